"""Method registry: every weighting method is one small module, registered here and only here."""

from __future__ import annotations

from .asvd import ASVD
from .base import Method, Weights
from .fwsvd import FWSVD
from .gfwsvd import GFWSVD
from .kfac import KFAC
from .svd import SVD
from .svdllm import SVDLLM

_REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (SVD, FWSVD, KFAC, GFWSVD, ASVD, SVDLLM)}


def available_methods() -> list[str]:
    """Names of the registered methods, in display order."""
    return list(_REGISTRY)


def get_method(name: str, **options) -> Method:
    """A configured method by name; unknown names and options are errors that list the valid ones."""
    if isinstance(name, Method):
        return name
    key = str(name).lower().replace("-", "").replace("_", "")
    cls = _REGISTRY.get(key)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(_REGISTRY)}")
    try:
        return cls(**options)
    except TypeError as exc:
        import dataclasses

        valid = [f.name for f in dataclasses.fields(cls)]
        raise ValueError(f"invalid options {sorted(options)} for method {cls.name!r}; valid: {valid}") from exc


__all__ = ["Method", "Weights", "available_methods", "get_method"]
