"""Method registry: every weighting method is one small module, registered here and only here."""

from __future__ import annotations

from ..errors import ConfigurationError
from .asvd import ASVD
from .auto import Auto
from .base import Method, Weights
from .fwsvd import FWSVD
from .gfwsvd import GFWSVD
from .kfac import KFAC
from .svd import SVD
from .svdllm import SVDLLM

_REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (SVD, FWSVD, KFAC, GFWSVD, ASVD, SVDLLM, Auto)}


def available_methods() -> list[str]:
    """Names of the registered methods, in display order."""
    return list(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The registered class of a method name (its display name, colour, units, statistics needs)."""
    if isinstance(name, Method):
        return type(name)
    key = str(name).lower().replace("-", "").replace("_", "")
    cls = _REGISTRY.get(key)
    if cls is None:
        raise ConfigurationError(f"unknown method {name!r}; valid methods: {', '.join(_REGISTRY)}")
    return cls


def explorer_methods() -> list[str]:
    """Methods the explorer compares by default (all computed from one statistics pass)."""
    return [n for n, cls in _REGISTRY.items() if cls.explorer_default]


def method_help() -> str:
    """One line per method for CLI help texts: name, display name, what it needs."""
    return "; ".join(f"{n} ({cls.label}: {', '.join(cls.requires) or 'no statistics'})" for n, cls in _REGISTRY.items())


def get_method(name: str, **options) -> Method:
    """A configured method by name; unknown names and options are errors that list the valid ones."""
    if isinstance(name, Method):
        return name
    cls = method_class(name)
    try:
        return cls(**options)
    except TypeError as exc:
        import dataclasses

        valid = [f.name for f in dataclasses.fields(cls)]
        raise ConfigurationError(f"invalid options {sorted(options)} for method {cls.name!r}; valid: {valid}") from exc


__all__ = ["Method", "Weights", "available_methods", "explorer_methods", "get_method", "method_class", "method_help"]
