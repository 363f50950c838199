"""GFWSVD (Chekalina et al. 2025): the nearest Kronecker product ``A (x) B`` of the empirical Fisher."""

from dataclasses import dataclass

from ..fisher.kronecker import nearest_kronecker
from .base import Method, Weights


@dataclass
class GFWSVD(Method):
    """Weights ``(B, A)``: output-side and input-side Kronecker factors (design.md 2)."""

    init: str = "kfac"
    solver: str = "als"
    tol: float = 1e-5  # factor change per sweep; the product is then accurate to ~1e-5 * g/(1-g)
    max_sweeps: int = 50
    damping: float = 1e-6
    diagnostics: bool = True
    gap_sweeps: int = 4

    name = "gfwsvd"
    label = "GFWSVD"
    color = "#d62728"
    loss_units = True
    explorer_default = True
    requires = ("samples", "kfac")
    description = "Nearest Kronecker product of the full per-sample empirical Fisher."

    def weights(self, stats) -> Weights:
        fac = nearest_kronecker(stats, init=self.init, method=self.solver, tol=self.tol,
                                max_sweeps=self.max_sweeps, diagnostics=self.diagnostics, gap_sweeps=self.gap_sweeps)
        return Weights(fac.B, fac.A, self.damping, {"kronecker": fac.diagnostics(), "factors": fac})
