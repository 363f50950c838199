"""Scale-out over processes with ``torch.distributed``, launched by ``torchrun``.

    torchrun --standalone --nproc-per-node 2 -m gfwsvd_core compress --model ... --out ...

Every rank loads the model and the data and runs the same flow; what is split:

* **statistics**: each rank runs a contiguous slice of the calibration batches; moment sums
  (K-FAC, diagonal, inputs) and the sample/token counts are all-reduced, so every rank holds the
  statistics of all batches. Per-sample gradients stay on the rank that computed them; the
  :class:`Shard` on each ``LayerStats`` says so.
* **anything that reads per-sample gradients** (the Kronecker maps, ``||F||``, the exact
  quadratic, the per-sample yardstick curves) sums its local part and all-reduces it, so every
  rank gets the one-process answer (up to the order of float sums).
* **decompositions**: layer ``i`` is solved by rank ``i % world`` and the results are exchanged;
  methods whose weights read per-sample gradients (GFWSVD) compute them collectively first.

Ranks, compression and evaluation then run replicated (every rank has every decomposition), and
rank 0 alone prints, writes the report and exports. Backends: NCCL when the model runs on CUDA
(rank ``r`` on ``cuda:LOCAL_RANK``), gloo on CPU. Contiguous slices keep the samples in the
one-process order, so per-sample curves and their bootstrap intervals match too.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .errors import ConfigurationError


@dataclass(frozen=True)
class Shard:
    """This process's place in the job: rank ``rank`` of ``world``."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, x):
        """All-reduced sum of a tensor (in place, returned) or a float."""
        if isinstance(x, torch.Tensor):
            dist.all_reduce(x)
            return x
        t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return float(t.item())

    def min(self, x: float) -> float:
        t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return float(t.item())

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation along dim 0 of every rank's ``t`` (rank order); other dims must agree."""
        dev = t.device
        sizes = self.gather_objects(int(t.shape[0]))
        top = max(sizes)
        pad = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=_comm_device())
        pad[: t.shape[0]] = t.to(pad.device)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(dev)

    def gather_objects(self, obj: Any, device: Optional[torch.device] = None) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank. With ``device``, the
        tensors inside are sent through ``torch.save`` and arrive on ``device`` (a CUDA tensor of
        another rank would otherwise land on that rank's GPU)."""
        out: list = [None] * self.world
        if device is None:
            dist.all_gather_object(out, obj)
            return out
        buf = io.BytesIO()
        torch.save(obj, buf)
        dist.all_gather_object(out, buf.getvalue())
        return [torch.load(io.BytesIO(b), map_location=device, weights_only=False) for b in out]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def owner(self, i: int) -> int:
        """The rank that solves item ``i`` of a sequence shared across ranks."""
        return i % self.world

    def barrier(self) -> None:
        dist.barrier()


_SHARD: Optional[Shard] = None
_OWNED = False  # whether init() created the process group (and close() should end it)


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: Optional[str] = None) -> Optional[Shard]:
    """Join the job torchrun started (a no-op returning None for a single process).

    ``device``: the requested device; CUDA (or none given with CUDA present) means NCCL and the
    local rank's GPU when there is a GPU per local process, anything else gloo. The device this
    rank should then use is :func:`local_device`."""
    global _SHARD, _OWNED
    if not launched():
        return None
    if _SHARD is not None:
        return _SHARD
    want_cuda = (device is None and torch.cuda.is_available()) or (device is not None and str(device).startswith("cuda"))
    # NCCL needs a GPU per process; more processes than local GPUs (e.g. a 2-process check on
    # one GPU) share them through gloo, which reduces CUDA tensors too
    nccl = want_cuda and torch.cuda.is_available() and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= torch.cuda.device_count()
    if want_cuda:
        if not torch.cuda.is_available():
            raise ConfigurationError("--device cuda was asked for but CUDA is not available on this machine")
        if nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if nccl else "gloo")
        _OWNED = True
    _SHARD = Shard(dist.get_rank(), dist.get_world_size())
    return _SHARD


def local_device(device: Optional[str]) -> Optional[str]:
    """This rank's device: under NCCL ``cuda:LOCAL_RANK`` (a bare "cuda" is made specific)."""
    if _SHARD is None or not dist.is_initialized() or dist.get_backend() != "nccl":
        return device
    return f"cuda:{torch.cuda.current_device()}"


def current() -> Optional[Shard]:
    """The job this process belongs to, or None when it runs alone."""
    return _SHARD


def close() -> None:
    """Leave the job (ends the process group if :func:`init` started it)."""
    global _SHARD, _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _SHARD, _OWNED = None, False


def shard_batches(batches: Sequence[Any], shard: Shard) -> list:
    """Rank ``r``'s contiguous slice of the batches (sizes differ by at most one)."""
    n = len(batches)
    if n < shard.world:
        raise ConfigurationError(
            f"{n} calibration batches cannot be split over {shard.world} processes; give more calibration "
            f"texts, a smaller batch size or fewer processes")
    lo, hi = (shard.rank * n) // shard.world, ((shard.rank + 1) * n) // shard.world
    return list(batches[lo:hi])


def reduce_statistics(stats: dict, shard: Shard) -> dict:
    """Make rank-local statistics the job's: counts and moment sums all-reduced in place, kept
    per-sample gradients left local and marked with ``shard``.

    Ranks whose first batches differed in length may have chosen different sample storages for a
    layer; they then all keep it materialised (``G_k`` is exact either way), so every rank runs
    the same maps."""
    from .statistics import KINDS
    from .statistics.base import get_field
    from .statistics.samples import _materialised

    names = list(stats)
    if shard.gather_objects(names) != [names] * shard.world:
        raise ConfigurationError("the processes selected different layers; give every rank the same --layers")
    for name in names:
        s = stats[name]
        counts = torch.tensor([s.num_samples, s.num_tokens], dtype=torch.float64, device=_comm_device())
        shard.sum(counts)
        s.num_samples, s.num_tokens = int(counts[0].item()), int(counts[1].item())
        for kind in KINDS.values():
            if kind.name == "samples" or not kind.collected(s):
                continue
            for f in kind.fields:
                t = get_field(s, f)
                if isinstance(t, torch.Tensor):
                    dev = t.device
                    red = shard.sum(t.to(_comm_device()))
                    if red.device != dev:
                        t.copy_(red.to(dev))
        storages = shard.gather_objects(s.storage)
        if len(set(storages)) > 1:
            s.G, s.X, s.D = _materialised(s), None, None
        s.info["storage"] = s.storage
        s.shard = shard
    return stats
