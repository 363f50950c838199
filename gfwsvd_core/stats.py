"""Calibration statistics of linear layers, captured with scoped hooks.

For a linear layer ``y = W x + b`` (W is m x n) and a *sample* k with token matrices ``X_k``
(T x n, layer inputs) and ``D_k`` (T x m, loss gradients w.r.t. the layer outputs), the weight
gradient is ``G_k = D_k^T X_k``. From these we keep, per layer, whatever the methods need:

* ``samples``  - the per-sample gradients, either factored ``(X_k, D_k)`` or materialised ``G_k``
  (chosen per layer by whichever makes the Kronecker map ``E[G A G^T]`` cheaper in flops,
  see :func:`map_flops`; overridable);
* ``diagonal`` - the diagonal empirical Fisher ``mean_k G_k**2`` (never the square of a mean) and
  the mean gradient ``mean_k G_k``;
* ``kfac``     - token second moments ``sum_t x x^T`` and ``sum_t d d^T`` (K-FAC "expand");
* ``inputs``   - the input Gram ``sum_t x x^T`` and the per-channel ``sum_t |x|`` (forward only).

``loss_fn(model, batch)`` returns per-sample losses (shape ``(B,)``), so per-sample gradients
are exact whatever reduction the model uses; a scalar loss (e.g. a contrastive loss that couples
the batch) is accepted for ``sample_unit="batch"`` and ``"token"`` (a token's contribution
``d_t x_t^T`` is defined for any loss), and for a batch of one. Hooks live only inside :func:`collect_statistics` and are removed in
``finally``; gradients come from ``torch.autograd.grad`` on the captured layer outputs, so
``.grad`` fields, user hooks and module attributes are never touched.

Each kind is a :class:`~gfwsvd_core.statistics.StatKind` in the registry of
:mod:`gfwsvd_core.statistics`; this module only counts samples and tokens and drives the kinds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .errors import ConfigurationError
from .layers import LayerFilter, select_layers, weight_shape
from .statistics import KINDS, STORAGE_MODES, Context, choose_storage, expand_kinds, get_kind, map_flops
from .statistics import resolve_storage as _resolve_storage

SAMPLE_UNITS = ("token", "sequence", "batch")
ALL_KINDS = tuple(KINDS)  # ("samples", "diagonal", "kfac", "inputs")
_FLOAT = 4  # bytes per stored float32
CHUNK_BYTES = 256 * 2**20  # default budget for per-sample temporaries (env GFWSVD_CHUNK_MB overrides)


def _chunk_budget(budget_bytes: Optional[int] = None) -> int:
    """The byte budget for per-sample temporaries: the argument, else $GFWSVD_CHUNK_MB, else CHUNK_BYTES."""
    if budget_bytes is not None:
        return int(budget_bytes)
    env = os.environ.get("GFWSVD_CHUNK_MB", "").strip()
    if env:
        try:
            mb = float(env)
        except ValueError:
            raise ConfigurationError(f"GFWSVD_CHUNK_MB must be a number of MiB, got {env!r}") from None
        if not mb > 0:
            raise ConfigurationError(f"GFWSVD_CHUNK_MB must be positive, got {env!r}")
        return int(mb * 2**20)
    return CHUNK_BYTES


def _chunk_samples(m: int, n: int, budget_bytes: Optional[int] = None, *, copies: int = 1, itemsize: int = _FLOAT) -> int:
    """How many samples fit ``copies`` temporaries of ``m x n`` elements each in the budget (at least 1).

    Per-sample work is done in chunks so that its temporaries scale with the budget, not with
    the layer: one 32-sample chunk of an 11008 x 4096 layer is already 5.4 GiB.
    """
    per_sample = max(1, m * n * copies * itemsize)
    return max(1, _chunk_budget(budget_bytes) // per_sample)


class Cancelled(RuntimeError):
    """Raised when a caller's cancel event is set during a long computation."""


@dataclass
class LayerStats:
    """Statistics of one linear layer (``nn.Linear`` layout: m = out, n = in).

    Sums are kept with their counts; means are derived properties so nothing is stored twice.
    """

    name: str
    out_features: int
    in_features: int
    sample_unit: str
    num_samples: int = 0  # K
    num_tokens: int = 0  # N (valid tokens seen by the layer)
    X: Optional[torch.Tensor] = None  # (K, T, n) per-sample inputs, zero-padded
    D: Optional[torch.Tensor] = None  # (K, T, m) per-sample output gradients, zero-padded
    G: Optional[torch.Tensor] = None  # (K, m, n) materialised per-sample weight gradients
    grad_sq_sum: Optional[torch.Tensor] = None  # (m, n) sum_k G_k**2   (float64)
    grad_sum: Optional[torch.Tensor] = None  # (m, n) sum_k G_k          (float64)
    xx_sum: Optional[torch.Tensor] = None  # (n, n) sum_t x x^T        (float64)
    dd_sum: Optional[torch.Tensor] = None  # (m, m) sum_t d d^T        (float64)
    abs_x_sum: Optional[torch.Tensor] = None  # (n,) sum_t |x|           (float64)
    info: dict = field(default_factory=dict)  # storage mode and caches of derived results
    extra: dict = field(default_factory=dict)  # values of registered kinds without a field above
    #: under torchrun: the job whose other ranks hold the rest of the per-sample gradients (counts
    #: and moment sums are already the job's); None when every sample is here
    shard: Optional[Any] = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def storage(self) -> Optional[str]:
        """"factored", "materialized" or None when per-sample gradients were not kept."""
        if self.G is not None:
            return "materialized"
        if self.X is not None:
            return "factored"
        return None

    def _need(self, value, what: str, kind: str):
        if value is None:
            raise ValueError(f"layer {self.name}: {what} was not collected (add {kind!r} to kinds)")
        if self.num_samples == 0 and get_kind(kind).needs_grad:  # forward-only kinds count tokens
            raise ValueError(f"layer {self.name}: empty statistics (no calibration samples)")
        return value

    @property
    def diagonal_fisher(self) -> torch.Tensor:
        """Diagonal empirical Fisher ``mean_k G_k**2`` (m x n)."""
        return self._need(self.grad_sq_sum, "the diagonal Fisher", "diagonal") / self.num_samples

    @property
    def grad_mean(self) -> torch.Tensor:
        """Mean weight gradient ``mean_k G_k`` (m x n)."""
        return self._need(self.grad_sum, "the mean gradient", "diagonal") / self.num_samples

    @property
    def kfac_in(self) -> torch.Tensor:
        """K-FAC input factor ``E_t[x x^T]`` (n x n, mean over tokens)."""
        return self._need(self.xx_sum, "the input second moment", "kfac") / max(self.num_tokens, 1)

    @property
    def kfac_out(self) -> torch.Tensor:
        """K-FAC output factor ``sum_t d d^T / K`` (m x m).

        Normalised per *sample*, so that ``kfac_in (x) kfac_out`` approximates the per-sample
        Fisher ``F = 1/K sum_k vec(G_k) vec(G_k)^T`` at its own scale (K-FAC "expand").
        """
        return self._need(self.dd_sum, "the output-gradient second moment", "kfac") / self.num_samples

    @property
    def input_gram(self) -> torch.Tensor:
        """Input Gram ``sum_t x x^T`` (n x n), as used by SVD-LLM."""
        return self._need(self.xx_sum, "the input Gram", "inputs")

    @property
    def act_absmean(self) -> torch.Tensor:
        """Per input channel ``mean_t |x|`` (n,), as used by ASVD."""
        return self._need(self.abs_x_sum, "the activation magnitudes", "inputs") / max(self.num_tokens, 1)

    def per_sample_gradients(self, chunk: Optional[int] = None, budget_bytes: Optional[int] = None) -> Iterator[torch.Tensor]:
        """Yield the per-sample gradients ``G_k`` in chunks of shape (c, m, n).

        ``chunk`` fixes c; by default c is sized so that one chunk fits the byte budget
        (``budget_bytes``, else $GFWSVD_CHUNK_MB, else ``CHUNK_BYTES``).
        """
        if chunk is None:
            t = self.G if self.G is not None else self.X
            itemsize = t.element_size() if t is not None else _FLOAT
            chunk = _chunk_samples(self.out_features, self.in_features, budget_bytes, itemsize=itemsize)
        if self.G is not None:
            yield from self.G.split(chunk)
        elif self.X is not None:
            for X, D in zip(self.X.split(chunk), self.D.split(chunk)):
                yield torch.bmm(D.transpose(1, 2), X)  # (c, m, T) @ (c, T, n) -> (c, m, n)
        else:
            raise ValueError(f"layer {self.name}: per-sample gradients were not collected (add 'samples' to kinds)")

    @torch.no_grad()
    def quadratic(self, dW: torch.Tensor, budget_bytes: Optional[int] = None) -> float:
        """Exact empirical-Fisher quadratic ``1/2 vec(dW)^T F vec(dW) = mean_k <G_k, dW>^2 / 2``.

        The second-order loss increase of a weight change ``dW`` (m x n) with the full Fisher of
        the stored samples, one inner product per sample (factored: ``<D_k dW, X_k>``). Samples
        are taken in chunks whose temporaries fit the byte budget (see :meth:`per_sample_gradients`).
        """
        if self.num_samples == 0:
            raise ValueError(f"layer {self.name}: empty statistics (no calibration samples)")
        if tuple(dW.shape) != self.shape:
            raise ValueError(f"layer {self.name}: dW has shape {tuple(dW.shape)}, expected {self.shape}")
        total = 0.0
        if self.X is not None:
            dWf = dW.to(self.X.device, self.X.dtype)
            # temporaries per sample: D_k dW and its product with X_k, both T x n
            c = _chunk_samples(self.X.shape[1], self.in_features, budget_bytes, copies=2, itemsize=self.X.element_size())
            for X, D in zip(self.X.split(c), self.D.split(c)):
                inner = ((D @ dWf) * X).sum(dim=(1, 2))  # <G_k, dW> = sum (D_k dW) * X_k
                total += float((inner.double() ** 2).sum())
        else:
            # stored G: the chunks are views, the product with dW is the one temporary
            for G in self.per_sample_gradients(budget_bytes=budget_bytes):
                inner = (G * dW.to(G.device, G.dtype)).sum(dim=(1, 2))
                total += float((inner.double() ** 2).sum())
        if self.shard is not None:
            total = self.shard.sum(total)
        return 0.5 * total / self.num_samples

    def has(self, kind: str) -> bool:
        """Whether statistics of ``kind`` were collected for this layer."""
        return get_kind(kind).collected(self)

    def counts_only(self) -> "LayerStats":
        """This layer's name, shape, unit and counts without any tensor: what a streamed run keeps
        once the layer's decompositions are computed (``has()`` is then False for every kind)."""
        info = {k: v for k, v in self.info.items() if not isinstance(v, torch.Tensor)}
        info.update(storage=self.storage, streamed=True)
        return LayerStats(self.name, self.out_features, self.in_features, self.sample_unit, self.num_samples,
                          self.num_tokens, info=info)

    def nbytes(self) -> int:
        """Bytes of the tensors kept (all kinds)."""
        values = [getattr(self, f.name) for f in fields(self)] + list(self.extra.values())
        return sum(t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor))


def merge_stats(a: LayerStats, b: LayerStats) -> LayerStats:
    """The statistics of one layer over the samples of ``a`` and then ``b`` (e.g. two processes).

    Counts and running sums add, kept samples concatenate (``a``'s first, on ``a``'s device), so
    the result equals one pass over both sets of batches. Both must hold the same kinds; cached
    derived results in ``info`` are dropped.
    """
    if (a.name, a.shape, a.sample_unit) != (b.name, b.shape, b.sample_unit):
        raise ValueError(f"cannot merge statistics of {a.name} {a.shape} ({a.sample_unit} samples) with "
                         f"{b.name} {b.shape} ({b.sample_unit} samples)")
    kinds = [k for k in KINDS.values() if k.collected(a) or k.collected(b)]
    differ = [k.name for k in kinds if k.collected(a) != k.collected(b)]
    if differ:
        raise ValueError(f"layer {a.name}: cannot merge statistics that differ in the kinds {differ}")
    out = LayerStats(name=a.name, out_features=a.out_features, in_features=a.in_features, sample_unit=a.sample_unit,
                     num_samples=a.num_samples + b.num_samples, num_tokens=a.num_tokens + b.num_tokens)
    for k in kinds:
        k.merge(out, a, b)
    out.info["storage"] = out.storage
    return out


def has_kinds(stats: Mapping[str, LayerStats], kinds: Sequence[str]) -> list[str]:
    """The kinds in ``kinds`` that some layer of ``stats`` lacks (empty: all collected)."""
    return [k for k in kinds if not stats or not all(s.has(k) for s in stats.values())]


# ---------------------------------------------------------------------------------------------
# memory estimate (the storage cost rule, map_flops and choose_storage, is in statistics.samples)


def estimate_layer_bytes(
    m: int, n: int, num_samples: int, tokens_per_sample: int, kinds: Sequence[str] = ALL_KINDS, storage: str = "auto"
) -> int:
    """Bytes the kept statistics of one layer need (float32 samples, float64 moments)."""
    return sum(k.layer_bytes(m, n, num_samples, tokens_per_sample, storage) for k in expand_kinds(kinds))


def estimate_memory(
    model: nn.Module,
    num_samples: int,
    tokens_per_sample: int,
    layers: LayerFilter = None,
    kinds: Sequence[str] = ALL_KINDS,
    sample_unit: str = "sequence",
    storage: str = "auto",
) -> dict[str, int]:
    """Estimated bytes per layer of :func:`collect_statistics` with these settings.

    ``num_samples`` and ``tokens_per_sample`` are in sequences and tokens per sequence; the
    sample unit converts them (a token sample has T = 1, a batch sample all its tokens).
    """
    K, T = _samples_and_tokens(num_samples, tokens_per_sample, sample_unit)
    out = {}
    for name, mod in select_layers(model, layers).items():
        m, n = weight_shape(mod)
        mode = storage.get(name, "auto") if isinstance(storage, Mapping) else storage
        out[name] = estimate_layer_bytes(m, n, K, T, kinds, mode)
    return out


def _samples_and_tokens(num_sequences: int, tokens: int, unit: str, batch_size: int = 8) -> tuple[int, int]:
    if unit == "token":
        return num_sequences * tokens, 1
    if unit == "batch":
        return max(1, math.ceil(num_sequences / batch_size)), tokens * batch_size
    return num_sequences, tokens


def plan_groups(sizes: Mapping[str, int], max_bytes: Optional[int]) -> list[list[str]]:
    """Split layers (in order) into consecutive groups whose estimated size fits ``max_bytes``."""
    if not max_bytes:
        return [list(sizes)]
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if size > max_bytes:
            raise ValueError(
                f"layer {name} alone needs about {size / 2**20:.1f} MiB of statistics, more than the "
                f"memory budget of {max_bytes / 2**20:.1f} MiB; raise the budget, use fewer samples "
                "or a shorter max length, or drop 'samples' from kinds"
            )
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


# ---------------------------------------------------------------------------------------------
# collection


class _Accumulator:
    """One layer during collection: counts samples and tokens and feeds each kind its batch."""

    def __init__(self, name: str, m: int, n: int, unit: str, kinds: Sequence[str], storage, device,
                 chunk_bytes: Optional[int] = None):
        self.stats = LayerStats(name=name, out_features=m, in_features=n, sample_unit=unit)
        self.chunk_bytes = chunk_bytes
        self.kinds = expand_kinds(kinds)
        ctx = Context(storage=storage, device=device)
        self.state = {k.name: k.init(self.stats, ctx) for k in self.kinds}

    def add_inputs(self, X: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Forward-only statistics. X: (B, T, n) float32, mask: (B, T) bool or None."""
        s = self.stats
        flat = X.reshape(-1, X.shape[-1]) if mask is None else X[mask]  # (N_b, n)
        s.num_tokens += flat.shape[0]
        for k in self.kinds:
            k.add_inputs(s, self.state[k.name], flat)

    def add_gradients(self, X: torch.Tensor, D: torch.Tensor, mask: Optional[torch.Tensor], unit: str) -> None:
        """X: (B, T, n), D: (B, T, m), zeroed outside ``mask``; both float32."""
        s = self.stats
        if not (torch.isfinite(D.sum()) and torch.isfinite(X.sum())):  # NaN/inf propagate; one pass, no mask
            raise ValueError(
                f"layer {s.name}: non-finite values (NaN or inf) in its inputs or output gradients; "
                "check the loss, the data and the model's dtype"
            )
        if unit == "token":
            idx = mask if mask is not None else torch.ones(X.shape[:2], dtype=torch.bool, device=X.device)
            X, D = X[idx].unsqueeze(1), D[idx].unsqueeze(1)  # (N_b, 1, n), (N_b, 1, m)
        elif unit == "batch":  # one sample of the batch's valid tokens (padding rows are zero: dropped)
            if mask is not None:
                X, D = X[mask].unsqueeze(0), D[mask].unsqueeze(0)  # (1, N_b, .)
            else:
                X, D = X.reshape(1, -1, X.shape[-1]), D.reshape(1, -1, D.shape[-1])  # (1, B*T, .)
        s.num_samples += X.shape[0]
        for k in self.kinds:
            k.add_gradients(s, self.state[k.name], X, D)
        chunked = [k for k in self.kinds if k.wants_chunks(s, self.state[k.name], X.shape[1])]
        if chunked:
            # per sample: G_k and one temporary of its size (m x n float32 each), sized to the byte budget
            c = _chunk_samples(s.out_features, s.in_features, self.chunk_bytes, copies=2)
            for Xc, Dc in zip(X.split(c), D.split(c)):
                Gc = torch.bmm(Dc.transpose(1, 2), Xc)  # (c, m, n), formed once per chunk for all kinds
                for k in chunked:
                    k.add_chunk(s, self.state[k.name], Gc)

    def finish(self) -> LayerStats:
        s = self.stats
        for k in self.kinds:
            k.finish(s, self.state[k.name])
        s.info["storage"] = s.storage
        return s


def _to_device(batch: Any, device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _as_btn(x: torch.Tensor, B: int, name: str) -> torch.Tensor:
    """Bring a layer input/output to (B, T, features)."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    feats = x.shape[-1]
    if x.shape[0] == B:
        return x.reshape(B, -1, feats)
    if x.numel() % (B * feats) == 0 and x.dim() == 2:  # flattened (B*T, feats)
        return x.reshape(B, -1, feats)
    raise ValueError(f"layer {name}: cannot split its input of shape {tuple(x.shape)} into {B} samples")


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    layers: LayerFilter = None,
    kinds: Sequence[str] = ALL_KINDS,
    sample_unit: str = "sequence",
    storage: Any = "auto",
    max_memory: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    storage_device: Optional[torch.device | str] = None,
    progress: Any = None,
    cancel: Any = None,
    chunk_bytes: Optional[int] = None,
) -> dict[str, LayerStats]:
    """Run the calibration batches and return ``{layer name: LayerStats}``.

    Args:
        model: any ``nn.Module`` with ``nn.Linear`` / ``Conv1D`` layers. Its train/eval mode and
            ``requires_grad`` flags are restored on exit; its weights are not changed.
        batches: re-iterable collection of batches (a dict of tensors, ...). A one-shot iterator
            is fine unless the layers are processed in several groups.
        loss_fn: ``loss_fn(model, batch)`` -> per-sample losses ``(B,)`` (or a scalar for
            ``sample_unit="batch"``). An ``attention_mask`` in a dict batch marks valid tokens.
        layers: selection by name patterns or a filter function (see ``layers.select_layers``).
        kinds: subset of ``ALL_KINDS`` (the registered kinds of ``gfwsvd_core.statistics``).
        sample_unit: "token", "sequence" or "batch": what one Fisher sample is.
        storage: "auto" (cost rule per layer), "factored", "materialized" or ``{layer: mode}``.
        max_memory: bytes for kept statistics; layers are then processed in groups, one pass
            over ``batches`` per group, using the sizes of the first batch for the estimate.
        device: where to run (default: the model's device). storage_device: where to keep
            per-sample statistics (default: ``device``).
        progress: None, True (tqdm bar) or ``callable(done, total, message)``.
        cancel: an object with ``is_set()`` (e.g. ``threading.Event``); raises :class:`Cancelled`.
        chunk_bytes: budget for the per-sample gradient temporaries of one layer (default:
            $GFWSVD_CHUNK_MB MiB, else ``CHUNK_BYTES``); the results do not depend on it.
    """
    if sample_unit not in SAMPLE_UNITS:
        raise ValueError(f"unknown sample_unit {sample_unit!r}; valid: {', '.join(SAMPLE_UNITS)}")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown kinds {bad}; valid: {', '.join(KINDS)}")
    selected = select_layers(model, layers)
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    storage_device = torch.device(storage_device) if storage_device is not None else device
    needs_grad = any(k.needs_grad for k in expand_kinds(kinds))

    groups = [list(selected)]
    if max_memory:
        if isinstance(batches, Iterator):
            raise ValueError("max_memory splits layers into several passes: pass a list of batches, not an iterator")
        sizes = _estimate_from_first_batch(model, batches, loss_fn, selected, kinds, sample_unit, storage, device)
        groups = plan_groups(sizes, max_memory)
    total = len(batches) * len(groups) if hasattr(batches, "__len__") else None
    bar = _progress(progress, total)

    result: dict[str, LayerStats] = {}
    was_training = model.training
    flags = {name: mod.weight.requires_grad for name, mod in selected.items()}
    moved = False
    if param.device != device:
        model.to(device)
        moved = True
    try:
        model.eval()
        done = 0
        for group in groups:
            accs = {
                name: _Accumulator(name, *weight_shape(selected[name]), sample_unit, kinds, storage, storage_device,
                                   chunk_bytes)
                for name in group
            }
            for name in group:
                selected[name].weight.requires_grad_(needs_grad)
            seen = 0
            of = f" of {total}" if total else ""
            for batch in batches:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("statistics collection cancelled")
                if callable(progress):  # say what runs now, not only what has finished
                    bar(done, total, f"statistics: batch {done + 1}{of} ({len(group)} layers)")
                _run_batch(model, _to_device(batch, device), loss_fn, {n: selected[n] for n in group}, accs,
                           sample_unit, needs_grad)
                seen += 1
                done += 1
                bar(done, total, f"statistics: {done}{of} batches done ({len(group)} layers)")
            if seen == 0:
                raise ValueError("no calibration batches: the data produced nothing to collect statistics from")
            for name in group:
                result[name] = accs[name].finish()
            for name in group:
                selected[name].weight.requires_grad_(flags[name])
    finally:
        for name, mod in selected.items():
            mod.weight.requires_grad_(flags[name])
        model.train(was_training)
        if moved:
            model.to(param.device)
    return {name: result[name] for name in selected}


def _run_batch(model, batch, loss_fn, modules: dict[str, nn.Module], accs, unit: str, needs_grad: bool) -> None:
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in modules}

    def make_hook(name):
        def hook(module, args, output):
            calls[name].append((args[0].detach(), output))

        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in modules.items()]
    try:
        with torch.enable_grad() if needs_grad else torch.no_grad():
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor):
                raise ValueError(f"loss_fn must return a tensor, got {type(loss).__name__}")
            if loss.dim() > 1:
                raise ValueError(f"loss_fn must return per-sample losses (B,) or a scalar, got shape {tuple(loss.shape)}")
            if loss.dim() == 0:
                if unit == "sequence" and _batch_size(calls) not in (None, 1):
                    raise ValueError(
                        "sample_unit='sequence' needs per-sample losses: make loss_fn return a (batch,) tensor "
                        "(reduction='none'), or use sample_unit='batch' or 'token'"
                    )
                B = _batch_size(calls) or 1
            else:
                B = loss.shape[0]
            if needs_grad and not torch.isfinite(loss).all():
                raise ValueError("the loss is not finite (NaN or inf) on a calibration batch")
            outs = [o for name in modules for (_, o) in calls[name]]
            grads: list[Optional[torch.Tensor]] = [None] * len(outs)
            if needs_grad:
                if not outs or not all(o.requires_grad for o in outs):
                    raise ValueError("layer outputs do not depend on the loss through autograd; is the loss detached?")
                grads = list(torch.autograd.grad(loss.sum(), outs, allow_unused=True))
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        i = 0
        for name in modules:
            xs, ds, ms = [], [], []
            for x, out in calls[name]:
                g = grads[i]
                i += 1
                X = _as_btn(x, B, name).float()
                Dm = _as_btn(g if g is not None else torch.zeros_like(out), B, name).float() if needs_grad else None
                mk = mask.bool() if (mask is not None and tuple(mask.shape) == tuple(X.shape[:2])) else None
                if mk is not None:
                    X = X * mk[..., None]
                    if Dm is not None:
                        Dm = Dm * mk[..., None]
                else:
                    mk = torch.ones(X.shape[:2], dtype=torch.bool, device=X.device)
                xs.append(X)
                ds.append(Dm)
                ms.append(mk)
            if not xs:
                continue  # layer not used by this batch
            cat = (lambda ts: ts[0]) if len(xs) == 1 else (lambda ts: torch.cat(ts, 1))
            X = cat(xs)  # several calls of a shared module: more tokens of the same sample
            mk = cat(ms)
            accs[name].add_inputs(X, mk)
            if needs_grad:
                accs[name].add_gradients(X, cat(ds), mk, unit)
    finally:
        for h in handles:
            h.remove()


def _batch_size(calls) -> Optional[int]:
    for lst in calls.values():
        for x, _ in lst:
            return int(x.shape[0]) if x.dim() >= 3 else None
    return None


def _estimate_from_first_batch(model, batches, loss_fn, selected, kinds, unit, storage, device) -> dict[str, int]:
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("no calibration batches: the data produced nothing to collect statistics from")
    shapes: dict[str, tuple] = {}

    def make_hook(name):
        def hook(module, args, output):
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [mod.register_forward_hook(make_hook(n)) for n, mod in selected.items()]
    try:
        with torch.no_grad():
            loss_fn(model, _to_device(first, device))
    finally:
        for h in handles:
            h.remove()
    n_batches = len(batches)
    sizes = {}
    for name, mod in selected.items():
        m, n = weight_shape(mod)
        shp = shapes.get(name, (1, 1, n))
        B = shp[0]
        T = int(math.prod(shp[1:-1])) if len(shp) > 2 else 1
        K, Ts = _samples_and_tokens(B * n_batches, T, unit, batch_size=B)
        mode = storage.get(name, "auto") if isinstance(storage, Mapping) else storage
        sizes[name] = estimate_layer_bytes(m, n, K, Ts, kinds, mode)
    return sizes


def _progress(progress, total):
    if progress is None or progress is False:
        return lambda done, total, msg: None
    if callable(progress):
        return progress
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="statistics", unit="batch")

    def update(done, total, msg):
        bar.n = done
        bar.set_description(msg)
        bar.refresh()
        if total is not None and done >= total:
            bar.close()

    return update
