"""Numbers behind the explorer's views (spectra, pooled heatmaps, per-rank curves).

Everything the app draws is computed here, so pages hold no numerics and the same figures can
be produced from a notebook. Curves compare every method under *common* yardsticks:

* relative reconstruction error ``||W - W_r||_F / ||W||_F``;
* the method's own weighted error ``||L_out^T (W - W_r) L_in||^2`` (= 2 x its predicted loss);
* the Kronecker-predicted loss ``1/2 tr(dW^T B dW A)`` with GFWSVD's factors (one yardstick for all);
* the exact empirical-Fisher quadratic ``mean_k <G_k, dW>^2 / 2`` (no Kronecker assumption).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .compress import LayerDecomposition
from .stats import LayerStats


def pool(M: torch.Tensor, size: int = 256) -> torch.Tensor:
    """Average-pool a matrix to at most ``size`` x ``size`` (for heatmaps of big factors)."""
    M = M.detach().float()
    if M.dim() != 2:
        raise ValueError("pool expects a matrix")
    r, c = M.shape
    kr, kc = max(1, math.ceil(r / size)), max(1, math.ceil(c / size))
    if kr == 1 and kc == 1:
        return M
    return F.avg_pool2d(M[None, None], (kr, kc), ceil_mode=True)[0, 0]


def spectrum(M: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD factor, descending, float64 (clamped at 0)."""
    ev = torch.linalg.eigvalsh(0.5 * (M.double() + M.double().T))
    return torch.flip(ev.clamp_min(0), [0])


def rank_grid(max_rank: int, points: int = 24) -> list[int]:
    """About ``points`` ranks from 1 to ``max_rank``, dense at small ranks (log spacing)."""
    if max_rank <= points:
        return list(range(1, max_rank + 1))
    grid = torch.unique(torch.logspace(0, math.log10(max_rank), points).round().long()).tolist()
    return sorted(set(int(g) for g in grid) | {1, max_rank})


def kron_quadratic(dW: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """``1/2 tr(dW^T B dW A)``: predicted loss of ``dW`` under a Kronecker Fisher ``A (x) B``."""
    dW = dW.double()
    return 0.5 * float(((B.double() @ dW) * (dW @ A.double())).sum())


def own_weighted_error(dec: LayerDecomposition, dW: torch.Tensor) -> float:
    d = dec.decomposition
    from .solver import _apply_left, _apply_right

    return float(_apply_right(d.right, _apply_left(d.left, dW.double())).pow(2).sum())


def layer_curves(
    W: torch.Tensor,
    decs: Mapping[str, LayerDecomposition],
    stats: Optional[LayerStats] = None,
    kronecker: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ranks: Optional[Sequence[int]] = None,
) -> list[dict]:
    """Rows (method, rank, yardsticks...) for one layer under several methods.

    ``kronecker``: GFWSVD's ``(A, B)`` to use as the common predicted-loss yardstick.
    """
    W = W.double()
    nrm = float(W.norm())
    rows = []
    for method, dec in decs.items():
        grid = list(ranks) if ranks is not None else rank_grid(dec.decomposition.max_rank)
        for r in grid:
            dW = W - dec.decomposition.reconstruct(r)
            row = {
                "method": method, "rank": r,
                "relative_error": float(dW.norm()) / nrm if nrm else 0.0,
                "own_weighted_error": 2 * float(dec.predicted_loss[r]),
                "own_predicted_loss": float(dec.predicted_loss[r]),
            }
            if kronecker is not None:
                row["kronecker_predicted_loss"] = kron_quadratic(dW, *kronecker)
            if stats is not None and (stats.X is not None or stats.G is not None):
                row["exact_quadratic"] = stats.quadratic(dW)
            rows.append(row)
    return rows


def weighted_spectra(decs: Mapping[str, LayerDecomposition]) -> dict[str, torch.Tensor]:
    """Singular values of each method's weighted matrix ``L_out^T W L_in``."""
    return {m: d.decomposition.singular_values.double() for m, d in decs.items()}


def kronecker_table(decs: Mapping[str, LayerDecomposition]) -> list[dict]:
    """Per-layer Kronecker diagnostics of GFWSVD decompositions (eta, gap, sweeps, damping, fallbacks)."""
    rows = []
    for name, d in decs.items():
        k = d.info.get("kronecker", {})
        rows.append({
            "layer": name, "shape": f"{d.shape[0]}x{d.shape[1]}",
            "eta": k.get("eta"), "fit_error": k.get("fit_error"), "gap": k.get("gap"),
            "sweeps": k.get("sweeps"), "converged": k.get("converged"),
            "damping_out": d.info.get("left_damping"), "damping_in": d.info.get("right_damping"),
            "fallback_out": d.info.get("left_fell_back"), "fallback_in": d.info.get("right_fell_back"),
            "seconds": round(d.seconds, 3),
        })
    return rows
