"""GFWSVD (Chekalina et al. 2025): the nearest Kronecker product ``A (x) B`` of the empirical Fisher."""

from dataclasses import dataclass

from ..fisher.kronecker import nearest_kronecker
from ..errors import ConfigurationError
from .base import Method, Weights


@dataclass
class GFWSVD(Method):
    """Weights ``(B, A)``: output-side and input-side Kronecker factors, ``F ~ A (x) B``."""

    init: str = "kfac"
    solver: str = "krylov"  # or "als" (power iteration, the reference) or "lanczos" (scipy svds)
    tol: float = 1e-5  # krylov: bound on the factors' angle to the exact ones; als: change per sweep
    max_sweeps: int = 50
    damping: float = 1e-6
    diagnostics: bool = True
    gap_sweeps: int = 4
    #: float64 map pairs after the float32 Krylov solve. 0 by default: on the embedded default's
    #: layers the float32 product is within 3e-6 of a float64 solve (bench/krylov_settings.py),
    #: far below the sampling error of K calibration samples, and refining cost ~40% of the
    #: solve. Use 2 for inputs whose channel spectra span many decades (bench/kronecker.py).
    refine: int = 0
    #: CUDA only: the Krylov solve's float32 products in TF32 (use with refine >= 2; see
    #: ``nearest_kronecker``); off by default until a GPU run has measured it (bench/gpu.sh)
    tf32: bool = False

    name = "gfwsvd"
    label = "GFWSVD"
    color = "#d62728"
    loss_units = True
    explorer_default = True
    requires = ("samples", "kfac")
    description = "Nearest Kronecker product of the full per-sample empirical Fisher."

    def __post_init__(self):
        super().__post_init__()
        for key, least in (("max_sweeps", 1), ("gap_sweeps", 0), ("refine", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigurationError(f"GFWSVD {key} must be an integer >= {least}, got {value!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not 0 < self.tol < 1:
            raise ConfigurationError(f"GFWSVD tol must be a number in (0, 1), got {self.tol!r}")
        if self.init not in ("kfac", "identity"):
            raise ConfigurationError(f"GFWSVD init must be 'kfac' or 'identity', got {self.init!r}")
        if not isinstance(self.tf32, bool):
            raise ConfigurationError(f"GFWSVD tf32 must be true or false, got {self.tf32!r}")
        if self.solver not in ("krylov", "als", "lanczos"):
            raise ConfigurationError(f"GFWSVD solver must be 'krylov', 'als' or 'lanczos', got {self.solver!r}")

    def weights(self, stats) -> Weights:
        fac = nearest_kronecker(stats, init=self.init, method=self.solver, tol=self.tol,
                                max_sweeps=self.max_sweeps, diagnostics=self.diagnostics, gap_sweeps=self.gap_sweeps,
                                refine=self.refine, tf32=self.tf32)
        return Weights(fac.B, fac.A, self.damping, {"kronecker": fac.diagnostics(), "factors": fac})
