"""The Fisher-aligned view (ours): how far a layer's Fisher is from K-FAC, and which inputs it keeps.

Inspired by FASC ("Fisher-Aligned Subspace Compression") and its "dependence violation score";
the paper's own formula could not be consulted, so these are *our* well-defined diagnostics, not
the paper's rho. For a linear layer (W: m x n) with per-sample gradients ``G_k`` and the empirical
Fisher ``F = 1/K sum_k vec(G_k) vec(G_k)^T`` (column-major vec, mn x mn, never formed):

* :func:`kfac_violation` - ``rho_KF = min_c ||F - c A0 (x) B0||_F / ||F||_F`` with K-FAC's factors
  ``A0 = E_t[x x^T]`` (n x n) and ``B0 = sum_t d d^T / K`` (m x m): how far the Fisher is from
  K-FAC's prediction that inputs and output gradients are independent. The nearest Kronecker
  product (GFWSVD) is the best of all ``A (x) B``, so its fit error ``sqrt(1 - eta)`` is a floor:
  ``rho_KF >= sqrt(1 - eta)``; the difference is what K-FAC's independence assumption costs
  beyond being a Kronecker product at all.
* :func:`subspace_angles` - principal angles between the top-k eigenvectors of GFWSVD's input
  factor ``A`` (the input directions the Fisher says the loss is sensitive to) and of ``E[x x^T]``
  (the highest-variance inputs that PCA / SVD-LLM-style methods keep).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

from ..stats import LayerStats, _chunk_budget, _chunk_samples


def _kfac_inner(stats: LayerStats, A0: torch.Tensor, B0: torch.Tensor, dtype: torch.dtype,
                budget_bytes: Optional[int]) -> float:
    """``<F, A0 (x) B0> = 1/K sum_k tr(G_k^T B0 G_k A0)`` (column-major vec: ``(A (x) B) vec(G) = vec(B G A)``).

    Factored samples use ``tr(G_k^T B0 G_k A0) = <D_k B0 D_k^T, X_k A0 X_k^T>`` (T x T) when that
    is cheaper than forming ``G_k = D_k^T X_k``; otherwise ``<B0 G_k, G_k A0>`` per chunk of samples.
    Products in ``dtype``, sums in float64.
    """
    m, n = stats.shape
    total = 0.0
    if stats.X is not None:
        T = stats.X.shape[1]
        dev = stats.X.device
        A, B = A0.to(dev, dtype), B0.to(dev, dtype)
        if T * (n * n + m * m) + T * T * (m + n) < T * m * n + m * n * (m + n):
            item = torch.empty((), dtype=dtype).element_size()
            c = max(1, _chunk_budget(budget_bytes) // (item * (2 * T * (m + n) + 2 * T * T)))
            for X, D in zip(stats.X.split(c), stats.D.split(c)):
                X, D = X.to(dtype), D.to(dtype)
                Sx = torch.bmm(X @ A, X.transpose(1, 2))  # (c, T, T) X_k A0 X_k^T
                Sd = torch.bmm(D @ B, D.transpose(1, 2))  # (c, T, T) D_k B0 D_k^T
                total += float((Sx * Sd).sum(dtype=torch.float64))
            return _job_sum(stats, total) / stats.num_samples
    else:
        dev = stats.G.device
        A, B = A0.to(dev, dtype), B0.to(dev, dtype)
    item = torch.empty((), dtype=dtype).element_size()
    c = _chunk_samples(m, n, budget_bytes, copies=4, itemsize=item)  # G_k, its cast, B0 G_k, G_k A0
    for G in stats.per_sample_gradients(chunk=c):
        G = G.to(dtype)
        total += float(((B @ G) * (G @ A)).sum(dtype=torch.float64))
    return _job_sum(stats, total) / stats.num_samples


def _job_sum(stats: LayerStats, total: float) -> float:
    """The sum over every rank's samples under torchrun (this process's otherwise)."""
    return total if stats.shard is None else stats.shard.sum(total)


def fisher_norm(stats: LayerStats) -> tuple[float, bool]:
    """``(||F||_F, estimated)`` by the nearest-Kronecker code's sample Gram
    (``1/K^2 sum_{k,l} <G_k, G_l>^2``), cached on the statistics (GFWSVD computes it already)."""
    from .kronecker import _as_samples, _fisher_norm

    if "fisher_norm" in stats.info:
        return stats.info["fisher_norm"]
    S, _ = _as_samples(stats)
    return _fisher_norm(S, stats)


def kfac_violation(stats: LayerStats, dtype: Optional[torch.dtype] = None,
                   budget_bytes: Optional[int] = None) -> dict:
    """Our K-FAC independence violation ``rho_KF = ||F - c* A0 (x) B0||_F / ||F||_F``.

    With ``P = A0 (x) B0`` (``stats.kfac_in``, ``stats.kfac_out``) the best scalar is
    ``c* = <F, P> / ||P||^2`` and ``rho_KF^2 = 1 - <F, P>^2 / (||F||^2 ||P||^2)``, all matrix-free:
    ``||P|| = ||A0|| ||B0||``, ``<F, P> = 1/K sum_k tr(G_k^T B0 G_k A0)`` and ``||F||`` from the
    K x K Gram of the samples (see :func:`fisher_norm`). 0 means K-FAC's product is the Fisher up to
    scale; 1 means it explains none of it. Needs the kinds "samples" and "kfac". Cached per dtype
    in ``stats.info``.

    ``dtype``: of the per-sample products (default: the samples', i.e. float32 for collected
    statistics); the per-sample traces and all sums are float64. The traces are non-negative
    (A0, B0 are PSD) and float32 products kept ``<F, P>`` within 1e-8 of a float64 run on the
    default's layers (measured 4e-9) at about half the time; rho_KF is then exact to ~1e-8 / rho_KF.

    Returns ``{"rho", "scale" (c*), "cosine" (<F,P>/(||F|| ||P||)), "inner", "fisher_norm",
    "kfac_norm", "fisher_norm_estimated"}``; rho, scale and cosine are None when F or P is 0.
    """
    if stats.G is None and stats.X is None:
        raise ValueError(f"layer {stats.name}: per-sample gradients were not collected (add 'samples' to kinds)")
    if dtype is None:
        src = stats.G if stats.G is not None else stats.X
        dtype = torch.float64 if src.dtype == torch.float64 else torch.float32
    key = f"kfac_violation:{dtype}"
    if key in stats.info:
        return dict(stats.info[key])
    A0, B0 = stats.kfac_in.double(), stats.kfac_out.double()
    inner = _kfac_inner(stats, A0, B0, dtype, budget_bytes)
    pnorm = float(torch.linalg.matrix_norm(A0)) * float(torch.linalg.matrix_norm(B0))
    fnorm, estimated = fisher_norm(stats)
    out = {"rho": None, "scale": None, "cosine": None, "inner": inner, "fisher_norm": fnorm, "kfac_norm": pnorm,
           "fisher_norm_estimated": bool(estimated)}
    if fnorm > 0 and pnorm > 0:
        cos = inner / (fnorm * pnorm)
        out.update(rho=math.sqrt(max(0.0, 1.0 - cos * cos)), scale=inner / pnorm**2, cosine=cos)
    stats.info[key] = dict(out)
    return out


def _top_eigvecs(M: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The top-k eigenvectors of a symmetric matrix (float64, n x k) and the relative gap
    ``(l_k - l_{k+1}) / l_1`` (0: the k-dimensional subspace is not unique)."""
    M = M.double()
    evals, evecs = torch.linalg.eigh(0.5 * (M + M.T))
    evals, evecs = torch.flip(evals, [0]), torch.flip(evecs, [1])
    top = float(evals[0])
    nxt = float(evals[k]) if k < M.shape[0] else 0.0
    gap = (float(evals[k - 1]) - nxt) / top if top > 0 else 0.0
    return evecs[:, :k], gap


def subspace_angles(A_fisher: torch.Tensor, A_var: torch.Tensor, k: int) -> dict:
    """Principal angles between the top-k eigenspaces of two n x n PSD input factors.

    ``A_fisher``: GFWSVD's input factor (Fisher-selected directions); ``A_var``: ``E[x x^T]``
    (variance-ranked, what PCA / SVD-LLM keep). The cosines are the singular values of
    ``Q1^T Q2`` (descending, in [0, 1]); ``overlap = mean cos^2 = ||Q1^T Q2||_F^2 / k`` is 1 for
    the same subspace and ``k / n`` on average for a random pair ("chance"). The gaps
    ``(l_k - l_{k+1}) / l_1`` of each factor say whether its top-k subspace is well defined
    (near 0: e.g. fewer Fisher samples than k, and the angles are then partly arbitrary).
    """
    if A_fisher.dim() != 2 or A_fisher.shape[0] != A_fisher.shape[1] or A_fisher.shape != A_var.shape:
        raise ValueError(f"subspace_angles needs two square matrices of one size, got {tuple(A_fisher.shape)} "
                         f"and {tuple(A_var.shape)}")
    n = A_fisher.shape[0]
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    Q1, gap1 = _top_eigvecs(A_fisher, k)
    Q2, gap2 = _top_eigvecs(A_var.to(Q1.device), k)
    cos = torch.linalg.svdvals(Q1.T @ Q2).clamp(0.0, 1.0)
    return {"k": k, "n": n, "cosines": cos.tolist(), "overlap": float((cos**2).mean()), "chance": k / n,
            "min_cosine": float(cos[-1]), "gap_fisher": gap1, "gap_variance": gap2}


def alignment_summary(stats: LayerStats, factors: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                      kronecker: Optional[Mapping[str, Any]] = None, k: Optional[int] = None,
                      dW: Optional[torch.Tensor] = None, exact_quadratic: Optional[float] = None) -> dict:
    """One layer's Fisher-aligned view as a flat record (what the report and the explorer show).

    Always ``rho_kfac`` (with ``kfac_scale`` c* and ``fisher_norm_estimated``); with GFWSVD's
    ``kronecker`` diagnostics ``nkp_fit_error`` (``sqrt(1 - eta)``); with its ``factors`` (A, B) and
    a rank ``k`` the subspace ``overlap`` and its ``chance_overlap`` k/n (cached on the statistics
    for the same A and k); with a truncation residual ``dW`` the ratio of the exact quadratic
    ``1/2 vec(dW)^T F vec(dW)`` (``exact_quadratic``, else ``stats.quadratic(dW)``) to K-FAC's
    best-scaled prediction ``1/2 c* tr(dW^T B0 dW A0)`` (1: K-FAC predicts this change exactly).
    """
    v = kfac_violation(stats)
    rec = {"rho_kfac": v["rho"], "kfac_scale": v["scale"], "fisher_norm_estimated": v["fisher_norm_estimated"]}
    if kronecker is not None:
        rec["nkp_fit_error"] = kronecker.get("fit_error")
    if factors is not None and k is not None:
        A = factors[0]
        cached = stats.info.get("subspace_angles")
        if cached is not None and cached["A"] is A and cached["k"] == int(k):
            s = cached["result"]
        else:
            s = subspace_angles(A, stats.kfac_in, k)
            stats.info["subspace_angles"] = {"A": A, "k": int(k), "result": s}
        rec.update(k=s["k"], overlap=s["overlap"], chance_overlap=s["chance"], min_cosine=s["min_cosine"],
                   gap_fisher=s["gap_fisher"])
    if dW is not None and v["scale"] is not None:
        dW = dW.double()
        A0, B0 = stats.kfac_in.double().to(dW.device), stats.kfac_out.double().to(dW.device)
        predicted = 0.5 * v["scale"] * float(((B0 @ dW) * (dW @ A0)).sum())
        exact = stats.quadratic(dW) if exact_quadratic is None else float(exact_quadratic)
        rec["kfac_quadratic"] = predicted
        rec["quadratic_ratio"] = exact / predicted if predicted > 0 else None
    return rec
