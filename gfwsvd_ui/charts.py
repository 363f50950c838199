"""Plotly figures of the explorer (presentation only: numbers come from gfwsvd_core.explore)."""

from __future__ import annotations

import math

from typing import Mapping, Optional, Sequence

import plotly.graph_objects as go

from .state import DENSE_COLOR, color, dash, label

EXPORT_CONFIG = {"toImageButtonOptions": {"format": "png", "scale": 2}, "displaylogo": False}


def _layout(fig: go.Figure, title: str, x: str, y: str, logy: bool = False, logx: bool = False) -> go.Figure:
    fig.update_layout(title=title, margin=dict(l=10, r=10, t=40, b=10), height=360, legend_title_text="",
                      template="plotly_white")
    fig.update_xaxes(title_text=x, type="log" if logx else None)  # ranks read best as 1, 2, 5, 10, 20...
    fig.update_yaxes(title_text=y, type="log" if logy else None, exponentformat="power" if logy else None)
    return fig


def spectra(series: Mapping[str, Sequence[float]], title: str, y: str = "eigenvalue", colors=None,
            normalise: bool = False, floor: float = 1e-15) -> go.Figure:
    """Descending spectra on a log axis. ``normalise``: divide each by its largest value (compare
    shapes of factors with arbitrary scale). Values below ``floor`` x the largest are numerical
    zeros and are left out (a log axis cannot show them; they would flatten the rest)."""
    fig = go.Figure()
    for name, vals in series.items():
        vals = [float(v) for v in vals]
        top = max(vals, default=0.0)
        if top <= 0:
            continue
        keep = [(i + 1, v / top if normalise else v) for i, v in enumerate(vals) if v > floor * top]
        fig.add_trace(go.Scatter(x=[i for i, _ in keep], y=[v for _, v in keep], mode="lines", name=name,
                                 line=dict(color=(colors or {}).get(name))))
    return _layout(fig, title, "index i (largest first)", y + (" / largest" if normalise else ""), logy=True)


def heatmap(M, title: str, x_title: str, y_title: str, full_shape=None, colorscale: str = "RdBu_r",
            symmetric: bool = True, colorbar_title: str = "", height: int = 420) -> go.Figure:
    """Heatmap of a (possibly average-pooled) matrix; ``full_shape`` = shape before pooling, so that
    the axes keep the original row/column indices."""
    z = M.tolist() if hasattr(M, "tolist") else M
    rows, cols = len(z), len(z[0]) if z else 0
    fr, fc = full_shape or (rows, cols)
    sr, sc = max(1, -(-fr // max(rows, 1))), max(1, -(-fc // max(cols, 1)))
    # robust colour range (percentiles), so that a few outlier entries (e.g. MiniLM's large activation
    # dimensions, or exact zeros on a log scale) do not wash out the structure; hover shows true values
    vals = sorted(v for row in z for v in row if v == v)

    def pct(q: float) -> float:
        return vals[min(len(vals) - 1, int(q * len(vals)))] if vals else 0.0

    if symmetric:
        mags = sorted(abs(v) for v in vals)
        zmax = (mags[min(len(mags) - 1, int(0.99 * len(mags)))] or mags[-1]) if mags else 1.0
        zmin, zmax = -(zmax or 1.0), (zmax or 1.0)
    else:
        zmin, zmax = pct(0.01), (vals[-1] if vals else 1.0)
    fig = go.Figure(go.Heatmap(z=z, x=[j * sc for j in range(cols)], y=[i * sr for i in range(rows)],
                               colorscale=colorscale, zmin=zmin, zmax=zmax,
                               colorbar=dict(thickness=10, title=dict(text=colorbar_title, side="right")),
                               hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>value %{{z:.3g}}<extra></extra>"))
    pooled = f" · {sr}×{sc} blocks averaged" if (sr, sc) != (1, 1) else ""
    fig.update_xaxes(title_text=x_title, constrain="domain")
    fig.update_yaxes(title_text=y_title, autorange="reversed", constrain="domain",
                     **({"scaleanchor": "x"} if fr == fc else {}))
    fig.update_layout(title=dict(text=title + pooled, font=dict(size=14)), margin=dict(l=10, r=10, t=40, b=10),
                      height=height, template="plotly_white")
    return fig


def curves(rows: Sequence[dict], y: str, title: str, y_title: str, logy: bool = True, marker_rank=None,
           floor: float = 1e-14, x_max: Optional[int] = None) -> go.Figure:
    """One line per method over rank (log-spaced ranks on a log axis). On a log y axis, values below
    ``floor`` x the trace's largest (exact zeros at full rank) are left out."""
    fig = go.Figure()
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method and r.get(y) is not None]
        if logy:
            top = max((r[y] for r in pts), default=0.0)
            pts = [r for r in pts if r[y] > floor * top]
        fig.add_trace(go.Scatter(x=[r["rank"] for r in pts], y=[r[y] for r in pts],
                                 mode="lines+markers", name=label(method), line=dict(color=color(method)),
                                 marker=dict(size=5)))
    if marker_rank:
        fig.add_vline(x=marker_rank, line_dash="dot", line_color="#555", annotation_text=f"r = {marker_rank}",
                      annotation_position="top")
    fig = _layout(fig, title, "rank r (log scale)", y_title, logy=logy, logx=True)
    if x_max:  # every panel of a layer on the same x range: 1 .. min(m, n)
        fig.update_xaxes(range=[0, math.log10(x_max)])
    return fig


def sweep_curves(rows: Sequence[dict], metric: str, higher_is_better: bool) -> go.Figure:
    fig = go.Figure()
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kept_layers"])
        ys = [r["metrics"][metric] for r in pts]
        ivs = [((r.get("intervals") or {}).get("metrics") or {}).get(metric) for r in pts]
        err = None
        if all(ivs):  # 95% bootstrap interval over the held-out examples
            err = dict(type="data", symmetric=False, array=[iv[1] - y for iv, y in zip(ivs, ys)],
                       arrayminus=[y - iv[0] for iv, y in zip(ivs, ys)], thickness=1, width=3)
        fig.add_trace(go.Scatter(x=[r["kept_layers"] for r in pts], y=ys, error_y=err,
                                 mode="lines+markers", name=label(method),
                                 line=dict(color=color(method), dash=dash(method))))
    if dense is not None:
        fig.add_hline(y=dense["metrics"][metric], line_dash="dash", line_color=DENSE_COLOR,
                      annotation_text="dense", annotation_position="bottom right")
    arrow = "higher is better" if higher_is_better else "lower is better"
    return _layout(fig, f"{metric} vs parameters kept ({arrow}; bars: 95% intervals)",
                   "parameters kept in compressed layers (fraction)", metric)


def _grid_position(ranks_grid: Sequence[int], r: float) -> float:
    """Position of rank ``r`` on the category axis of ``ranks_grid`` (interpolated between columns)."""
    g = list(ranks_grid)
    if r <= g[0]:
        return 0.0
    for i in range(len(g) - 1):
        if g[i] <= r <= g[i + 1]:
            return i + (r - g[i]) / (g[i + 1] - g[i])
    return float(len(g) - 1) + 0.5  # past the last column: just right of it


def rank_heatmap(layers: Sequence[str], ranks_grid: Sequence[int], z, chosen: Mapping[str, object],
                 title: str = "predicted loss increase per layer and rank",
                 break_even: Optional[Mapping[str, float]] = None) -> go.Figure:
    """Layer x rank heatmap of predicted loss (log10); chosen ranks marked at their exact rank
    (between grid columns when off the grid) and each layer's break-even rank ticked; click to choose.
    The x axis holds column indices (``ranks_grid[i]`` at ``x = i``); a click's x is such an index."""
    finite = [v for row in z for v in row if v is not None and v > -29]  # -30 = a predicted loss of exactly 0
    zmin = min(finite, default=-30.0)
    z = [[None if v is None else max(v, zmin) for v in row] for row in z]  # None: still computing
    # a numeric axis of column indices labelled with the ranks: markers between columns stay there
    # (on a category axis a fractional position would become a new category of its own)
    cols = list(range(len(ranks_grid)))
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=list(layers), colorscale="Viridis",
                               customdata=[[int(r) for r in ranks_grid] for _ in layers],
                               colorbar=dict(title="log10 loss", thickness=10),
                               hovertemplate="layer %{y}<br>rank %{customdata}<br>log10 loss %{z:.2f}<extra></extra>"))
    xs, ys, texts = [], [], []
    for name in layers:
        r = chosen.get(name)
        if r is not None:
            xs.append(_grid_position(ranks_grid, float(r)))
            ys.append(name)
            texts.append(f"{name}: rank {r}")
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker=dict(symbol="x", color="white", size=9),
                             name="chosen", text=texts, hovertemplate="%{text}<extra></extra>"))
    if break_even:
        bx, by, bt = [], [], []
        for name in layers:
            if name in break_even:
                bx.append(_grid_position(ranks_grid, float(break_even[name])))
                by.append(name)
                bt.append(f"{name}: break-even rank {break_even[name]:.0f} (dense from here)")
        fig.add_trace(go.Scatter(x=bx, y=by, mode="markers", name="break-even", text=bt,
                                 marker=dict(symbol="line-ns", color="#ff7f0e", size=14, line=dict(width=3, color="#ff7f0e")),
                                 hovertemplate="%{text}<extra></extra>"))
    fig.update_xaxes(type="linear", title_text="rank r", tickmode="array", tickvals=cols,
                     ticktext=[str(int(r)) for r in ranks_grid], range=[-0.5, len(cols) - 0.5 + (1 if break_even else 0)])
    fig.update_yaxes(autorange="reversed", title_text="layer")
    fig.update_layout(title=dict(text=title, font=dict(size=14)), height=max(320, 16 * len(layers) + 100),
                      margin=dict(l=10, r=10, t=40, b=10),
                      template="plotly_white", showlegend=False)
    return fig


def effective_rank_chart(rows: Sequence[dict], names: Sequence[str]) -> go.Figure:
    """Effective ranks of GFWSVD's and K-FAC's factors per layer (log axis), with the sample count
    K as a dashed line: GFWSVD's factors cannot have more significant directions than its samples
    give them (``gfwsvd_core.explore.effective_ranks`` computes the numbers)."""
    fig = go.Figure()
    series = (("gfwsvd_in", "GFWSVD A (input side)", color("gfwsvd"), "circle"),
              ("gfwsvd_out", "GFWSVD B (output side)", color("gfwsvd"), "diamond"),
              ("kfac_in", "K-FAC E[x xᵀ] (input side)", color("kfac"), "circle"),
              ("kfac_out", "K-FAC E[d dᵀ] (output side)", color("kfac"), "diamond"))
    for key, name, col, symbol in series:
        if all(key in r for r in rows):
            fig.add_trace(go.Scatter(x=list(names), y=[r[key] for r in rows], mode="markers", name=name,
                                     marker=dict(color=col, symbol=symbol, size=9,
                                                 line=dict(width=1, color="white"))))
    ks = {r["samples"] for r in rows}
    if len(ks) == 1:
        fig.add_hline(y=ks.pop(), line_dash="dash", line_color=DENSE_COLOR,
                      annotation_text=f"K = {rows[0]['samples']} samples", annotation_position="top left")
    return _layout(fig, "effective rank (participation ratio) of the factors", "layer", "effective rank", logy=True)


def fisher_alignment_chart(rows: Sequence[dict], names: Sequence[str]) -> go.Figure:
    """Our Fisher-aligned view per layer, all on a 0..1 axis: K-FAC's independence violation
    rho_KF and GFWSVD's nearest-Kronecker fit error (its floor), the overlap of the Fisher-selected
    and variance-ranked input subspaces, and that overlap's chance level k/n
    (``gfwsvd_core.explore.fisher_alignment_table`` computes the numbers)."""
    fig = go.Figure()
    series = (("rho_kfac", "ρ_KF: distance to K-FAC's E[x xᵀ] ⊗ E[d dᵀ]", color("kfac"), "circle"),
              ("nkp_fit_error", "NKP fit error √(1−η) (floor of any A ⊗ B)", color("gfwsvd"), "diamond"),
              ("overlap", "input-subspace overlap, GFWSVD A vs E[x xᵀ]", "#2ca02c", "square"),
              ("chance_overlap", "overlap by chance (k / n)", DENSE_COLOR, "line-ew"))
    for key, name, col, symbol in series:
        if rows and all(r.get(key) is not None for r in rows):
            fig.add_trace(go.Scatter(x=list(names), y=[r[key] for r in rows], mode="markers", name=name,
                                     marker=dict(color=col, symbol=symbol, size=9,
                                                 line=dict(width=2 if symbol == "line-ew" else 1,
                                                           color=col if symbol == "line-ew" else "white"))))
    fig = _layout(fig, "Fisher-aligned view (ours) per layer", "layer", "value (0 … 1)")
    fig.update_yaxes(range=[0, 1.05])
    return fig


def update_effect_chart(effects: dict, marker_rank: Optional[int] = None) -> go.Figure:
    """Relative output error ``||(W - W_r) X|| / ||W X||`` over rank per method, without (solid)
    and with (dotted) the closed-form update (``gfwsvd_core.update.update_effect`` per method)."""
    fig = go.Figure()
    for m, e in effects.items():
        for key, style, suffix in (("without", "solid", ""), ("with", "dot", " + update")):
            fig.add_trace(go.Scatter(x=e["ranks"], y=e[key], mode="lines", name=label(m) + suffix,
                                     line=dict(color=color(m), dash=style)))
    if marker_rank is not None:
        fig.add_vline(x=marker_rank, line_dash="dash", line_color=DENSE_COLOR)
    return _layout(fig, "output error on the calibration inputs, without and with the closed-form update",
                   "rank r", "‖(W − W_r) X‖ / ‖W X‖", logy=True)
