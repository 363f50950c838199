"""FWSVD (Hsu et al., ICLR 2022): one-sided weighting by the diagonal Fisher, summed per row/column."""

from ..errors import ConfigurationError
from dataclasses import dataclass

from ..fisher.diagonal import fwsvd_weight
from .base import Method, Weights


@dataclass
class FWSVD(Method):
    """``side="in"`` (default) weights input columns, as the public re-implementations and the
    GFWSVD authors' baseline do; ``side="out"`` weights output rows, as the paper words it."""

    side: str = "in"
    damping: float = 1e-6

    name = "fwsvd"
    label = "FWSVD"
    color = "#1f77b4"
    loss_units = False
    explorer_default = True
    requires = ("diagonal",)
    description = "Diagonal Fisher summed along one dimension weights the other side."

    def __post_init__(self):
        super().__post_init__()
        if self.side not in ("in", "out"):
            raise ConfigurationError(f"FWSVD side must be 'in' or 'out', got {self.side!r}")

    def weights(self, stats) -> Weights:
        w = fwsvd_weight(stats, self.side)
        if self.side == "in":
            return Weights(None, w, self.damping, {"side": "in"})
        return Weights(w, None, self.damping, {"side": "out"})
