"""Honest numbers about what compression lost: task metrics and per-layer loss increases.

Per layer three estimates of the loss increase of ``dW = W - W_r`` are compared:

* predicted  - half the weighted tail energy ``1/2 sum_{i>r} s_i^2`` (exact for the method's
  own quadratic model; a loss estimate only when the weights are Fisher factors);
* exact quadratic - ``mean_k <G_k, dW>^2 / 2``, the second-order term with the full empirical
  Fisher of the calibration samples (no Kronecker assumption);
* measured   - the change of the mean calibration loss when only that layer is compressed
  (on request: one evaluation per layer).
"""

from __future__ import annotations

import time

from typing import Any, Mapping, Optional, Sequence

from torch import nn

from .compress import Compression, LayerDecomposition, build_compressed, decompose_layers, resolve_ranks
from .layers import get_weight
from .methods import get_method, method_key
from .ranks import check_ratio, kept_params, uniform_ranks
from .stats import Cancelled, LayerStats
from .yardstick import compare_options, metric_intervals
from .yardstick import exact_quadratic_curve  # noqa: F401  (re-exported: the reports' yardstick)


def exact_quadratic(stats: LayerStats, dec: LayerDecomposition, rank: Optional[int], W) -> Optional[float]:
    """``mean_k <G_k, W - W_r>^2 / 2`` or None when per-sample gradients were not kept."""
    if rank is None:
        return 0.0
    if dec.exact_curve is not None:
        return float(dec.exact_curve[rank])
    if stats.X is None and stats.G is None:
        return None
    dW = W.double() - dec.decomposition.reconstruct(rank)
    return stats.quadratic(dW.float() if stats.X is not None and stats.X.dtype != dW.dtype else dW)


def fisher_alignment(stats: Optional[LayerStats], dec: LayerDecomposition, rank: Optional[int], W,
                     exact: Optional[float] = None, angles: bool = False) -> Optional[dict]:
    """Our Fisher-aligned view of one layer (``fisher.violation.alignment_summary``), or None
    without per-sample gradients and K-FAC moments: ``rho_kfac`` always; with GFWSVD's factors the
    NKP fit error and the overlap of the top-``rank`` input eigenspaces (of ``A`` and ``E[x x^T]``);
    at a kept rank also the exact quadratic over K-FAC's best-scaled prediction. Costs one
    Kronecker map per layer (``||F||`` is the one GFWSVD cached); ``angles`` adds the subspace
    overlap, two float64 eigendecompositions per layer (about 25% of a GFWSVD solve on the default,
    so reports leave it to the Fisher factors page and ``explore.fisher_alignment_table``)."""
    if (stats is None or stats.num_samples == 0 or not stats.has("samples") or stats.xx_sum is None
            or stats.dd_sum is None):
        return None
    from .fisher.violation import alignment_summary
    from .ranks import rank_for_ratio

    kron = dec.info.get("kronecker")
    factors = dec.factors if kron is not None and angles else None
    m, n = dec.shape
    k = rank if rank is not None else rank_for_ratio(m, n, 0.5)
    dW = None if rank is None else W.double() - dec.decomposition.reconstruct(rank).to(W.device)
    return alignment_summary(stats, factors, kron, None if k is None else min(k, n), dW, exact)


def measured_increase(model: nn.Module, task: Any, batches: Sequence, dec: LayerDecomposition, rank: int,
                      base_loss: float) -> float:
    """Calibration-loss change with only this layer factorised at ``rank``.

    The variant shares every other tensor with ``model`` (see :func:`build_compressed`), so a
    per-layer report costs one layer's factors per layer, not a copy of the model.
    """
    new = build_compressed(model, {dec.name: dec}, {dec.name: rank})
    return task.measured_loss(new, batches) - base_loss


def layer_report(
    model: nn.Module,
    compression: Compression,
    stats: Optional[Mapping[str, LayerStats]] = None,
    task: Any = None,
    batches: Optional[Sequence] = None,
    measure: bool = False,
    progress: Any = None,
    cancel: Any = None,
) -> list[dict]:
    """Per-layer records: rank, parameters, predicted / exact-quadratic / measured loss increase."""
    if measure and (task is None or not batches):
        raise ValueError("measuring the loss increase needs a task and calibration batches")
    recs = compression.layer_records()
    base_loss = task.measured_loss(model, batches) if measure else None
    for i, rec in enumerate(recs):
        if cancel is not None and cancel.is_set():
            raise Cancelled("evaluation cancelled")
        name = rec["layer"]
        dec = compression.decompositions[name]
        W = get_weight(model.get_submodule(name))
        r = compression.ranks.get(name)
        rec["exact_quadratic"] = exact_quadratic(stats[name], dec, r, W) if stats and name in stats else None
        if r is not None:
            rec["relative_error"] = float((W.double() - dec.decomposition.reconstruct(r)).norm() / W.double().norm())
        else:
            rec["relative_error"] = 0.0
        if measure:
            rec["measured_increase"] = 0.0 if r is None else measured_increase(model, task, batches, dec, r, base_loss)
        alignment = fisher_alignment(stats.get(name) if stats else None, dec, r, W, rec["exact_quadratic"])
        if alignment is not None:
            rec["fisher_alignment"] = alignment
        if progress:
            progress(i + 1, len(recs), f"layer report: {name}")
    return recs


def evaluate_pair(task: Any, original: nn.Module, compressed: nn.Module, batches: Sequence,
                  reference: Any = None) -> tuple[dict, dict]:
    """Task metrics of the original and the compressed model on the same evaluation batches."""
    if reference is None:
        reference = task.reference_outputs(original, batches)
    return task.evaluate(original, batches, reference), task.evaluate(compressed, batches, reference)


def sweep(
    model: nn.Module,
    stats: Mapping[str, LayerStats],
    task: Any,
    batches: Sequence,
    methods: Sequence[Any],
    ratios: Sequence[float],
    layers: Optional[list[str]] = None,
    decompositions: Optional[Mapping[str, Mapping[str, LayerDecomposition]]] = None,
    progress: Any = None,
    cancel: Any = None,
    sequential: Optional[Any] = None,
) -> list[dict]:
    """Metrics over a grid of kept ratios for several methods, from one statistics pass.

    Rows are keyed by each method's spec (:func:`gfwsvd_core.methods.method_key`, e.g.
    ``svd[update=true]``); ranks follow each method's ``allocation``. A method with
    ``sequential=True`` is compressed per ratio by ``sequential(method, ranks)`` (its ranks come
    from the one-pass decompositions).

    Each method's decompositions are computed once (or taken from ``decompositions[method]``)
    and truncated per ratio. Returns one record per (method, ratio) plus the dense baseline
    (method "dense", ratio 1.0): the data of a rank/accuracy curve. Every record carries
    bootstrap ``intervals`` over the held-out examples (with the paired change against dense),
    and with several methods each ratio's records carry ``comparison``: per metric the best
    method and the methods it is not resolved from.
    """
    ratios = [check_ratio(r) for r in ratios]
    if not ratios:
        raise ValueError("sweep needs at least one ratio")
    if not methods:
        raise ValueError("sweep needs at least one method")
    methods = [get_method(m) for m in methods]  # validate all before the long work
    reference = task.reference_outputs(model, batches)
    base_values = task.example_values(model, batches, reference)
    baseline = task.aggregate(base_values)
    rows = [{"method": "dense", "ratio": 1.0, "kept_layers": 1.0, "kept_model": 1.0, "metrics": baseline,
             "intervals": metric_intervals(task, base_values, resamples=INTERVAL_RESAMPLES)}]
    cell_values: dict[float, dict[str, dict]] = {}  # ratio -> method -> per-example values
    total = len(methods) * len(ratios)
    done = 0
    for method in methods:
        t0 = time.perf_counter()
        key = method_key(method)  # canonical spec: "GFWSVD" and "gfwsvd" share decompositions
        if method.sequential and sequential is None:
            raise ValueError(f"{key} compresses sequentially: pass sequential= (pipeline.run_sweep does)")
        decs = (decompositions or {}).get(key) or decompose_layers(model, stats, method, layers, cancel=cancel)
        t_dec = time.perf_counter() - t0
        for ratio in ratios:
            if cancel is not None and cancel.is_set():
                raise Cancelled("sweep cancelled")
            ranks = resolve_ranks(decs, ratio, allocation=method.allocation)
            if method.sequential:
                comp = sequential(method, ranks)
            else:
                comp = Compression(build_compressed(model, decs, ranks), key, ranks, dict(decs))
            shapes = {n: d.shape for n, d in comp.decompositions.items()}
            after, before = kept_params(shapes, comp.ranks)
            values = task.example_values(comp.model, batches, reference)
            metrics = task.aggregate(values)
            cell_values.setdefault(ratio, {})[key] = values
            rows.append({
                "method": key, "ratio": ratio,
                "kept_layers": after / before, "kept_model": comp.kept_ratio(model)["model"],
                "metrics": metrics, "decompose_seconds": t_dec,
                "intervals": metric_intervals(task, values, base_values, resamples=INTERVAL_RESAMPLES),
            })
            done += 1
            if progress:
                progress(done, total, f"sweep: {key} at {ratio:.2f}")
    hib = getattr(task, "higher_is_better", {})
    verdicts: dict[float, dict] = {}
    for ratio, cells in cell_values.items():  # per ratio and metric: the best method, resolved or not
        if len(cells) > 1:
            verdicts[ratio] = {}
            for m in baseline:
                c = compare_options(task, cells, m, hib.get(m, False), resamples=INTERVAL_RESAMPLES)
                verdicts[ratio][m] = {"best": c["best"], "all_resolved": c["all_resolved"],
                                      "unresolved": [k for k, ok in c["resolved"].items() if not ok]}
    for row in rows[1:]:
        if row["ratio"] in verdicts:
            row["comparison"] = verdicts[row["ratio"]]
    return rows


#: bootstrap draws per sweep cell (each draw re-aggregates the held-out examples)
INTERVAL_RESAMPLES = 500
