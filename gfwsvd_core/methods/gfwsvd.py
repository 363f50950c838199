"""GFWSVD (Chekalina et al. 2025): the nearest Kronecker product ``A (x) B`` of the empirical Fisher."""

from dataclasses import dataclass

from ..fisher.kronecker import nearest_kronecker, nearest_kronecker_batch
from ..errors import ConfigurationError
from .base import Method, Weights


#: layers of at most this many weights are "small": batched by ``batch`` (a 1024 x 2048 layer)
BATCH_MAX_ENTRIES = 2**21


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
    #: solve small layers (at most ``BATCH_MAX_ENTRIES`` weights) of one shape together, one
    #: batched Krylov iteration for all (``nearest_kronecker_batch``): "auto" does on CUDA, where
    #: small layers' solves are launches and host synchronisations rather than flops; "on", "off".
    #: On a CPU it is slower (24 MiniLM attention layers: 11.1 s against 9.9 s one by one; the
    #: batched maps skip the symmetric block savings), hence not the CPU default
    batch: str = "auto"

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
        if self.batch not in ("auto", "on", "off"):
            raise ConfigurationError(f"GFWSVD batch must be 'auto', 'on' or 'off', got {self.batch!r}")
        if self.solver not in ("krylov", "als", "lanczos"):
            raise ConfigurationError(f"GFWSVD solver must be 'krylov', 'als' or 'lanczos', got {self.solver!r}")

    def prefetch(self, layer_stats: list) -> None:
        """Solve the small layers among ``layer_stats`` in batches (see ``batch``); ``weights``
        then takes their factors instead of solving them again."""
        self.__dict__["_prefetched"] = {}
        if self.solver != "krylov" or self.batch == "off" or len(layer_stats) < 2:
            return
        pick = []
        for st in layer_stats:
            src = st.G if st.G is not None else st.X
            if src is None or st.shard is not None or st.num_samples == 0:
                continue
            if st.out_features * st.in_features > BATCH_MAX_ENTRIES:
                continue
            if self.batch == "auto" and src.device.type != "cuda":
                continue
            pick.append(st)
        if len(pick) < 2:
            return
        facs = nearest_kronecker_batch(pick, init=self.init, tol=self.tol, max_sweeps=self.max_sweeps,
                                       diagnostics=self.diagnostics, refine=self.refine, tf32=self.tf32)
        self._prefetched = {(st.name, id(st)): f for st, f in zip(pick, facs)}

    def weights(self, stats) -> Weights:
        fac = self.__dict__.get("_prefetched", {}).pop((stats.name, id(stats)), None)
        if fac is None:
            fac = nearest_kronecker(stats, init=self.init, method=self.solver, tol=self.tol,
                                    max_sweeps=self.max_sweeps, diagnostics=self.diagnostics,
                                    gap_sweeps=self.gap_sweeps, refine=self.refine, tf32=self.tf32)
        return Weights(fac.B, fac.A, self.damping, {"kronecker": fac.diagnostics(), "factors": fac})
