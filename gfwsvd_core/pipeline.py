"""The end-to-end flow shared by the CLI and the app.

load -> calibration/evaluation data -> statistics -> per-method decompositions -> ranks ->
compressed model -> evaluation -> report/export. An :class:`Experiment` holds what one flow
produced so far; every stage is timed and every input is recorded for the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from .compress import Compression, LayerDecomposition, compress, decompose_layers
from .data import TextSource, load_texts, split_texts
from .evaluate import layer_report, sweep
from .layers import select_layers
from .methods import get_method
from .models import ModelBundle, default_layers, load_model
from .stats import LayerStats, collect_statistics, estimate_memory

DEFAULTS = {
    "model": "default", "task": None, "calib": "default", "text_column": None, "split": "train",
    "samples": 128, "eval_samples": 256, "max_length": 128, "batch_size": 8, "seed": 0,
    "fisher": "empirical", "sample_unit": None, "layers": None, "device": None,
}


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
    decompositions: dict[str, dict[str, LayerDecomposition]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
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

    def baseline_metrics(self) -> dict:
        """Metrics of the uncompressed model on the evaluation set (computed once)."""
        if self._baseline is None:
            self._baseline = self.task.evaluate(self.model, self.eval_batches, self.reference())
        return self._baseline

    def time_estimate(self) -> dict[str, float]:
        """Seconds for statistics (one timed calibration batch x batches) and for the Kronecker
        factors (ALS flops at this machine's measured matmul rate, ~12 sweeps), measured once."""
        if self._time_estimate is None:
            from .layers import weight_shape
            from .stats import _samples_and_tokens, choose_storage, map_flops

            gen = torch.Generator().manual_seed(0)
            batch = self.calib_batches[0]
            t0 = time.perf_counter()
            loss = self.task.fisher_loss(self.model, batch, fisher=self.settings["fisher"], generator=gen)
            first = [p for p in self.model.parameters() if p.requires_grad][:1]
            if first and loss.requires_grad:  # a full backward pass, without touching .grad
                torch.autograd.grad(loss.sum(), first, allow_unused=True)
            per_batch = time.perf_counter() - t0
            a = torch.randn(512, 512)
            t0 = time.perf_counter()
            for _ in range(5):
                a @ a
            rate = 5 * 2 * 512**3 / max(time.perf_counter() - t0, 1e-6)
            rows = int(batch["input_ids"].shape[0])
            K, T = _samples_and_tokens(len(self.calib.texts) * (2 if self.bundle.task == "retrieval" else 1),
                                       self.settings["max_length"], self.sample_unit, batch_size=rows)
            flops = 0.0
            for name in self.layers:
                m, n = weight_shape(self.model.get_submodule(name))
                flops += 2 * 12 * K * map_flops(m, n, T, choose_storage(m, n, T))
            self._time_estimate = {"statistics": 1.5 * per_batch * len(self.calib_batches), "kronecker": flops / rate}
        return self._time_estimate

    def memory_estimate(self, kinds=("samples", "diagonal", "kfac", "inputs")) -> dict[str, int]:
        return estimate_memory(self.model, len(self.calib.texts), self.settings["max_length"], self.layers,
                               kinds, self.sample_unit)

    def data_record(self) -> dict:
        return {"calibration": self.calib.description, "evaluation": self.evaluation.description,
                "fisher": self.settings["fisher"], "sample_unit": self.sample_unit,
                "max_length": self.settings["max_length"], "batch_size": self.settings["batch_size"],
                "seed": self.settings["seed"]}


def _timed(exp: Experiment, stage: str, t0: float) -> None:
    exp.timings[stage] = exp.timings.get(stage, 0.0) + time.perf_counter() - t0


def prepare(bundle: Optional[ModelBundle] = None, **options) -> Experiment:
    """Load the model, the task and disjoint calibration / evaluation sets (see ``DEFAULTS``).

    ``bundle``: an already loaded model (e.g. the app's shared cache); it is never modified.
    """
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    for key in ("samples", "eval_samples", "max_length", "batch_size"):
        if int(s[key]) < 1:
            raise ValueError(f"{key} must be at least 1, got {s[key]}")
    if int(s["max_length"]) < 4:
        raise ValueError("max_length must be at least 4 tokens")
    if s["fisher"] not in ("empirical", "mc"):
        raise ValueError(f"unknown fisher {s['fisher']!r}; valid: empirical, mc")
    from .tasks import get_task

    timings = {}
    t0 = time.perf_counter()
    if bundle is None:
        bundle = load_model(s["model"], task=s["task"], device=s["device"])
    timings["load_model"] = time.perf_counter() - t0
    task = get_task(bundle.task)
    t0 = time.perf_counter()
    source = load_texts(s["calib"], text_column=s["text_column"], split=s["split"])
    calib, evaluation = split_texts(source, int(s["samples"]), int(s["eval_samples"]), seed=int(s["seed"]))
    calib_batches = task.make_batches(bundle.tokenizer, calib.texts, calib.labels, int(s["max_length"]), int(s["batch_size"]))
    eval_batches = task.make_batches(bundle.tokenizer, evaluation.texts, evaluation.labels, int(s["max_length"]), int(s["batch_size"]))
    timings["data"] = time.perf_counter() - t0
    layers = default_layers(bundle.model) if s["layers"] is None else list(select_layers(bundle.model, s["layers"]))
    s["task"] = bundle.task
    return Experiment(bundle, task, calib, evaluation, calib_batches, eval_batches, s, layers, timings=timings)


def required_kinds(methods: Sequence[Any]) -> tuple[str, ...]:
    kinds: list[str] = []
    for m in methods:
        for k in get_method(m).requires:
            if k not in kinds:
                kinds.append(k)
    return tuple(kinds) or ("inputs",)


def collect(exp: Experiment, methods: Sequence[Any] = ("svd", "fwsvd", "kfac", "gfwsvd"),
            max_memory: Optional[int] = None, progress: Any = None, cancel: Any = None,
            extra_kinds: Sequence[str] = ()) -> dict[str, LayerStats]:
    """One statistics pass with everything the given methods need (plus ``extra_kinds``, e.g.
    "samples" for the exact empirical-Fisher quadratic in reports)."""
    gen = torch.Generator().manual_seed(int(exp.settings["seed"]))
    fisher = exp.settings["fisher"]

    def loss_fn(model, batch):
        return exp.task.fisher_loss(model, batch, fisher=fisher, generator=gen)

    t0 = time.perf_counter()
    exp.stats = collect_statistics(exp.model, exp.calib_batches, loss_fn, layers=exp.layers,
                                   kinds=tuple(dict.fromkeys(required_kinds(methods) + tuple(extra_kinds))),
                                   sample_unit=exp.sample_unit,
                                   max_memory=max_memory, progress=progress, cancel=cancel)
    exp.decompositions.clear()
    _timed(exp, "statistics", t0)
    return exp.stats


def decompositions(exp: Experiment, method: Any, progress: Any = None, cancel: Any = None) -> dict[str, LayerDecomposition]:
    """Per-layer decompositions of one method, computed once per experiment."""
    m = get_method(method)
    if exp.stats is None:
        raise ValueError("collect statistics first")
    missing = [k for k in m.requires if not _has_kind(exp.stats, k)]
    if missing:
        raise ValueError(f"method {m.name} needs statistics {missing}; collect them again including this method")
    if m.name not in exp.decompositions:
        t0 = time.perf_counter()
        exp.decompositions[m.name] = decompose_layers(exp.model, exp.stats, m, progress=progress, cancel=cancel)
        _timed(exp, f"decompose:{m.name}", t0)
    return exp.decompositions[m.name]


def _has_kind(stats: Mapping[str, LayerStats], kind: str) -> bool:
    s = next(iter(stats.values()), None)
    if s is None:
        return False
    return {
        "samples": s.X is not None or s.G is not None, "diagonal": s.grad_sq_sum is not None,
        "kfac": s.dd_sum is not None, "inputs": s.xx_sum is not None,
    }[kind]


def run_compression(exp: Experiment, method: Any, ratio: Optional[float] = None,
                    ranks: Optional[Mapping[str, Optional[int]]] = None, measure: bool = False,
                    evaluate: bool = True, progress: Any = None, cancel: Any = None) -> tuple[Compression, dict]:
    """Compress with one method and build the JSON report (see :func:`report`)."""
    method = get_method(method)  # a name or a configured Method; its config goes into the report
    decs = decompositions(exp, method, progress=progress, cancel=cancel)
    t0 = time.perf_counter()
    comp = compress(exp.model, exp.stats, method, ratio=ratio, ranks=ranks, decompositions=decs)
    _timed(exp, "compress", t0)
    t0 = time.perf_counter()
    layers = layer_report(exp.model, comp, exp.stats, exp.task, exp.calib_batches, measure=measure,
                          progress=progress, cancel=cancel)
    _timed(exp, "layer_report", t0)
    base = metrics = None
    if evaluate:
        t0 = time.perf_counter()
        base = exp.baseline_metrics()
        metrics = exp.task.evaluate(comp.model, exp.eval_batches, exp.reference())
        _timed(exp, "evaluate", t0)
    return comp, report(exp, comp, base, metrics, layers, ratio, method)


def report(exp: Experiment, comp: Compression, base, metrics, layers: list[dict], ratio=None, method=None) -> dict:
    kept = comp.kept_ratio(exp.model)
    return {
        "method": comp.method,
        "method_config": get_method(method or comp.method).config(),
        "requested_ratio": ratio,
        "kept_ratio": {"layers": kept["layers"], "model": kept["model"]},
        "removed_ratio": {"layers": 1 - kept["layers"], "model": 1 - kept["model"]},
        "params": kept,
        "model": exp.settings["model"], "task": exp.bundle.task,
        "baseline_metrics": base, "metrics": metrics,
        "layers": layers,
        "dense_layers": [r["layer"] for r in layers if r["dense"]],
        "calibration": exp.data_record(),
        "timings": dict(exp.timings),
        "peak_memory_mb": peak_memory_mb(),
    }


def run_sweep(exp: Experiment, methods: Sequence[Any], ratios: Sequence[float], progress=None, cancel=None) -> dict:
    decs = {get_method(m).name: decompositions(exp, m, cancel=cancel) for m in methods}
    t0 = time.perf_counter()
    rows = sweep(exp.model, exp.stats, exp.task, exp.eval_batches, methods, ratios, decompositions=decs,
                 progress=progress, cancel=cancel)
    _timed(exp, "sweep", t0)
    return {"model": exp.settings["model"], "task": exp.bundle.task, "rows": rows,
            "calibration": exp.data_record(), "timings": dict(exp.timings), "peak_memory_mb": peak_memory_mb()}


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), in MiB; plus CUDA peak when used."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if torch.cuda.is_available():
        peak += torch.cuda.max_memory_allocated() / 2**20
    return round(peak, 1)


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_json_default))
    return path


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
