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
from .svdllm import SVDLLM, SVDLLMV2

_REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (SVD, FWSVD, KFAC, GFWSVD, ASVD, SVDLLM, SVDLLMV2, Auto)}


def available_methods() -> list[str]:
    """Names of the registered methods, in display order."""
    return list(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"svdllm[root=eigen,update=true]"`` -> ``("svdllm", {"root": "eigen", "update": True})``.

    The spec form of a configured method is what :func:`method_key` writes, so every key in a
    report, a sweep or a study can be given back to :func:`get_method`. Values are read as
    true/false, integers, floats or (optionally quoted) strings.
    """
    spec = str(spec).strip()
    if "[" not in spec:
        if "]" in spec:
            raise ConfigurationError(f"method spec {spec!r} has ']' without '['; write e.g. svd[update=true]")
        return spec, {}
    if not spec.endswith("]"):
        raise ConfigurationError(f"method spec {spec!r} must end with ']'; write e.g. svd[update=true]")
    name, body = spec[:-1].split("[", 1)
    options: dict = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigurationError(f"method option {part!r} in {spec!r} must be key=value")
        options[key.strip()] = _value(value.strip())
    return name.strip(), options


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def split_methods(text: str) -> list[str]:
    """A comma-separated list of method specs (commas inside ``[...]`` separate options)."""
    out, depth, cur = [], 0, ""
    for ch in str(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [m for m in out if m]


def method_class(name: str) -> type[Method]:
    """The registered class of a method name or spec (its display name, colour, units, statistics needs)."""
    if isinstance(name, Method):
        return type(name)
    key = parse_spec(name)[0].lower().replace("-", "").replace("_", "")
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
        if not options:
            return name
        name = method_key(name)
    base, given = parse_spec(name)
    cls = method_class(base)
    options = {**given, **options}
    try:
        return cls(**options)
    except TypeError as exc:
        import dataclasses

        valid = [f.name for f in dataclasses.fields(cls)]
        raise ConfigurationError(f"invalid options {sorted(options)} for method {cls.name!r}; valid: {valid}") from exc


def method_key(method) -> str:
    """Cache key and spec of a configured method: its name when every option is the default,
    else the name with the options that differ, e.g. ``gfwsvd[damping=0.5]``; reports never mix
    configurations, and :func:`get_method` reads a key back."""
    m = get_method(method)
    changed = _changed(m)
    if not changed:
        return m.name
    return m.name + "[" + ",".join(f"{k}={_text(v)}" for k, v in sorted(changed.items())) + "]"


def _changed(m: Method) -> dict:
    """The options of a configured method that differ from its class's defaults."""
    default = type(m)().config()
    return {k: v for k, v in m.config().items() if default.get(k) != v}


def _text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return "'" + "+".join(map(str, v)) + "'"  # auto's candidates: '+' keeps the spec one list item
    return str(v)


def method_label(method) -> str:
    """Display name of a configured method, e.g. "SVD + update", "GFWSVD (damping=0.5)"."""
    m = get_method(method)
    changed = _changed(m)
    words = []
    if changed.pop("update", False):
        words.append("update")
    if changed.pop("sequential", False):
        words.append("sequential")
    alloc = changed.pop("allocation", None)
    if alloc:
        words.append(f"{alloc} ranks")
    label = " + ".join([m.label] + words)
    if changed:
        label += " (" + ", ".join(f"{k}={_text(v)}" for k, v in sorted(changed.items())) + ")"
    return label


__all__ = ["method_key", "method_label", "parse_spec", "split_methods", "Method", "Weights", "available_methods", "explorer_methods", "get_method", "method_class", "method_help"]
