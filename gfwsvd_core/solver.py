"""The one solver: rank-r minimiser of a two-sided weighted Frobenius error.

For PSD weights ``left = L_out L_out^T`` (m x m, output side) and ``right = L_in L_in^T`` (n x n,
input side) the rank-r matrix minimising ``||L_out^T (W - W_r) L_in||_F`` is

    W~ = L_out^T W L_in = U S V^T,        W_r = L_out^{-T} [W~]_r L_in^{-1}

(a change of variables and Eckart-Young). The minimum is ``sum_{i>r} s_i^2``; when the weights
are Kronecker factors of the Fisher (``F ~ right (x) left``), half of it is the predicted loss
increase ``1/2 tr(dW^T B dW A)``, so one SVD gives the whole curve over r.

Only one side is ever inverted, by triangular solves in float64:
``W_r = L_out^{-T} U_r (U_r^T L_out^T W)`` or ``W_r = (W L_in V_r)(V_r^T L_in^{-1})``; the better
conditioned side is chosen. Weights may be None (identity), a vector (diagonal) or a matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .fisher.psd import Root, as_weight, root


@dataclass
class WeightedSVDResult:
    """Factors of a rank-r layer: ``W_r = up @ down``; ``up`` m x r, ``down`` r x n."""

    up: torch.Tensor
    down: torch.Tensor
    singular_values: torch.Tensor  # of the weighted matrix W~, descending
    predicted_loss: torch.Tensor  # entry k: 1/2 sum_{i>k} s_i^2, k = 0 .. min(m, n)
    rank: int
    info: dict

    @property
    def weight(self) -> torch.Tensor:
        return self.up @ self.down


class _KeptRoot:
    """What a decomposition keeps of a :class:`Root`: its diagnostics, not its matrix.

    ``damping``, ``fell_back``, ``condition``, ``zero``, ``diagonal``, ``requested``, ``dim``,
    ``info()`` and ``warnings()`` are stored values (free). ``L`` is recomputed on demand from the
    weight as it was passed in (held by reference, never copied: the method's ``Weights`` keep it
    anyway) with the same requested damping, which reproduces the root exactly; that costs one
    Cholesky factorisation per access, so only rarely used diagnostics such as
    :func:`gfwsvd_core.explore.own_weighted_error` read it. The weight must not be edited in place
    afterwards.
    """

    info = Root.info
    warnings = Root.warnings

    def __init__(self, rt: Root, weight: torch.Tensor, device, name: str):
        self.diagonal = rt.diagonal
        self.damping = rt.damping
        self.fell_back = rt.fell_back
        self.condition = rt.condition
        self.zero = rt.zero
        self.requested = rt.requested
        self.kind = rt.kind
        self.floored = rt.floored
        self._dim = rt.dim
        self._weight = weight
        self._device = device
        self._name = name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def L(self) -> torch.Tensor:
        return root(self._weight.to(self._device), self.requested, self._name, self.kind).L

    @property
    def eig(self) -> Optional[tuple]:
        """Eigen-roots only: ``(U, s)``, recomputed like :attr:`L` (None for Cholesky roots)."""
        if self.kind != "eigen":
            return None
        return root(self._weight.to(self._device), self.requested, self._name, self.kind).eig

    def __repr__(self) -> str:
        return f"_KeptRoot(dim={self._dim}, diagonal={self.diagonal}, {self.info()})"


class WeightedDecomposition:
    """The SVD of ``W~ = L_out^T W L_in``; truncates to any rank without recomputing.

    Memory: only what truncation needs is kept - the singular values ``S`` (float64, k =
    min(m, n)) and the two mapped-back, column-balanced factors ``up`` (m x k) and ``down``
    (k x n) in W's dtype, of which ``factors(r)`` is the first r columns / rows. That is
    ``k (m + n)`` numbers, at most twice W's size (about 1.8x for a float32 64 x 48 weight;
    the former float64 copy of W, U, V and both float64 roots were about 10-13x). ``left`` and
    ``right`` keep the roots' diagnostics; their ``L`` is recomputed on demand (see
    :class:`_KeptRoot`).
    """

    def __init__(self, W: torch.Tensor, left=None, right=None, damping: float = 0.0, root_kind: str = "cholesky"):
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            raise ValueError("W must be a 2-D tensor (out x in)")
        if W.numel() == 0:
            raise ValueError("W is empty")
        if not torch.isfinite(W).all():
            raise ValueError("W contains NaN or inf")
        m, n = W.shape
        self.shape = (m, n)
        self.dtype = W.dtype if W.is_floating_point() else torch.float32
        Wd = W.detach().to(torch.float64)  # a temporary: not kept
        left = as_weight(left, m, "left (output-side)")
        right = as_weight(right, n, "right (input-side)")
        lrt = None if left is None else root(left.to(W.device), damping, "left (output-side)", root_kind)
        rrt = None if right is None else root(right.to(W.device), damping, "right (input-side)", root_kind)
        self.warnings: list[str] = []
        for side, rt in (("output-side", lrt), ("input-side", rrt)):
            if rt is not None:
                self.warnings += rt.warnings(side)
        # a zero weighting: W~ = 0, so every rank loses nothing the loss can see; the factors are
        # then plain SVD's (any rank-r matrix is optimal, this one is the most faithful to W)
        self.zero_weight = any(rt is not None and rt.zero for rt in (lrt, rrt))
        if self.zero_weight:
            self.warnings.append("predicted loss 0 at every rank; the factors are plain SVD's")
            lrt = rrt = None
        self.left: Optional[_KeptRoot] = None if lrt is None else _KeptRoot(lrt, left, W.device, "left (output-side)")
        self.right: Optional[_KeptRoot] = None if rrt is None else _KeptRoot(rrt, right, W.device, "right (input-side)")
        Wt = _apply_left(lrt, Wd)  # L_out^T W
        Wt = _apply_right(rrt, Wt)  # L_out^T W L_in
        U, self.S, Vh = torch.linalg.svd(Wt, full_matrices=False)  # (m,k), (k,), (k,n)
        del Wt
        V = Vh.T  # (n, k)
        # invert the better-conditioned side (an absent or diagonal side is trivial to invert)
        self.inverted = "out" if _cost(lrt) <= _cost(rrt) else "in"
        if self.inverted == "out":
            up = _solve_left_t(lrt, U)  # L_out^{-T} U            (m, k)
            down = U.T @ _apply_left(lrt, Wd)  # U^T L_out^T W    (k, n)
        else:
            up = _apply_right(rrt, Wd) @ V  # W L_in V             (m, k)
            down = _solve_right_t(rrt, V).T  # V^T L_in^{-1}       (k, n)
        del U, V, Vh, Wd
        # balance: scale column i of up and row i of down to equal norms (product unchanged);
        # column i's scale depends on column i only, so truncating afterwards is exact
        cu = up.norm(dim=0)
        cd = down.norm(dim=1)
        c = torch.where((cu > 0) & (cd > 0), torch.sqrt(cd / cu.clamp_min(1e-300)), torch.ones_like(cu))
        self._up = (up * c).to(self.dtype)  # (m, k), what factors(k) returns
        self._down = (down / c[:, None]).to(self.dtype)  # (k, n)

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    @property
    def singular_values(self) -> torch.Tensor:
        """Of the weighted matrix ``W~`` (all zero for a zero weighting)."""
        return torch.zeros_like(self.S) if self.zero_weight else self.S

    @property
    def predicted_loss(self) -> torch.Tensor:
        """Entry k: half the tail energy ``1/2 sum_{i>k} s_i^2`` for k = 0 .. min(m, n)."""
        if self.zero_weight:
            return torch.zeros(self.S.numel() + 1, dtype=torch.float64, device=self.S.device)
        sq = self.S.double() ** 2
        tail = torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0])  # tail[k] = sum_{i>=k}
        return 0.5 * torch.cat([tail, tail.new_zeros(1)])

    def check_rank(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int):
            try:
                if int(rank) != rank:
                    raise ValueError
                rank = int(rank)
            except (TypeError, ValueError):
                raise ValueError(f"rank must be an integer, got {rank!r}") from None
        if rank < 1 or rank > self.max_rank:
            raise ValueError(f"rank must be between 1 and min(m, n) = {self.max_rank}, got {rank}")
        return rank

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` with ``up @ down = W_r``, balanced column/row norms, in W's dtype.

        Fresh contiguous tensors (copies of the kept factors' first ``rank`` columns / rows), so
        editing them cannot change this decomposition.
        """
        r = self.check_rank(rank)
        fmt = torch.contiguous_format
        return self._up[:, :r].clone(memory_format=fmt), self._down[:r].clone(memory_format=fmt)

    def reconstruct(self, rank: int) -> torch.Tensor:
        """``W_r`` (m x n, float64) from the factors in W's dtype (``factors(rank)`` multiplied)."""
        r = self.check_rank(rank)
        return self._up[:, :r].double() @ self._down[:r].double()

    def result(self, rank: int) -> WeightedSVDResult:
        up, down = self.factors(rank)
        info = {"inverted_side": self.inverted}
        for side, rt in (("left", self.left), ("right", self.right)):
            if rt is not None:
                info.update({f"{side}_{k}": v for k, v in rt.info().items()})
        return WeightedSVDResult(up, down, self.singular_values.to(self.dtype), self.predicted_loss, rank, info)

    def to_(self, device) -> "WeightedDecomposition":
        """Move what truncation needs (``S``, the factors) to ``device``, in place. Offloading the
        decompositions of a large model to host memory keeps only the layer being solved on the
        accelerator; ``factors(r)`` then returns host tensors, which the replacing layer moves to
        its own device."""
        self.S, self._up, self._down = (t.to(device) for t in (self.S, self._up, self._down))
        return self

    def nbytes(self) -> int:
        """Bytes of the tensors this decomposition owns (the weights passed in are the caller's)."""
        return sum(t.numel() * t.element_size() for t in (self.S, self._up, self._down))


def decompose(W: torch.Tensor, left=None, right=None, damping: float = 0.0,
              root_kind: str = "cholesky") -> WeightedDecomposition:
    """SVD of the weighted matrix, reusable for every rank (sliders re-truncate this).
    ``root_kind``: "cholesky" (damping added to the weight) or "eigen" (eigenvalues floored)."""
    return WeightedDecomposition(W, left, right, damping, root_kind)


def weighted_svd(W: torch.Tensor, rank: int, left=None, right=None, damping: float = 0.0) -> WeightedSVDResult:
    """Rank-``rank`` minimiser of ``||L_out^T (W - W_r) L_in||_F`` with ``left``/``right`` PSD weights.

    Args:
        W: m x n weight (``nn.Linear`` layout).
        rank: 1 .. min(m, n).
        left: output-side weight: None (identity), a (m,) vector of diagonal entries or an m x m
            PSD matrix. right: the same for the input side (n).
        damping: relative damping added to matrix weights before their roots (see ``psd.root``).
    """
    dec = decompose(W, left, right, damping)
    return dec.result(dec.check_rank(rank))


# --- root helpers: a Root is None (identity), a diagonal vector or a lower-triangular factor


def _cost(rt: Optional[Root]) -> float:
    return 0.0 if rt is None else rt.condition


def _apply_left(rt: Optional[Root], M: torch.Tensor) -> torch.Tensor:
    """``L^T M``."""
    if rt is None:
        return M
    if rt.diagonal:
        return rt.L[:, None] * M
    if rt.eig is not None:
        U, s = rt.eig
        return s.sqrt()[:, None] * (U.T @ M)
    return rt.L.T @ M


def _apply_right(rt: Optional[Root], M: torch.Tensor) -> torch.Tensor:
    """``M L``."""
    if rt is None:
        return M
    if rt.diagonal:
        return M * rt.L[None, :]
    if rt.eig is not None:
        U, s = rt.eig
        return (M @ U) * s.sqrt()[None, :]
    return M @ rt.L


def _solve_left_t(rt: Optional[Root], M: torch.Tensor) -> torch.Tensor:
    """``L^{-T} M`` by a triangular solve."""
    if rt is None:
        return M
    if rt.diagonal:
        return M / rt.L[:, None]
    if rt.eig is not None:
        U, s = rt.eig
        return U @ (M / s.sqrt()[:, None])
    return torch.linalg.solve_triangular(rt.L.T, M, upper=True)


_solve_right_t = _solve_left_t  # V^T L^{-1} = (L^{-T} V)^T
