"""Rank allocation: from a kept-parameter ratio or a global budget to ``{layer: rank or None}``.

``None`` means the layer stays dense: at or above the break-even rank ``mn/(m+n)`` a factorised
layer (``r(m+n)`` parameters) is no smaller than the dense one (``mn``). Ratios are always
*kept* parameters over original parameters.
"""

from __future__ import annotations

import heapq
import math
from typing import Mapping, Optional

import torch

Shape = tuple[int, int]


def check_ratio(ratio: float) -> float:
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}") from None
    if not (0 < ratio <= 1) or math.isnan(ratio):
        raise ValueError(f"ratio must be in (0, 1] (parameters kept / original), got {ratio}")
    return ratio


def rank_for_ratio(m: int, n: int, ratio: float, align: int = 1) -> Optional[int]:
    """Rank keeping about ``ratio`` of the layer's parameters, or None when it would not shrink."""
    ratio = check_ratio(ratio)
    r = int(math.floor(ratio * m * n / (m + n)))
    if align > 1:
        r = max(align, (r // align) * align)
    r = max(1, min(r, min(m, n)))
    return None if r * (m + n) >= m * n else r


def uniform_ranks(shapes: Mapping[str, Shape], ratio: float, align: int = 1) -> dict[str, Optional[int]]:
    """The same kept ratio applied to every layer."""
    return {name: rank_for_ratio(m, n, ratio, align) for name, (m, n) in shapes.items()}


def layer_params(m: int, n: int, rank: Optional[int]) -> int:
    """Weight parameters of a layer at ``rank`` (None: dense). Biases are not counted."""
    return m * n if rank is None else rank * (m + n)


def kept_params(shapes: Mapping[str, Shape], ranks: Mapping[str, Optional[int]]) -> tuple[int, int]:
    """(parameters after, parameters before) over the given layers' weights."""
    after = sum(layer_params(*shapes[n], ranks.get(n)) for n in shapes)
    before = sum(m * n for m, n in shapes.values())
    return after, before


def validate_ranks(shapes: Mapping[str, Shape], ranks: Mapping[str, Optional[int]]) -> dict[str, Optional[int]]:
    """Check an explicit rank map: known layers, integer ranks in 1..min(m, n) (or None)."""
    unknown = [n for n in ranks if n not in shapes]
    if unknown:
        raise ValueError(
            f"rank given for unknown layer(s) {', '.join(unknown[:5])}; layers that exist: "
            + ", ".join(list(shapes)[:20]) + (" ..." if len(shapes) > 20 else "")
        )
    out = {}
    for name, r in ranks.items():
        m, n = shapes[name]
        if r is None:
            out[name] = None
            continue
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(m, n):
            raise ValueError(f"rank for layer {name} must be an integer in 1..{min(m, n)} (or null for dense), got {r!r}")
        out[name] = None if r * (m + n) >= m * n else r
    return out


def budget_ranks(
    curves: Mapping[str, torch.Tensor], shapes: Mapping[str, Shape], ratio: float
) -> dict[str, Optional[int]]:
    """Minimise the summed predicted loss increase subject to a global kept-parameter ratio.

    ``curves[name][k]`` is the layer's predicted loss at rank k (non-increasing, convex in k for
    tail energies). Greedy on loss decrease per parameter is optimal for such separable convex
    curves. A layer that would reach its break-even rank is kept dense. Only meaningful when the
    curves share one scale (methods that keep the Fisher scale, e.g. GFWSVD and K-FAC).
    """
    ratio = check_ratio(ratio)
    budget = ratio * sum(m * n for m, n in shapes.values())
    ranks = {name: 1 for name in shapes}
    used = sum(m + n for m, n in shapes.values())
    if used > budget:
        raise ValueError(f"a budget of {ratio:.3f} is too small: rank 1 everywhere already keeps {used / (budget / ratio):.3f}")
    heap = []

    def push(name):
        m, n = shapes[name]
        r = ranks[name]
        curve = curves[name]
        if r is None or r >= len(curve) - 1:
            return
        gain = float(curve[r] - curve[r + 1])
        heapq.heappush(heap, (-gain / (m + n), name))

    for name in shapes:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        m, n = shapes[name]
        if used + (m + n) > budget:
            continue
        ranks[name] += 1
        used += m + n
        if ranks[name] * (m + n) >= m * n:  # reached break-even: go dense (costs mn, loss 0)
            extra = m * n - ranks[name] * (m + n)
            if used + extra <= budget:
                used += extra
                ranks[name] = None
                continue
            ranks[name] -= 1
            used -= m + n
            continue
        push(name)
    return ranks
