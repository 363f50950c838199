"""The closed-form update after truncation (SVD-LLM's layer-wise update, seen as least squares).

A truncation ``W_r = up_r down_r`` keeps ``r`` input directions (the rows of ``down_r``). Given
those, the output side that reproduces the dense layer's outputs best on the calibration inputs
``X`` solves ``min_U ||(W - U down_r) X||_F``: ``U = W C down_r^T (down_r C down_r^T)^{-1}`` with
the input Gram ``C = X X^T``. Every method's truncation can be followed by it; for SVD-LLM, whose
truncation already minimises the output error, it changes nothing.

The updated truncations are nested again: with ``down C down^T = L L^T`` (Cholesky, ``L`` lower
triangular) and ``Q = L^{-1} down``, the rows of ``Q`` are C-orthonormal and span the same nested
subspaces, so ``W'_r = (W C Q_r^T) Q_r``. One factorisation gives every rank, and the exact
empirical-Fisher curve and rank allocation work on it unchanged.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .fisher.psd import damp, root
from .solver import WeightedDecomposition

#: relative damping of the input Gram (``C + lambda tr(C)/n I``): keeps the update defined when
#: the calibration inputs do not span every direction (fewer tokens than inputs, dead channels)
UPDATE_DAMPING = 1e-6


class UpdatedDecomposition:
    """A decomposition whose truncations are followed by the closed-form update.

    Behaves as :class:`~gfwsvd_core.solver.WeightedDecomposition` (``factors``, ``reconstruct``,
    ``max_rank``); ``singular_values`` and ``predicted_loss`` stay the method's own (before the
    update: they are what the method's weighting predicts, the exact quadratic is recomputed on
    the updated factors).
    """

    def __init__(self, base: WeightedDecomposition, W: torch.Tensor, gram: torch.Tensor,
                 damping: float = UPDATE_DAMPING):
        m, n = base.shape
        if tuple(gram.shape) != (n, n):
            raise ValueError(f"the input Gram has shape {tuple(gram.shape)}, expected {(n, n)}")
        self.base = base
        self.shape = base.shape
        self.dtype = base.dtype
        self.left, self.right, self.zero_weight = base.left, base.right, base.zero_weight
        self.warnings = list(base.warnings)
        dev = base._down.device
        C = damp(gram.detach().to(dev, torch.float64), damping)
        D = base._down.double()  # (k, n), every rank's input directions
        rt = root(D @ C @ D.T, 0.0, "updated input directions")  # L L^T = D C D^T (+ damping if singular)
        if rt.fell_back:
            raise ValueError("the closed-form update failed: the kept input directions carry no calibration input")
        if rt.damping > 0:
            self.warnings.append(f"closed-form update: the kept directions are nearly dependent on the calibration "
                                 f"inputs; damping {rt.damping:g} added")
        Q = torch.linalg.solve_triangular(rt.L, D, upper=False)  # (k, n), Q C Q^T = I
        up = W.detach().to(dev, torch.float64) @ (C @ Q.T)  # (m, k)
        cu, cd = up.norm(dim=0), Q.norm(dim=1)
        c = torch.where((cu > 0) & (cd > 0), torch.sqrt(cd / cu.clamp_min(1e-300)), torch.ones_like(cu))
        self._up = (up * c).to(self.dtype)
        self._down = (Q / c[:, None]).to(self.dtype)
        self.damping = damping

    max_rank = WeightedDecomposition.max_rank
    check_rank = WeightedDecomposition.check_rank
    factors = WeightedDecomposition.factors
    reconstruct = WeightedDecomposition.reconstruct

    @property
    def singular_values(self) -> torch.Tensor:
        return self.base.singular_values

    @property
    def predicted_loss(self) -> torch.Tensor:
        return self.base.predicted_loss

    @property
    def inverted(self) -> str:
        return self.base.inverted

    def result(self, rank: int):
        res = self.base.result(rank)
        res.up, res.down = self.factors(rank)
        res.info["update"] = True
        return res

    def nbytes(self) -> int:
        return self.base.nbytes()


def closed_form_update(dec: WeightedDecomposition, W: torch.Tensor, gram: torch.Tensor,
                       damping: float = UPDATE_DAMPING) -> UpdatedDecomposition:
    """``dec``'s truncations, each with its output side re-solved on the calibration inputs."""
    return UpdatedDecomposition(dec, W, gram, damping)


@torch.no_grad()
def output_errors(dec, W: torch.Tensor, gram: torch.Tensor, ranks: Sequence[int]) -> list[Optional[float]]:
    """Relative output error ``||(W - W_r) X||_F / ||W X||_F`` at each rank (``C = X X^T``):
    how well the truncated layer reproduces its dense outputs on the calibration inputs."""
    C = gram.detach().double()
    Wd = W.detach().double().to(C.device)
    base = float(((Wd @ C) * Wd).sum())
    out: list[Optional[float]] = []
    for r in ranks:
        if base <= 0:
            out.append(None)
            continue
        dW = Wd - dec.reconstruct(int(r)).to(C.device)
        out.append(max(float(((dW @ C) * dW).sum()), 0.0) ** 0.5 / base ** 0.5)
    return out


def update_effect(dec, W: torch.Tensor, gram: torch.Tensor, ranks: Sequence[int]) -> dict:
    """One layer under one method: the relative output error at each rank without and with the
    closed-form update (the Layer lab's chart). ``dec``: a decomposition (not yet updated)."""
    upd = closed_form_update(dec, W, gram)
    return {"ranks": [int(r) for r in ranks], "without": output_errors(dec, W, gram, ranks),
            "with": output_errors(upd, W, gram, ranks)}
