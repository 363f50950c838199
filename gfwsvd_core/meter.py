"""Wall time and peak memory of one pipeline stage (not of the process's lifetime).

CPU: Linux lets a process reset its resident-memory high-water mark (``VmHWM``) by writing 5 to
``/proc/self/clear_refs``; the stage's peak is the mark read at its end, minus the resident size
at its start. Elsewhere only the lifetime peak (``ru_maxrss``) exists, and the figure says so.
CUDA: ``torch.cuda`` peak statistics, reset at the start of the stage. Both are process-wide, so
stages running at the same time in other threads (other app sessions) count too.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> Optional[int]:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_cpu_peak() -> bool:
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def lifetime_peak_mb() -> float:
    """Peak resident memory of this process since it started, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class StageRecord:
    """What one stage cost: seconds, peak extra CPU memory and peak CUDA memory (MiB)."""

    seconds: float = 0.0
    cpu_peak_extra_mb: Optional[float] = None  # above the resident size at the stage's start
    cpu_peak_mb: Optional[float] = None  # resident high-water mark during the stage
    cuda_peak_mb: Optional[float] = None
    scope: str = "stage"  # "stage", or "process" when only the lifetime peak could be read

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items() if v is not None}


@contextlib.contextmanager
def measure(device: Optional[torch.device] = None) -> Iterator[StageRecord]:
    """Context manager filling a :class:`StageRecord` for the code inside it."""
    rec = StageRecord()
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    start_rss = _status_kib("VmRSS")
    scoped = start_rss is not None and _reset_cpu_peak()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        yield rec
    finally:
        if cuda:
            torch.cuda.synchronize()
            rec.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20
        rec.seconds = time.perf_counter() - t0
        hwm = _status_kib("VmHWM") if scoped else None
        if hwm is not None:
            rec.cpu_peak_mb = hwm / 1024
            rec.cpu_peak_extra_mb = max(0.0, (hwm - start_rss) / 1024)
        else:
            rec.cpu_peak_mb = lifetime_peak_mb()
            rec.scope = "process"


def release_memory() -> None:
    """Give freed memory back to the system between the groups of a streamed run.

    glibc keeps large freed blocks in its heap once its mmap threshold has grown, so without this
    the resident size climbs group after group towards what keeping everything would need.
    CUDA: the caching allocator's unused blocks are released as well.
    """
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
