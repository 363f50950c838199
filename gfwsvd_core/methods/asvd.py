"""ASVD (Yuan et al. 2023): scale input channels by their mean absolute activation to the power alpha."""

from dataclasses import dataclass

from ..errors import ConfigurationError
from .base import Method, Weights


@dataclass
class ASVD(Method):
    alpha: float = 0.5
    damping: float = 1e-6

    name = "asvd"
    label = "ASVD"
    color = "#9467bd"
    loss_units = False
    explorer_default = False
    requires = ("inputs",)
    description = "Activation-aware: input channels scaled by mean |x|^alpha (no gradients)."

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 4:
            raise ConfigurationError(f"ASVD alpha must be a number in [0, 4], got {self.alpha!r}")

    def weights(self, stats) -> Weights:
        s = stats.act_absmean ** self.alpha  # the scaling S; the weight is S^2 (diagonal)
        return Weights(None, s * s, self.damping, {"alpha": self.alpha})
