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
from typing import Any, Mapping, Optional, Sequence

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


#: rules of thumb for the Kronecker fit, (good at or above, poor below) for eta and
#: (good at or below, poor above) for the gap s2/s1
ETA_RANGES = (0.5, 0.2)
GAP_RANGES = (0.7, 0.9)
VERDICTS = ("good", "fair", "poor")


def sample_note(num_samples: int, shape: tuple[int, int], unit: str) -> Optional[str]:
    """Why a layer's Fisher has few samples and what that does, or None when K is not small."""
    m, n = shape
    if num_samples >= min(m, n):
        return None
    why = {"batch": "one sample per calibration batch (the task's loss couples the batch)",
           "sequence": "one sample per calibration text", "token": "one sample per token"}.get(unit, unit)
    return (f"K = {num_samples} samples ({why}) for a {m} x {n} layer: the empirical Fisher is a sum of "
            f"{num_samples} outer products (rank at most {num_samples}), so its Kronecker factors collapse to a few dozen significant "
            "directions and weight the rest by sampling noise and damping. More calibration texts, or a finer "
            "sample unit where the task allows it, give better-determined factors.")


def judge_kronecker(info: Mapping[str, Any], num_samples: int, shape: tuple[int, int], unit: str) -> dict:
    """A verdict on one layer's Kronecker fit: ``{"verdict", "reasons"}`` (good / fair / poor).

    eta is the share of ``||F||^2`` that ``A (x) B`` explains: at or above 0.5 the product is most
    of the Fisher (good), below 0.2 it misses most of it (poor); a gap s2/s1 above 0.9 means the
    top pair is ill-determined (poor). The reasons link a poor fit to its likely cause."""
    eta, gap = info.get("eta"), info.get("gap")
    grades, reasons = [], []
    if eta is not None:
        g = 0 if eta >= ETA_RANGES[0] else 2 if eta < ETA_RANGES[1] else 1
        grades.append(g)
        if g:
            reasons.append(f"eta {eta:.2f}: A (x) B explains {'little' if g == 2 else 'part'} of the Fisher "
                           f"(good >= {ETA_RANGES[0]}, poor < {ETA_RANGES[1]})")
    if gap is not None:
        g = 0 if gap <= GAP_RANGES[0] else 2 if gap > GAP_RANGES[1] else 1
        grades.append(g)
        if g:
            reasons.append(f"gap {gap:.2f}: the top Kronecker pair is {'ill-' if g == 2 else 'loosely '}determined "
                           f"(good <= {GAP_RANGES[0]}, poor > {GAP_RANGES[1]})")
    if info.get("converged") is False:
        grades.append(2)
        reasons.append("the solver did not converge")
    worst = max(grades, default=1)
    note = sample_note(num_samples, shape, unit)
    if worst and note:
        reasons.append(note)
    return {"verdict": VERDICTS[worst], "reasons": reasons}


def kronecker_table(decs: Mapping[str, LayerDecomposition], stats: Optional[Mapping[str, Any]] = None) -> list[dict]:
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
        if stats is not None and name in stats:
            st_ = stats[name]
            j = judge_kronecker(k, st_.num_samples, d.shape, st_.sample_unit)
            rows[-1] = {"layer": name, "verdict": j["verdict"], **{c: v for c, v in rows[-1].items() if c != "layer"}}
    return rows


def participation_ratio(M: torch.Tensor) -> float:
    """Effective rank ``tr(F)^2 / ||F||_F^2`` of a PSD matrix: n for the identity, 1 for rank one;
    from traces only, so no eigendecomposition is needed."""
    M = M.double()
    fro2 = float((M * M).sum())
    return float(torch.trace(M)) ** 2 / fro2 if fro2 > 0 else 0.0


def effective_ranks(decs: Mapping[str, LayerDecomposition], stats: Mapping[str, Any]) -> list[dict]:
    """Per layer: the effective ranks (participation ratios) of GFWSVD's factors ``A``, ``B`` and
    of K-FAC's ``E[x x^T]``, ``E[d d^T]``, beside the widths and the number of Fisher samples K.

    GFWSVD's factors are built from the K per-sample gradients, so with few samples they have few
    significant directions whatever the width; K-FAC's token moments see every token. When GFWSVD
    loses to K-FAC, this is the first thing to look at."""
    rows = []
    for name, d in decs.items():
        f = d.factors
        s = stats.get(name)
        if f is None or s is None:
            continue
        A, B = f  # input side (n x n), output side (m x m)
        row = {"layer": name, "in_features": d.shape[1], "out_features": d.shape[0], "samples": s.num_samples,
               "unit": s.sample_unit, "gfwsvd_in": participation_ratio(A), "gfwsvd_out": participation_ratio(B),
               "eta": (d.info.get("kronecker") or {}).get("eta")}
        if s.xx_sum is not None and s.dd_sum is not None:
            row["kfac_in"], row["kfac_out"] = participation_ratio(s.xx_sum), participation_ratio(s.dd_sum)
        rows.append(row)
    return rows


def fisher_alignment_table(decs: Mapping[str, LayerDecomposition], stats: Mapping[str, Any],
                           model: Any = None, ratio: float = 0.5) -> list[dict]:
    """Per layer, our Fisher-aligned view of GFWSVD decompositions (see ``fisher.violation``):
    ``rho_kfac`` (how far the Fisher is from K-FAC's independent ``E[x xᵀ] ⊗ E[d dᵀ]``, best
    scale), GFWSVD's ``nkp_fit_error`` (the floor of any single Kronecker product), the overlap of
    the top-k input eigenspaces of GFWSVD's ``A`` and of ``E[x xᵀ]`` beside its chance level k/n,
    with ``k`` the rank that keeps ``ratio`` of the layer's parameters (capped at n); with ``model``
    also the exact quadratic of the rank-k GFWSVD truncation over K-FAC's prediction.

    Layers without per-sample gradients, K-FAC moments or GFWSVD factors are left out. Our
    diagnostic, inspired by FASC's dependence-violation score; not the paper's formula."""
    from .fisher.violation import alignment_summary
    from .layers import get_weight
    from .ranks import rank_for_ratio

    rows = []
    for name, d in decs.items():
        s = stats.get(name)
        f = d.factors
        if (s is None or f is None or "kronecker" not in d.info or s.xx_sum is None or s.dd_sum is None
                or not s.has("samples") or s.num_samples == 0):
            continue
        m, n = d.shape
        k = min(rank_for_ratio(m, n, ratio) or max(1, min(m, n) // 2), n)
        dW = exact = None
        if model is not None:
            W = get_weight(model.get_submodule(name)).double()
            dW = W - d.decomposition.reconstruct(k).to(W.device)
            if d.exact_curve is not None:
                exact = float(d.exact_curve[k])
        rec = alignment_summary(s, f, d.info["kronecker"], k, dW, exact)
        rows.append({"layer": name, "shape": f"{m}x{n}", "samples": s.num_samples, **rec})
    return rows
