"""Low-rank linear layers and module surgery.

A dense layer ``y = W x + b`` (``W`` m x n, ``nn.Linear`` layout) is replaced by
``y = up(down(x))`` with ``down`` r x n (no bias) and ``up`` m x r (keeps the bias), so
``W_r = up.weight @ down.weight`` and the layer holds ``r (m + n)`` weights instead of ``m n``.
GPT-2's ``Conv1D`` computes ``x @ W + b`` with ``W`` stored n x m; its
replacement is the same ``up(down(x))``: the factors are always in ``nn.Linear`` layout and the
transpose happens once, in :func:`gfwsvd_core.layers.get_weight` / :func:`to_dense`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import weight_shape
from .ranks import layer_params

try:
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - only without transformers
    Conv1D = None  # type: ignore[assignment]

DENSE_TYPES = ("linear", "conv1d")


def _dense_type(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D is not None and isinstance(module, Conv1D):
        return "conv1d"
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-``rank`` drop-in for ``nn.Linear`` / GPT-2 ``Conv1D``.

    ``down = nn.Linear(in_features, rank, bias=False)``, ``up = nn.Linear(rank, out_features,
    bias=bias)``. ``dense_type`` records what was replaced (``"linear"`` or ``"conv1d"``) so
    :func:`to_dense` and the exporter can rebuild the original module type.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dense_type: str = "linear",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dense_type not in DENSE_TYPES:
            raise ValueError(f"dense_type must be one of {DENSE_TYPES}, got {dense_type!r}")
        for label, v in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if int(v) != v or int(v) < 1:
                raise ValueError(f"{label} must be a positive integer, got {v!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.rank = int(rank)
        self.dense_type = dense_type
        kw = {"device": device, "dtype": dtype}
        self.down = nn.Linear(self.in_features, self.rank, bias=False, **kw)  # r x n
        self.up = nn.Linear(self.rank, self.out_features, bias=bias, **kw)  # m x r

    @classmethod
    def from_factors(
        cls,
        up: torch.Tensor,
        down: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        dense_type: str = "linear",
    ) -> "LowRankLinear":
        """A layer with weight ``up @ down`` (``up`` m x r, ``down`` r x n) and an optional bias (m,).

        ``dtype`` / ``device`` default to those of ``up``; the tensors are copied, never shared.
        """
        if up.dim() != 2 or down.dim() != 2:
            raise ValueError(f"factors must be matrices, got up {tuple(up.shape)} and down {tuple(down.shape)}")
        m, r = (int(s) for s in up.shape)
        if int(down.shape[0]) != r:
            raise ValueError(f"inner dimensions differ: up is {m} x {r} but down is {tuple(down.shape)[0]} x {down.shape[1]}")
        n = int(down.shape[1])
        if bias is not None and tuple(bias.shape) != (m,):
            raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
        dtype = up.dtype if dtype is None else dtype
        device = up.device if device is None else device
        new = cls(n, m, r, bias=bias is not None, dense_type=dense_type, device=device, dtype=dtype)
        with torch.no_grad():
            new.up.weight.copy_(up.detach())  # copy_ casts dtype and moves device
            new.down.weight.copy_(down.detach())
            if bias is not None:
                new.up.bias.copy_(bias.detach())
        return new

    @classmethod
    def replacing(cls, module: nn.Module, up: torch.Tensor, down: torch.Tensor) -> "LowRankLinear":
        """Build the replacement of a dense ``nn.Linear`` or ``Conv1D`` from factors.

        ``up`` is m x r and ``down`` r x n (``nn.Linear`` layout, whatever the module type). The
        bias is copied; dtype and device follow the module's weight.
        """
        dense_type = _dense_type(module)
        m, n = weight_shape(module)
        if up.dim() != 2 or down.dim() != 2:
            raise ValueError(f"factors must be matrices, got up {tuple(up.shape)} and down {tuple(down.shape)}")
        r = int(up.shape[1])
        if tuple(up.shape) != (m, r) or tuple(down.shape) != (r, n):
            raise ValueError(
                f"factor shapes up {tuple(up.shape)} and down {tuple(down.shape)} do not fit a "
                f"{m} x {n} layer (expected up {m} x r and down r x {n})"
            )
        w = module.weight
        new = cls.from_factors(
            up, down, bias=getattr(module, "bias", None), dtype=w.dtype, device=w.device, dense_type=dense_type
        )
        new.train(module.training)
        return new

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        """``up.weight @ down.weight`` (m x n, ``nn.Linear`` layout)."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}, dense_type={self.dense_type!r}"
        )


def parameter_count(m: int, n: int, rank: Optional[int] = None, bias: bool = True) -> int:
    """Parameters of an m x n layer: dense (``rank=None``: ``mn``) or factorised (``r(m+n)``), plus ``m`` for a bias."""
    return int(layer_params(m, n, rank) + (m if bias else 0))


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if not name:
        raise ValueError("cannot replace the model itself: give a submodule name")
    parts = name.split(".")
    parent = model
    for i, part in enumerate(parts[:-1]):
        child = parent._modules.get(part) if hasattr(parent, "_modules") else None
        if child is None:
            raise KeyError(f"no submodule {'.'.join(parts[: i + 1])!r} in {type(model).__name__} (replacing {name!r})")
        parent = child
    if parts[-1] not in parent._modules or parent._modules[parts[-1]] is None:
        raise KeyError(f"no submodule {name!r} in {type(model).__name__}")
    return parent, parts[-1]


def replace_layer(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Replace submodule ``name`` (dotted, ModuleList indices included) by ``new_module``; returns the old one.

    Raises ``KeyError`` when the name does not exist.
    """
    parent, leaf = _parent(model, name)
    old = parent._modules[leaf]
    setattr(parent, leaf, new_module)  # works for ModuleList / Sequential (string index keys) too
    return old


def to_dense(module: LowRankLinear, like: Optional[nn.Module] = None) -> nn.Module:
    """Multiply the factors back: an ``nn.Linear``, or a ``Conv1D`` (weight stored n x m).

    The type follows ``like`` when given (a ``Conv1D`` gives a ``Conv1D``, anything else an
    ``nn.Linear``), otherwise the layer's ``dense_type``. A ``Conv1D`` always has a bias: a
    factorised layer without one gets a zero bias (the same map).
    """
    if not isinstance(module, LowRankLinear):
        raise TypeError(f"expected LowRankLinear, got {type(module).__name__}")
    if like is None:
        conv = module.dense_type == "conv1d"
    else:
        conv = Conv1D is not None and isinstance(like, Conv1D)
    with torch.no_grad():
        w = module.dense_weight()  # m x n
    b = module.up.bias
    kw = {"device": w.device, "dtype": w.dtype}
    if conv:
        if Conv1D is None:  # pragma: no cover
            raise ImportError("transformers is needed to rebuild a Conv1D layer")
        dense = Conv1D(module.out_features, module.in_features)  # weight n x m, bias m
        dense = dense.to(**kw)
        with torch.no_grad():
            dense.weight.copy_(w.t())
            if b is not None:
                dense.bias.copy_(b.detach())
            else:  # Conv1D always has a bias: a missing one is zero
                dense.bias.zero_()
    else:
        dense = nn.Linear(module.in_features, module.out_features, bias=b is not None, **kw)
        with torch.no_grad():
            dense.weight.copy_(w)
            if b is not None:
                dense.bias.copy_(b.detach())
    dense.train(module.training)
    return dense


__all__ = ["LowRankLinear", "parameter_count", "replace_layer", "to_dense"]
