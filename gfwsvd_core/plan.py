"""A memory and time plan made before any work: what statistics, factors and compression will need.

:func:`make_plan` reads only shapes (a config, a meta-device model or a loaded one) and counts,
per layer, the bytes each stage keeps and the temporaries it makes, and the flops it runs (timed
at this machine's matmul rate). It chooses per layer how per-sample gradients are stored
(factored ``(X_k, D_k)`` / materialised ``G_k`` by the flop rule of :mod:`gfwsvd_core.statistics.samples`,
or *streamed*: not kept at all, only moments, when the methods need no samples), the layer groups
(one pass over the data each) that keep the collection's transient inside the budget, and whether
decompositions must be *lean* (each layer's Kronecker factors dropped once its SVD is taken:
only what truncation needs stays), and, when keeping every layer's statistics until the end
would not fit, whether the run is *streamed*: each group's statistics are collected, consumed by
every method's decompositions (factors, SVD, exact curve) and freed before the next group's pass
(:func:`gfwsvd_core.pipeline.collect_streamed`). A budget that no choice meets is a
:class:`~gfwsvd_core.errors.ConfigurationError` naming the smallest budget that works.

The model of a stage's peak is "what is kept so far + the largest temporary at one moment"; the
constants below are counts of tensors the code makes (see each), not fits per model.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .errors import ConfigurationError
from .statistics import choose_storage, expand_kinds, map_pair_flops

F32, F64 = 4, 8
#: logits-sized float32 tensors alive at the backward's peak: cross-entropy's saved log-softmax
#: (the logits themselves are freed after the forward: no backward node saves them), its input
#: gradient and the zero-padded gradient of the ``logits[:, :-1]`` slice
LOGIT_COPIES = 3
#: float32 values saved for backward per token and decoder block, in units of (hidden, MLP
#: width, kv width): norms' inputs/outputs, q/k/v/o, rotary copies, attention output, residuals
#: (~13 h), k/v and their rotary copies (~6 kv), gate, up, SiLU in/out, product (~5 i)
ACT_HIDDEN, ACT_KV, ACT_INTER = 13, 6, 5
#: Krylov map pairs per layer assumed by the plan (the solver stops by its own bound; 6-11 on
#: the embedded default, reported per layer in the decomposition diagnostics)
KRYLOV_STEPS = 8
#: cost of LAPACK's thin float64 SVD of an m x n matrix (m >= n), ``SVD_MN2 m n^2 + SVD_N3 n^3``,
#: of a symmetric eigendecomposition ``EIGH_D3 d^3`` and of a Cholesky ``CHOL_D3 d^3``, in flops
#: of a float64 matmul (measured here on 4864x896, 2048^2, 896^2 and 2048^2; MKL, 2 threads)
SVD_MN2, SVD_N3, EIGH_D3, CHOL_D3 = 11.5, 23.0, 15.6, 0.6
#: the PSD projection's eigenpairs of the negative eigenvalues only (LAPACK MRRR on a subset):
#: 0.4x a full eigendecomposition, measured at d = 1536
EIGH_NEG_D3 = 0.4 * EIGH_D3
#: the Krylov bases' memory traffic: besides the S^2 vector reads of the reorthogonalisation,
#: this many float64-vector passes per step and side: the casts to and from the maps' float32
#: (2), the recurrence's subtraction (3), the projection's norms, subtraction and scaling (9) and
#: the basis append (2); timed at the bandwidth of the accumulation probe
#: (:func:`elementwise_costs`, ``ACC_BYTES`` bytes an element). On a 4864 x 896 layer of 7 steps
#: this gives 6.0 s at the probe's 6.2 GB/s; its profile showed 6.1 s in those operations
BASIS_PASSES, ACC_BYTES = 16, 20
#: bytes per second the export writes (safetensors streams the tensors: no copy in memory); the
#: reload memory-maps the file, so it costs little time and no resident memory until the weights
#: are used (measured here: 0.45 GB/s written, reload 0.1 s for 0.6 GB)
WRITE_RATE = 0.45e9
RELOAD_SECONDS = 0.1

STAGES = ("statistics", "factors", "compress", "export", "reload")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: Any) -> Optional[int]:
    """``8GiB``, ``500MB``, ``1.5g`` or a plain number of bytes -> bytes (None/"" -> None)."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise ConfigurationError(f"memory size {text!r} not understood; write e.g. 8GiB, 500MB or 2e9")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigurationError(f"memory size must be positive, got {text!r}")
    return value


def fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


@dataclass
class LayerPlan:
    """One layer: its storage, kept statistics, group and the factor/SVD costs."""

    name: str
    shape: tuple[int, int]
    storage: str  # "factored", "materialized" or "streamed" (no per-sample gradients kept)
    stats_bytes: int  # kept statistics (LayerStats.nbytes after collection)
    samples_bytes: int = 0  # of which per-sample gradients (copied once when a pass finishes)
    group: int = 0
    factor_kept: int = 0  # Kronecker factors A, B (float64) kept by a non-lean decomposition
    factor_peak: int = 0  # temporaries while its factors are solved
    svd_peak: int = 0  # temporaries of its weighted SVD and exact curve
    dec_kept: int = 0  # what truncation needs: up/down, singular values, curves
    factor_flops: float = 0.0
    factor_flops64: float = 0.0
    factor_bytes: float = 0.0  # memory-bound traffic of the Krylov bases (timed by bandwidth, not flops)
    svd_flops64: float = 0.0


@dataclass
class StagePlan:
    name: str
    host_peak: int  # bytes above the resident size before the plan's first stage (model loaded)
    device_peak: int  # bytes on the accelerator (0 on CPU)
    seconds: float
    note: str = ""


@dataclass
class Plan:
    """What :func:`make_plan` decided and predicts; ``as_dict()`` for JSON, ``table()`` for text."""

    model: str
    num_samples: int
    max_length: int
    batch_size: int
    device: str
    max_memory: Optional[int]
    methods: list
    kinds: list
    sample_unit: str
    K: int
    T: int
    model_bytes: int
    activation_bytes: int
    layers: list[LayerPlan]
    groups: list[list[str]]
    collect_max_memory: Optional[int]  # what to pass to collect_statistics(max_memory=) for these groups
    lean: bool
    stages: list[StagePlan]
    minimum_bytes: int  # the smallest budget any choice of groups / lean decompositions meets
    rate32: float
    rate64: float
    notes: list[str] = field(default_factory=list)
    #: statistics consumed group by group (collect -> decompose -> free): only the lean
    #: decompositions accumulate; ``groups`` are then the passes of the streamed run
    stream: bool = False
    #: the smallest budget when every layer's statistics are kept to the end (no streaming)
    minimum_keep_bytes: int = 0
    #: streamed on an accelerator whose budget cannot also hold every layer's lean decomposition:
    #: each is moved to host memory once solved (the host then holds them all)
    offload: bool = False

    @property
    def peak_host(self) -> int:
        """Resident bytes at the worst stage, the loaded model included."""
        return self.model_bytes * (self.device == "cpu") + max(s.host_peak for s in self.stages)

    @property
    def peak_device(self) -> int:
        return max(s.device_peak for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.max_memory is None or self.minimum_bytes <= self.max_memory

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)

    def check(self) -> "Plan":
        """Raise a user error when the budget cannot be met (with the smallest one that can)."""
        if self.fits:
            return self
        biggest = max(self.layers, key=lambda lp: lp.stats_bytes)
        raise ConfigurationError(
            f"--max-memory {fmt_bytes(self.max_memory)} is too small for {self.model} with {self.num_samples} "
            f"samples of {self.max_length} tokens: the smallest budget that works is about "
            f"{fmt_bytes(self.minimum_bytes)} (model {fmt_bytes(self.model_bytes)}, one batch's activations "
            f"{fmt_bytes(self.activation_bytes)}, largest layer's statistics {fmt_bytes(biggest.stats_bytes)} "
            f"[{biggest.name}]). Raise the budget, use fewer --samples, a shorter --max-length or a smaller "
            "--batch-size, or methods without per-sample gradients (e.g. kfac, svdllm instead of gfwsvd)")

    def stage_rows(self) -> list[dict]:
        """One display row per stage (for the app's table): peaks in MiB, seconds rounded."""
        return [{"stage": s.name, "host peak (MiB)": round(s.host_peak / 2**20),
                 "device peak (MiB)": round(s.device_peak / 2**20), "seconds": round(s.seconds, 1), "note": s.note}
                for s in self.stages]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["peak_host"], d["peak_device"], d["fits"] = self.peak_host, self.peak_device, self.fits
        return d

    def table(self) -> str:
        """The plan as readable text: settings, stages (peak memory, time) and storage per layer."""
        lines = [f"plan for {self.model}: {self.num_samples} samples x {self.max_length} tokens "
                 f"(K={self.K} Fisher samples of T={self.T} tokens, unit {self.sample_unit}), batch {self.batch_size}, "
                 f"device {self.device}, budget {fmt_bytes(self.max_memory) if self.max_memory else 'none'}",
                 f"methods {','.join(map(str, self.methods))}; statistics {','.join(self.kinds)}; "
                 f"model {fmt_bytes(self.model_bytes)}; {len(self.groups)} pass(es) over the data; "
                 f"decompositions {'lean (factors dropped per layer)' if self.lean else 'cached'}; "
                 + ("statistics streamed (each group freed after its decompositions); " if self.stream else "")
                 + ("decompositions offloaded to host memory; " if self.offload else "")
                 + f"smallest budget {fmt_bytes(self.minimum_bytes)}"
                 + ("" if self.fits else "  ** DOES NOT FIT **"),
                 f"{'stage':<11} {'host peak':>11} {'device peak':>12} {'seconds':>9}  note"]
        for s in self.stages:
            lines.append(f"{s.name:<11} {fmt_bytes(s.host_peak):>11} {fmt_bytes(s.device_peak):>12} "
                         f"{s.seconds:>9.1f}  {s.note}")
        lines.append(f"{'(peak)':<11} {fmt_bytes(self.peak_host):>11} {fmt_bytes(self.peak_device):>12}  "
                     "host includes the model on cpu")
        counts: dict[str, int] = {}
        for lp in self.layers:
            counts[lp.storage] = counts.get(lp.storage, 0) + 1
        lines.append("storage: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        lines.append(f"{'layer':<44} {'shape':>12} {'storage':>12} {'stats':>10} {'group':>5}")
        for lp in self.layers:
            lines.append(f"{lp.name:<44} {f'{lp.shape[0]}x{lp.shape[1]}':>12} {lp.storage:>12} "
                         f"{fmt_bytes(lp.stats_bytes):>10} {lp.group:>5}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


_RATES: dict = {}


def matmul_rates() -> tuple[float, float]:
    """Flops/s of a 2048^3 float32 and float64 matmul on this machine (median of three, cached):
    large enough not to live in cache, as the layers' products do not."""
    if torch.float64 not in _RATES:
        for dt in (torch.float32, torch.float64):
            a = torch.randn(2048, 2048, dtype=dt)
            a @ a
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                a @ a
                times.append(time.perf_counter() - t0)
            _RATES[dt] = 2 * 2048**3 / max(sorted(times)[1], 1e-9)
    return _RATES[torch.float32], _RATES[torch.float64]


#: the logit-cost probe's size bounds (logits): below the lower one the probe sits in cache, which
#: a real batch's logits do not; above the upper one the probe would cost the plan seconds
LOGIT_PROBE = (2 * 256 * 4096, 2**25)


def elementwise_costs(logits: int = 0) -> tuple[float, float]:
    """Seconds per logit of the causal-LM loss (log-softmax forward and backward, the slice's
    zero-filled gradient) and per element of a float32-into-float64 accumulation: the memory-bound
    work of the statistics pass that flop counts miss (measured once per size, cached).

    ``logits``: one batch's logit count; the probe takes that many (within :data:`LOGIT_PROBE`),
    as the cost per logit grows with the tensor once it leaves the caches (measured 21 ns at 2M
    logits, 36 ns at 17M and 45 ns at 78M on the development machine)."""
    size = min(max(int(logits), LOGIT_PROBE[0]), LOGIT_PROBE[1])
    key = ("logit", size)
    if key not in _RATES:
        import torch.nn.functional as F

        V = 4096 if size <= LOGIT_PROBE[0] else 32768
        x = torch.randn(1, max(2, size // V), V, requires_grad=True)
        t = torch.randint(0, V, (1, x.shape[1] - 1))

        def loss_pass():
            y = x * 1.0
            nll = F.cross_entropy(y[:, :-1].transpose(1, 2), t, reduction="none")
            torch.autograd.grad(nll.sum(), [y])

        loss_pass()
        times = []
        for _ in range(2):  # a large probe takes ~1 s a pass: the faster of two
            t0 = time.perf_counter()
            loss_pass()
            times.append(time.perf_counter() - t0)
        _RATES[key] = min(times) / x.numel()
    if "acc" not in _RATES:
        out, blk = torch.zeros(2048, 2048, dtype=torch.float64), torch.randn(2048, 2048)
        out += blk
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out += blk
            times.append(time.perf_counter() - t0)
        _RATES["acc"] = sorted(times)[1] / blk.numel()
    return _RATES[key], _RATES["acc"]


def meta_model(model_or_config: Any, task: Optional[str] = None) -> tuple[nn.Module, str]:
    """A model without weights (meta device) from a config, a model id/folder, or a model as is."""
    if isinstance(model_or_config, nn.Module):
        return model_or_config, type(model_or_config).__name__
    import transformers
    from transformers import AutoConfig, PretrainedConfig

    from .models import default_model_path, infer_task
    from .tasks import task_class

    name = getattr(model_or_config, "name_or_path", None) or type(model_or_config).__name__
    cfg = model_or_config
    if not isinstance(cfg, PretrainedConfig):
        name = str(model_or_config)
        path = str(default_model_path()) if name == "default" else name
        try:
            cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - any loading failure is the user's input
            raise ConfigurationError(f"cannot read the config of {name!r}: {exc}") from None
    task = task or infer_task(cfg)
    auto = getattr(transformers, task_class(task).auto_model)
    with torch.device("meta"):
        model = auto.from_config(cfg)
    return model, name


def _default_unit(model: nn.Module, task: Optional[str]) -> str:
    """The sample unit the model's task uses by default (e.g. "batch" for retrieval's InfoNCE)."""
    from .models import infer_task
    from .tasks import get_task

    cfg = getattr(model, "config", None)
    try:
        name = task or (infer_task(cfg) if cfg is not None else None)
        return get_task(name).default_sample_unit if name else "sequence"
    except Exception:  # noqa: BLE001 - an unknown architecture plans as a sequence task
        return "sequence"


def _cfg(model: nn.Module, *keys, default=0):
    cfg = getattr(model, "config", None)
    for k in keys:
        v = getattr(cfg, k, None)
        if v:
            return int(v)
    return default


def activation_bytes(model: nn.Module, batch_size: int, max_length: int, needs_grad: bool = True) -> int:
    """Peak bytes of one calibration batch's forward and backward (float32), outside the statistics."""
    h = _cfg(model, "hidden_size", "n_embd", "d_model")
    inter = _cfg(model, "intermediate_size", "n_inner", default=4 * h)
    heads = _cfg(model, "num_attention_heads", "n_head", default=1)
    kv = _cfg(model, "num_key_value_heads", default=heads) * (h // max(heads, 1))
    blocks = _cfg(model, "num_hidden_layers", "n_layer", default=1)
    vocab = _cfg(model, "vocab_size", default=0)
    tokens = batch_size * max_length
    out = getattr(model, "get_output_embeddings", lambda: None)()
    logits = LOGIT_COPIES * tokens * vocab * F32 if out is not None else 2 * tokens * h * F32
    saved = blocks * tokens * (ACT_HIDDEN * h + ACT_KV * kv + ACT_INTER * inter) * F32
    return int(logits + (saved if needs_grad else saved // 4))


def _forward_flops(model: nn.Module, layers: dict, tokens: int) -> float:
    """Forward matmul flops of ``tokens`` tokens: every linear-like layer, the LM head included."""
    from .layers import linear_layers, weight_shape

    total = sum(2.0 * math.prod(weight_shape(m)) for m in linear_layers(model, include_heads=True).values())
    return total * tokens


def make_plan(model_or_config: Any, num_samples: int, max_length: int, device: str = "cpu",
              max_memory: Any = None, methods: Sequence[Any] = ("gfwsvd",), sample_unit: Optional[str] = None,
              dtype: Any = torch.float32, batch_size: int = 8, layers: Any = None, extra_kinds: Sequence[str] = (),
              task: Optional[str] = None, ratio: float = 0.5) -> Plan:
    """Plan statistics -> factors -> compression -> export for these settings, without weights.

    ``num_samples`` sequences of ``max_length`` tokens (packed windows: every token valid),
    ``batch_size`` per pass; ``max_memory`` (bytes or "8GiB") bounds the *extra* resident memory of
    every stage on the host (CPU runs) or the accelerator (CUDA runs), the loaded model counted
    in. ``ratio`` (kept parameters) sizes the compressed model. Call :meth:`Plan.check` to turn
    an unmeetable budget into a user error.
    """
    from .layers import select_layers, weight_shape
    from .methods import get_method
    from .models import default_layers
    from .pipeline import required_kinds
    from .stats import _samples_and_tokens, estimate_layer_bytes

    budget = parse_bytes(max_memory)
    model, name = meta_model(model_or_config, task)
    unit = sample_unit or _default_unit(model, task)
    kinds = list(dict.fromkeys(required_kinds(methods) + tuple(extra_kinds)))
    needs_samples = "samples" in kinds
    needs_grad = any(k.needs_grad for k in expand_kinds(kinds))
    names = default_layers(model) if layers is None else list(select_layers(model, layers))
    K, T = _samples_and_tokens(num_samples, max_length, unit, batch_size)
    itemsize = torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else F32
    params = {id(p): p for p in model.parameters()}
    model_bytes = sum(p.numel() for p in params.values()) * itemsize
    act = activation_bytes(model, min(batch_size, num_samples), max_length, needs_grad)
    rate32, rate64 = matmul_rates()
    gfwsvd = any(getattr(get_method(m), "name", "") == "gfwsvd" for m in methods)

    lps: list[LayerPlan] = []
    for n_ in names:
        m, n = weight_shape(model.get_submodule(n_))
        storage = choose_storage(m, n, T) if needs_samples else "streamed"
        kept = estimate_layer_bytes(m, n, K, T, kinds, storage if needs_samples else "auto")
        lp = LayerPlan(n_, (m, n), storage, int(kept),
                       int(estimate_layer_bytes(m, n, K, T, ["samples"], storage)) if needs_samples else 0)
        k = min(m, n)
        lp.dec_kept = k * (m + n) * F32 + (2 * k + 2) * F64
        # the weighted SVD: W in float64, L_out^T W, L_out^T W L_in, U, V^T, up/down in float64
        # (~6 m n float64), the two float64 roots and the Cholesky's copy of each weight
        lp.svd_peak = 6 * m * n * F64 + 2 * (m * m + n * n) * F64
        # the SVD, the two products with the roots and their triangular solve, the two Cholesky roots
        lp.svd_flops64 = (SVD_MN2 * max(m, n) * k * k + SVD_N3 * k**3 + 2 * (m * m * n + m * n * n) + m * k * k
                          + CHOL_D3 * (m**3 + n**3))
        if gfwsvd and needs_samples:
            lp.factor_kept = (m * m + n * n) * F64
            lp.factor_flops, lp.factor_flops64, lp.factor_peak, lp.factor_bytes = _kronecker_cost(m, n, K, T, storage)
        lps.append(lp)

    # statistics: everything kept + the larger of one batch's activations and, when a pass ends,
    # one more copy of its layers' per-sample gradients (the chunks and their concatenation)
    total_kept = sum(lp.stats_bytes for lp in lps)
    total_samples = sum(lp.samples_bytes for lp in lps)
    sizes = {lp.name: lp.stats_bytes for lp in lps}  # what collect_statistics groups by
    largest = max(sizes.values(), default=0)
    by_name = {lp.name: lp for lp in lps}
    # what one layer's solve adds while it runs: its factors and the larger of their temporaries and the SVD's
    solve_need = {lp.name: lp.factor_kept + max(lp.factor_peak, lp.svd_peak) for lp in lps}
    all_lean = sum(lp.dec_kept for lp in lps)  # every layer's lean decomposition
    streamable = _streamable(methods)

    # the smallest budget of each mode: groups of one layer, lean decompositions; the worst stage
    # keep-all: room for the statistics' transient: one pass when its copy of the samples fits, else
    # groups (collect_statistics groups by whole layers' statistics, the largest alone at least)
    min_room = act if total_samples <= act else min(total_samples, max(largest, act))
    comp_bytes = sum(max(1, int(ratio * lp.shape[0] * lp.shape[1] / (lp.shape[0] + lp.shape[1]))) * sum(lp.shape)
                     for lp in lps) * itemsize
    lean_kept = total_kept + all_lean

    # GFWSVD's batched small layers (``batch``; not in lean runs): a batch's stacked samples and
    # bases while the batch solves, before the layers' own solves
    batch_tmp = _batch_bytes(lps, methods, device, K, T) if gfwsvd and needs_samples else 0

    def factors_peak(lean: bool) -> int:  # keep-all: every layer's stats stay; decompositions accumulate
        kept_decs = sum(lp.dec_kept + (0 if lean else lp.factor_kept) for lp in lps)
        return total_kept + kept_decs + max(solve_need.values(), default=0) + (0 if lean else batch_tmp)

    minimum_keep = model_bytes + max(total_kept + min_room, factors_peak(True), lean_kept + comp_bytes)
    # streamed: one group's statistics (and its pass's transient, or one of its layers' solve) on top
    # of every lean decomposition (the last group's worst case); nothing else accumulates
    minimum_stream = model_bytes + all_lean + max([comp_bytes] + [_group_need([lp], act, solve_need) for lp in lps])
    # on an accelerator the lean decompositions can wait in host memory instead (offloaded)
    offloadable = streamable and bool(lps) and device != "cpu"
    minimum_offload = minimum_stream - all_lean if offloadable else None
    stream = bool(budget is not None and streamable and lps and minimum_keep > budget
                  and budget >= (minimum_offload if offloadable else minimum_stream))
    offload = bool(stream and offloadable and budget < minimum_stream)
    dev_lean = 0 if offload else all_lean  # lean decompositions on the device

    groups, collect_budget = [list(sizes)], None
    if stream:
        groups = _stream_groups(lps, act, solve_need, budget - model_bytes - dev_lean)
    elif budget is not None and needs_samples:
        room = budget - model_bytes - total_kept  # for the larger of a pass's finishing copy and a batch
        if max(largest, act) <= room < total_samples:
            from .stats import plan_groups

            collect_budget = int(room)
            groups = plan_groups(sizes, collect_budget)
    for gi, g in enumerate(groups):
        for n_ in g:
            by_name[n_].group = gi
    tokens = num_samples * max_length
    fwd = _forward_flops(model, {}, tokens)
    kinds_flops = sum(_kind_flops(lp, K, T, tokens, kinds) for lp in lps)
    n_batches = math.ceil(num_samples / max(1, batch_size))
    vocab = _cfg(model, "vocab_size", default=0) if getattr(model, "get_output_embeddings", lambda: None)() else 0
    t_logit, t_acc = elementwise_costs(min(batch_size, num_samples) * max_length * vocab)
    moments = sum((lp.shape[0] ** 2 if "kfac" in kinds else 0) + (lp.shape[1] ** 2 if {"kfac", "inputs"} & set(kinds)
                  else 0) for lp in lps)  # float64 elements updated per batch
    # every pass runs the model and its loss; each layer's own statistics are captured in one of them
    per_pass = (2.0 if needs_grad else 1.0) * fwd / rate32 + tokens * vocab * t_logit * needs_grad
    stats_s = per_pass * len(groups) + kinds_flops / rate32 + n_batches * moments * t_acc
    fac_s = sum(lp.factor_flops / rate32 + (lp.factor_flops64 + lp.svd_flops64) / rate64
                + lp.factor_bytes * t_acc / ACC_BYTES for lp in lps)

    if stream:
        lean = True
        pass_peak = max(sum(by_name[n_].stats_bytes for n_ in g)
                        + max(act, sum(by_name[n_].samples_bytes for n_ in g)) for g in groups)
        solve_peak = max(sum(by_name[n_].stats_bytes for n_ in g) + max(solve_need[n_] for n_ in g) for g in groups)
        stats_peak, fac_peak, kept_after_factors = dev_lean + pass_peak, dev_lean + solve_peak, dev_lean
        stats_note = f"{len(groups)} pass(es), streamed: each group's statistics freed after its decompositions"
        if offload:
            stats_note += f"; decompositions ({fmt_bytes(all_lean)}) offloaded to host memory"
    else:
        group_max = max(sum(by_name[n_].samples_bytes for n_ in g) for g in groups) if lps else 0
        stats_peak = total_kept + max(group_max, act)
        lean = bool(budget is not None and model_bytes + factors_peak(False) > budget)
        fac_peak = factors_peak(lean)
        kept_after_factors = total_kept + sum(lp.dec_kept + (0 if lean else lp.factor_kept) for lp in lps)
        stats_note = f"{len(groups)} pass(es); kept {fmt_bytes(total_kept)}, activations {fmt_bytes(act)}"

    dense_layers = sum(lp.shape[0] * lp.shape[1] for lp in lps)
    compressed_model = model_bytes - dense_layers * itemsize + comp_bytes
    on_cpu = device == "cpu"
    host_lean = all_lean if offload else 0  # offloaded decompositions: in host memory by the end
    stages = [
        StagePlan("statistics", stats_peak if on_cpu else host_lean, 0 if on_cpu else model_bytes + stats_peak,
                  stats_s, stats_note),
        StagePlan("factors", fac_peak if on_cpu else host_lean, 0 if on_cpu else model_bytes + fac_peak, fac_s,
                  ("GFWSVD Kronecker factors + " if gfwsvd else "") + "weighted SVD, one layer at a time"),
        StagePlan("compress", kept_after_factors + comp_bytes if on_cpu else comp_bytes + host_lean,
                  0 if on_cpu else model_bytes + kept_after_factors + comp_bytes, 0.0,
                  f"low-rank factors {fmt_bytes(comp_bytes)} at ratio {ratio:g}"),
        StagePlan("export", kept_after_factors + comp_bytes + host_lean, 0, compressed_model / WRITE_RATE,
                  "safetensors of the compressed model, streamed from its tensors"),
        StagePlan("reload", kept_after_factors + comp_bytes + host_lean, 0, RELOAD_SECONDS,
                  "load_compressed: memory-mapped, resident once used"),
    ]
    minimum = min([minimum_keep, minimum_stream] + ([minimum_offload] if offloadable else [])) if streamable \
        else minimum_keep
    notes = []
    if not needs_samples:
        notes.append("no method needs per-sample gradients: every layer is streamed (only moments are kept); "
                     "GFWSVD cannot run that way, K-FAC (kfac) uses the same moments and is its starting point")
    if stream:
        notes.append(f"keeping every layer's statistics needs {fmt_bytes(minimum_keep)}: the run is streamed, "
                     f"{len(groups)} group(s) each collected, decomposed and freed (time x{len(groups)} passes)")
        if offload:
            notes.append(f"every layer's lean decomposition ({fmt_bytes(all_lean)}) does not fit beside a group on "
                         f"the device: each is moved to host memory once solved (host needs {fmt_bytes(all_lean)})")
    elif len(groups) > 1:
        notes.append(f"{len(groups)} groups of layers: one pass over the calibration data each (time x{len(groups)})")
    if lean:
        notes.append("decompositions are lean: each layer's Kronecker factors are dropped after its SVD")
    if not streamable and budget is not None and minimum_keep > budget:
        notes.append("sequential and composite (auto) methods cannot stream their statistics")
    return Plan(name, num_samples, max_length, batch_size, str(device), budget, [str(m) for m in methods], kinds,
                unit, K, T, int(model_bytes), int(act), lps, groups, collect_budget, lean, stages, int(minimum),
                rate32, rate64, notes, stream, int(minimum_keep), offload)


def _batch_bytes(lps: Sequence[LayerPlan], methods: Sequence[Any], device: str, K: int, T: int) -> int:
    """Bytes of GFWSVD's largest batch of small layers (stacked samples and float64 bases; see
    ``GFWSVD.batch``), 0 when no configured GFWSVD batches on ``device``."""
    from .fisher.kronecker import BATCH_BYTES, KRYLOV_BASIS_STEPS
    from .methods import get_method
    from .methods.gfwsvd import BATCH_MAX_ENTRIES

    on = [m for m in map(get_method, methods) if m.name == "gfwsvd" and getattr(m, "solver", "") == "krylov"
          and (m.batch == "on" or (m.batch == "auto" and device.startswith("cuda")))]
    if not on:
        return 0
    shapes: dict = {}
    for lp in lps:
        m, n = lp.shape
        if m * n <= BATCH_MAX_ENTRIES and lp.storage != "streamed":
            per = (K * m * n if lp.storage == "materialized" else K * T * (m + n)) * F32
            shapes.setdefault((m, n, lp.storage), []).append(per + KRYLOV_BASIS_STEPS * F64 * (m * m + n * n))
    sizes = [min(sum(v), max(BATCH_BYTES, max(v))) for v in shapes.values() if len(v) > 1]
    return int(max(sizes, default=0))


def _streamable(methods: Sequence[Any]) -> bool:
    """Whether the methods' statistics can be consumed group by group: not a sequential method
    (which collects its own, block by block, on the compressed model) nor a composite one (auto
    chooses on held-out folds of all the statistics)."""
    from .methods import get_method

    return not any(getattr(get_method(m), "sequential", False) or getattr(get_method(m), "composite", False)
                   for m in methods)


def _group_need(g: Sequence[LayerPlan], act: int, solve_need: dict) -> int:
    """A streamed group's peak: its statistics plus the larger of its pass's transient (a batch's
    activations or the finishing copy of its samples) and its largest solve."""
    return (sum(lp.stats_bytes for lp in g)
            + max(act, sum(lp.samples_bytes for lp in g), max(solve_need[lp.name] for lp in g)))


def _stream_groups(lps: Sequence[LayerPlan], act: int, solve_need: dict, room: int) -> list[list[str]]:
    """Consecutive layer groups for a streamed run, each one's :func:`_group_need` within ``room``."""
    groups: list[list[str]] = []
    cur: list[LayerPlan] = []
    for lp in lps:
        if cur and _group_need(cur + [lp], act, solve_need) > room:
            groups.append([x.name for x in cur])
            cur = []
        cur.append(lp)
    if cur:
        groups.append([x.name for x in cur])
    return groups


def _kind_flops(lp: LayerPlan, K: int, T: int, tokens: int, kinds: Sequence[str]) -> float:
    m, n = lp.shape
    f = 0.0
    if "kfac" in kinds or "inputs" in kinds:
        f += tokens * n * n  # the upper block triangle of sum x x^T
    if "kfac" in kinds:
        f += tokens * m * m
    if lp.storage == "materialized" or "diagonal" in kinds:
        f += 2.0 * K * T * m * n  # G_k = D_k^T X_k
    return f


def _basis_bytes(m: int, n: int, steps: int) -> int:
    """Peak bytes of the Krylov bases (float64, buffers doubling from 8 rows; capped like the solver)."""
    from .fisher.kronecker import KRYLOV_BASIS_STEPS

    def cap(rows: int) -> int:
        c = 8
        while c < rows:
            c *= 2
        return c

    per_pair = F64 * (m * m + n * n)
    want = max(512 * 2**20, KRYLOV_BASIS_STEPS * per_pair)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        want = min(want, free // 4)
    except (ValueError, OSError, AttributeError):
        pass
    rows = min(steps + 1, max(2, want // per_pair))  # range (n x n) vectors; the domain (m x m) has one fewer

    def resident(r: int) -> int:  # rows of a doubling buffer that were written (the rest is never touched)
        return r if r <= 8 else cap(r)  # past 8: the old rows and their copy while it doubles

    return int(resident(rows) * n * n * F64 + resident(rows - 1) * m * m * F64)


def kronecker_seconds(m: int, n: int, K: int, T: int, storage: str) -> float:
    """Predicted seconds of one layer's GFWSVD Kronecker solve on this machine: the plan's model
    (:func:`_kronecker_cost`) at the measured matmul rates and memory bandwidth (probed once)."""
    rate32, rate64 = matmul_rates()
    _, t_acc = elementwise_costs(0)
    f32, f64, _, moved = _kronecker_cost(m, n, K, T, storage)
    return f32 / rate32 + f64 / rate64 + moved * t_acc / ACC_BYTES


def _kronecker_cost(m: int, n: int, K: int, T: int, storage: str) -> tuple[float, float, int, float]:
    """(float32 flops, float64 flops, peak temporary bytes, bytes moved by memory-bound work) of
    one layer's nearest Kronecker product."""
    from .fisher.kronecker import CHUNK_BYTES, SPAN_SHARE

    maps = KRYLOV_STEPS * K * map_pair_flops(m, n, T, storage)
    # the Krylov bases (float64, m^2 + n^2 per step): step j reads its j vectors twice to
    # orthonormalise against them (S^2 vector reads in S steps), and each step makes
    # BASIS_PASSES more passes over one vector
    # (the maps' casts, the recurrence, the buffer); memory-bound, so counted in bytes
    ortho = 4.0 * KRYLOV_STEPS * KRYLOV_STEPS * (m * m + n * n)
    moved = (KRYLOV_STEPS**2 + BASIS_PASSES * KRYLOV_STEPS) * F64 * (m * m + n * n)
    # ||F||: the cheaper of the factored T x T route and the materialised Gram (as the solver picks)
    cost_f = K * K * T * T * (m + n)
    cost_m = K * T * m * n + K * K * m * n
    if storage == "factored" and cost_f < cost_m:
        rows = max(1, CHUNK_BYTES // (F64 * T * T * K))
        norm32, norm64 = 0.0, 2.0 * cost_f
        norm_tmp = 2 * min(rows, K) * T * K * T * F64 + K * T * (m + n) * F64  # products; float64 X, D
    else:
        norm32, norm64 = (2.0 * K * T * m * n if storage == "factored" else 0.0), 2.0 * K * K * m * n
        norm_tmp = K * m * n * (F32 + F64)  # one chunk of G_k and its float64 copy (all K here)
        if storage == "factored":
            per = T * (2 * m + 2 * n + 2 * T)
            chunk = max(1, CHUNK_BYTES // (F32 * per))
            norm_tmp = min(K, chunk) * m * n * (F32 + F64)
    # a map's temporaries: one chunk of samples, sized by the solver to at most CHUNK_BYTES
    per = T * (2 * m + 2 * n + 2 * T) if storage == "factored" else 3 * m * n
    map_tmp = min(CHUNK_BYTES, max(1, CHUNK_BYTES // (F32 * per)) * per * F32, K * per * F32)
    # the PSD check: a Cholesky of each factor; a factor of more rows than the K T sample tokens
    # that span it is rank-deficient, float32 rounding leaves it indefinite, and its negative
    # eigenpairs are computed and removed; with few enough sample vectors on that side, inside
    # their span: a QR of them, the two products with it and an r x r check and clip
    psd = 0.0
    for d in (m, n):
        r = K * T if storage == "factored" else K * (m + n - d)  # tokens, or the other side's rows of each G_k
        if r <= SPAN_SHARE * d:
            psd += 4.0 * d * r * r + 4.0 * d * d * r + 4.0 * d * r * r + (CHOL_D3 + EIGH_NEG_D3) * r**3
        else:
            psd += CHOL_D3 * d**3 + (EIGH_NEG_D3 * d**3 if d > r else 0.0)
    relaid = K * m * n * F32 if storage == "materialized" else 0  # the solver's (m, c, n) copy of G
    # phases, one after the other: the Krylov solve (bases, a map's chunk, its float64 in/out
    # matrices), the PSD projection (the symmetrised float64 factor, its shifted copy or eigenvectors
    # and the rebuild, for the larger side) and ||F|| (its chunk of samples)
    krylov = _basis_bytes(m, n, KRYLOV_STEPS) + map_tmp + 2 * (m * m + n * n) * F64
    psd_tmp = 3 * max(m, n) ** 2 * F64
    peak = relaid + max(krylov, psd_tmp, norm_tmp)
    return maps + norm32, ortho + norm64 + psd, int(peak), moved


def plan_experiment(exp: Any, max_memory: Any, methods: Sequence[Any], extra_kinds: Sequence[str] = (),
                    ratio: float = 0.5) -> Plan:
    """The checked plan of a prepared :class:`~gfwsvd_core.pipeline.Experiment` (its loaded model,
    its real number and length of calibration sequences); sets ``exp.lean`` from it."""
    batches = exp.calib_batches
    seqs = sum(int(b["input_ids"].shape[0]) if b["input_ids"].dim() > 1 else 1 for b in batches)
    length = max(int(b["input_ids"].shape[-1]) for b in batches)
    dev = exp.model.device.type
    from .methods import get_method

    kinds = tuple(extra_kinds)
    if any(getattr(get_method(m), "composite", False) for m in methods):  # collected in folds, with samples
        kinds += ("samples",)
    wanted = set(exp.layers)
    p = make_plan(exp.model, seqs, length, dev, max_memory, methods, exp.sample_unit, exp.model.dtype,
                  int(exp.settings["batch_size"]), layers=lambda name, mod: name in wanted,
                  extra_kinds=kinds, ratio=ratio)
    p.check()
    exp.lean = p.lean
    exp.offload = p.offload
    return p
