"""K-FAC-weighted SVD (as in KFAC-SVD): roots of E[d d^T] (output side) and E[x x^T] (input side)."""

from dataclasses import dataclass

from ..fisher.kfac import kfac_factors
from .base import Method, Weights


@dataclass
class KFAC(Method):
    damping: float = 1e-6

    name = "kfac"
    label = "K-FAC"
    color = "#2ca02c"
    loss_units = True
    explorer_default = True
    requires = ("kfac",)
    description = "Token second moments of inputs and output gradients, assumed independent."

    def weights(self, stats) -> Weights:
        A, B = kfac_factors(stats)
        return Weights(B, A, self.damping)
