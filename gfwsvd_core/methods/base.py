"""What a weighting method is: statistics in, a pair of PSD weights (output side, input side) out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from ..errors import ConfigurationError
from ..stats import LayerStats


@dataclass
class Weights:
    """Two-sided weights for the solver: None (identity), a diagonal vector or a PSD matrix."""

    left: Optional[torch.Tensor]  # output side, m x m or (m,)
    right: Optional[torch.Tensor]  # input side, n x n or (n,)
    damping: float = 0.0  # relative damping the solver adds before taking roots
    info: dict = field(default_factory=dict)


@dataclass
class Method:
    """Base class. Subclasses set the class attributes and implement :meth:`weights`.

    A method only turns statistics into weights; the one solver does the rest.
    """

    name: ClassVar[str] = ""  # registry key (lower case, no separators)
    label: ClassVar[str] = ""  # display name in the CLI, reports and the app
    color: ClassVar[str] = "#333333"  # one colour per method in every chart
    requires: ClassVar[tuple[str, ...]] = ()  # statistics kinds (see stats.ALL_KINDS)
    #: True when the predicted loss (half the weighted tail energy) is on the Fisher's scale, i.e.
    #: comparable across layers and with measured loss increases; False for unit-free weightings
    loss_units: ClassVar[bool] = False
    #: compared by default in the explorer (all from one statistics pass)
    explorer_default: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __post_init__(self):
        """Options are user input: reject bad values here, before any long work."""
        damping = getattr(self, "damping", 0.0)
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < float("inf"):
            raise ConfigurationError(f"{self.label or self.name} damping must be a finite number >= 0, got {damping!r}")

    def weights(self, stats: Optional[LayerStats]) -> Weights:
        """Turn one layer's statistics into solver weights (each method overrides this)."""
        raise TypeError(f"{type(self).__name__} does not implement weights()")

    def config(self) -> dict:
        from dataclasses import asdict

        return {"method": self.name, **asdict(self)}
