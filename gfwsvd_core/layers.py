"""Finding and reading the linear layers of a model.

Two module types carry a dense weight that can be factorised: ``nn.Linear`` (weight out x in)
and GPT-2's ``Conv1D`` (weight stored in x out). Everything in this package speaks the
``nn.Linear`` layout; :func:`get_weight` / :func:`set_weight` transpose at this boundary only.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import nn

from .errors import ConfigurationError

try:  # transformers is a runtime dependency, but keep this module importable without it
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - only without transformers
    Conv1D = ()  # type: ignore[assignment]

LayerFilter = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and GPT-2 ``Conv1D`` (not for already factorised layers)."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear-like module."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight in ``nn.Linear`` layout (out x in), detached; a view, not a copy."""
    w = module.weight.detach()
    return w if isinstance(module, nn.Linear) else w.t()


def _tied_to_embedding(model: nn.Module) -> set[int]:
    ids = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            ids.add(id(m.weight))
    return ids


def linear_layers(model: nn.Module, include_heads: bool = False) -> dict[str, nn.Module]:
    """All linear-like modules by qualified name.

    Unless ``include_heads``, the output head (``get_output_embeddings()``, e.g. an LM head) and
    any layer whose weight is tied to an embedding are left out: factorising them breaks weight
    tying and they are rarely worth it.
    """
    skip: set[int] = set()
    if not include_heads:
        tied = _tied_to_embedding(model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            skip.add(id(head))
        for m in model.modules():
            if is_linear_like(m) and id(m.weight) in tied:
                skip.add(id(m))
    return {
        name: m
        for name, m in model.named_modules()
        if name and is_linear_like(m) and id(m) not in skip
    }


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name  # plain text: substring


def select_layers(model: nn.Module, layers: LayerFilter = None, include_heads: bool = False) -> dict[str, nn.Module]:
    """Select linear-like layers by name patterns or a filter function.

    ``layers`` may be None (all, see :func:`linear_layers`), a glob pattern (``"*.attention.*"``),
    a plain substring (``"intermediate"``), a regular expression prefixed with ``re:``, a list of
    these (union), or a callable ``(name, module) -> bool``. A pattern that matches no layer is an
    error that lists the layers that exist, so typos do not silently compress nothing.
    """
    candidates = linear_layers(model, include_heads=True)
    default = linear_layers(model, include_heads=include_heads)
    if layers is None:
        selected = default
    elif callable(layers):
        selected = {n: m for n, m in candidates.items() if layers(n, m)}
    else:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        if not patterns:
            raise ConfigurationError("empty layer selection: give at least one pattern or None for all layers")
        selected = {}
        for p in patterns:
            if not isinstance(p, str):
                raise ConfigurationError(f"layer patterns must be strings, got {type(p).__name__}")
            hit = {n: m for n, m in candidates.items() if _matches(p, n)}
            if not hit:
                raise ConfigurationError(
                    f"layer pattern {p!r} matches no linear layer; layers that exist: "
                    + _summarise(list(candidates))
                )
            selected.update(hit)
        selected = {n: selected[n] for n in candidates if n in selected}  # model order
    if not selected:
        raise ConfigurationError("no linear layer selected; layers that exist: " + _summarise(list(candidates)))
    return selected


def _summarise(names: Iterable[str], limit: int = 40) -> str:
    names = list(names)
    text = ", ".join(names[:limit])
    return text + (f", ... ({len(names)} in all)" if len(names) > limit else "")

