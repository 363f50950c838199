"""The product's common yardstick: the exact empirical-Fisher quadratic of a truncation, per rank.

Every method's own predicted loss (its weighted tail energy) is exact only under its own weighting
and, for most methods, not in loss units, so it cannot rank layers or methods against each other.
``mean_k <G_k, W - W_r>^2 / 2`` uses the full per-sample Fisher of the calibration samples: one
scale for every layer and method, and checkable against a measured loss change.
"""

from __future__ import annotations

from typing import Optional

import torch

from .solver import WeightedDecomposition
from .stats import LayerStats


def per_sample_quadratics(stats: LayerStats, decomposition: WeightedDecomposition, W,
                          budget_bytes: int = 256 * 2**20) -> Optional[torch.Tensor]:
    """Entry (k, r): ``<G_k, W - W_r>^2 / 2`` for every sample k and rank r = 0 .. min(m, n)
    (float64), or None when per-sample gradients were not kept. Their mean over k is
    :func:`exact_quadratic_curve`; their spread gives its interval.

    The common yardstick of the product: the second-order loss increase under the full empirical
    Fisher of the calibration samples, in loss units for every method (each method's own
    predicted loss is exact only for its own weighting). With ``W_r = sum_{i<=r} up_i down_i^T``,
    ``<G_k, W - W_r> = <G_k, W> - sum_{i<=r} up_i^T G_k down_i``, so one pass over the samples
    gives the whole curve (cost ``K m n R``, or ``K T (m + n) R`` for factored samples).
    """
    if stats.X is None and stats.G is None:
        return None
    if stats.num_samples == 0:
        raise ValueError(f"layer {stats.name}: empty statistics (no calibration samples)")
    src = stats.X if stats.X is not None else stats.G
    up, down = decomposition.factors(decomposition.max_rank)  # (m, R), (R, n)
    up, down = up.to(src.device, src.dtype), down.to(src.device, src.dtype)
    W = W.detach().to(src.device, src.dtype)
    parts = []
    with torch.no_grad():
        if stats.X is not None:
            per = stats.X.shape[1] * (up.shape[0] + down.shape[1] + 2 * up.shape[1]) * src.element_size()
            c = max(1, budget_bytes // max(per, 1))
            for X, D in zip(stats.X.split(c), stats.D.split(c)):
                Xd = X @ down.T  # (c, T, R): x_t . down_i
                Du = D @ up  # (c, T, R): d_t . up_i
                coef = (Xd * Du).sum(1)  # (c, R): up_i^T G_k down_i, G_k = D_k^T X_k
                full = ((D @ W) * X).sum((1, 2))  # <G_k, W>
                parts.append((full, coef))
        else:
            per = 2 * up.shape[0] * max(up.shape[1], down.shape[1]) * src.element_size()
            c = max(1, budget_bytes // max(per, 1))
            for G in stats.G.split(c):
                coef = ((G @ down.T) * up).sum(1)  # (c, R)
                full = (G * W).sum((1, 2))
                parts.append((full, coef))
    full = torch.cat([f for f, _ in parts]).double()  # (K,)
    coef = torch.cat([c for _, c in parts]).double()  # (K, R)
    if stats.shard is not None:  # every rank's samples, in rank (= one-process) order
        full, coef = stats.shard.cat(full), stats.shard.cat(coef)
    inner = full[:, None] - torch.cat([coef.new_zeros(coef.shape[0], 1), coef.cumsum(1)], 1)  # (K, R+1)
    return 0.5 * inner ** 2


def exact_quadratic_curve(stats: LayerStats, decomposition: WeightedDecomposition, W,
                          budget_bytes: int = 256 * 2**20) -> Optional[torch.Tensor]:
    """Entry r: ``mean_k <G_k, W - W_r>^2 / 2`` for every rank r = 0 .. min(m, n) (float64), or
    None when per-sample gradients were not kept."""
    q = per_sample_quadratics(stats, decomposition, W, budget_bytes)
    return None if q is None else q.mean(0)


def percentile_span(draws, level: float = 0.95) -> list[float]:
    """``[low, high]``: the central ``level`` range of bootstrap draws (percentile interval)."""
    a = (1 - level) / 2
    t = torch.as_tensor(draws, dtype=torch.float64).reshape(-1)
    return torch.quantile(t, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()


def bootstrap_interval(values: torch.Tensor, level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` (K,) and its percentile-bootstrap interval.

    With few samples (the default retrieval task has K = 16 batch samples) the interval is wide,
    and that is the point: it says how far the calibration set pins the number down."""
    v = values.double().reshape(-1)
    mean = float(v.mean())
    if v.numel() < 2:
        return mean, float("-inf"), float("inf")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (resamples, v.numel()), generator=g)
    lo, hi = percentile_span(v[idx].mean(1), level)
    return mean, lo, hi


def best_of(per_sample: dict[str, torch.Tensor], level: float = 0.95) -> dict:
    """The option with the lowest mean of its per-sample values, and whether that is resolved.

    ``per_sample[name]`` holds the same samples' values for each option (e.g. each method's
    per-sample quadratics at one rank), so the comparison is paired: the best is resolved against
    another option when the bootstrap interval of their mean difference excludes zero. Returns
    ``{"best", "resolved": {other: bool}, "all_resolved"}``."""
    if not per_sample:
        raise ValueError("nothing to compare")
    means = {k: float(v.double().mean()) for k, v in per_sample.items()}
    best = min(means, key=means.get)
    resolved = {}
    for other, v in per_sample.items():
        if other == best:
            continue
        _, lo, _ = bootstrap_interval(v.double() - per_sample[best].double(), level)
        resolved[other] = lo > 0
    return {"best": best, "resolved": resolved, "all_resolved": all(resolved.values())}


def metric_intervals(task, values: dict, reference_values: Optional[dict] = None, level: float = 0.95,
                     resamples: int = 1000, seed: int = 0) -> dict:
    """Bootstrap intervals of a task's metrics over its held-out examples.

    ``values`` are ``task.example_values(...)`` of one model; each resample draws the examples
    with replacement and re-aggregates them (``task.aggregate``), so ratios such as a token-
    weighted loss are resampled correctly. With ``reference_values`` (the dense model on the same
    examples) the same draws give the interval of the change, paired per example: a change whose
    interval excludes zero is resolved. Returns ``{"level", "metrics": {m: [lo, hi]},
    "change": {m: [lo, hi]}, "resolved": {m: bool}}`` (the last two only with a reference)."""
    n = next(iter(values.values())).shape[0]
    g = torch.Generator().manual_seed(seed)
    draws: dict[str, list[float]] = {}
    diffs: dict[str, list[float]] = {}
    for _ in range(resamples):
        idx = torch.randint(0, n, (n,), generator=g)
        m = task.aggregate({k: v[idx] for k, v in values.items()})
        for k, v in m.items():
            draws.setdefault(k, []).append(v)
        if reference_values is not None:
            base = task.aggregate({k: v[idx] for k, v in reference_values.items()})
            for k, v in m.items():
                diffs.setdefault(k, []).append(v - base[k])

    def span(xs: list[float]) -> list[float]:
        return percentile_span(xs, level)

    out = {"level": level, "examples": n, "metrics": {k: span(v) for k, v in draws.items()}}
    if reference_values is not None:
        out["change"] = {k: span(v) for k, v in diffs.items()}
        out["resolved"] = {k: not (lo <= 0 <= hi) for k, (lo, hi) in out["change"].items()}
    return out


def compare_options(task, values_by_option: dict, metric: str, higher_is_better: bool = False,
                    level: float = 0.95, resamples: int = 1000, seed: int = 0) -> dict:
    """Which option (e.g. method at one kept ratio) is best on ``metric``, and is that resolved?

    All options must be evaluated on the same held-out examples; each draw resamples the examples
    once for all options (paired) and re-aggregates. The best is resolved against another option
    when the interval of their metric difference excludes zero. Returns ``{"best", "resolved":
    {other: bool}, "all_resolved"}``."""
    names = list(values_by_option)
    if not names:
        raise ValueError("nothing to compare")
    point = {k: task.aggregate(v)[metric] for k, v in values_by_option.items()}
    best = (max if higher_is_better else min)(point, key=point.get)
    n = next(iter(values_by_option[best].values())).shape[0]
    g = torch.Generator().manual_seed(seed)
    diffs: dict[str, list[float]] = {k: [] for k in names if k != best}
    for _ in range(resamples):
        idx = torch.randint(0, n, (n,), generator=g)
        b = task.aggregate({k: v[idx] for k, v in values_by_option[best].items()})[metric]
        for other in diffs:
            o = task.aggregate({k: v[idx] for k, v in values_by_option[other].items()})[metric]
            diffs[other].append(b - o)
    resolved = {}
    for other, d in diffs.items():
        lo, hi = percentile_span(d, level)
        resolved[other] = not (lo <= 0 <= hi)
    return {"best": best, "resolved": resolved, "all_resolved": all(resolved.values())}
