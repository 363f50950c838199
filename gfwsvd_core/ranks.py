"""Rank allocation: from a kept-parameter ratio or a global budget to ``{layer: rank or None}``.

``None`` means the layer stays dense: at or above the break-even rank ``mn/(m+n)`` a factorised
layer (``r(m+n)`` parameters) is no smaller than the dense one (``mn``). Ratios are always
*kept* parameters over original parameters.
"""

from __future__ import annotations

import heapq
import re
import math
from typing import Mapping, Optional

import torch

from .errors import ConfigurationError

Shape = tuple[int, int]


def break_even_rank(m: int, n: int) -> float:
    """Rank at which a factorised layer (``r(m+n)`` weights) is as large as the dense one (``mn``)."""
    return m * n / (m + n)


def shrinks(m: int, n: int, rank: Optional[int]) -> bool:
    """True when rank ``rank`` stores fewer weights than the dense layer (None: dense, False)."""
    return rank is not None and layer_params(m, n, rank) < m * n


def check_ratio(ratio: float) -> float:
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise ConfigurationError(f"ratio must be a number in (0, 1], got {ratio!r}") from None
    if not (0 < ratio <= 1) or math.isnan(ratio):
        raise ConfigurationError(f"ratio must be in (0, 1] (parameters kept / original), got {ratio}")
    return ratio


def rank_for_ratio(m: int, n: int, ratio: float, align: int = 1) -> Optional[int]:
    """Rank keeping about ``ratio`` of the layer's parameters, or None when it would not shrink."""
    ratio = check_ratio(ratio)
    if ratio >= 1:  # keeping everything means keeping the dense layer, whatever the rounding
        return None
    r = int(math.floor(ratio * break_even_rank(m, n)))
    if align > 1:
        r = max(align, (r // align) * align)
    r = max(1, min(r, min(m, n)))
    return r if shrinks(m, n, r) else None


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
        raise ConfigurationError(
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
            raise ConfigurationError(f"rank for layer {name} must be an integer in 1..{min(m, n)} (or null for dense), got {r!r}")
        out[name] = r if shrinks(m, n, r) else None
    return out


def _options(curve: torch.Tensor, m: int, n: int) -> list[tuple[int, float, Optional[int]]]:
    """``(parameters, predicted loss, rank)`` of a layer's choices in increasing parameters:
    every rank below break-even, then dense (``mn`` parameters, no loss)."""
    opts = [(layer_params(m, n, r), float(curve[r]), r) for r in range(1, min(m, n, len(curve) - 1) + 1)
            if shrinks(m, n, r)]
    opts.append((m * n, 0.0, None))
    return opts


def _lower_hull(opts: list[tuple[int, float, Optional[int]]]) -> list[int]:
    """Indices of the lower convex hull of the (parameters, loss) options, loss strictly decreasing."""
    hull: list[int] = []
    for i, (c, loss, _) in enumerate(opts):
        if hull and loss >= opts[hull[-1]][1]:
            continue  # costs more and loses no less: never worth it
        while len(hull) >= 2:
            (ca, la, _), (cb, lb, _) = opts[hull[-2]], opts[hull[-1]]
            if (lb - la) * (c - ca) >= (loss - la) * (cb - ca):  # b on or above the chord a -> i
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def budget_ranks(
    curves: Mapping[str, torch.Tensor], shapes: Mapping[str, Shape], ratio: float
) -> dict[str, Optional[int]]:
    """Minimise the summed predicted loss increase subject to a global kept-parameter ratio.

    ``curves[name][k]`` is the layer's predicted loss at rank k (non-increasing). Each layer
    chooses a rank below its break-even rank (``r(m+n)`` parameters) or dense (``mn``
    parameters, zero loss). Greedy on the lower convex hull of each layer's (parameters, loss)
    choices, best loss decrease per parameter first, then leftover parameters go to the best
    intermediate choices that still fit. This is exactly optimal whenever the budget falls on the
    greedy path (e.g. convex curves with equal step costs) and otherwise within one hull step of
    the optimum. Only meaningful when the curves share one scale (methods that keep the Fisher
    scale, e.g. GFWSVD and K-FAC).
    """
    ratio = check_ratio(ratio)
    missing = [n for n in shapes if n not in curves]
    if missing:
        raise ConfigurationError(f"no predicted-loss curve for layer(s) {', '.join(missing[:5])}")
    total = sum(m * n for m, n in shapes.values())
    budget = ratio * total
    opts = {name: _options(curves[name], m, n) for name, (m, n) in shapes.items()}
    hulls = {name: _lower_hull(o) for name, o in opts.items()}
    pos = {name: 0 for name in shapes}  # position on the hull
    idx = {name: hulls[name][0] for name in shapes}  # index into opts (the current choice)
    used = sum(opts[name][idx[name]][0] for name in shapes)
    if used > budget:
        raise ConfigurationError(f"a budget of {ratio:.3f} is too small: rank 1 everywhere already keeps {used / total:.3f}")

    heap: list = []
    order = {name: i for i, name in enumerate(shapes)}

    def push(name: str) -> None:
        h, p = hulls[name], pos[name]
        if p + 1 >= len(h):
            return
        (c0, l0, _), (c1, l1, _) = opts[name][h[p]], opts[name][h[p + 1]]
        heapq.heappush(heap, (-(l0 - l1) / (c1 - c0), order[name], name))

    for name in shapes:
        push(name)
    while heap:
        _, _, name = heapq.heappop(heap)
        h, p = hulls[name], pos[name]
        cost = opts[name][h[p + 1]][0] - opts[name][h[p]][0]
        if used + cost > budget:
            continue  # this layer's later steps cost at least as much per unit of loss: it stops here
        pos[name] = p + 1
        idx[name] = h[p + 1]
        used += cost
        push(name)

    # leftover: choices between a layer's current hull point and its next one that still fit
    while True:
        best = None
        for name in shapes:
            h, p = hulls[name], pos[name]
            stop = h[p + 1] if p + 1 < len(h) else len(opts[name])
            c0, l0, _ = opts[name][idx[name]]
            for j in range(idx[name] + 1, stop):
                c, loss, _ = opts[name][j]
                if used + c - c0 <= budget and loss < l0:
                    gain = (l0 - loss) / (c - c0)
                    if best is None or gain > best[0]:
                        best = (gain, name, j)
        if best is None:
            break
        _, name, j = best
        used += opts[name][j][0] - opts[name][idx[name]][0]
        idx[name] = j
    return {name: opts[name][idx[name]][2] for name in shapes}


def matrix_type(name: str) -> str:
    """A layer's matrix type: its name with block indices replaced, e.g.
    ``encoder.layer.3.attention.self.query`` -> ``encoder.layer.*.attention.self.query``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def v2_ranks(
    curves: Mapping[str, torch.Tensor], shapes: Mapping[str, Shape], ratio: float
) -> dict[str, Optional[int]]:
    """SVD-LLM V2's heterogeneous ranks: per matrix type, kept ratios from truncation losses.

    Matrices are grouped by type (:func:`matrix_type`: all queries, all FFN outputs, ...). Each
    matrix's theoretical truncation loss at the uniform rank is ``L_i = sqrt(2 curve_i[r])`` (for
    SVD-LLM's whitening, ``curve`` = half the tail energy, so ``L_i`` is the norm of the dropped
    singular values of ``W S``: the output error ``||dW X||_F``). Inside a group of size ``|G|``
    with removed fraction ``R = 1 - ratio``, matrix i removes ``R_i = |G| R w_i / sum_j w_j`` with
    ``w_i = 1 / log(L_i)``: higher loss, less compression. ``1/log`` is undefined for ``L <= 1``,
    so a group with any such loss uses ``log1p`` (as a public re-implementation does; V2's code
    is unreleased). Removed fractions are clipped to [0, 1); the kept total can then differ a
    little from ``ratio`` (the report states the kept ratio actually reached). Equal shapes per
    group mean each group keeps about ``ratio`` of its parameters.
    """
    ratio = check_ratio(ratio)
    missing = [n for n in shapes if n not in curves]
    if missing:
        raise ConfigurationError(f"no truncation-loss curve for layer(s) {', '.join(missing[:5])}")
    uniform = uniform_ranks(shapes, ratio)
    if ratio >= 1:
        return uniform
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(matrix_type(name), []).append(name)
    out: dict[str, Optional[int]] = {}
    removed = 1 - ratio
    for names in groups.values():
        losses = []
        for n in names:
            r = uniform[n]
            c = curves[n]
            losses.append(math.sqrt(max(2 * float(c[r]), 0.0)) if r is not None and r < len(c) else 0.0)
        f = math.log if all(L > 1 for L in losses) else math.log1p
        w = [1 / max(f(L), 1e-300) for L in losses]
        total = sum(w)
        for n, wi in zip(names, w):
            m, k = shapes[n]
            share = len(names) * removed * wi / total if total > 0 else removed
            kept = min(max(1 - share, 1e-9), 1.0)
            out[n] = rank_for_ratio(m, k, kept)
    return out
