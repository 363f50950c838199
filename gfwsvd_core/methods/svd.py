"""Plain truncated SVD: minimise ``||W - W_r||_F`` (no statistics)."""

from dataclasses import dataclass

from .base import Method, Weights


@dataclass
class SVD(Method):
    name = "svd"
    label = "SVD"
    color = "#7f7f7f"
    loss_units = False
    explorer_default = True
    requires = ()
    description = "Keeps the largest singular directions of W; blind to data and loss."

    def weights(self, stats=None) -> Weights:
        return Weights(None, None)
