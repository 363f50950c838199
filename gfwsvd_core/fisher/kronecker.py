"""Nearest Kronecker product of a layer's empirical Fisher (Van Loan-Pitsianis), matrix-free.

The empirical Fisher of per-sample gradients ``G_k`` (m x n) is
``F = 1/K sum_k vec(G_k) vec(G_k)^T`` (column-major vec, mn x mn; never formed). Its nearest
Kronecker product ``min ||F - A (x) B||_F`` (A: n x n input side, B: m x m output side) is the
top singular pair of the rearranged F, whose two maps are

    R(B)   = E_k[G_k^T B G_k]   (n x n)        R^T(A) = E_k[G_k A G_k^T]   (m x m).

Alternating least squares (``B <- R^T(A)/||A||^2``, ``A <- R(B)/||B||^2``) is power iteration
on ``R R^T``; started from the identity or the K-FAC factors every iterate is a congruence sum of
PSD matrices, so the result is symmetric PSD with no sign ambiguity. Error falls like
``(s2/s1)^2`` per sweep. The optional Lanczos route (``scipy.sparse.linalg.svds``) returns an
arbitrary sign, which is fixed here (the published code was bitten by it).

With factored samples (``G_k = D_k^T X_k``) the maps are computed as
``E[D_k^T (X_k A X_k^T) D_k]`` without forming ``G_k`` (cheaper when T is small; design.md 2).
Reference: C. Van Loan, N. Pitsianis, "Approximation with Kronecker products" (1993);
Chekalina et al., "Generalized Fisher-Weighted SVD" (arXiv 2505.17974).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ..stats import LayerStats, map_flops

#: bytes of intermediate tensors per chunk of samples
CHUNK_BYTES = 256 * 2**20
#: above this many samples, ||F||^2 is estimated from this many random partner samples
MAX_PARTNERS = 2048


@dataclass
class KroneckerFactors:
    """``F ~ A (x) B`` with ``A`` (n x n, input side) and ``B`` (m x m, output side), both PSD.

    The scale ``s1 = ||A (x) B||_F = ||A|| ||B||`` is split evenly, so predicted losses stay
    comparable across layers.
    """

    A: torch.Tensor
    B: torch.Tensor
    s1: float
    sweeps: int
    converged: bool
    method: str
    init: str
    fisher_norm: Optional[float] = None  # ||F||_F
    fisher_norm_estimated: bool = False  # True when estimated from a random subset of sample pairs
    s2: Optional[float] = None  # second singular value of the rearranged F (estimate)
    seconds: float = 0.0
    history: list = field(default_factory=list)  # s1 estimate per sweep

    @property
    def eta(self) -> Optional[float]:
        """Captured energy ``s1^2 / ||F||^2`` (1 for an exact Kronecker Fisher)."""
        if self.fisher_norm is None or self.fisher_norm == 0:
            return None
        return min(1.0, (self.s1 / self.fisher_norm) ** 2)

    @property
    def fit_error(self) -> Optional[float]:
        """Relative Kronecker fit error ``||F - A (x) B|| / ||F|| = sqrt(1 - eta)``."""
        eta = self.eta
        return None if eta is None else math.sqrt(max(0.0, 1.0 - eta))

    @property
    def gap(self) -> Optional[float]:
        """``s2 / s1``: near 1 means the Kronecker factors are ill-determined."""
        return None if self.s2 is None or self.s1 == 0 else self.s2 / self.s1

    def diagnostics(self) -> dict:
        return {
            "s1": self.s1, "eta": self.eta, "fit_error": self.fit_error, "gap": self.gap,
            "sweeps": self.sweeps, "converged": self.converged, "method": self.method,
            "init": self.init, "seconds": self.seconds, "eta_estimated": self.fisher_norm_estimated,
        }


class _Samples:
    """The two maps of the rearranged Fisher over stored samples, batched in chunks."""

    def __init__(self, G=None, X=None, D=None, device=None, dtype=None):
        # default: float64 samples stay float64 (tests, small layers); everything else float32
        src = G if G is not None else X
        if dtype is None:
            dtype = torch.float64 if src.dtype == torch.float64 else torch.float32
        if G is not None:
            self.G = G.to(device=device, dtype=dtype)
            self.K, self.m, self.n = self.G.shape
            self.T = None
            per_sample = 3 * self.m * self.n
        else:
            self.X = X.to(device=device, dtype=dtype)  # (K, T, n)
            self.D = D.to(device=device, dtype=dtype)  # (K, T, m)
            self.G = None
            self.K, self.T, self.n = self.X.shape
            self.m = self.D.shape[2]
            per_sample = self.T * (2 * self.m + 2 * self.n + 2 * self.T)
        self.chunk = max(1, CHUNK_BYTES // (4 * per_sample))
        self.norm_estimated = False
        self.device = (self.G if self.G is not None else self.X).device

    @property
    def storage(self) -> str:
        return "materialized" if self.G is not None else "factored"

    def out_map(self, A: torch.Tensor) -> torch.Tensor:
        """``E_k[G_k A G_k^T]`` (m x m) for a symmetric n x n ``A``."""
        acc = torch.zeros(self.m, self.m, dtype=A.dtype, device=self.device)
        if self.G is not None:
            for G in self.G.split(self.chunk):  # (c, m, n)
                GA = G @ A  # (c, m, n)
                c = G.shape[0]
                # sum_k (G_k A) G_k^T as one GEMM: (m, c*n) @ (c*n, m)
                acc += GA.permute(1, 0, 2).reshape(self.m, c * self.n) @ G.permute(1, 0, 2).reshape(self.m, c * self.n).T
        else:
            for X, D in zip(self.X.split(self.chunk), self.D.split(self.chunk)):
                S = torch.bmm(X @ A, X.transpose(1, 2))  # (c, T, T) = X_k A X_k^T
                SD = torch.bmm(S, D)  # (c, T, m)
                acc += D.reshape(-1, self.m).T @ SD.reshape(-1, self.m)  # sum_k D_k^T S_k D_k
        return acc / self.K

    def in_map(self, B: torch.Tensor) -> torch.Tensor:
        """``E_k[G_k^T B G_k]`` (n x n) for a symmetric m x m ``B``."""
        acc = torch.zeros(self.n, self.n, dtype=B.dtype, device=self.device)
        if self.G is not None:
            for G in self.G.split(self.chunk):  # (c, m, n)
                BG = B @ G  # (c, m, n)
                acc += G.reshape(-1, self.n).T @ BG.reshape(-1, self.n)  # sum_k G_k^T (B G_k)
        else:
            for X, D in zip(self.X.split(self.chunk), self.D.split(self.chunk)):
                S = torch.bmm(D @ B, D.transpose(1, 2))  # (c, T, T) = D_k B D_k^T
                SX = torch.bmm(S, X)  # (c, T, n)
                acc += X.reshape(-1, self.n).T @ SX.reshape(-1, self.n)  # sum_k X_k^T S_k X_k
        return acc / self.K

    def fisher_norm_sq(self) -> float:
        """``||F||_F^2 = 1/K^2 sum_{k,l} <G_k, G_l>^2`` from the Gram of the samples."""
        if self.G is None and self.T is not None:
            cost_factored = self.K * self.K * self.T * self.T * (self.m + self.n)
            cost_materialized = self.K * self.T * self.m * self.n + self.K * self.K * self.m * self.n
            if cost_factored < cost_materialized:
                return self._norm_factored()
        total = 0.0
        chunks = list(range(0, self.K, self.chunk))
        for i in chunks:
            Gi = self._g(i).reshape(-1, self.m * self.n).double()
            for j in chunks:
                if j < i:
                    continue
                Gj = Gi if j == i else self._g(j).reshape(-1, self.m * self.n).double()
                blk = float(((Gi @ Gj.T) ** 2).sum())
                total += blk if j == i else 2 * blk
        return total / self.K**2

    def _g(self, start: int) -> torch.Tensor:
        if self.G is not None:
            return self.G[start:start + self.chunk]
        X, D = self.X[start:start + self.chunk], self.D[start:start + self.chunk]
        return torch.bmm(D.transpose(1, 2), X)  # (c, m, n)

    def _norm_factored(self) -> float:
        # <G_k, G_l> = sum((D_k D_l^T) * (X_k X_l^T)), over T x T blocks. With many samples
        # (e.g. token samples) the K^2 pairs are estimated from MAX_PARTNERS random partners l,
        # which keeps the estimate of ||F||^2 unbiased.
        Xf = self.X.reshape(-1, self.n).double()
        Df = self.D.reshape(-1, self.m).double()
        T, K = self.T, self.K
        L = K
        if K > MAX_PARTNERS:
            gen = torch.Generator().manual_seed(0)
            idx = torch.randperm(K, generator=gen)[:MAX_PARTNERS].to(Xf.device)
            L = MAX_PARTNERS
            tok = (idx[:, None] * T + torch.arange(T, device=Xf.device)[None, :]).reshape(-1)
            Xl, Dl = Xf[tok], Df[tok]
            self.norm_estimated = True
        else:
            Xl, Dl = Xf, Df
        total = 0.0
        rows = max(1, CHUNK_BYTES // (8 * T * T * L))
        for i in range(0, K, rows):
            Xi, Di = Xf[i * T:(i + rows) * T], Df[i * T:(i + rows) * T]
            P = (Di @ Dl.T) * (Xi @ Xl.T)  # (c*T, L*T)
            inner = P.reshape(-1, T, L, T).sum(dim=(1, 3))  # (c, L)
            total += float((inner**2).sum())
        return total / (K * L)


def _as_samples(source, device=None, dtype=None) -> tuple[_Samples, Optional[LayerStats]]:
    stats = None
    if isinstance(source, LayerStats):
        stats = source
        if source.G is None and source.X is None:
            raise ValueError(f"layer {source.name}: per-sample gradients were not collected (add 'samples' to kinds)")
        if source.num_samples == 0:
            raise ValueError(f"layer {source.name}: empty statistics (no calibration samples)")
        if source.G is not None:
            return _Samples(G=source.G, device=device, dtype=dtype), stats
        return _Samples(X=source.X, D=source.D, device=device, dtype=dtype), stats
    if isinstance(source, torch.Tensor):
        if source.dim() != 3:
            raise ValueError(f"per-sample gradients must have shape (K, m, n), got {tuple(source.shape)}")
        if source.shape[0] == 0:
            raise ValueError("empty statistics: no per-sample gradients")
        if not torch.isfinite(source).all():
            raise ValueError("per-sample gradients contain NaN or inf")
        return _Samples(G=source, device=device, dtype=dtype), None
    if isinstance(source, (tuple, list)) and len(source) == 2:
        X, D = source
        if X.dim() != 3 or D.dim() != 3 or X.shape[:2] != D.shape[:2]:
            raise ValueError(
                f"factored samples must be X (K, T, n) and D (K, T, m) with equal K and T, got "
                f"{tuple(X.shape)} and {tuple(D.shape)}"
            )
        if X.shape[0] == 0:
            raise ValueError("empty statistics: no per-sample gradients")
        if not (torch.isfinite(X).all() and torch.isfinite(D).all()):
            raise ValueError("factored samples contain NaN or inf")
        return _Samples(X=X, D=D, device=device, dtype=dtype), None
    raise ValueError("nearest_kronecker takes LayerStats, a tensor G (K, m, n) or a pair (X, D)")


def nearest_kronecker(
    source: Union[LayerStats, torch.Tensor, tuple],
    init: str = "kfac",
    method: str = "als",
    tol: float = 1e-6,
    max_sweeps: int = 50,
    diagnostics: bool = True,
    gap_sweeps: int = 8,
    device=None,
    dtype: Optional[torch.dtype] = None,
    seed: int = 0,
) -> KroneckerFactors:
    """Nearest Kronecker product ``A (x) B`` of the empirical Fisher of per-sample gradients.

    Args:
        source: ``LayerStats`` (with samples), a tensor ``G`` (K, m, n), or ``(X, D)`` of shapes
            (K, T, n), (K, T, m).
        init: "identity" or "kfac" (``sum x x^T`` of the samples; falls back to identity when
            unavailable). Both have a positive overlap with the PSD top pair.
        method: "als" (power iteration, PSD by construction) or "lanczos" (scipy svds with a
            sign fix and symmetrisation).
        tol: stop when the unit-norm input factor changes by less than ``tol`` (Frobenius) in a
            sweep; the Kronecker product is then accurate to about ``tol * g / (1 - g)`` with
            ``g = (s2/s1)^2``. (A test on the s1 estimate alone stops far too early: it
            converges like the square of the factor error.)
        dtype: arithmetic of the maps: None (float32, or float64 for float64 samples) or an
            explicit dtype. float32 is ~3x faster on CPU; on inputs whose channel spectra span
            many decades its rounding moves the factors by ~1e-4 relatively (bench/kronecker.py).
        diagnostics: also compute ``||F||`` (for eta and the fit error) and estimate ``s2`` by
            ``gap_sweeps`` sweeps of deflated power iteration.
    Returns:
        :class:`KroneckerFactors` on the samples' device, float32 (float64 for float64 samples;
        in float32 the fit error ``sqrt(1 - eta)`` cannot resolve values below ~3e-4).
    """
    if init not in ("identity", "kfac"):
        raise ValueError(f"unknown init {init!r}; valid: identity, kfac")
    if method not in ("als", "lanczos"):
        raise ValueError(f"unknown method {method!r}; valid: als, lanczos")
    t0 = time.perf_counter()
    S, stats = _as_samples(source, device, dtype)
    A0, used_init = _initial(S, stats, init)
    if method == "als":
        A, B, s1, sweeps, converged, hist = _als(S, A0, tol, max_sweeps)
    else:
        A, B, s1, sweeps, converged, hist = _lanczos(S, A0, tol, max_sweeps)
    res = KroneckerFactors(A=A, B=B, s1=s1, sweeps=sweeps, converged=converged, method=method,
                           init=used_init, history=hist)
    if diagnostics:
        res.fisher_norm = math.sqrt(max(S.fisher_norm_sq(), 0.0))
        res.fisher_norm_estimated = S.norm_estimated
        res.s2 = _second_singular_value(S, A, B, s1, gap_sweeps, seed)
    res.seconds = time.perf_counter() - t0
    return res


def _initial(S: _Samples, stats, init: str):
    dtype = (S.G if S.G is not None else S.X).dtype
    eye = torch.eye(S.n, dtype=dtype, device=S.device)
    if init == "identity":
        return eye, "identity"
    if stats is not None and stats.xx_sum is not None:
        return stats.xx_sum.to(device=S.device, dtype=dtype), "kfac"
    if S.G is None:
        Xf = S.X.reshape(-1, S.n)
        return Xf.T @ Xf, "kfac"
    return eye, "identity"


def _unit(M: torch.Tensor) -> tuple[torch.Tensor, float]:
    nrm = float(torch.linalg.matrix_norm(M))
    return (M / nrm if nrm > 0 else M), nrm


def _als(S: _Samples, A0, tol, max_sweeps):
    a, _ = _unit(A0)
    hist = []
    converged = False
    sweeps = 0
    b = None
    sigma = 0.0
    for sweeps in range(1, max_sweeps + 1):
        b, _ = _unit(S.out_map(a))  # B <- R^T(A), normalised
        a_new, sigma = _unit(S.in_map(b))  # A <- R(B); ||R(b)|| -> s1 from below
        hist.append(sigma)
        if sigma == 0:
            break
        # stop on the change of the (unit) factor itself: s1 converges like its square
        change = float(torch.linalg.matrix_norm(a_new - a))
        a = a_new
        if change <= tol:
            converged = True
            break
    a = 0.5 * (a + a.T)
    b = 0.5 * (b + b.T)
    s1 = sigma  # = <a, R(b)>: the Rayleigh quotient of the final pair
    r = math.sqrt(max(s1, 0.0))
    return a * r, b * r, s1, sweeps, converged, hist


def _lanczos(S: _Samples, A0, tol, max_sweeps):
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, svds

    n, m = S.n, S.m
    dev = S.device
    count = [0]

    def matvec(v):  # vec(B) (m*m) -> vec(R(B)) (n*n)
        count[0] += 1
        B = torch.as_tensor(np.asarray(v).reshape(m, m), dtype=A0.dtype, device=dev)
        return S.in_map(0.5 * (B + B.T)).double().cpu().numpy().reshape(-1)

    def rmatvec(u):
        A = torch.as_tensor(np.asarray(u).reshape(n, n), dtype=A0.dtype, device=dev)
        return S.out_map(0.5 * (A + A.T)).double().cpu().numpy().reshape(-1)

    op = LinearOperator((n * n, m * m), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    # scipy wants the start vector on the smaller side (length min(n^2, m^2))
    start = A0 if n * n <= m * m else S.out_map(A0)
    v0 = (start / torch.linalg.matrix_norm(start)).double().cpu().numpy().reshape(-1)
    u, s, vt = svds(op, k=1, tol=tol, v0=v0, maxiter=max_sweeps * 10)
    dtype = A0.dtype
    A = torch.as_tensor(u[:, 0].reshape(n, n), dtype=dtype, device=dev)
    B = torch.as_tensor(vt[0].reshape(m, m), dtype=dtype, device=dev)
    if float(torch.trace(A)) < 0:  # svds returns an arbitrary sign: the PSD pair has trace > 0
        A, B = -A, -B
    A, B = 0.5 * (A + A.T), 0.5 * (B + B.T)
    s1 = float(s[0])
    r = math.sqrt(s1)
    return A * r, B * r, s1, count[0], True, [s1]


def _second_singular_value(S: _Samples, A, B, s1, sweeps: int, seed: int) -> Optional[float]:
    """Lower estimate of ``s2`` by power iteration on the deflated rearrangement."""
    if s1 <= 0 or sweeps <= 0:
        return None
    a1, _ = _unit(A)
    b1, _ = _unit(B)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(S.n, S.n, generator=gen, dtype=A.dtype).to(S.device)
    a = a + a.T
    a = a - (a * a1).sum() * a1
    a, _ = _unit(a)
    sigma = 0.0
    for _ in range(sweeps):
        b = S.out_map(a) - s1 * (a1 * a).sum() * b1  # deflated R^T
        b, _ = _unit(b)
        a = S.in_map(b) - s1 * (b1 * b).sum() * a1  # deflated R
        a, sigma = _unit(a)
    return sigma


def kronecker_flops(m: int, n: int, K: int, T: Optional[int]) -> float:
    """Flops of one ALS sweep (two maps)."""
    return 2 * K * map_flops(m, n, T or 0, "factored" if T else "materialized")
