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
        s.grad_sum += (D.reshape(-1, D.shape[-1]).T @ X.reshape(-1, X.shape[-1])).double()
        if X.shape[1] == 1:  # G_t = d x^T  =>  sum_t G_t**2 = (D*D)^T (X*X), no G formed
            s.grad_sq_sum += ((D[:, 0] ** 2).T @ (X[:, 0] ** 2)).double()

    def wants_chunks(self, s, state, T):
        return T != 1

    def add_chunk(self, s, state, G):
        s.grad_sq_sum += (G * G).sum(0).double()
