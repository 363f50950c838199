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

