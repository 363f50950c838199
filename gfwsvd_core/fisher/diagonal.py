"""Diagonal empirical Fisher ``I = E[G * G]`` and the one-sided weights FWSVD derives from it."""

from __future__ import annotations

import torch

from ..stats import LayerStats


def diagonal_fisher(stats: LayerStats) -> torch.Tensor:
    """``mean_k G_k**2`` (m x n): the mean of per-sample squares, never the square of a mean."""
    return stats.diagonal_fisher


def fwsvd_weight(stats: LayerStats, side: str = "in") -> torch.Tensor:
    """FWSVD importance per row or column: the diagonal Fisher summed along the other dimension.

    ``side="in"`` gives one weight per input column (``sum_i I_ij``, n entries), the convention
    of public re-implementations; ``side="out"`` one per output row (``sum_j I_ij``, m entries),
    the paper's wording (Hsu et al. 2022). Returned as the diagonal of a PSD weight, so the
    solver uses its square root as the scaling.
    """
    fisher = stats.diagonal_fisher
    if side == "in":
        return fisher.sum(0)
    if side == "out":
        return fisher.sum(1)
    raise ValueError(f"unknown side {side!r}; valid: in, out")


def two_sided_diagonal(fisher: torch.Tensor, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Frobenius-best rank-one fit ``I_ij ~ r_i c_j`` (Perron vectors of the nonnegative I).

    Returns ``(r, c)`` with the scale split evenly: the diagonal analogue of the Kronecker fit,
    a teaching ablation between FWSVD and GFWSVD.
    """
    f = fisher.double()
    c = torch.ones(f.shape[1], dtype=f.dtype, device=f.device)
    for _ in range(iters):
        r = f @ c
        r = r / r.norm().clamp_min(1e-300)
        c_new = f.T @ r
        s = float(c_new.norm())
        c_new = c_new / max(s, 1e-300)
        if torch.allclose(c_new, c, rtol=1e-10, atol=1e-14):
            c = c_new
            break
        c = c_new
    s = float(r @ f @ c)
    return r * s**0.5, c * s**0.5
