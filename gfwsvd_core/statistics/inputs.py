"""Forward-only input moments: the Gram ``sum_t x x^T`` and the per-channel ``sum_t |x|``."""

from __future__ import annotations

from ..gram import add_gram
from .base import StatKind


class Inputs(StatKind):
    name = "inputs"
    fields = ("xx_sum", "abs_x_sum")

    def sums(self, m, n):
        return {"xx_sum": (n, n), "abs_x_sum": (n,)}

    def add_inputs(self, s, state, flat):  # per-batch products in float32, running sums in float64
        add_gram(s.xx_sum, flat)  # (n, N_b) @ (N_b, n), upper block triangle
        s.abs_x_sum += flat.abs().sum(0)
