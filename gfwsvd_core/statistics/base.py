"""The interface of one kind of calibration statistic, and the shared running-sum behaviour.

A kind owns some fields of :class:`~gfwsvd_core.stats.LayerStats` (its running sums or kept
samples) and says how to size, start, accumulate, finish and merge them. The collector calls
every selected kind once per batch, so sums two kinds share live in one kind that the other
``requires`` (K-FAC reads the input moments of "inputs"; nothing is accumulated twice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:  # stats.py imports this package; no import back at run time
    from ..stats import LayerStats

FLOAT = 4  # bytes per kept float32 sample value
DOUBLE = 8  # bytes per float64 running-sum value


@dataclass
class Context:
    """Per-collection settings a kind may need when it starts a layer."""

    storage: Any = "auto"  # the storage request: a mode or {layer: mode}
    device: Optional[torch.device] = None  # where kept statistics live


def get_field(s: "LayerStats", name: str):
    """A statistic's value: a LayerStats attribute, else an entry of ``s.extra`` (new kinds)."""
    return getattr(s, name) if name in type(s).__dataclass_fields__ else s.extra.get(name)


def set_field(s: "LayerStats", name: str, value) -> None:
    if name in type(s).__dataclass_fields__:
        setattr(s, name, value)
    else:
        s.extra[name] = value


class StatKind:
    """One kind of statistic. Subclasses set ``name`` and override what they need.

    The defaults implement a kind made only of float64 running sums: list their shapes in
    :meth:`sums`, accumulate into them in :meth:`add_inputs` / :meth:`add_gradients` /
    :meth:`add_chunk`, and sizing, zero start, merge (sum) and the collected test come for free.
    Sample counts (``num_samples``, ``num_tokens``) belong to the collector, not to kinds.
    """

    name: str = ""
    needs_grad: bool = False  # whether it needs the output gradients (a backward pass)
    requires: tuple[str, ...] = ()  # kinds whose fields it reads; collected with it, once
    fields: tuple[str, ...] = ()  # the LayerStats fields (or ``extra`` keys) it owns

    def sums(self, m: int, n: int) -> dict[str, tuple[int, ...]]:
        """Shapes of its float64 running sums for an m x n layer (keys among ``fields``)."""
        return {}

    def layer_bytes(self, m: int, n: int, num_samples: int, tokens_per_sample: int, storage: str) -> int:
        """Bytes it keeps for one layer (``storage``: the layer's requested mode)."""
        return sum(math.prod(shape) * DOUBLE for shape in self.sums(m, n).values())

    def init(self, s: "LayerStats", ctx: Context) -> Any:
        """Start a layer: zero the running sums; returns per-layer state passed back below."""
        for f, shape in self.sums(s.out_features, s.in_features).items():
            set_field(s, f, torch.zeros(shape, dtype=torch.float64, device=ctx.device))
        return None

    def add_inputs(self, s: "LayerStats", state: Any, flat: torch.Tensor) -> None:
        """Forward statistics of one batch; ``flat`` (N_b, n) float32 holds its valid tokens."""

    def add_gradients(self, s: "LayerStats", state: Any, X: torch.Tensor, D: torch.Tensor) -> None:
        """Gradient statistics of one batch: X (K_b, T, n), D (K_b, T, m) per sample, float32."""

    def wants_chunks(self, s: "LayerStats", state: Any, T: int) -> bool:
        """Whether it needs the per-sample weight gradients G_k = D_k^T X_k of this batch."""
        return False

    def add_chunk(self, s: "LayerStats", state: Any, G: torch.Tensor) -> None:
        """One chunk (c, m, n) of per-sample gradients, formed once for all kinds that want it."""

    def finish(self, s: "LayerStats", state: Any) -> None:
        """Turn the per-layer state into the final fields (after the last batch)."""

    def collected(self, s: "LayerStats") -> bool:
        return bool(self.fields) and get_field(s, self.fields[0]) is not None

    def merge(self, out: "LayerStats", a: "LayerStats", b: "LayerStats") -> None:
        """Set its fields of ``out`` from two partial statistics of the same layer (sum of sums)."""
        for f in self.fields:
            x, y = get_field(a, f), get_field(b, f)
            set_field(out, f, None if x is None and y is None else x + y.to(x.device))
