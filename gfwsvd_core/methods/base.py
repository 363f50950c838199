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
    #: how the solver roots a matrix weight: "cholesky" (damping added) or "eigen" (eigenvalues
    #: below ``damping`` x their mean raised to it, SVD-LLM V2)
    root: str = "cholesky"


#: rank policies a kept ratio can be turned into ranks by (see :func:`gfwsvd_core.compress.resolve_ranks`)
ALLOCATIONS = ("uniform", "budget", "v2")


@dataclass
class Method:
    """Base class. Subclasses set the class attributes and implement :meth:`weights`.

    A method only turns statistics into weights; the one solver does the rest. Three options
    apply to every method (keyword-only, default off, so a method's name alone means its plain
    form):

    * ``update``: after truncation, re-solve the output-side factor by least squares on the
      calibration inputs (SVD-LLM's closed-form update), so the layer reproduces its dense
      outputs as well as the kept input directions allow; needs the input Gram ("inputs").
    * ``allocation``: how a kept ratio becomes ranks: ``uniform`` (the ratio in every layer),
      ``budget`` (one global budget spent where the loss estimate falls most) or ``v2``
      (SVD-LLM V2's per-type ratios from each matrix's truncation loss).
    * ``sequential``: compress block by block, collecting each block's statistics on the model
      whose earlier blocks are already compressed (one extra statistics pass per block).
    """

    update: bool = field(default=False, kw_only=True)
    allocation: str = field(default="uniform", kw_only=True)
    sequential: bool = field(default=False, kw_only=True)

    name: ClassVar[str] = ""  # registry key (lower case, no separators)
    label: ClassVar[str] = ""  # display name in the CLI, reports and the app
    color: ClassVar[str] = "#333333"  # one colour per method in every chart
    requires: ClassVar[tuple[str, ...]] = ()  # statistics kinds (see stats.ALL_KINDS)
    #: True when the predicted loss (half the weighted tail energy) is on the Fisher's scale, i.e.
    #: comparable across layers and with measured loss increases; False for unit-free weightings
    loss_units: ClassVar[bool] = False
    #: compared by default in the explorer (all from one statistics pass)
    explorer_default: ClassVar[bool] = False
    #: among auto's default candidates (False when the truncation equals another method's)
    auto_candidate: ClassVar[bool] = True
    description: ClassVar[str] = ""

    def __post_init__(self):
        """Options are user input: reject bad values here, before any long work."""
        damping = getattr(self, "damping", 0.0)
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < float("inf"):
            raise ConfigurationError(f"{self.label or self.name} damping must be a finite number >= 0, got {damping!r}")
        for key in ("update", "sequential"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigurationError(f"{self.label or self.name} {key} must be true or false, got {getattr(self, key)!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigurationError(f"{self.label or self.name} allocation must be one of {', '.join(ALLOCATIONS)}, "
                                     f"got {self.allocation!r}")

    def kinds(self) -> tuple[str, ...]:
        """Statistics kinds this configuration needs: the class's, plus the input Gram for ``update``."""
        return tuple(dict.fromkeys(self.requires + (("inputs",) if self.update else ())))

    def weights(self, stats: Optional[LayerStats]) -> Weights:
        """Turn one layer's statistics into solver weights (each method overrides this)."""
        raise TypeError(f"{type(self).__name__} does not implement weights()")

    def prefetch(self, layer_stats: list) -> None:
        """Optionally compute the weights of many layers at once, before :meth:`weights` asks for
        them one by one (GFWSVD solves small layers in batches on an accelerator). An empty list
        forgets what was prefetched and not used. The default does nothing."""

    def config(self) -> dict:
        from dataclasses import asdict

        return {"method": self.name, **asdict(self)}
