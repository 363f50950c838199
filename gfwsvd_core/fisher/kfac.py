"""K-FAC factors of a linear layer (Martens & Grosse 2015), "expand" flavour for sequences."""

from __future__ import annotations

import torch

from ..stats import LayerStats


def kfac_factors(stats: LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B) = (E_t[x x^T], sum_t d d^T / K)``: input side n x n, output side m x m.

    Their Kronecker product approximates the per-sample Fisher at its own scale when tokens
    are independent (exact for one datum); the gap to the nearest Kronecker product is the
    "dependence" GFWSVD captures.
    """
    return stats.kfac_in, stats.kfac_out


def kfac_violation(stats: LayerStats, F_norm: float, s1: float | None = None) -> float:
    """``||F - c A (x) B||_F / ||F||_F`` with the best scalar c (our diagnostic, not FASC's rho).

    Uses ``<F, A (x) B> = E_k tr(G_k^T B G_k A)`` from the stored samples, so F is never formed.
    """
    A, B = (t.float() for t in kfac_factors(stats))
    dev = A.device
    inner = 0.0
    for G in stats.per_sample_gradients():
        G = G.to(dev)
        inner += float(((B @ G) * (G @ A)).sum())  # sum_k tr(G_k^T B G_k A)
    inner /= stats.num_samples
    norm_kron = float(torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(B))
    if F_norm == 0 or norm_kron == 0:
        return 1.0
    cos = inner / (F_norm * norm_kron)
    return float(max(0.0, 1.0 - cos**2) ** 0.5)
