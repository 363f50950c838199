"""Per-sample gradients, kept factored ``(X_k, D_k)`` or materialised ``G_k`` (the cost rule)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from .base import FLOAT, Context, StatKind

if TYPE_CHECKING:
    from ..stats import LayerStats

STORAGE_MODES = ("auto", "factored", "materialized")


def map_flops(m: int, n: int, T: int, storage: str) -> float:
    """Flops of one Kronecker map ``E[G A G^T]`` per sample: factored, products through the T
    tokens of ``(X_k, D_k)``; materialised, two dense products with the m x n ``G_k``."""
    if storage == "factored":
        return 2.0 * (T * (m * m + n * n) + T * T * (m + n))
    return 2.0 * m * n * (m + n)


def map_pair_flops(m: int, n: int, T: int, storage: str) -> float:
    """Flops per sample of one Krylov step (``E[G A G^T]`` and ``E[G^T B G]``) as
    :class:`gfwsvd_core.fisher.kronecker._Samples` computes them: the products on the larger side
    by block triangles (a share ``(b + 1) / 2b`` of a GEMM with b blocks, see ``gfwsvd_core.gram``)."""
    from ..gram import _blocks

    def tri(d: int) -> float:  # share of a GEMM left by a d x d block triangle
        b = _blocks(d)
        return (b + 1) / (2 * b)

    if storage == "factored":
        # out: X A, (X A) X^T, S D, D^T (S D) by its upper triangle; in: D L (triangle), (D L) D^T, S X, X^T S X
        return 2.0 * (2 * T * n * n + 2 * T * T * (m + n) + 2 * tri(m) * T * m * m)
    wide, tall = n > m and _blocks(n) > 1, m > n and _blocks(m) > 1
    out = (tri(n) * m * n * n + m * m * n) if wide else (m * n * n + tri(m) * m * m * n)
    inn = (tri(m) * m * m * n + m * n * n) if tall else (m * m * n + tri(n) * m * n * n)
    return 2.0 * (out + inn)


def choose_storage(m: int, n: int, T: int) -> str:
    """Factored when its map is cheaper in flops than the materialised one (per layer)."""
    return "factored" if map_flops(m, n, T, "factored") < map_flops(m, n, T, "materialized") else "materialized"


def resolve_storage(storage, name: str, m: int, n: int, T: int) -> str:
    """The storage of one layer from a request (a mode or ``{layer: mode}``; "auto": cost rule)."""
    mode = storage.get(name, "auto") if isinstance(storage, Mapping) else storage
    if mode not in STORAGE_MODES:
        raise ValueError(f"unknown storage {mode!r} for layer {name}; valid: {', '.join(STORAGE_MODES)}")
    return choose_storage(m, n, T) if mode == "auto" else mode


class _Running:
    def __init__(self, request: Any, device):
        self.request, self.device = request, device
        self.storage: Optional[str] = None  # resolved on the first batch (needs T)
        self.X: list[torch.Tensor] = []
        self.D: list[torch.Tensor] = []
        self.G: list[torch.Tensor] = []


def _pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (K_i, T_i, f) along samples, zero-padding tokens to the longest T."""
    T = max(x.shape[1] for x in parts)
    return torch.cat([nn.functional.pad(x, (0, 0, 0, T - x.shape[1])) for x in parts])


class Samples(StatKind):
    name = "samples"
    needs_grad = True
    fields = ("X", "D", "G")

    def layer_bytes(self, m, n, num_samples, tokens_per_sample, storage):
        mode = choose_storage(m, n, tokens_per_sample) if storage == "auto" else storage
        per = tokens_per_sample * (m + n) if mode == "factored" else m * n
        return num_samples * per * FLOAT

    def init(self, s: "LayerStats", ctx: Context) -> _Running:
        return _Running(ctx.storage, ctx.device)

    def add_gradients(self, s, state: _Running, X, D):
        if state.storage is None:
            state.storage = resolve_storage(state.request, s.name, s.out_features, s.in_features, X.shape[1])
        if state.storage == "factored":
            state.X.append(X.to(state.device))
            state.D.append(D.to(state.device))

    def wants_chunks(self, s, state: _Running, T):
        return state.storage == "materialized"

    def add_chunk(self, s, state: _Running, G):
        state.G.append(G.to(state.device))

    def finish(self, s, state: _Running):
        if state.X:
            s.X, s.D = _pad_cat(state.X), _pad_cat(state.D)
        if state.G:
            s.G = torch.cat(state.G)

    def collected(self, s):
        return s.X is not None or s.G is not None

    def merge(self, out, a, b):
        """Samples of ``a`` then ``b``; mixed storages are merged materialised (G_k is exact either way)."""
        dev = (a.X if a.X is not None else a.G).device
        if a.storage == b.storage == "factored":
            out.X = _pad_cat([a.X, b.X.to(dev)])
            out.D = _pad_cat([a.D, b.D.to(dev)])
        else:
            out.G = torch.cat([_materialised(a).to(dev), _materialised(b).to(dev)])


def _materialised(s: "LayerStats") -> torch.Tensor:
    if s.G is not None:
        return s.G
    return torch.cat([s.X.new_zeros(0, *s.shape), *s.per_sample_gradients()])
