"""The registry of statistic kinds collected by :func:`gfwsvd_core.stats.collect_statistics`.

A new statistic is one module with a :class:`StatKind` subclass plus one :func:`register` call
(below for the built-in ones); its values live in a LayerStats field or in ``LayerStats.extra``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigurationError
from .base import Context, StatKind, get_field, set_field
from .diagonal import Diagonal
from .inputs import Inputs
from .kfac import KFAC
from .samples import STORAGE_MODES, Samples, choose_storage, map_flops, map_pair_flops, resolve_storage

KINDS: dict[str, StatKind] = {}


def register(kind: StatKind) -> StatKind:
    """Add a kind to the registry (its name must be new)."""
    if not kind.name or kind.name in KINDS:
        raise ValueError(f"statistic kind {kind.name!r} has no name or is already registered")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> StatKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigurationError(f"unknown kind {name!r}; valid: {', '.join(KINDS)}") from None


def expand_kinds(kinds: Sequence[str]) -> list[StatKind]:
    """The kinds with those they require, each once (required ones first)."""
    out: dict[str, StatKind] = {}

    def add(name: str) -> None:
        if name not in out:
            kind = get_kind(name)
            for r in kind.requires:
                add(r)
            out[name] = kind

    for k in kinds:
        add(k)
    return list(out.values())


for _kind in (Samples(), Diagonal(), KFAC(), Inputs()):  # the order of ALL_KINDS
    register(_kind)

__all__ = ["KINDS", "STORAGE_MODES", "Context", "StatKind", "choose_storage", "expand_kinds", "get_field",
           "get_kind", "map_flops", "map_pair_flops", "register", "resolve_storage", "set_field"]
