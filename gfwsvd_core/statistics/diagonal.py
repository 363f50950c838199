"""Diagonal empirical Fisher ``sum_k G_k**2`` (never the square of a mean) and ``sum_k G_k``."""

from __future__ import annotations

from .base import StatKind


class Diagonal(StatKind):
    name = "diagonal"
    needs_grad = True
    fields = ("grad_sq_sum", "grad_sum")

    def sums(self, m, n):
        return {"grad_sq_sum": (m, n), "grad_sum": (m, n)}

    def add_gradients(self, s, state, X, D):
        if X.shape[1] == 1:  # G_t = d x^T: both sums without forming G
            s.grad_sum += D[:, 0].T @ X[:, 0]
            s.grad_sq_sum += (D[:, 0] ** 2).T @ (X[:, 0] ** 2)

    def wants_chunks(self, s, state, T):
        return T != 1

    def add_chunk(self, s, state, G):  # the chunk's G_k are formed anyway: sum them here too
        s.grad_sum += G.sum(0)
        s.grad_sq_sum += (G * G).sum(0)
