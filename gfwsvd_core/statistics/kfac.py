"""K-FAC ("expand"): the output-gradient moment ``sum_t d d^T``; the input side is "inputs"."""

from __future__ import annotations

from ..gram import add_gram
from .base import StatKind


class KFAC(StatKind):
    name = "kfac"
    needs_grad = True
    requires = ("inputs",)  # kfac_in reads xx_sum: shared, accumulated once
    fields = ("dd_sum",)

    def sums(self, m, n):
        return {"dd_sum": (m, m)}

    def add_gradients(self, s, state, X, D):
        add_gram(s.dd_sum, D.reshape(-1, D.shape[-1]))  # float32 blocks into the float64 sum
