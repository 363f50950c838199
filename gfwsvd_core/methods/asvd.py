"""ASVD (Yuan et al. 2023): scale input channels by their mean absolute activation to the power alpha."""

from dataclasses import dataclass

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

    def weights(self, stats) -> Weights:
        s = stats.act_absmean ** self.alpha  # the scaling S; the weight is S^2 (diagonal)
        return Weights(None, s * s, self.damping, {"alpha": self.alpha})
