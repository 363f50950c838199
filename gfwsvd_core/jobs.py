"""Long work in a background thread with progress and cancellation (UI-agnostic).

The app starts a :class:`Job`, a fragment polls ``job.progress`` every half second and a
cancel button calls ``job.cancel()``; the job's function receives ``progress`` and ``cancel``
and passes them on to the library, which checks ``cancel.is_set()`` between steps.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Any, Callable, Optional

from .errors import GfwsvdUserError
from .stats import Cancelled


class Job:
    """Runs ``fn(*args, progress=..., cancel=..., **kwargs)`` in a daemon thread."""

    def __init__(self, name: str, fn: Callable[..., Any], *args, **kwargs):
        self.name = name
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.done_steps = 0
        self.total_steps: Optional[int] = None
        self.message = "starting"
        self.result: Any = None
        self.error: Optional[str] = None
        self.details: Optional[str] = None
        self.user_error = False  # the error is a GfwsvdUserError: a message for the user, not a bug
        self.cancelled = False
        self.started = time.time()
        self.finished: Optional[float] = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True, name=f"job:{name}")
        self._thread.start()

    def _progress(self, done: int, total: Optional[int], message: str) -> None:
        with self._lock:
            self.done_steps, self.total_steps, self.message = done, total, message

    def _run(self, fn, args, kwargs) -> None:
        try:
            self.result = fn(*args, progress=self._progress, cancel=self._event, **kwargs)
        except Cancelled:
            self.cancelled = True
            self.error = f"{self.name} was cancelled"
        except Exception as exc:  # reported to the user, never raised in the UI thread
            self.error = " ".join(str(exc).split()) or type(exc).__name__
            self.user_error = isinstance(exc, GfwsvdUserError)
            self.details = traceback.format_exc()
        finally:
            self.finished = time.time()

    def cancel(self) -> None:
        self._event.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def fraction(self) -> float:
        with self._lock:
            if not self.total_steps:
                return 0.0
            return min(1.0, self.done_steps / self.total_steps)

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    def wait(self, timeout: Optional[float] = None) -> "Job":
        self._thread.join(timeout)
        return self


def run_steps(steps: list[tuple[str, Callable[..., Any]]], progress=None, cancel=None) -> list[Any]:
    """Run several library calls in sequence as one job, each getting progress/cancel."""
    out = []
    for label, fn in steps:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"{label} cancelled")
        out.append(fn(progress=progress, cancel=cancel))
    return out
