"""The end-to-end flow shared by the CLI and the app.

load -> calibration/evaluation data -> statistics -> per-method decompositions -> ranks ->
compressed model -> evaluation -> report/export. An :class:`Experiment` holds what one flow
produced so far; every stage is timed and every input is recorded for the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from . import distributed
from .compress import (Compression, LayerDecomposition, build_compressed, compress, decompose_layers, resolve_ranks,
                       updated_layer)
from .factorized import LowRankLinear, replace_layer
from .data import TextSource, load_texts, split_texts
from .evaluate import layer_report, sweep
from .layers import get_weight, select_layers
from .errors import ConfigurationError, DataError, OutputPathError
from .meter import StageRecord, lifetime_peak_mb, measure, release_memory
from .methods import get_method, method_key
from .models import ModelBundle, default_layers, load_model
from .stats import Cancelled, LayerStats, collect_statistics, estimate_memory, has_kinds, merge_stats
from .yardstick import metric_intervals

DEFAULTS = {
    "model": "default", "task": None, "calib": "default", "text_column": None, "label_column": None,
    "split": "train",
    "samples": 128, "eval_samples": 256, "max_length": 128, "batch_size": 8, "seed": 0,
    "fisher": "empirical", "sample_unit": None, "layers": None, "device": None, "dtype": "float32",
}

#: model dtypes ``prepare(dtype=)`` loads in; statistics and factors are float32/float64 whatever
#: the model's dtype, and compressed weights are cast back to it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Experiment:
    """Model, task and data of one compression study, plus what has been computed on them."""

    bundle: ModelBundle
    task: Any
    calib: TextSource
    evaluation: TextSource
    calib_batches: list
    eval_batches: list
    settings: dict
    layers: list[str]
    stats: Optional[dict[str, LayerStats]] = None
    #: ``{method_key(method): {layer: decomposition}}``; a default-configured method's key is its name
    decompositions: dict[str, dict[str, LayerDecomposition]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds of the latest run of each stage
    stages: dict[str, dict] = field(default_factory=dict)  # time and peak memory of the latest run of each stage
    warnings: list[str] = field(default_factory=list)  # data-level warnings (skipped texts, small splits)
    #: what the task fitted on the dense model's calibration batches (e.g. a probe head), for the report
    task_setup: Optional[dict] = None
    #: statistics of the even and the odd calibration batches (collected when a composite method
    #: such as auto is requested; the full statistics are their merge)
    fold_stats: Optional[tuple[dict, dict]] = None
    #: ``{method_key: {layer: decomposition}}`` fitted on the first fold only (auto's candidates)
    fold_decompositions: dict[str, dict[str, LayerDecomposition]] = field(default_factory=dict)
    #: decompose with ``lean=True`` (weights dropped per layer): set from a memory plan that says the
    #: caches do not fit (``gfwsvd_core.plan``)
    lean: bool = False
    #: move each lean decomposition to host memory once solved (a plan for an accelerator whose
    #: budget cannot hold every layer's decomposition sets it; see ``offload_decomposition``)
    offload: bool = False
    #: the layer groups of a streamed collection (:func:`collect_streamed`): their statistics were
    #: consumed and freed, ``stats`` holds counts only; None after a plain :func:`collect`
    streamed: Optional[list[list[str]]] = None
    _reference: Any = None
    _baseline: Optional[dict] = None
    _time_estimate: Optional[dict] = None

    @property
    def model(self):
        return self.bundle.model

    @property
    def sample_unit(self) -> str:
        return self.settings["sample_unit"] or self.task.default_sample_unit

    def reference(self):
        """Outputs of the uncompressed model on the evaluation set (computed once)."""
        if self._reference is None:
            self._reference = self.task.reference_outputs(self.model, self.eval_batches)
        return self._reference

    def calibration_loss(self) -> float:
        """The dense model's loss on the calibration batches (computed once): the reference of
        measured loss increases."""
        if getattr(self, "_calib_loss", None) is None:
            self._calib_loss = self.task.measured_loss(self.model, self.calib_batches)
        return self._calib_loss

    def baseline_values(self) -> dict:
        """Per-example values of the uncompressed model on the evaluation set (computed once)."""
        if getattr(self, "_baseline_values", None) is None:
            self._baseline_values = self.task.example_values(self.model, self.eval_batches, self.reference())
        return self._baseline_values

    def baseline_metrics(self) -> dict:
        """Metrics of the uncompressed model on the evaluation set (computed once)."""
        if self._baseline is None:
            self._baseline = self.task.aggregate(self.baseline_values())
        return self._baseline

    def time_estimate(self) -> dict[str, float]:
        """Seconds for the statistics pass and for GFWSVD's Kronecker factors, measured once.

        Statistics: the real collection (model pass and every statistic kind) timed on one
        calibration batch after a warm-up batch, times the number of batches. Kronecker factors:
        the memory plan's model of each layer's solve (``plan.kronecker_seconds``: Krylov map
        flops from the storage rule, with the valid-token count of the batches, not the padded
        length, the PSD projection and the bases' memory traffic) at this machine's rates,
        probed once per process, so a reload gives the same figure."""
        if self._time_estimate is None:
            from .layers import weight_shape
            from .plan import kronecker_seconds
            from .statistics import choose_storage

            batches = self.calib_batches
            kinds = required_kinds(["gfwsvd", "fwsvd", "kfac", "svd"])
            gen = torch.Generator().manual_seed(0)

            def loss_fn(model, batch):
                return self.task.fisher_loss(model, batch, fisher=self.settings["fisher"], generator=gen)

            def one(batch) -> float:
                t0 = time.perf_counter()
                collect_statistics(self.model, [batch], loss_fn, layers=self.layers, kinds=kinds,
                                   sample_unit=self.sample_unit)
                return time.perf_counter() - t0

            warm = one(batches[0])
            per_batch = one(batches[1]) if len(batches) > 1 else warm
            masks = [b.get("attention_mask") for b in batches]
            valid = sum(int(mk.sum()) if mk is not None else int(b["input_ids"].numel()) for mk, b in zip(masks, batches))
            rows = sum(int(b["input_ids"].shape[0]) for b in batches)
            unit = self.sample_unit
            K = valid if unit == "token" else (len(batches) if unit == "batch" else rows)
            T = 1 if unit == "token" else max(1, round(valid / K))
            kron = 0.0
            for name in self.layers:
                m, n = weight_shape(self.model.get_submodule(name))
                kron += kronecker_seconds(m, n, K, T, choose_storage(m, n, T))
            self._time_estimate = {"statistics": per_batch * len(batches), "kronecker": kron}
        return self._time_estimate

    def memory_estimate(self, kinds=("samples", "diagonal", "kfac", "inputs")) -> dict[str, int]:
        return estimate_memory(self.model, len(self.calib.texts), self.settings["max_length"], self.layers,
                               kinds, self.sample_unit)

    def fork(self) -> "Experiment":
        """A copy sharing model, data and batches but with its own statistics, decompositions and
        timings: a background job computes into it while the original stays on screen."""
        import copy

        new = copy.copy(self)
        new.decompositions = dict(self.decompositions)
        new.fold_decompositions = dict(self.fold_decompositions)
        new.timings, new.stages, new.warnings = dict(self.timings), dict(self.stages), list(self.warnings)
        return new

    def data_record(self) -> dict:
        return {"calibration": self.calib.description, "evaluation": self.evaluation.description,
                "fisher": self.settings["fisher"], "sample_unit": self.sample_unit,
                "max_length": self.settings["max_length"], "batch_size": self.settings["batch_size"],
                "seed": self.settings["seed"], "dtype": self.settings.get("dtype", "float32"),
                "skipped_texts": self.calib.description.get("skipped_texts", 0),
                **({"task_setup": self.task_setup} if self.task_setup is not None else {})}


def _record(exp: Experiment, stage: str, rec: StageRecord, run: Optional[dict] = None) -> None:
    """Keep a stage's time and peak memory on the experiment (latest run) and in ``run``."""
    exp.timings[stage] = rec.seconds
    exp.stages[stage] = rec.as_dict()
    if run is not None:
        run[stage] = rec.as_dict()


def prepare(bundle: Optional[ModelBundle] = None, **options) -> Experiment:
    """Load the model, the task and disjoint calibration / evaluation sets (see ``DEFAULTS``).

    ``bundle``: an already loaded model (e.g. the app's shared cache); it is never modified.
    """
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ConfigurationError(f"unknown options {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    for key in ("samples", "eval_samples", "max_length", "batch_size"):
        if int(s[key]) < 1:
            raise ConfigurationError(f"{key} must be at least 1, got {s[key]}")
    if int(s["max_length"]) < 4:
        raise ConfigurationError("max_length must be at least 4 tokens")
    if s["dtype"] not in DTYPES:
        raise ConfigurationError(f"unknown dtype {s['dtype']!r}; valid: {', '.join(DTYPES)}")
    if s["fisher"] not in ("empirical", "mc"):
        raise ConfigurationError(f"unknown fisher {s['fisher']!r}; valid: empirical, mc")
    from .stats import SAMPLE_UNITS
    from .tasks import get_task

    if s["sample_unit"] is not None and s["sample_unit"] not in SAMPLE_UNITS:
        raise ConfigurationError(f"unknown sample_unit {s['sample_unit']!r}; valid: {', '.join(SAMPLE_UNITS)}")
    timings = {}
    t0 = time.perf_counter()
    if bundle is None:
        bundle = load_model(s["model"], task=s["task"], device=s["device"], dtype=DTYPES[s["dtype"]])
    elif any(p.is_meta for p in bundle.model.parameters()):
        raise ConfigurationError("the model is on the meta device (no weights); load it with real weights first")
    timings["load_model"] = time.perf_counter() - t0
    task = get_task(bundle.task)
    unit = s["sample_unit"] or task.default_sample_unit
    if unit not in task.sample_units:
        raise ConfigurationError(
            f"the {task.name} task cannot use sample_unit={unit!r}: its loss defines a Fisher sample only as "
            f"{' or '.join(repr(u) for u in task.sample_units)}; pick one of those"
        )
    t0 = time.perf_counter()
    calib_source = s["calib"]
    if calib_source == "default" and task.default_calib:  # the task's own embedded data (e.g. labelled)
        calib_source = task.default_calib
    source = load_texts(calib_source, text_column=s["text_column"], split=s["split"], label_column=s["label_column"])
    source, skipped = usable_texts(source, task)
    notes = []
    if skipped:
        notes.append(f"skipped {skipped} of {skipped + len(source)} texts that the {task.name} task cannot use "
                     f"(fewer than {task.min_words} words)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calib, evaluation = split_texts(source, int(s["samples"]), int(s["eval_samples"]), seed=int(s["seed"]))
    notes += [str(w.message) for w in caught]
    calib, evaluation, task_notes = task.prepare_data(calib, evaluation)
    notes += task_notes
    calib.description["skipped_texts"] = evaluation.description["skipped_texts"] = skipped
    calib_batches = task.make_batches(bundle.tokenizer, calib.texts, calib.labels, int(s["max_length"]), int(s["batch_size"]))
    eval_batches = task.make_batches(bundle.tokenizer, evaluation.texts, evaluation.labels, int(s["max_length"]), int(s["batch_size"]))
    timings["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    task_setup = task.fit(bundle.model, calib_batches)
    if task_setup is not None:
        timings["task_fit"] = time.perf_counter() - t0
    layers = default_layers(bundle.model) if s["layers"] is None else list(select_layers(bundle.model, s["layers"]))
    s["task"] = bundle.task
    exp = Experiment(bundle, task, calib, evaluation, calib_batches, eval_batches, s, layers, timings=timings,
                     task_setup=task_setup)
    exp.warnings.extend(notes)
    return exp


def usable_texts(source: TextSource, task: Any) -> tuple[TextSource, int]:
    """``source`` without the texts ``task`` cannot use (e.g. one-word headings for retrieval),
    and how many were dropped; too few left is a :class:`DataError`."""
    keep = [i for i, t in enumerate(source.texts) if isinstance(t, str) and len(t.split()) >= task.min_words]
    skipped = len(source.texts) - len(keep)
    if not skipped:
        return source, 0
    if len(keep) < 3:
        raise DataError(
            f"only {len(keep)} of {len(source.texts)} texts have at least {task.min_words} words, which the "
            f"{task.name} task needs; give longer texts"
        )
    labels = [source.labels[i] for i in keep] if source.labels is not None else None
    description = {**source.description, "count": len(keep), "skipped_texts": skipped}
    return TextSource([source.texts[i] for i in keep], labels, description), skipped


def required_kinds(methods: Sequence[Any]) -> tuple[str, ...]:
    kinds: list[str] = []
    for m in methods:
        for k in get_method(m).kinds():
            if k not in kinds:
                kinds.append(k)
    return tuple(kinds) or ("inputs",)


def collect(exp: Experiment, methods: Sequence[Any] = ("svd", "fwsvd", "kfac", "gfwsvd"),
            max_memory: Optional[int] = None, progress: Any = None, cancel: Any = None,
            extra_kinds: Sequence[str] = (), folds: Optional[bool] = None) -> dict[str, LayerStats]:
    """One statistics pass with everything the given methods need (plus ``extra_kinds``, e.g.
    "samples" for the exact empirical-Fisher quadratic in reports).

    ``folds`` (default: when a composite method such as auto is among ``methods``) collects the
    even and the odd calibration batches separately and merges them: the same statistics and
    the same cost as one pass, plus the two folds that auto chooses on (``exp.fold_stats``; the
    per-sample gradients it scores with are then collected too).
    """
    gen = torch.Generator().manual_seed(int(exp.settings["seed"]))
    fisher = exp.settings["fisher"]
    if folds is None:
        folds = any(getattr(get_method(m), "composite", False) for m in methods)
    kinds = tuple(dict.fromkeys(required_kinds(methods) + tuple(extra_kinds) + (("samples",) if folds else ())))
    if folds and distributed.current() is not None:
        raise ConfigurationError("auto chooses on held-out folds, which torchrun does not split yet; run it in one "
                                 "process")
    if folds and len(exp.calib_batches) < 2:
        raise DataError("choosing on a held-out fold needs at least 2 calibration batches; give more calibration "
                        "texts or a smaller batch size")

    def loss_fn(model, batch):
        return exp.task.fisher_loss(model, batch, fisher=fisher, generator=gen)

    def run(batches, report=None):
        return job_statistics(exp.model, batches, loss_fn, layers=exp.layers, kinds=kinds,
                              sample_unit=exp.sample_unit, max_memory=max_memory, progress=report, cancel=cancel)

    with measure(exp.model.device) as rec:
        if not folds:
            stats, fold_stats = run(exp.calib_batches, progress), None
        else:
            parts = (exp.calib_batches[0::2], exp.calib_batches[1::2])

            def fold_progress(i):
                if not callable(progress):
                    return progress
                return lambda d, t, msg: progress(d + (len(parts[0]) if i else 0), len(exp.calib_batches),
                                                  f"fold {i + 1} of 2, {msg}")

            a, b = (run(p, fold_progress(i)) for i, p in enumerate(parts))
            stats = {n: merge_stats(a[n], b[n]) for n in a}
            for n, s in stats.items():  # the folds' samples become views of the merged ones: no copy kept
                _share_samples(a[n], s, 0, a[n].num_samples)
                _share_samples(b[n], s, a[n].num_samples, s.num_samples)
            fold_stats = (a, b)
    exp.stats = stats
    exp.fold_stats = fold_stats
    exp.streamed = None
    exp.decompositions.clear()
    exp.fold_decompositions.clear()
    _record(exp, "statistics", rec)
    return exp.stats


def collect_streamed(exp: Experiment, methods: Sequence[Any], groups: Sequence[Sequence[str]],
                     progress: Any = None, cancel: Any = None, extra_kinds: Sequence[str] = ()) -> dict[str, LayerStats]:
    """Statistics consumed group by group, for models whose statistics do not fit all at once.

    Per group of layers (``gfwsvd plan`` chooses them; one pass over the calibration batches
    each): collect the group's statistics, compute every method's decompositions of those layers
    (lean: what truncation needs, with the exact empirical-Fisher curve when samples are
    collected), then free the statistics before the next pass. Afterwards ``exp.decompositions``
    holds every method's decompositions of every layer, ``exp.stats`` each layer's counts only
    (:meth:`~gfwsvd_core.stats.LayerStats.counts_only`), and ``exp.streamed`` the groups. What
    needs the statistics later is not available: the reports' Fisher-aligned view, another
    method without collecting again, sequential and composite (auto) methods.
    """
    ms = [get_method(m) for m in methods]
    bad = [m.label for m in ms if m.sequential or getattr(m, "composite", False)]
    if bad:
        raise ConfigurationError(f"{', '.join(bad)} cannot stream statistics (a sequential method collects its own "
                                 "block by block, auto chooses on held-out folds of all of them): give a larger "
                                 "--max-memory or another method")
    names = [n for g in groups for n in g]
    unknown = sorted(set(names) - set(exp.layers))
    if unknown or len(set(names)) != len(names) or not names:
        raise ConfigurationError(f"streamed groups must name each selected layer at most once; unknown: {unknown}")
    gen = torch.Generator().manual_seed(int(exp.settings["seed"]))
    fisher = exp.settings["fisher"]
    kinds = tuple(dict.fromkeys(required_kinds(methods) + tuple(extra_kinds)))
    per_pass = len(exp.calib_batches)
    # progress units: each group's batches, then its layers' decompositions (one per method and layer)
    sizes = [per_pass + len(ms) * len(g) for g in groups]
    total = sum(sizes)

    def loss_fn(model, batch):
        return exp.task.fisher_loss(model, batch, fisher=fisher, generator=gen)

    def step(gi: int, start: int):
        if not callable(progress):
            return None
        base = sum(sizes[:gi]) + start
        return lambda d, t, msg: progress(base + d, total, f"group {gi + 1} of {len(groups)}: {msg}")

    light: dict[str, LayerStats] = {}
    kept: dict[str, dict[str, LayerDecomposition]] = {}
    exp.fold_stats = None
    exp.fold_decompositions.clear()
    lean = exp.lean
    exp.lean = True
    try:
        with measure(exp.model.device) as rec:
            for gi, group in enumerate(groups):
                wanted = set(group)
                stats = job_statistics(exp.model, exp.calib_batches, loss_fn, layers=lambda n, _m: n in wanted,
                                       kinds=kinds, sample_unit=exp.sample_unit, cancel=cancel,
                                       progress=step(gi, 0))
                exp.stats, exp.decompositions = stats, {}
                for j, m in enumerate(ms):
                    decompositions(exp, m, progress=step(gi, per_pass + j * len(group)), cancel=cancel)
                for key, decs in exp.decompositions.items():
                    kept.setdefault(key, {}).update(decs)
                light.update({n: s.counts_only() for n, s in stats.items()})
                exp.stats = stats = None  # this group's statistics are freed here
                exp.decompositions = {}
                release_memory()
    finally:
        exp.lean = lean
        for key in [k for k in exp.stages if k.startswith("decompose:")]:  # per group: inside "statistics" below
            exp.stages.pop(key)
            exp.timings.pop(key, None)
    exp.stats = {n: light[n] for n in exp.layers if n in light}
    exp.decompositions = {key: {n: d[n] for n in exp.stats if n in d} for key, d in kept.items()}
    exp.streamed = [list(g) for g in groups]
    _record(exp, "statistics", rec)
    exp.stages["statistics"].update(streamed_groups=len(groups),
                                    includes=f"the decompositions of {', '.join(kept)}, computed per group")
    return exp.stats


def job_statistics(model, batches, loss_fn, **options) -> dict[str, LayerStats]:
    """:func:`~gfwsvd_core.stats.collect_statistics`, or under torchrun this rank's slice of the
    batches with the moments all-reduced (see :mod:`gfwsvd_core.distributed`)."""
    shard = distributed.current()
    if shard is None:
        return collect_statistics(model, batches, loss_fn, **options)
    if not shard.is_main:
        options["progress"] = None
    local = collect_statistics(model, distributed.shard_batches(batches, shard), loss_fn, **options)
    return distributed.reduce_statistics(local, shard)


def _share_samples(fold: LayerStats, merged: LayerStats, start: int, stop: int) -> None:
    """Point a fold's per-sample gradients at its rows of the merged statistics."""
    if merged.storage is None:
        return
    fold.X = fold.D = fold.G = None
    if merged.storage == "factored":
        fold.X, fold.D = merged.X[start:stop], merged.D[start:stop]
    else:
        fold.G = merged.G[start:stop]
    fold.info = {"storage": fold.storage}


def decompositions(exp: Experiment, method: Any, progress: Any = None, cancel: Any = None,
                   run: Optional[dict] = None) -> dict[str, LayerDecomposition]:
    """Per-layer decompositions of one configured method, computed once per experiment and
    configuration (``method_key``); ``run`` receives the stage record when they are computed."""
    m = get_method(method)
    if exp.stats is None:
        raise ConfigurationError("collect statistics first")
    if m.sequential:  # the one-pass fit of the same method: what its ranks are allocated on
        m = dataclasses.replace(m, sequential=False)
    if getattr(m, "composite", False):
        return _composite_decompositions(exp, m, progress, cancel, run)
    key = method_key(m)
    if key in exp.decompositions:  # computed before (a streamed run keeps no statistics to redo them)
        if run is not None:
            run[f"decompose:{key}"] = {"seconds": 0.0, "cached": True}
        return exp.decompositions[key]
    if m.update:  # the plain method's decompositions, each followed by the closed-form update
        missing = has_kinds(exp.stats, m.kinds())
        if missing:
            raise ConfigurationError(f"{key} needs statistics {missing}; collect them again including this method")
        if key not in exp.decompositions:
            base = decompositions(exp, dataclasses.replace(m, update=False), progress, cancel, run)
            with measure(exp.model.device) as rec:
                exp.decompositions[key] = {n: updated_layer(d, get_weight(exp.model.get_submodule(n)), exp.stats[n])
                                           for n, d in base.items()}
            _record(exp, f"decompose:{key}", rec, run)
        elif run is not None:
            run[f"decompose:{key}"] = {"seconds": 0.0, "cached": True}
        return exp.decompositions[key]
    missing = has_kinds(exp.stats, m.kinds())
    if missing:
        raise ConfigurationError(
            f"method {m.name} needs statistics {missing}; collect them again including this method")
    if key not in exp.decompositions:
        with measure(exp.model.device) as rec:
            decs = decompose_layers(exp.model, exp.stats, m, progress=progress, cancel=cancel, lean=exp.lean,
                                    offload=exp.offload)
        exp.decompositions[key] = decs
        _record(exp, f"decompose:{key}", rec, run)
    elif run is not None:
        run[f"decompose:{key}"] = {"seconds": 0.0, "cached": True}
    return exp.decompositions[key]


def _composite_decompositions(exp: Experiment, m: Any, progress: Any, cancel: Any,
                              run: Optional[dict]) -> dict[str, LayerDecomposition]:
    """Auto: every candidate on all samples (shared with the candidates' own cache entries) and on
    the first fold, scored on the second."""
    key = method_key(m)
    if key in exp.decompositions:
        if run is not None:
            run[f"decompose:{key}"] = {"seconds": 0.0, "cached": True}
        return exp.decompositions[key]
    if exp.fold_stats is None:
        raise ConfigurationError(f"{m.label} chooses on a held-out fold: collect statistics again with "
                                 f"{m.name} among the methods (the statistics are then collected in two folds)")
    missing = has_kinds(exp.fold_stats[1], ("samples",))
    if missing:
        raise ConfigurationError(f"{m.label} needs per-sample gradients ('samples'); collect statistics again "
                                 f"with {m.name} among the methods")
    from .methods.auto import choose

    candidates = m.resolve(exp.stats)
    full = {c: decompositions(exp, m.candidate(c), progress=progress, cancel=cancel, run=run) for c in candidates}
    fold_fit = {}
    for c in candidates:
        cm = m.candidate(c)
        ck = method_key(cm)
        if cm.requires == () and not cm.update:  # unweighted (plain SVD): the fit does not depend on the samples
            fold_fit[c] = full[c]
            continue
        plain = dataclasses.replace(cm, update=False)
        pk = method_key(plain)
        if pk not in exp.fold_decompositions:
            with measure(exp.model.device) as rec:
                exp.fold_decompositions[pk] = decompose_layers(
                    exp.model, exp.fold_stats[0], plain, progress=progress and (
                        lambda d, t, msg: progress(d, t, f"fold A, {msg}")), cancel=cancel)
            _record(exp, f"decompose_fold:{pk}", rec, run)
        if ck not in exp.fold_decompositions:  # the update on fold A's inputs, reusing fold A's fit
            exp.fold_decompositions[ck] = {
                n: updated_layer(d, get_weight(exp.model.get_submodule(n)), exp.fold_stats[0][n])
                for n, d in exp.fold_decompositions[pk].items()}
        fold_fit[c] = exp.fold_decompositions[ck]
    with measure(exp.model.device) as rec:
        decs = choose(exp.model, exp.fold_stats[1], full, fold_fit, candidates, layers=list(exp.stats))
    exp.decompositions[key] = decs
    _record(exp, f"decompose:{key}", rec, run)
    return decs


def blocks_of(names: Sequence[str]) -> list[list[str]]:
    """Layers grouped by transformer block (the name up to its first numeric part, e.g.
    ``encoder.layer.3``), in model order; layers outside any numbered block form their own groups."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        key = ".".join(parts[: idx + 1]) if idx is not None else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def sequential_compression(exp: Experiment, method: Any, ranks: Mapping[str, Optional[int]], progress: Any = None,
                           cancel: Any = None) -> Compression:
    """Compress block by block: each block's statistics are collected on the model whose earlier
    blocks are already compressed (as GPTQ-style and SVD-LLM's pipelines propagate), then its
    layers are decomposed and truncated to ``ranks``. Costs one statistics pass over the
    calibration batches per block (forward and, for gradient-based methods, backward), on top of
    the one-pass statistics the ranks and the report's yardstick come from."""
    m = dataclasses.replace(get_method(method), sequential=False)
    kinds = m.kinds()
    fisher = exp.settings["fisher"]
    current = build_compressed(exp.model, {}, {})  # shares every weight with exp.model until replaced
    blocks = [[n for n in b if n in ranks] for b in blocks_of(exp.layers)]
    blocks = [b for b in blocks if b]
    decs: dict[str, LayerDecomposition] = {}
    for i, block in enumerate(blocks):
        if cancel is not None and cancel.is_set():
            raise Cancelled("sequential compression cancelled")
        if progress:
            progress(i, len(blocks), f"sequential: block {i + 1} of {len(blocks)}")
        gen = torch.Generator().manual_seed(int(exp.settings["seed"]))
        wanted = set(block)
        stats = job_statistics(current, exp.calib_batches,
                               lambda model, batch: exp.task.fisher_loss(model, batch, fisher=fisher, generator=gen),
                               layers=lambda name, mod: name in wanted, kinds=kinds, sample_unit=exp.sample_unit,
                               cancel=cancel)
        d = decompose_layers(current, stats, m, layers=block, cancel=cancel)
        for name in block:
            r = ranks.get(name)
            if r is not None:
                up, down = d[name].decomposition.factors(r)
                replace_layer(current, name, LowRankLinear.replacing(current.get_submodule(name), up, down))
        decs.update(d)
    if progress:
        progress(len(blocks), len(blocks), "sequential: done")
    return Compression(current.eval(), method_key(method), {n: ranks.get(n) for n in decs}, decs)


def run_compression(exp: Experiment, method: Any, ratio: Optional[float] = None,
                    ranks: Optional[Mapping[str, Optional[int]]] = None, measure: bool = False,
                    evaluate: bool = True, progress: Any = None, cancel: Any = None) -> tuple[Compression, dict]:
    """Compress with one method and build the JSON report (see :func:`report`); ``measure``
    also measures each layer's loss increase alone (one evaluation per layer)."""
    method = get_method(method)  # a name or a configured Method; its config goes into the report
    run: dict[str, dict] = {}
    decs = decompositions(exp, method, progress=progress, cancel=cancel, run=run)
    with _measure(exp) as rec:
        if method.sequential:
            chosen = resolve_ranks(decs, ratio, ranks, method.allocation if ratio is not None else "uniform")
            comp = sequential_compression(exp, method, chosen, progress=progress, cancel=cancel)
            comp.requested = dict(ranks) if ranks is not None else {}
        else:
            comp = compress(exp.model, exp.stats, method, ratio=ratio, ranks=ranks, decompositions=decs)
            comp.method = method_key(method)  # the variant, e.g. svd[update=true], in the report and the export
    _record(exp, "sequential_compress" if method.sequential else "compress", rec, run)
    with _measure(exp) as rec:
        layers = layer_report(exp.model, comp, exp.stats, exp.task, exp.calib_batches, measure=measure,
                              progress=progress, cancel=cancel)
    _record(exp, "layer_report", rec, run)
    base = metrics = check = intervals = None
    if evaluate:
        with _measure(exp) as rec:
            base = exp.baseline_metrics()
            values = exp.task.example_values(comp.model, exp.eval_batches, exp.reference())
            metrics = exp.task.aggregate(values)
            intervals = metric_intervals(exp.task, values, exp.baseline_values())
            intervals["baseline"] = metric_intervals(exp.task, exp.baseline_values())["metrics"]
            check = prediction_check(exp, comp, layers)
        _record(exp, "evaluate", rec, run)
    rep = report(exp, comp, base, metrics, layers, ratio, method, run)
    if intervals is not None:
        rep["intervals"] = intervals
    if check is not None:
        rep["prediction_check"] = check
        if check.get("warning"):
            rep["warnings"].append(check["warning"])
    fid = (metrics or {}).get("fidelity")
    if fid is not None and fid < FIDELITY_FLAG:
        rep["warnings"].append(f"fidelity {fid:.2f}: the compressed model's outputs are far from the dense model's "
                               f"(mean cosine below {FIDELITY_FLAG}); keep more parameters or compare methods in a sweep")
    return comp, rep


#: a fidelity (mean cosine of compressed and dense outputs) below this is a report warning
FIDELITY_FLAG = 0.9


#: predicted and measured loss increases that differ by more than this factor get a warning
AGREEMENT_FACTOR = 3.0


def prediction_check(exp: Experiment, comp: Compression, layers: Sequence[Mapping]) -> Optional[dict]:
    """The predicted loss increase of a compression beside the measured one, on the calibration texts.

    Predicted: the exact empirical-Fisher quadratic summed over layers (the yardstick the budget
    allocation uses). Measured: the compressed model's calibration loss minus the dense model's.
    The quadratic ignores first-order terms (the dense model is not at a minimum of this loss)
    and interactions between layers, so the two can disagree; beyond ``AGREEMENT_FACTOR`` the
    check carries a warning. None when per-sample gradients were not collected.
    """
    preds = [r.get("exact_quadratic") for r in layers]
    if not layers or any(p is None for p in preds):
        return None
    predicted = float(sum(preds))
    measured = exp.task.measured_loss(comp.model, exp.calib_batches) - exp.calibration_loss()
    ratio = measured / predicted if predicted > 0 else (math.inf if measured > 0 else 1.0)
    agrees = 1 / AGREEMENT_FACTOR <= ratio <= AGREEMENT_FACTOR
    out = {"yardstick": "exact empirical-Fisher quadratic, summed over layers",
           "predicted_increase": predicted, "measured_increase": measured, "measured_over_predicted": ratio,
           "factor": AGREEMENT_FACTOR, "agrees": agrees}
    if not agrees:
        out["warning"] = (f"predicted calibration-loss increase {predicted:.3g} and measured {measured:.3g} differ by "
                          f"more than {AGREEMENT_FACTOR:g}x (measured/predicted {ratio:.3g}): the quadratic model "
                          "misses first-order terms and interactions between layers here; trust the measured number")
    return out


def _measure(exp: Experiment):
    return measure(exp.model.device)


def _run_stages(exp: Experiment, run: Optional[dict]) -> dict[str, dict]:
    """The stages behind one report: the inputs it used (load, data, statistics) and its own."""
    stages = {k: {"seconds": round(v, 3)} for k, v in exp.timings.items() if k in ("load_model", "data", "task_fit")}
    if "statistics" in exp.stages:
        stages["statistics"] = exp.stages["statistics"]
    stages.update(run or {})
    return stages


def report_warnings(exp: Experiment, layers: Sequence[Mapping]) -> list[str]:
    """Every fallback and data warning behind a report, one line each (never only an info field)."""
    out = list(exp.warnings)
    for r in layers:
        out += [f"{r['layer']}: {w}" for w in r.get("warnings") or []]
    return out


def report(exp: Experiment, comp: Compression, base, metrics, layers: list[dict], ratio=None, method=None,
           run: Optional[dict] = None) -> dict:
    kept = comp.kept_ratio(exp.model)
    stages = _run_stages(exp, run)
    peaks = [v["cpu_peak_mb"] for v in stages.values() if "cpu_peak_mb" in v]
    cfg = get_method(method or comp.method)
    return {
        "method": comp.method,
        "method_key": method_key(cfg),
        "method_config": cfg.config(),
        "requested_ratio": ratio,
        "kept_ratio": {"layers": kept["layers"], "model": kept["model"]},
        "removed_ratio": {"layers": 1 - kept["layers"], "model": 1 - kept["model"]},
        "params": kept,
        "model": exp.settings["model"], "task": exp.bundle.task,
        "baseline_metrics": base, "metrics": metrics,
        "layers": layers,
        "dense_layers": [r["layer"] for r in layers if r["dense"]],
        "warnings": report_warnings(exp, layers),
        "calibration": exp.data_record(),
        "timings": {k: v["seconds"] for k, v in stages.items()},
        "stages": stages,
        "peak_memory_mb": round(max(peaks), 1) if peaks else round(lifetime_peak_mb(), 1),
    }


def run_sweep(exp: Experiment, methods: Sequence[Any], ratios: Sequence[float], progress=None, cancel=None) -> dict:
    run: dict[str, dict] = {}
    decs = {method_key(m): decompositions(exp, m, cancel=cancel, run=run) for m in methods}
    with _measure(exp) as rec:
        rows = sweep(exp.model, exp.stats, exp.task, exp.eval_batches, methods, ratios, decompositions=decs,
                     progress=progress, cancel=cancel,
                     sequential=lambda m, r: sequential_compression(exp, m, r, cancel=cancel))
    _record(exp, "sweep", rec, run)
    stages = _run_stages(exp, run)
    peaks = [v["cpu_peak_mb"] for v in stages.values() if "cpu_peak_mb" in v]
    warn = list(exp.warnings)
    for key, d in zip(decs, decs.values()):
        for name, dec in d.items():
            warn += [f"{key} {name}: {w}" for w in dec.info.get("warnings") or []]
    return {"model": exp.settings["model"], "task": exp.bundle.task, "rows": rows, "warnings": warn,
            "calibration": exp.data_record(), "timings": {k: v["seconds"] for k, v in stages.items()},
            "stages": stages, "peak_memory_mb": round(max(peaks), 1) if peaks else round(lifetime_peak_mb(), 1)}


def peak_memory_mb() -> float:
    """Peak resident memory of this process's lifetime (CPU), in MiB, plus the CUDA peak; reports
    give per-stage peaks instead (``stages``)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if torch.cuda.is_available():
        peak += torch.cuda.max_memory_allocated() / 2**20
    return round(peak, 1)


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, default=_json_default))
    except OSError as exc:
        raise OutputPathError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    return path


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
