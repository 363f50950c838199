"""Top singular triplets of a matrix-free linear map by Golub-Kahan-Lanczos bidiagonalisation.

The rearranged Fisher ``R`` maps an output-side factor ``B`` (m x m) to ``R(B) = E[G^T B G]``
(n x n) and its adjoint maps ``A`` to ``R^T(A) = E[G A G^T]``. Its top singular pair is the
nearest Kronecker product; the second singular value measures how well determined it is.
Starting from ``u_1`` (e.g. the K-FAC input factor) the recurrences

    alpha_1 v_1 = R^T u_1,
    beta_{j+1} u_{j+1} = R v_j - alpha_j u_j,      alpha_{j+1} v_{j+1} = R^T u_{j+1} - beta_{j+1} v_j

build orthonormal bases ``U_{k+1}``, ``V_k`` with ``R V_k = U_{k+1} C_k`` for the (k+1) x k lower
bidiagonal ``C_k`` (diagonal alpha, subdiagonal beta). The singular triplets of the small ``C_k``
give the Ritz triplets ``(sigma_i, U p_i, V q_i)``; ``R v - sigma u = 0`` holds exactly and the
residual of the adjoint equation is ``||R^T u - sigma v|| = alpha_{k+1} |p_i[k]|``, so each step,
one map each way (the cost of one alternating-least-squares sweep), knows its own error.

**Stopping rule.** With residual ``r_1`` and gap ``delta = sigma_1 - sigma_2`` (sigma_2 from the same
space, made conservative by its own residual) Wedin's theorem bounds the angle between the
computed and the exact singular vectors by ``sin(theta) <= sqrt(2) r_1 / delta``; the solver stops
once that bound is at most ``tol``. Power iteration (ALS) contracts the error by
``(sigma_2/sigma_1)^2`` per sweep; Lanczos by about ``exp(-2 sqrt(1 - (sigma_2/sigma_1)^2))``, so a
gap of 0.8 needs ~10 steps instead of ~30, and ``sigma_2`` comes for free.

The bases are kept in float64 (the maps may run in float32) with full reorthogonalisation
(classical Gram-Schmidt, repeated when the DGKS test asks). When they would exceed ``basis_bytes`` the solver restarts from
the current best left vector, which keeps memory bounded for wide layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Map = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class KrylovResult:
    """Top triplet ``(s1, u, v)`` (``u`` in the range, ``v`` in the domain, unit Frobenius norm),
    the second singular value ``s2`` and how the solver got there."""

    s1: float
    s2: Optional[float]
    u: torch.Tensor
    v: torch.Tensor
    steps: int  # map pairs (one R and one R^T each)
    converged: bool
    residual: float  # ||R^T u - s1 v|| of the returned triplet
    bound: float  # Wedin bound on sin(angle to the exact singular vectors)
    restarts: int = 0
    history: list = field(default_factory=list)  # s1 estimate per step


def _sym(M: torch.Tensor) -> torch.Tensor:
    return 0.5 * (M + M.transpose(-1, -2))


class _Basis(list):
    """Orthonormal vectors (a list of tensors) mirrored as rows of one float64 buffer, so that a
    projection is two matrix-vector products, not a restack of the whole basis."""

    def __init__(self, first: Optional[torch.Tensor] = None):
        super().__init__()
        self._buf: Optional[torch.Tensor] = None
        if first is not None:
            self.append(first)

    def append(self, v: torch.Tensor) -> None:
        flat = v.reshape(-1)
        if self._buf is None or len(self) == self._buf.shape[0]:
            cap = 8 if self._buf is None else 2 * self._buf.shape[0]
            buf = flat.new_empty(cap, flat.numel())
            if self._buf is not None:
                buf[: len(self)] = self._buf[: len(self)]
            self._buf = buf
        self._buf[len(self)] = flat
        super().append(self._buf[len(self)].view(v.shape))

    def rows(self) -> torch.Tensor:
        return self._buf[: len(self)]


def _orthonormalise(w: torch.Tensor, basis: "_Basis") -> tuple[torch.Tensor, float]:
    """``w`` minus its projection on ``basis``, normalised. A second projection runs only when the
    first removed most of ``w`` (the DGKS test: the norm fell below 1/sqrt(2) of what it was),
    which is when the first leaves rounding-level components along the basis."""
    flat = w.reshape(-1)
    if len(basis):
        Q = basis.rows()  # (j, N)
        before = float(torch.linalg.vector_norm(flat))
        flat = flat - Q.T @ (Q @ flat)
        if float(torch.linalg.vector_norm(flat)) < before / math.sqrt(2):
            flat = flat - Q.T @ (Q @ flat)
    nrm = float(torch.linalg.vector_norm(flat))
    flat = flat / nrm if nrm > 0 else flat
    return flat.view(w.shape), nrm


def top_singular_triplets(apply: Map, apply_t: Map, start: torch.Tensor, tol: float = 1e-6,
                          max_steps: int = 100, basis_bytes: int = 512 * 2**20,
                          symmetric: bool = True) -> KrylovResult:
    """Top singular triplet and second singular value of ``apply`` (domain -> range).

    Args:
        apply: ``v -> R(v)``; ``apply_t``: ``u -> R^T(u)``; both take and return tensors in the
            dtype of the maps (inputs are cast; results are taken to float64).
        start: a range-space tensor with a non-zero overlap with the top left singular vector
            (the K-FAC input factor for the Fisher).
        tol: bound on ``sin(angle)`` of the returned vectors to the exact ones (see the module).
        max_steps: at most this many map pairs in all.
        basis_bytes: memory for the two float64 bases; the solver restarts when it is full.
        symmetric: the maps preserve symmetric matrices: the start (and a restart) is
            symmetrised, and the caller symmetrises the result (rounding asymmetry stays ~1e-16).
    """
    map_dtype = start.dtype
    # float64 bases: float32 ones (half the memory traffic of the reorthogonalisation) were
    # measured to move the float32 solve's product from 2e-7 to 5e-5 of a float64 reference on the
    # wide-spectrum benchmark (bench/kronecker.py), as inner products over m^2 entries lose digits
    f64 = torch.float64
    per_pair = None
    u = start.to(f64)
    u = _sym(u) if symmetric else u
    u = u / torch.linalg.vector_norm(u)
    steps = restarts = 0
    history: list[float] = []
    best = None
    while True:
        U, V = _Basis(u), _Basis()
        alphas: list[float] = []
        betas: list[float] = []
        v_prev = None
        while True:
            w = apply_t(U[-1].to(map_dtype)).to(f64)  # R^T u_j
            steps += 1
            if v_prev is not None:
                w = torch.sub(w, v_prev, alpha=betas[-1])
            v, alpha = _orthonormalise(w, V)
            alphas.append(alpha)
            # the bidiagonal C ((j+1) x j, with the new alpha as its last row's residual)
            j = len(V)
            if j > 0:
                tri = _ritz(alphas[:j], betas[:j], alpha)
                s, res, p, q = tri
                history.append(float(s[0]))
                bound = _wedin_bound(s, res)
                best = (s, res, p, q, U, V, bound)
                if bound <= tol or alpha <= 1e-300:
                    return _finish(best, steps, True, restarts, history)
                if steps >= max_steps:
                    return _finish(best, steps, False, restarts, history)
            if alpha <= 0:  # an invariant subspace at the first step: R^T u = 0
                return KrylovResult(0.0, 0.0, U[0], torch.zeros_like(w), steps, True, 0.0, 0.0, restarts, history)
            V.append(v)
            if per_pair is None:
                per_pair = (U[0].numel() + v.numel()) * v.element_size()
            w = torch.sub(apply(v.to(map_dtype)).to(f64), U[-1], alpha=alpha)  # R v_j - alpha_j u_j
            u_next, beta = _orthonormalise(w, U)
            betas.append(beta)
            U.append(u_next)
            v_prev = v
            if beta <= 1e-300 * max(alphas):  # invariant subspace: the Ritz values are exact
                s, res, p, q = _ritz(alphas, betas, 0.0)
                return _finish((s, res * 0, p, q, U, V, 0.0), steps, True, restarts, history)
            if (len(V) + 2) * per_pair > basis_bytes and len(V) >= 2:
                break  # restart from the best left vector
        s, res, p, q = _ritz(alphas[:len(V)], betas[:len(V)], 0.0)
        u = _combine(U, p[:, 0])
        u = _sym(u) if symmetric else u
        u = (u / torch.linalg.vector_norm(u)).to(f64)
        restarts += 1


def _ritz(alphas, betas, alpha_next):
    """Singular triplets of the (k+1) x k bidiagonal and their residuals ``alpha_{k+1} |p[k]|``."""
    k = len(alphas)
    C = torch.zeros(k + 1, k, dtype=torch.float64)
    idx = torch.arange(k)
    C[idx, idx] = torch.tensor(alphas, dtype=torch.float64)
    C[idx + 1, idx] = torch.tensor(betas[:k], dtype=torch.float64)
    P, s, Qh = torch.linalg.svd(C, full_matrices=False)  # P (k+1, k), s (k,), Qh (k, k)
    res = abs(alpha_next) * P[k, :].abs()
    return s, res, P, Qh.T


def _combine(basis: list[torch.Tensor], coeffs: torch.Tensor) -> torch.Tensor:
    """``sum_i c_i b_i``, accumulated in float64."""
    out = torch.zeros_like(basis[0], dtype=torch.float64)
    for b, c in zip(basis, coeffs.tolist()):
        out.add_(b, alpha=c)
    return out


def _wedin_bound(s: torch.Tensor, res: torch.Tensor) -> float:
    """``sqrt(2) r_1 / (s_1 - s_2 - r_2)`` (inf without a positive gap): the stopping rule's bound
    on ``sin(angle)`` of the top Ritz pair, s_2 made conservative by its own residual."""
    s2 = float(s[1]) if len(s) > 1 else 0.0
    r2 = float(res[1]) if len(res) > 1 else 0.0
    gap = float(s[0]) - (s2 + r2)
    return math.sqrt(2) * float(res[0]) / gap if gap > 0 else math.inf


def _finish(best, steps, converged, restarts, history) -> KrylovResult:
    s, res, p, q, U, V, bound = best
    return _triplet(s, res, p, q, U.rows(), V.rows(), U[0].shape, V[0].shape, steps, converged, bound, history,
                    restarts)


BatchMap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def top_singular_triplets_batched(apply: BatchMap, apply_t: BatchMap, start: torch.Tensor, tol: float = 1e-6,
                                  max_steps: int = 100, symmetric: bool = True) -> list[KrylovResult]:
    """:func:`top_singular_triplets` for L independent problems of one shape, in lockstep.

    For many small layers (a model's attention projections) on an accelerator, one step of all of
    them is a few batched kernels and a few host synchronisations (the step's alphas, betas and
    the reorthogonalisation test), instead of L times as many small kernels and round trips. Each
    problem stops by its own bound (the same rule, step for step, as the single solver) and drops
    out of the batch. No restarts: the bases grow to the steps taken (meant for small layers).

    Args:
        apply: ``(v, idx) -> R_i(v_i)`` for the stacked domain tensors ``v`` (a, ...) of the
            problems ``idx`` (a long tensor of problem indices, increasing); ``apply_t`` likewise
            for the adjoints.
        start: (L, ...) range-space start tensors, one per problem.
    """
    map_dtype = start.dtype
    f64 = torch.float64
    L = start.shape[0]
    dev = start.device
    u = start.to(f64)
    u = _sym(u) if symmetric else u
    u = u / torch.linalg.vector_norm(u.reshape(L, -1), dim=1).reshape(L, *([1] * (u.dim() - 1)))
    shape_u = tuple(u.shape[1:])
    shape_v = None
    Ubuf = u.new_zeros(L, min(max_steps + 1, 16), u[0].numel())  # doubled as the steps need
    Ubuf[:, 0] = u.reshape(L, -1)
    Vbuf = None
    alphas = torch.zeros(L, max_steps + 1, dtype=f64)
    betas = torch.zeros(L, max_steps + 1, dtype=f64)
    results: list[Optional[KrylovResult]] = [None] * L
    history: list[list[float]] = [[] for _ in range(L)]
    idx = torch.arange(L)  # active problems (CPU; ``idx.to(dev)`` indexes the device buffers)
    v_prev = None
    j = 0  # vectors in each active problem's V so far: the same for all of them
    steps = 0
    while idx.numel():
        a, di = idx.numel(), idx.to(dev)
        w = apply_t(Ubuf[di, j].reshape(a, *shape_u).to(map_dtype), di).to(f64)  # R^T u_j
        steps += 1
        if Vbuf is None:
            shape_v = tuple(w.shape[1:])
            Vbuf = w.new_zeros(L, Ubuf.shape[1], w[0].numel())
        w = w.reshape(a, -1)
        if v_prev is not None:
            w = w - betas[idx, j - 1].to(dev)[:, None] * v_prev
        v, alpha = _orthonormalise_batched(w, Vbuf[di, :j] if j else None)
        alphas[idx, j] = alpha
        done = torch.zeros(a, dtype=torch.bool)
        for r, i in enumerate(idx.tolist()):
            al = float(alpha[r])
            if j == 0:
                if al <= 0:  # an invariant subspace at the first step: R^T u = 0
                    results[i] = KrylovResult(0.0, 0.0, Ubuf[i, 0].reshape(shape_u).clone(),
                                              w.new_zeros(shape_v), steps, True, 0.0, 0.0, 0, history[i])
                    done[r] = True
                continue
            s, res, p, q = _ritz(alphas[i, :j].tolist(), betas[i, :j].tolist(), al)
            history[i].append(float(s[0]))
            bound = _wedin_bound(s, res)
            converged = bound <= tol or al <= 1e-300
            if converged or steps >= max_steps:
                results[i] = _triplet(s, res, p, q, Ubuf[i], Vbuf[i], shape_u, shape_v, steps, converged,
                                         bound, history[i])
                done[r] = True
        if bool(done.all()):
            break
        keep = ~done
        idx, v, alpha = idx[keep], v[keep.to(dev)], alpha[keep]
        a, di = idx.numel(), idx.to(dev)
        if j + 2 > Ubuf.shape[1]:  # room for u_{j+1} and v_{j+1}
            cap = min(max_steps + 1, 2 * Ubuf.shape[1])
            Ubuf = torch.cat([Ubuf, Ubuf.new_zeros(L, cap - Ubuf.shape[1], Ubuf.shape[2])], 1)
            Vbuf = torch.cat([Vbuf, Vbuf.new_zeros(L, cap - Vbuf.shape[1], Vbuf.shape[2])], 1)
        Vbuf[di, j] = v
        w = apply(v.reshape(a, *shape_v).to(map_dtype), di).to(f64).reshape(a, -1)
        w = w - alpha.to(dev)[:, None] * Ubuf[di, j]  # R v_j - alpha_j u_j
        u_next, beta = _orthonormalise_batched(w, Ubuf[di, : j + 1])
        betas[idx, j] = beta
        Ubuf[di, j + 1] = u_next
        v_prev = v
        j += 1
        # an invariant subspace (beta ~ 0): the Ritz values are exact
        inv = beta <= 1e-300 * alphas[idx, :j].abs().max(dim=1).values
        for r in torch.nonzero(inv).flatten().tolist():
            i = int(idx[r])
            s, res, p, q = _ritz(alphas[i, :j].tolist(), betas[i, :j].tolist(), 0.0)
            results[i] = _triplet(s, res * 0, p, q, Ubuf[i], Vbuf[i], shape_u, shape_v, steps, True, 0.0,
                                     history[i])
        if bool(inv.any()):
            idx, v_prev = idx[~inv], v_prev[(~inv).to(dev)]
    return results


def _orthonormalise_batched(w: torch.Tensor, Q: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``w`` (a, N) minus their projections on the rows of ``Q[r]`` (a, j, N), normalised,
    with a second projection for the rows the DGKS test flags (as :func:`_orthonormalise`).
    Returns the vectors and their norms before normalising (float64, on the CPU)."""
    if Q is not None:
        before = torch.linalg.vector_norm(w, dim=1)
        w = w - torch.bmm(torch.bmm(Q, w[:, :, None]).transpose(1, 2), Q)[:, 0]
        again = torch.linalg.vector_norm(w, dim=1) < before / math.sqrt(2)
        if bool(again.any()):
            w2 = w - torch.bmm(torch.bmm(Q, w[:, :, None]).transpose(1, 2), Q)[:, 0]
            w = torch.where(again[:, None], w2, w)
    nrm = torch.linalg.vector_norm(w, dim=1)
    w = w / torch.where(nrm > 0, nrm, torch.ones_like(nrm))[:, None]
    return w, nrm.cpu()


def _triplet(s, res, p, q, U, V, shape_u, shape_v, steps, converged, bound, history, restarts=0) -> KrylovResult:
    """The top Ritz triplet from the bases' rows ``U`` (>= k+1, N_u) and ``V`` (>= k, N_v), float64."""
    u = (p[:, 0].to(U) @ U[: p.shape[0]]).reshape(shape_u)
    v = (q[:, 0].to(V) @ V[: q.shape[0]]).reshape(shape_v)
    u = u / torch.linalg.vector_norm(u)
    v = v / torch.linalg.vector_norm(v)
    s2 = float(s[1]) if len(s) > 1 else None
    return KrylovResult(float(s[0]), s2, u, v, steps, converged, float(res[0]), float(bound), restarts, list(history))
