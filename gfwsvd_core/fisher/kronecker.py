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
``E[D_k^T (X_k A X_k^T) D_k]`` without forming ``G_k`` (cheaper when ``T`` is small next to m and n).
Reference: C. Van Loan, N. Pitsianis, "Approximation with Kronecker products" (1993);
Chekalina et al., "Generalized Fisher-Weighted SVD" (arXiv 2505.17974).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ..gram import _blocks, add_sym_product, half_tril, matmul_tril, tril_matmul
from ..stats import LayerStats

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
    psd_clipped: float = 0.0  # share of A and B removed by the PSD projection, ||M - M+||_F / ||M||_F (~0)
    residual_bound: Optional[float] = None  # Krylov: bound on sin(angle) of the factors to the exact ones
    refine_steps: int = 0  # float64 map pairs after the float32 solve

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
            "psd_clipped": self.psd_clipped, "residual_bound": self.residual_bound, "refine_steps": self.refine_steps,
        }


class _Samples:
    """The two maps of the rearranged Fisher over stored samples, batched in chunks.

    Materialised samples are kept as chunks laid out (m, c, n), so that ``sum_k G_k A G_k^T``
    and ``sum_k G_k^T B G_k`` are plain GEMMs over views (no per-map copies); the maps' outputs
    are symmetric, and the m x m one is computed by its upper block triangle only.
    """

    def __init__(self, G=None, X=None, D=None, device=None, dtype=None, shard=None, total=None):
        # default: float64 samples stay float64 (tests, small layers); everything else float32
        src = G if G is not None else X
        if dtype is None:
            dtype = torch.float64 if src.dtype == torch.float64 else torch.float32
        if G is not None:
            self.materialized = True
            self.K, self.m, self.n = G.shape
            self.T = None
            per_sample = 3 * self.m * self.n
            self.chunk = max(1, CHUNK_BYTES // (4 * per_sample))
            # one relaid-out copy of the samples (the source stays the caller's)
            self._Gm = [g.to(device=device, dtype=dtype).permute(1, 0, 2).contiguous() for g in G.split(self.chunk)]
            self.dtype = self._Gm[0].dtype
            self.device = self._Gm[0].device
        else:
            self.materialized = False
            self.X = X.to(device=device, dtype=dtype)  # (K, T, n)
            self.D = D.to(device=device, dtype=dtype)  # (K, T, m)
            self.K, self.T, self.n = self.X.shape
            self.m = self.D.shape[2]
            per_sample = self.T * (2 * self.m + 2 * self.n + 2 * self.T)
            self.chunk = max(1, CHUNK_BYTES // (4 * per_sample))
            self.dtype = self.X.dtype
            self.device = self.X.device
        self.norm_estimated = False
        # under torchrun the other ranks hold the rest of the samples: every map and sum over
        # samples is this rank's part, all-reduced, over the job's K (``total``)
        self.shard = shard
        self.total = self.K if total is None else int(total)

    def _mean(self, acc: torch.Tensor) -> torch.Tensor:
        """``acc`` (a sum over this rank's samples) as the mean over all the job's samples."""
        if self.shard is not None:
            acc = self.shard.sum(acc)
        return acc / self.total

    @property
    def storage(self) -> str:
        return "materialized" if self.materialized else "factored"

    def out_map(self, A: torch.Tensor) -> torch.Tensor:
        """``E_k[G_k A G_k^T]`` (m x m) for a symmetric n x n ``A``."""
        acc = torch.zeros(self.m, self.m, dtype=A.dtype, device=self.device)
        if self.materialized:
            # the larger side gets the cheaper product: a wide input (n > m) by the half
            # triangle of A (G L G^T plus its transpose), a tall one by the symmetric output
            wide = self.n > self.m and _blocks(self.n) > 1
            L = half_tril(A) if wide else None
            for Gm in self._Gm:  # (m, c, n)
                Gm = Gm.to(A.dtype)
                c = Gm.shape[1]
                Gf = Gm.reshape(self.m, c * self.n)
                if wide:
                    GL = matmul_tril(Gm.reshape(self.m * c, self.n), L).reshape(self.m, c * self.n)
                    acc += GL @ Gf.T  # sum_k (G_k L) G_k^T
                else:
                    GA = torch.matmul(Gm, A).reshape(self.m, c * self.n)  # [G_k A]_k side by side
                    add_sym_product(acc, GA, Gf)  # sum_k (G_k A) G_k^T
            if wide:
                acc = acc + acc.T
        else:
            for X, D in zip(self.X.split(self.chunk), self.D.split(self.chunk)):
                X, D = X.to(A.dtype), D.to(A.dtype)
                S = torch.bmm(X @ A, X.transpose(1, 2))  # (c, T, T) = X_k A X_k^T
                SD = torch.bmm(S, D)  # (c, T, m)
                add_sym_product(acc, D.reshape(-1, self.m).T, SD.reshape(-1, self.m).T)  # sum_k D_k^T S_k D_k
        return self._mean(acc)

    def in_map(self, B: torch.Tensor) -> torch.Tensor:
        """``E_k[G_k^T B G_k]`` (n x n) for a symmetric m x m ``B``.

        Factored: with ``B = L + L^T`` (``L`` its lower triangle, diagonal halved) the map is
        ``E[X^T (D L D^T) X]`` plus its transpose, and ``D L`` skips the zero blocks of ``L``
        (0.62x the flops of ``D B`` with four blocks; measured 0.77x of the map on the
        1536 x 384 benchmark shape). Materialised samples take ``L G`` by row blocks when B is
        the larger side (0.85x of the map on 1536 x 384) and otherwise compute only the upper
        block triangle of the symmetric n x n output (0.8x on 384 x 1536); ``out_map`` mirrors
        this.
        """
        acc = torch.zeros(self.n, self.n, dtype=B.dtype, device=self.device)
        if self.materialized:
            # as out_map: a tall layer (m > n) by the half triangle of B, a wide one by the
            # symmetric output
            tall = self.m > self.n and _blocks(self.m) > 1
            L = half_tril(B) if tall else None
            for Gm in self._Gm:  # (m, c, n)
                Gm = Gm.to(B.dtype)
                c = Gm.shape[1]
                Gf = Gm.reshape(self.m, c * self.n)
                if tall:
                    LG = tril_matmul(L, Gf).reshape(self.m * c, self.n)
                    acc += Gm.reshape(self.m * c, self.n).T @ LG  # sum_k G_k^T (L G_k)
                else:
                    BG = (B @ Gf).reshape(self.m * c, self.n)  # rows (i, k): (B G_k)[i]
                    add_sym_product(acc, Gm.reshape(self.m * c, self.n).T, BG.T)  # sum_k G_k^T (B G_k)
            return self._mean(acc + acc.T if tall else acc)
        L = half_tril(B)
        for X, D in zip(self.X.split(self.chunk), self.D.split(self.chunk)):
            X, D = X.to(B.dtype), D.to(B.dtype)
            c = X.shape[0]
            DL = matmul_tril(D.reshape(-1, self.m), L).reshape(c, self.T, self.m)
            S = torch.bmm(DL, D.transpose(1, 2))  # (c, T, T) = D_k L D_k^T (its symmetric part is half of D_k B D_k^T)
            SX = torch.bmm(S, X)  # (c, T, n)
            acc += X.reshape(-1, self.n).T @ SX.reshape(-1, self.n)  # sum_k X_k^T S_k X_k
        return self._mean(acc + acc.T)

    def fisher_norm_sq(self) -> float:
        """``||F||_F^2 = 1/K^2 sum_{k,l} <G_k, G_l>^2`` from the Gram of the samples."""
        if self.shard is not None:
            return self._norm_sharded()
        if not self.materialized:
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
        if self.materialized:
            return self._Gm[start // self.chunk].permute(1, 0, 2)  # (c, m, n) view
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


    def _norm_sharded(self) -> float:
        """``||F||^2`` when the samples are spread over ranks: every rank's samples (or, beyond
        ``MAX_PARTNERS`` in all, a random subset in proportion to each rank's count) are sent to
        all in turn and paired with the local ones, chunk by chunk; the sums are all-reduced."""
        sh, K = self.shard, self.total
        idx = torch.arange(self.K)
        if K > MAX_PARTNERS:
            take = max(1, round(MAX_PARTNERS * self.K / K))
            idx = torch.randperm(self.K, generator=torch.Generator().manual_seed(sh.rank))[:take]
            self.norm_estimated = True
        L = int(round(sh.sum(float(len(idx)))))
        if self.materialized:
            mine = (torch.cat([self._g(i) for i in range(0, self.K, self.chunk)])[idx].cpu(),)
        else:
            mine = (self.X[idx.to(self.X.device)].cpu(), self.D[idx.to(self.D.device)].cpu())
        total = 0.0
        for src in range(sh.world):
            part = sh.broadcast(mine if sh.rank == src else None, src=src)
            part = tuple(t.to(self.device) for t in part)
            total += self._pair_sq(part)
        return sh.sum(total) / (K * L)

    def _pair_sq(self, part: tuple) -> float:
        """``sum_{k local, l in part} <G_k, G_l>^2`` (part: ``(G,)`` or ``(X, D)`` partner samples)."""
        total = 0.0
        if not self.materialized and len(part) == 2:
            Xl, Dl = (t.double() for t in part)
            Lp, Tp = Xl.shape[:2]
            Xl, Dl = Xl.reshape(-1, self.n), Dl.reshape(-1, self.m)
            rows = max(1, CHUNK_BYTES // (8 * self.T * Tp * Lp))
            for i in range(0, self.K, rows):
                Xi = self.X[i:i + rows].double()
                c = Xi.shape[0]
                Di = self.D[i:i + rows].double().reshape(-1, self.m)
                P = (Di @ Dl.T) * (Xi.reshape(-1, self.n) @ Xl.T)  # (c*T, Lp*Tp)
                total += float((P.reshape(c, self.T, Lp, Tp).sum(dim=(1, 3)) ** 2).sum())
            return total
        if len(part) == 2:
            Gp = torch.bmm(part[1].transpose(1, 2), part[0])
        else:
            Gp = part[0]
        for j in range(0, Gp.shape[0], self.chunk):
            Gj = Gp[j:j + self.chunk].reshape(-1, self.m * self.n).double()
            for i in range(0, self.K, self.chunk):
                Gi = self._g(i).reshape(-1, self.m * self.n).double()
                total += float(((Gi @ Gj.T) ** 2).sum())
        return total


def _as_samples(source, device=None, dtype=None) -> tuple[_Samples, Optional[LayerStats]]:
    stats = None
    if isinstance(source, LayerStats):
        stats = source
        if source.G is None and source.X is None:
            raise ValueError(f"layer {source.name}: per-sample gradients were not collected (add 'samples' to kinds)")
        if source.num_samples == 0:
            raise ValueError(f"layer {source.name}: empty statistics (no calibration samples)")
        job = {"shard": source.shard, "total": source.num_samples} if source.shard is not None else {}
        if source.G is not None:
            return _Samples(G=source.G, device=device, dtype=dtype, **job), stats
        return _Samples(X=source.X, D=source.D, device=device, dtype=dtype, **job), stats
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
    method: str = "krylov",
    tol: float = 1e-6,
    max_sweeps: int = 50,
    diagnostics: bool = True,
    gap_sweeps: int = 8,
    device=None,
    dtype: Optional[torch.dtype] = None,
    seed: int = 0,
    refine: int = 2,
    tf32: bool = False,
) -> KroneckerFactors:
    """Nearest Kronecker product ``A (x) B`` of the empirical Fisher of per-sample gradients.

    Args:
        source: ``LayerStats`` (with samples), a tensor ``G`` (K, m, n), or ``(X, D)`` of shapes
            (K, T, n), (K, T, m).
        init: "identity" or "kfac" (``sum x x^T`` of the samples; falls back to identity when
            unavailable). Both have a positive overlap with the PSD top pair.
        method: "krylov" (default: Golub-Kahan-Lanczos with full reorthogonalisation, see
            ``fisher.krylov``; s2 comes from the same Krylov space, so diagnostics cost no extra
            maps), "als" (power iteration, PSD by construction; the reference) or "lanczos"
            (scipy svds with a sign fix and symmetrisation, as the published code).
        refine: Krylov only: at most this many float64 map pairs after a float32 solve, started
            from its result, so the product matches a float64 solve (0: none).
        tol: Krylov: stop when the residual bound on the angle to the exact factors is at most
            ``tol``. ALS: stop when the unit-norm input factor changes by less than ``tol``
            (Frobenius) in a sweep; the product is then accurate to about ``tol * g / (1 - g)``
            with ``g = (s2/s1)^2``. (A test on the s1 estimate alone stops far too early: it
            converges like the square of the factor error.)
        dtype: arithmetic of the maps: None (float32, or float64 for float64 samples) or an
            explicit dtype. float32 is ~3x faster on CPU; on inputs whose channel spectra span
            many decades its rounding moves the factors by ~1e-4 relatively (bench/kronecker.py).
        tf32: CUDA only (ignored elsewhere): the float32 Krylov solve's products on tensor cores in
            TF32 (several times a GPU's float32 rate; about 1e-3 relative rounding per product),
            then the float64 refinement (``refine``, at least 2) restores the accuracy; TF32 never
            touches the refinement. ``bench/gpu.sh`` measures both.
        diagnostics: also compute ``||F||`` (for eta and the fit error) and estimate ``s2`` by
            ``gap_sweeps`` sweeps of deflated power iteration.
    Returns:
        :class:`KroneckerFactors` on the samples' device, float32 (float64 for float64 samples;
        in float32 the fit error ``sqrt(1 - eta)`` cannot resolve values below ~3e-4).
    """
    if init not in ("identity", "kfac"):
        raise ValueError(f"unknown init {init!r}; valid: identity, kfac")
    if method not in ("krylov", "als", "lanczos"):
        raise ValueError(f"unknown method {method!r}; valid: krylov, als, lanczos")
    t0 = time.perf_counter()
    S, stats = _as_samples(source, device, dtype)
    A0, used_init = _initial(S, stats, init)
    s2 = bound = None
    refined = 0
    if method == "krylov":
        A, B, s1, s2, sweeps, converged, hist, bound, refined = _krylov(S, A0, tol, max_sweeps, refine, tf32)
    elif method == "als":
        A, B, s1, sweeps, converged, hist = _als(S, A0, tol, max_sweeps)
    else:
        A, B, s1, sweeps, converged, hist = _lanczos(S, A0, tol, max_sweeps)
    return _factors(S, stats, A, B, s1, s2, sweeps, converged, hist, bound, refined, method, used_init,
                    diagnostics, gap_sweeps, seed, t0)


def _factors(S, stats, A, B, s1, s2, sweeps, converged, hist, bound, refined, method, used_init, diagnostics,
             gap_sweeps, seed, t0) -> KroneckerFactors:
    """The PSD projection and the diagnostics of a solved pair, as :class:`KroneckerFactors`."""
    A, clip_a = _psd_projection(A, _sample_span(S, "in"))
    B, clip_b = _psd_projection(B, _sample_span(S, "out"))
    res = KroneckerFactors(A=A, B=B, s1=s1, sweeps=sweeps, converged=converged, method=method,
                           init=used_init, history=hist, psd_clipped=max(clip_a, clip_b),
                           residual_bound=bound, refine_steps=refined)
    if diagnostics:
        res.fisher_norm, res.fisher_norm_estimated = _fisher_norm(S, stats)
        res.s2 = s2 if method == "krylov" else _second_singular_value(S, A, B, s1, gap_sweeps, seed)
    res.seconds = time.perf_counter() - t0
    return res


#: a batch of layers solved in lockstep holds at most this many bytes of stacked samples
BATCH_BYTES = 512 * 2**20


class _Stacked:
    """The maps of several layers' samples of one shape and storage, stacked: ``(v, idx)`` maps
    the problems ``idx`` at once, each by plain batched products (a copy of the samples; meant for
    small layers, where launching and synchronising, not flops, is the cost on an accelerator)."""

    def __init__(self, members: list):
        S0 = members[0]
        self.materialized, self.m, self.n, self.K, self.T = S0.materialized, S0.m, S0.n, S0.K, S0.T
        if self.materialized:  # (L, m, K, n): each layer's chunks side by side
            self.G = torch.stack([torch.cat(S._Gm, dim=1) for S in members])
        else:
            self.X = torch.stack([S.X for S in members])  # (L, K, T, n)
            self.D = torch.stack([S.D for S in members])  # (L, K, T, m)

    def _pick(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return t if idx.numel() == t.shape[0] else t.index_select(0, idx)

    def out_map(self, A: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``E_k[G_k A_i G_k^T]`` for each problem i of ``idx``: (a, n, n) -> (a, m, m)."""
        a, m, n, K = A.shape[0], self.m, self.n, self.K
        if self.materialized:
            G = self._pick(self.G, idx).to(A.dtype)  # (a, m, K, n)
            GA = torch.bmm(G.reshape(a, m * K, n), A).reshape(a, m, K * n)  # [G_k A]_k side by side
            out = torch.bmm(GA, G.reshape(a, m, K * n).transpose(1, 2))
        else:
            out = self._factored(self.X, self.D, A, idx)
        return out / K

    def in_map(self, B: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``E_k[G_k^T B_i G_k]`` for each problem i of ``idx``: (a, m, m) -> (a, n, n)."""
        a, m, n, K = B.shape[0], self.m, self.n, self.K
        if self.materialized:
            G = self._pick(self.G, idx).to(B.dtype)  # (a, m, K, n)
            BG = torch.bmm(B, G.reshape(a, m, K * n)).reshape(a, m * K, n)
            out = torch.bmm(G.reshape(a, m * K, n).transpose(1, 2), BG)
        else:
            out = self._factored(self.D, self.X, B, idx)
        return out / K

    def _factored(self, P: torch.Tensor, Q: torch.Tensor, M: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``sum_k Q_k^T (P_k M_i P_k^T) Q_k`` per problem: ``out_map`` is (P, Q) = (X, D), ``in_map`` (D, X)."""
        P, Q = self._pick(P, idx).to(M.dtype), self._pick(Q, idx).to(M.dtype)  # (a, K, T, .)
        a, KT = M.shape[0], self.K * self.T
        S = torch.matmul(torch.bmm(P.reshape(a, KT, -1), M).reshape(P.shape), P.transpose(-1, -2))  # (a, K, T, T)
        SQ = torch.matmul(S, Q).reshape(a, KT, -1)
        return torch.bmm(Q.reshape(a, KT, -1).transpose(1, 2), SQ)


def nearest_kronecker_batch(sources: list, init: str = "kfac", tol: float = 1e-6, max_sweeps: int = 50,
                            diagnostics: bool = True, device=None, dtype: Optional[torch.dtype] = None,
                            refine: int = 2, tf32: bool = False) -> list[KroneckerFactors]:
    """:func:`nearest_kronecker` (Krylov) of many layers: those of one shape, storage and sample
    count are solved in lockstep by one batched Krylov iteration
    (:func:`fisher.krylov.top_singular_triplets_batched`), in batches of at most
    :data:`BATCH_BYTES` of samples and bases; a layer alone in its shape, or whose samples are sharded over
    processes, is solved by itself. Each layer stops by its own bound, so the factors match a
    one-by-one solve to rounding. ``seconds`` of a batched layer is its share of the batch."""
    from .krylov import top_singular_triplets_batched

    if init not in ("identity", "kfac"):
        raise ValueError(f"unknown init {init!r}; valid: identity, kfac")
    out: list[Optional[KroneckerFactors]] = [None] * len(sources)
    groups: dict[tuple, list[int]] = {}
    prepared = []
    for i, src in enumerate(sources):
        S, stats = _as_samples(src, device, dtype)
        prepared.append((S, stats))
        key = (S.storage, S.m, S.n, S.K, S.T, S.dtype, str(S.device), S.shard is None)
        groups.setdefault(key, []).append(i)
    for key, members in groups.items():
        S0 = prepared[members[0]][0]  # (the group's samples are released as they are solved)
        # a layer's stacked samples and its float64 bases for KRYLOV_BASIS_STEPS steps
        per = (S0.K * S0.m * S0.n if S0.materialized else S0.K * S0.T * (S0.m + S0.n)) * S0.dtype.itemsize
        per += KRYLOV_BASIS_STEPS * 8 * (S0.m * S0.m + S0.n * S0.n)
        size = max(1, BATCH_BYTES // per)
        if len(members) == 1 or not key[-1]:
            size = 1
        for b in range(0, len(members), size):
            batch = members[b:b + size]
            if len(batch) == 1:
                i = batch[0]
                prepared[i] = None  # solved from its source again: no second copy of its samples
                out[i] = nearest_kronecker(sources[i], init=init, tol=tol, max_sweeps=max_sweeps,
                                           diagnostics=diagnostics, device=device, dtype=dtype, refine=refine,
                                           tf32=tf32)
                continue
            t0 = time.perf_counter()
            starts = [_initial(*prepared[i], init) for i in batch]
            stacked = _Stacked([prepared[i][0] for i in batch])
            with _tf32(tf32, S0.device):
                results = top_singular_triplets_batched(stacked.in_map, stacked.out_map,
                                                        torch.stack([A0 for A0, _ in starts]), tol=tol,
                                                        max_steps=max_sweeps)
            del stacked
            share = (time.perf_counter() - t0) / len(batch)
            for i, r, (A0, used_init) in zip(batch, results, starts):
                t1 = time.perf_counter() - share
                S, stats = prepared[i]
                A, B, s1, s2, sweeps, converged, hist, bound, refined = _krylov_finish(S, r, A0.dtype, tol, refine)
                out[i] = _factors(S, stats, A, B, s1, s2, sweeps, converged, hist, bound, refined, "krylov",
                                  used_init, diagnostics, 0, 0, t1)
                prepared[i] = None
    return out


def _fisher_norm(S: _Samples, stats: Optional[LayerStats]) -> tuple[float, bool]:
    """``||F||_F`` from the sample Grams, computed once per layer (cached on the statistics)."""
    key = "fisher_norm"
    if stats is not None and key in stats.info:
        return stats.info[key]
    out = (math.sqrt(max(S.fisher_norm_sq(), 0.0)), S.norm_estimated)
    if stats is not None:
        stats.info[key] = out
    return out


#: a factor whose Cholesky succeeds at this relative shift has negative eigenvalue mass below it
PSD_CHECK_SHIFT = 1e-8  # 100x below the default damping


def _psd_projection(M: torch.Tensor, span: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, float]:
    """Nearest PSD matrix and the share removed, ``||M - M+||_F / ||M||_F``.

    Rounding leaves eigenvalues of about -1e-8 relative on float32 factors; left in, they make the
    Cholesky at a small requested damping fail and the damping climb. A Cholesky at a shift of
    :data:`PSD_CHECK_SHIFT` (relative) first proves most factors PSD to that level (nothing
    removed); for the others only the negative eigenpairs are computed (LAPACK's MRRR on a subset,
    2.5x faster than a full eigendecomposition at d = 1536) and removed: ``M - V diag(l-) V^T``
    is the clipped projection.

    ``span`` (d x r, orthonormal, r < d): a subspace that holds the exact factor's range - the
    span of the samples' vectors on this side (:func:`_sample_span`), when there are fewer of them
    than rows. Such a factor is rank-deficient, so rounding scatters +-1e-8 eigenvalues over its whole null space;
    the projection is then onto PSD matrices with range in ``span``: ``P [P^T M P]_+ P^T``, an
    r x r problem instead of d x d, which also removes the null space's rounding noise.

    All in float64, which the factors keep: a float32 rebuild would bring the negative
    eigenvalues back. The share removed must be ~0; a large one means the factor itself is wrong,
    and it is reported per layer."""
    M = 0.5 * (M + M.T).double()
    norm = float(torch.linalg.matrix_norm(M))
    if span is not None:
        P = span.to(M)
        Mh = P.T @ M @ P
        Mh = 0.5 * (Mh + Mh.T)
        Mp, _ = _psd_projection(Mh)
        out = P @ Mp @ P.T
        out = 0.5 * (out + out.T)
        removed = float(torch.linalg.matrix_norm(M - out))
        return out, (removed / norm if norm > 0 else 0.0)
    d = M.shape[0]
    scale = float(torch.diagonal(M).sum()) / d
    if scale > 0:
        _, info = torch.linalg.cholesky_ex(M + PSD_CHECK_SHIFT * scale * torch.eye(d, dtype=M.dtype, device=M.device))
        if int(info) == 0:
            return M, 0.0
    evals, evecs = _negative_eigenpairs(M)
    if evals.numel() == 0:
        return M, 0.0
    P = M - (evecs * evals) @ evecs.T
    removed = float(torch.linalg.vector_norm(evals))
    return 0.5 * (P + P.T), (removed / norm if norm > 0 else 1.0)


#: the range projection pays (QR, two products, an r x r solve) when the span is at most this
#: share of the factor's rows
SPAN_SHARE = 0.75


def _sample_span(S: "_Samples", side: str) -> Optional[torch.Tensor]:
    """Orthonormal basis (float64) of the span that holds one side's factor, when it is a small
    share of that side's dimension: every Kronecker map's output, hence the exact factor, lies in
    the span of the samples' vectors on that side - factored, the rows of all ``D_k`` (output
    side) or ``X_k`` (input side); materialised, the columns or the rows of all ``G_k``. None
    when the span is not small enough to pay, or the samples are sharded over processes."""
    if S.shard is not None:
        return None
    d = S.m if side == "out" else S.n
    if S.materialized:
        count = S.K * (S.n if side == "out" else S.m)
    else:
        count = S.K * S.T
    if count > SPAN_SHARE * d:
        return None
    if S.materialized:  # chunks laid out (m, c, n)
        if side == "out":
            rows = torch.cat([g.permute(1, 2, 0).reshape(-1, S.m) for g in S._Gm])  # columns of each G_k
        else:
            rows = torch.cat([g.reshape(-1, S.n) for g in S._Gm])  # rows of each G_k
    else:
        rows = (S.D if side == "out" else S.X).reshape(-1, d)
    Q, _ = torch.linalg.qr(rows.T.double())  # (d, count); zero (padding) vectors only add directions
    return Q


def _negative_eigenpairs(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric float64 ``M`` with eigenvalue < 0 (values (j,), vectors (d, j))."""
    if M.device.type == "cpu":
        import numpy as np
        from scipy.linalg import eigh

        w, V = eigh(M.numpy(), subset_by_value=(-np.inf, 0.0), driver="evr")
        keep = w < 0
        return torch.from_numpy(w[keep].copy()), torch.from_numpy(np.ascontiguousarray(V[:, keep]))
    w, V = torch.linalg.eigh(M)
    keep = w < 0
    return w[keep], V[:, keep]


def _basis_budget(S: _Samples) -> int:
    """Bytes for the Krylov bases: room for ``KRYLOV_BASIS_STEPS`` steps without a restart (a wide
    layer's input-side vector alone is n^2 float64: 970 MB for n = 11008), within a quarter of the
    device's free memory; at least 512 MiB."""
    per_pair = 8 * (S.m * S.m + S.n * S.n)
    free = None
    if S.device.type == "cuda":
        free = torch.cuda.mem_get_info(S.device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
    want = max(512 * 2**20, KRYLOV_BASIS_STEPS * per_pair)
    budget = int(min(want, free // 4)) if free else want
    # ranks must restart the Krylov iteration at the same step, or their collective maps diverge
    return budget if S.shard is None else int(S.shard.min(budget))


#: Krylov steps the bases should hold before a restart (the default's layers need 6-11)
KRYLOV_BASIS_STEPS = 16


@contextlib.contextmanager
def _tf32(enabled: bool, device: torch.device):
    """float32 matmuls in TF32 on a CUDA device while the block runs (the previous setting after)."""
    if not (enabled and device.type == "cuda"):
        yield
        return
    mm = torch.backends.cuda.matmul
    key, value = ("fp32_precision", "tf32") if hasattr(mm, "fp32_precision") else ("allow_tf32", True)
    old = getattr(mm, key)
    setattr(mm, key, value)
    try:
        yield
    finally:
        setattr(mm, key, old)


def _krylov(S: _Samples, A0, tol, max_steps, refine, tf32: bool = False):
    from .krylov import top_singular_triplets

    with _tf32(tf32, S.device):
        r = top_singular_triplets(S.in_map, S.out_map, A0, tol=tol, max_steps=max_steps,
                                  basis_bytes=_basis_budget(S))
    return _krylov_finish(S, r, A0.dtype, tol, refine)


def _krylov_finish(S: _Samples, r, map_dtype, tol, refine):
    """The float64 refinement (``refine`` map pairs) and the factors from a Krylov result."""
    from .krylov import top_singular_triplets

    steps, refined = r.steps, 0
    if refine > 0 and map_dtype != torch.float64 and r.s1 > 0:
        # float64 maps (chunks cast on the fly) from the float32 answer: a few steps recover the
        # accuracy float32 rounding cost on inputs with wide spectra
        r64 = top_singular_triplets(S.in_map, S.out_map, r.u.double(), tol=min(tol, 1e-9), max_steps=refine)
        refined = r64.steps
        # s1 and the pair from the float64 steps; s2 from the larger float32 space (a tighter
        # Ritz value); the bound of whichever solve could certify its answer
        r64.history = r.history + r64.history
        r64.s2 = r.s2
        if not r64.converged:
            r64.bound, r64.converged = r.bound, r.converged
        r = r64
    u, v = r.u, r.v
    if float(torch.trace(u)) < 0:  # a singular pair's sign is arbitrary: the PSD pair has trace > 0
        u, v = -u, -v
    u, v = 0.5 * (u + u.T), 0.5 * (v + v.T)
    root = math.sqrt(max(r.s1, 0.0))
    A, B = u * root, v * root  # float64 from the Krylov basis; the PSD projection keeps them so
    return A, B, r.s1, r.s2, steps + refined, r.converged, r.history, r.bound, refined


def _initial(S: _Samples, stats, init: str):
    dtype = S.dtype
    eye = torch.eye(S.n, dtype=dtype, device=S.device)
    if init == "identity":
        return eye, "identity"
    if stats is not None and stats.xx_sum is not None:
        return stats.xx_sum.to(device=S.device, dtype=dtype), "kfac"
    if not S.materialized:
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

