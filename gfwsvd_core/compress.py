"""Compress a model: per-layer weighted decompositions, then ranks, then a new factorised model.

Decompositions are computed once per (layer, method) and truncated to any rank, so a sweep
over ratios or a rank slider costs no new SVDs. The input model is never modified.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .factorized import LowRankLinear, replace_layer
from .layers import get_weight, weight_shape
from .methods import Method, Weights, get_method
from .ranks import break_even_rank, budget_ranks, kept_params, layer_params, uniform_ranks, v2_ranks, validate_ranks
from .solver import WeightedDecomposition, decompose
from .update import closed_form_update
from .yardstick import exact_quadratic_curve
from .stats import Cancelled, LayerStats


@dataclass
class LayerDecomposition:
    """One layer under one method: the reusable SVD of its weighted matrix and what produced it."""

    name: str
    shape: tuple[int, int]
    method: str
    decomposition: WeightedDecomposition
    info: dict = field(default_factory=dict)  # method diagnostics, damping, fallbacks
    seconds: float = 0.0
    weights: Optional[Weights] = None  # the (left, right) weights the method produced
    #: entry r: the exact empirical-Fisher quadratic of the rank-r truncation (r = 0 .. min(m, n)),
    #: the yardstick comparable across layers and methods; None without per-sample gradients
    exact_curve: Optional[torch.Tensor] = None
    #: entry r: the loss estimate the budget allocation spends on, when it is not ``exact_curve``
    #: (auto: the held-out quadratic of its choice at each rank)
    allocation_curve: Optional[torch.Tensor] = None
    #: auto only: ``{candidate: held-out quadratic per rank}``, what its choice was made on
    heldout_curves: Optional[dict] = None

    def method_at(self, rank: Optional[int]) -> Optional[str]:
        """The method whose truncation is used at ``rank`` (auto chooses per rank)."""
        if rank is None:
            return None
        pick = getattr(self.decomposition, "method_at", None)
        return pick(rank) if pick is not None else self.method

    @property
    def factors(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(A, B)`` (input side, output side) when both weights are matrices, else None."""
        w = self.weights
        if w is None or w.left is None or w.right is None or w.left.dim() != 2 or w.right.dim() != 2:
            return None
        return w.right, w.left

    @property
    def predicted_loss(self) -> torch.Tensor:
        return self.decomposition.predicted_loss


def decompose_layers(
    model: nn.Module,
    stats: Mapping[str, LayerStats],
    method: Any = "gfwsvd",
    layers: Optional[list[str]] = None,
    progress: Any = None,
    cancel: Any = None,
    lean: bool = False,
    offload: bool = False,
) -> dict[str, LayerDecomposition]:
    """Weighted decomposition of each layer (all layers with statistics unless ``layers``).

    ``lean``: drop each layer's weights (e.g. GFWSVD's float64 Kronecker factors, m^2 + n^2) as
    soon as its SVD is taken, keeping only what truncation needs (see :func:`drop_weights`); for
    models whose caches would not fit the memory budget (``gfwsvd_core.plan``). ``offload``: also
    move each finished (lean) decomposition to host memory (:func:`offload_decomposition`), so the
    accelerator holds one layer's solve at a time."""
    method = get_method(method) if not isinstance(method, Method) else method
    names = list(stats) if layers is None else list(layers)
    missing = [n for n in names if n not in stats]
    if missing:
        raise ValueError(f"no statistics for layer(s) {', '.join(missing[:5])}; collect them first")
    if not names:
        raise ValueError("no layers to decompose: the statistics are empty")
    shard = stats[names[0]].shard
    if shard is not None and getattr(method, "composite", False):
        raise ValueError(f"{method.label} is not supported under torchrun yet; run it in one process")
    # under torchrun layer i is solved by rank i % world; weights that read the per-sample
    # gradients (spread over the ranks) are computed by all ranks together, in layer order
    collective = shard is not None and "samples" in method.kinds()
    solved: dict[str, tuple] = {}
    out = {}
    try:
        if shard is None and not (lean or offload):  # lean runs hold one layer's solve at a time
            method.prefetch([stats[n] for n in names])  # e.g. GFWSVD's small layers in batches
        _decompose_each(model, stats, method, names, shard, collective, solved, out, progress, cancel, lean, offload)
    finally:
        method.prefetch([])  # forget what a cancelled run prefetched and did not use
    if shard is None:
        return out
    device = get_weight(model.get_submodule(names[0])).device
    for part in shard.gather_objects(solved, device=device):
        solved.update(part)
    for i, name in enumerate(names):  # the yardstick curves read every rank's samples: all ranks, in order
        dec, w, seconds = solved[name]
        out[name] = _finished(model, stats[name], method, dec, w, time.perf_counter() - seconds)
        if lean or offload:
            drop_weights(out[name])
        if offload:
            offload_decomposition(out[name])
        if progress:
            progress(i + 1, len(names), f"{method.label}: {name}")
    return out


def _decompose_each(model, stats, method, names, shard, collective, solved, out, progress, cancel, lean, offload):
    """The per-layer loop of :func:`decompose_layers`: one process's layers into ``out``, or under
    torchrun this rank's (and the collective methods' every) layer into ``solved``."""
    for i, name in enumerate(names):
        if cancel is not None and cancel.is_set():
            raise Cancelled("decomposition cancelled")
        mine = shard is None or shard.owner(i) == shard.rank
        if not (mine or collective):
            continue
        t0 = time.perf_counter()
        w = method.weights(stats[name])
        if shard is None:
            out[name] = _finished(model, stats[name], method, *_solve(model.get_submodule(name), w), t0)
            if lean or offload:
                drop_weights(out[name])
            if offload:
                offload_decomposition(out[name])
            del w  # lean: nothing else holds this layer's factors now
            if progress:
                progress(i + 1, len(names), f"{method.label}: {name}")
        elif mine:
            solved[name] = (*_solve(model.get_submodule(name), w), time.perf_counter() - t0)


def drop_weights(dec: LayerDecomposition) -> LayerDecomposition:
    """Forget the weights behind a decomposition, in place: truncation, curves and diagnostics stay;
    ``dec.weights`` / ``dec.factors`` become None and the roots' ``L`` can no longer be rebuilt."""
    dec.weights = None
    for rt in (dec.decomposition.left, dec.decomposition.right):
        if rt is not None and hasattr(rt, "_weight"):
            rt._weight = None
    return dec


def offload_decomposition(dec: LayerDecomposition, device="cpu") -> LayerDecomposition:
    """Move a (lean) decomposition's tensors - the truncation's factors and singular values, its
    curves - to ``device`` (host memory by default), in place; compression moves the kept ranks
    back to each layer's device."""
    move = getattr(dec.decomposition, "to_", None)
    if move is None:
        raise ValueError(f"{dec.method} decompositions cannot be offloaded")
    move(device)
    for key in ("exact_curve", "allocation_curve"):
        t = getattr(dec, key)
        if isinstance(t, torch.Tensor):
            setattr(dec, key, t.to(device))
    return dec


def _finished(model: nn.Module, stats: LayerStats, method: Method, dec: WeightedDecomposition, w: Weights,
              t0: float) -> LayerDecomposition:
    """A solved layer with its exact quadratic curve (after the closed-form update if asked for)."""
    module = model.get_submodule(stats.name)
    W = get_weight(module)
    if method.update:
        out = updated_layer(LayerDecomposition(stats.name, weight_shape(module), method.name, dec, w.info, 0.0, w),
                            W, stats)
        out.seconds = time.perf_counter() - t0
        return out
    curve = exact_quadratic_curve(stats, dec, W)
    return LayerDecomposition(stats.name, weight_shape(module), method.name, dec, w.info, time.perf_counter() - t0,
                              w, curve)


def _solve(module: nn.Module, w: Weights) -> tuple[WeightedDecomposition, Weights]:
    """The weighted decomposition of one layer from its weights, with the diagnostics in ``w.info``."""
    dec = decompose(get_weight(module), w.left, w.right, damping=w.damping, root_kind=w.root)
    info = {k: v for k, v in w.info.items() if k != "factors"}
    for side, rt in (("left", dec.left), ("right", dec.right)):
        if rt is not None:
            info[f"{side}_damping"] = rt.damping
            info[f"{side}_fell_back"] = rt.fell_back
    info["zero_weight"] = dec.zero_weight
    info["warnings"] = list(w.info.get("warnings", [])) + _method_warnings(info) + dec.warnings
    w.info = info
    return dec, w


def updated_layer(dec: LayerDecomposition, W: torch.Tensor, stats: LayerStats) -> LayerDecomposition:
    """``dec`` with the closed-form update after every truncation (:mod:`gfwsvd_core.update`),
    from the layer's input Gram; the exact quadratic curve is recomputed on the updated factors.
    Reuses the decomposition: the weighting (e.g. GFWSVD's Kronecker factors) is not refitted."""
    t0 = time.perf_counter()
    upd = closed_form_update(dec.decomposition, W, stats.input_gram)
    info = {**dec.info, "update": {"damping": upd.damping},
            "warnings": list(dec.info.get("warnings", [])) + upd.warnings[len(dec.decomposition.warnings):]}
    curve = exact_quadratic_curve(stats, upd, W)
    return LayerDecomposition(dec.name, dec.shape, dec.method, upd, info, dec.seconds + time.perf_counter() - t0,
                              dec.weights, curve)


#: names of the two loss curves a layer can be allocated by
EXACT_YARDSTICK = "exact empirical-Fisher quadratic"
OWN_YARDSTICK = "the method's own predicted loss"


#: the yardstick of auto's allocation
HELDOUT_YARDSTICK = "held-out exact empirical-Fisher quadratic"


def loss_curve(dec: LayerDecomposition) -> torch.Tensor:
    """Entry r: the layer's loss increase estimate at rank r, on the common yardstick when the
    per-sample gradients were kept (:data:`EXACT_YARDSTICK`), else the method's own prediction
    (auto: the held-out quadratic it chose by)."""
    if dec.allocation_curve is not None:
        return dec.allocation_curve
    return dec.exact_curve if dec.exact_curve is not None else dec.predicted_loss


def allocation_curves(decs: Mapping[str, LayerDecomposition]) -> tuple[dict[str, torch.Tensor], str]:
    """Per-layer curves for :func:`gfwsvd_core.ranks.budget_ranks` and the yardstick they are on.

    The exact quadratic when every layer has it (comparable across layers and methods, checked
    against measurement by ``pipeline.prediction_check``), else every method's own prediction
    (comparable across layers only for methods that keep the Fisher scale)."""
    if decs and all(d.allocation_curve is not None for d in decs.values()):
        return {n: d.allocation_curve for n, d in decs.items()}, HELDOUT_YARDSTICK
    exact = all(d.exact_curve is not None for d in decs.values())
    curves = {n: (d.exact_curve if exact else d.predicted_loss) for n, d in decs.items()}
    return curves, EXACT_YARDSTICK if exact else OWN_YARDSTICK


def _method_warnings(info: Mapping[str, Any]) -> list[str]:
    """Warnings hidden in a method's diagnostics (e.g. a Kronecker solve that did not converge)."""
    out = []
    kron = info.get("kronecker")
    if isinstance(kron, Mapping):
        if kron.get("converged") is False:
            out.append(f"the Kronecker factors did not converge in {kron.get('sweeps')} steps "
                       f"(bound {kron.get('residual_bound')}); raise max_sweeps or tol")
        if (kron.get("psd_clipped") or 0) > 1e-4:
            out.append(f"the Kronecker factors were projected onto the PSD cone, removing "
                       f"{kron['psd_clipped']:.1e} of their Frobenius norm")
    return out


def resolve_ranks(
    decs: Mapping[str, LayerDecomposition], ratio: Optional[float] = None, ranks: Optional[Mapping] = None,
    allocation: str = "uniform",
) -> dict[str, Optional[int]]:
    """Ranks from exactly one of a kept ratio or an explicit ``{layer: rank}`` map.

    ``allocation`` turns the ratio into ranks: "uniform" (the ratio in every layer), "budget"
    (one global budget on :func:`allocation_curves`: auto's held-out curve, else the exact
    quadratic, else the method's own prediction) or "v2" (SVD-LLM V2's per-type ratios from each
    matrix's truncation loss at the uniform rank, :func:`gfwsvd_core.ranks.v2_ranks`).
    """
    if (ratio is None) == (ranks is None):
        raise ValueError("give exactly one of ratio (parameters kept per layer) or ranks ({layer: rank})")
    shapes = {n: d.shape for n, d in decs.items()}
    if ranks is not None:
        return validate_ranks(shapes, ranks)
    if allocation == "budget":
        return budget_ranks(allocation_curves(decs)[0], shapes, ratio)
    if allocation == "v2":
        return v2_ranks({n: d.predicted_loss for n, d in decs.items()}, shapes, ratio)
    if allocation != "uniform":
        raise ValueError(f"allocation must be uniform, budget or v2, got {allocation!r}")
    return uniform_ranks(shapes, ratio)


def build_compressed(
    model: nn.Module, decs: Mapping[str, LayerDecomposition], ranks: Mapping[str, Optional[int]]
) -> nn.Module:
    """A copy of ``model`` whose layers with a rank are ``LowRankLinear``; ``None`` stays dense.

    Only the module tree is copied: every parameter and buffer that is not replaced (embeddings,
    norms, layers kept dense) *shares its storage with* ``model``, so a variant costs its low-rank
    factors and nothing more (a sweep over 24 variants no longer makes 24 copies of the model).
    The copy's parameters are new ``nn.Parameter`` objects over the same data, so their
    ``requires_grad``, ``.grad`` and ``.to()`` / ``.half()`` (which rebind ``.data``) stay the
    copy's own, and the copy is put in eval mode without touching ``model``'s modes; tied weights
    stay tied. ``model`` is never modified by this function, but the shared tensors *are*
    ``model``'s: an in-place edit of the copy (``load_state_dict``, ``copy_``, an optimizer step,
    ``torch.nn.init``) writes into ``model``. Deep-copy the result before training or editing it.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():  # remove_duplicate: a tied parameter maps to one new Parameter
        shared = type(p)(p.detach(), p.requires_grad) if isinstance(p, nn.Parameter) else p.detach()
        memo[id(p)] = shared
    for b in model.buffers():
        memo[id(b)] = b.detach().requires_grad_(b.requires_grad) if b.requires_grad else b.detach()
    new = copy.deepcopy(model, memo)
    for name, r in ranks.items():
        if r is None:
            continue
        up, down = decs[name].decomposition.factors(r)
        replace_layer(new, name, LowRankLinear.replacing(new.get_submodule(name), up, down))
    return new.eval()


@dataclass
class Compression:
    """A compressed model and the record of how it was made."""

    model: nn.Module
    method: str
    ranks: dict[str, Optional[int]]
    decompositions: dict[str, LayerDecomposition]
    requested: dict = field(default_factory=dict)  # explicit {layer: rank} as given, when given

    def kept_ratio(self, original: nn.Module) -> dict:
        """Parameters kept / original: over the compressed layers' weights and the whole model."""
        shapes = {n: d.shape for n, d in self.decompositions.items()}
        after, before = kept_params(shapes, self.ranks)
        total_before = sum(p.numel() for p in original.parameters())
        total_after = sum(p.numel() for p in self.model.parameters())
        return {
            "layers": after / before if before else 1.0,
            "model": total_after / total_before if total_before else 1.0,
            "layer_params_before": before, "layer_params_after": after,
            "model_params_before": total_before, "model_params_after": total_after,
        }

    def layer_records(self) -> list[dict]:
        recs = []
        for name, d in self.decompositions.items():
            m, n = d.shape
            r = self.ranks.get(name)
            if r is not None:
                reason = ""
            elif name in self.requested and self.requested[name] is None:
                reason = "kept dense as requested"
            else:
                reason = f"at or above the break-even rank {break_even_rank(m, n):.1f}: kept dense"
            recs.append({
                "layer": name, "shape": [m, n], "rank": r, "dense": r is None, "reason": reason,
                "break_even_rank": break_even_rank(m, n),
                "params_before": m * n, "params_after": layer_params(m, n, r),
                "predicted_loss": 0.0 if r is None else float(d.predicted_loss[r]),
                **({"chosen_method": d.method_at(r)} if d.heldout_curves is not None else {}),
                **{k: v for k, v in d.info.items()},
            })
        return recs


def compress(
    model: nn.Module,
    stats: Mapping[str, LayerStats],
    method: Any = "gfwsvd",
    ratio: Optional[float] = None,
    ranks: Optional[Mapping[str, Optional[int]]] = None,
    layers: Optional[list[str]] = None,
    decompositions: Optional[Mapping[str, LayerDecomposition]] = None,
    progress: Any = None,
) -> Compression:
    """Compress the layers with statistics (or ``layers``) by ``method``.

    Give either ``ratio`` (parameters kept, applied per layer) or ``ranks``
    (``{layer: rank}``, ``None`` = dense). Pass ``decompositions`` from
    :func:`decompose_layers` to reuse them. Returns a :class:`Compression` with a new model.
    """
    if ranks is not None:
        # check the map against every layer that could be compressed (the error lists them all),
        # then decompose only the layers it names
        if decompositions is not None:
            known = {n: d.shape for n, d in decompositions.items()}
        else:
            known = {n: tuple(s.shape) for n, s in (stats or {}).items()}
        if not ranks:
            raise ValueError("the ranks map is empty: give {layer: rank or None} for at least one layer")
        validate_ranks(known, ranks)
        if layers is None:
            layers = list(ranks)
    decs = dict(decompositions) if decompositions is not None else decompose_layers(model, stats, method, layers, progress)
    if ranks is not None:
        validate_ranks({n: d.shape for n, d in decs.items()}, ranks)  # e.g. a layer outside ``layers``
        decs = {n: decs[n] for n in ranks}
    chosen = resolve_ranks(decs, ratio, ranks, get_method(method).allocation if ratio is not None else "uniform")
    decs = {n: decs[n] for n in chosen}
    name = next(iter(decs.values())).method if decs else str(method)
    return Compression(build_compressed(model, decs, chosen), name, chosen, decs,
                       dict(ranks) if ranks is not None else {})
