"""Per-layer decompositions computed in the background, in the order a user needs them.

The explorer's pages are usable as soon as the statistics are in: a :class:`Filler` then computes
every method's per-layer decompositions in one daemon thread, cheap methods first, and moves the
layer a page shows to the front of the queue (:meth:`Filler.prioritise`). What is finished can be
read at any time (:meth:`Filler.ready`), so a page draws what is ready and marks the rest.

The filler only reads the model's weights and the statistics; it never writes into an
:class:`~gfwsvd_core.pipeline.Experiment`. :func:`adopt` copies finished methods into
``exp.decompositions`` from the caller's thread.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Any, Mapping, Optional, Sequence

from .compress import LayerDecomposition, decompose_layers
from .errors import ConfigurationError, GfwsvdUserError
from .methods import get_method
from .pipeline import Experiment, method_key


class Filler:
    """Computes ``methods`` x ``layers`` decompositions in a daemon thread.

    The queue starts method by method (in the given order, so list cheap methods first), layer by
    layer; :meth:`prioritise` moves one layer's pending work to the front. A method whose
    decomposition of some layer fails stops there and records the error; the others go on.
    """

    def __init__(self, model, stats: Mapping[str, Any], methods: Sequence[Any],
                 layers: Optional[Sequence[str]] = None, start: bool = True):
        self.model, self.stats = model, stats
        self.methods = {method_key(m): get_method(m) for m in methods}
        self.layers = list(stats) if layers is None else list(layers)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._cancel = threading.Event()
        self._pending: list[tuple[str, str]] = [(k, n) for k in self.methods for n in self.layers]
        self._done: dict[str, dict[str, LayerDecomposition]] = {k: {} for k in self.methods}
        self.errors: dict[str, str] = {}  # method key -> message
        self.user_errors: set[str] = set()
        self.details: dict[str, str] = {}  # method key -> traceback
        self.current: Optional[tuple[str, str]] = None
        self.started = time.time()
        self.finished: Optional[float] = None
        self.seconds: dict[str, float] = {k: 0.0 for k in self.methods}
        self._thread = threading.Thread(target=self._run, daemon=True, name="gfwsvd:filler")
        if start:
            self.start()

    # ---- control
    def prioritise(self, layer: str, method: Optional[str] = None) -> None:
        """Move ``layer``'s pending work (of ``method`` only, when given) to the front of the queue."""
        with self._lock:
            first = [p for p in self._pending if p[1] == layer and (method is None or p[0] == method)]
            if first:
                rest = [p for p in self._pending if p not in first]
                self._pending = first + rest

    def cancel(self) -> None:
        """Stop after the layer being computed; what is finished stays readable."""
        self._cancel.set()

    def start(self) -> "Filler":
        self._thread.start()
        return self

    def wait(self, timeout: Optional[float] = None) -> "Filler":
        self._thread.join(timeout)
        return self

    # ---- state
    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def ready(self, key: str) -> dict[str, LayerDecomposition]:
        """The finished decompositions of one method, in layer order (a snapshot)."""
        with self._lock:
            done = self._done.get(key, {})
            return {n: done[n] for n in self.layers if n in done}

    def has(self, key: str, layer: str) -> bool:
        with self._lock:
            return layer in self._done.get(key, {})

    def settled(self, key: str, layer: Optional[str] = None) -> bool:
        """Whether nothing more will come for ``layer`` (every layer when None) of one method: it
        is done, or the method failed."""
        with self._lock:
            done = self._done.get(key, {})
            return key in self.errors or (layer in done if layer is not None else len(done) == len(self.layers))

    def complete(self, key: str) -> bool:
        with self._lock:
            return len(self._done.get(key, {})) == len(self.layers)

    def progress(self, key: str) -> tuple[int, int]:
        """(layers finished, layers in all) of one method."""
        with self._lock:
            return len(self._done.get(key, {})), len(self.layers)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # ---- the worker
    def _next(self) -> Optional[tuple[str, str]]:
        with self._lock:
            while self._pending:
                key, layer = self._pending.pop(0)
                if key not in self.errors:
                    self.current = (key, layer)
                    return key, layer
            self.current = None
            return None

    def _run(self) -> None:
        try:
            while not self._cancel.is_set():
                item = self._next()
                if item is None:
                    break
                key, layer = item
                t0 = time.perf_counter()
                try:
                    dec = decompose_layers(self.model, self.stats, self.methods[key], layers=[layer])[layer]
                except Exception as exc:  # recorded for the pages; the other methods go on
                    with self._lock:
                        self.errors[key] = f"{layer}: " + (" ".join(str(exc).split()) or type(exc).__name__)
                        self.details[key] = traceback.format_exc()
                        if isinstance(exc, GfwsvdUserError):
                            self.user_errors.add(key)
                        self._pending = [p for p in self._pending if p[0] != key]
                    continue
                with self._lock:
                    self._done[key][layer] = dec
                    self.seconds[key] += time.perf_counter() - t0
        finally:
            with self._lock:
                self.current = None
            self.finished = time.time()


def fill(exp: Experiment, methods: Sequence[Any], first: Optional[str] = None) -> Filler:
    """Start a :class:`Filler` for the methods of ``exp`` not decomposed yet (``first``: a layer
    to compute before the others)."""
    if exp.stats is None:
        raise ConfigurationError("collect statistics first")
    todo = [m for m in methods if method_key(m) not in exp.decompositions]
    f = Filler(exp.model, exp.stats, todo, start=False)
    if first is not None:
        f.prioritise(first)
    return f.start()


def adopt(exp: Experiment, filler: Optional[Filler]) -> list[str]:
    """Copy the filler's finished methods into ``exp.decompositions`` (call from the owner's
    thread); returns the keys adopted now."""
    if filler is None or filler.stats is not exp.stats:
        return []
    out = []
    for key in filler.methods:
        if key not in exp.decompositions and filler.complete(key):
            exp.decompositions[key] = filler.ready(key)
            exp.timings[f"decompose:{key}"] = filler.seconds[key]
            exp.stages[f"decompose:{key}"] = {"seconds": round(filler.seconds[key], 3), "background": True}
            out.append(key)
    return out
