"""Plotly figures of the explorer (presentation only: numbers come from gfwsvd_core.explore)."""

from __future__ import annotations

from typing import Mapping, Sequence

import plotly.graph_objects as go

from .state import COLORS, label

EXPORT_CONFIG = {"toImageButtonOptions": {"format": "png", "scale": 2}, "displaylogo": False}


def _layout(fig: go.Figure, title: str, x: str, y: str, logy: bool = False, logx: bool = False) -> go.Figure:
    fig.update_layout(title=title, margin=dict(l=10, r=10, t=40, b=10), height=360, legend_title_text="",
                      template="plotly_white")
    fig.update_xaxes(title_text=x, type="log" if logx else None, exponentformat="power" if logx else None)
    fig.update_yaxes(title_text=y, type="log" if logy else None, exponentformat="power" if logy else None)
    return fig


def spectra(series: Mapping[str, Sequence[float]], title: str, y: str = "eigenvalue", colors=None) -> go.Figure:
    fig = go.Figure()
    for name, vals in series.items():
        vals = [max(float(v), 1e-30) for v in vals]
        fig.add_trace(go.Scatter(x=list(range(1, len(vals) + 1)), y=vals, mode="lines", name=name,
                                 line=dict(color=(colors or {}).get(name))))
    return _layout(fig, title, "index (descending)", y, logy=True)


def heatmap(M, title: str, colorscale: str = "RdBu_r", symmetric: bool = True) -> go.Figure:
    z = M.tolist() if hasattr(M, "tolist") else M
    zmax = max(abs(v) for row in z for v in row) or 1.0
    fig = go.Figure(go.Heatmap(z=z, colorscale=colorscale, zmid=0 if symmetric else None,
                               zmin=-zmax if symmetric else None, zmax=zmax if symmetric else None,
                               colorbar=dict(thickness=10)))
    fig.update_yaxes(autorange="reversed", scaleanchor="x")
    fig.update_layout(title=title, margin=dict(l=10, r=10, t=40, b=10), height=320, template="plotly_white")
    return fig


def curves(rows: Sequence[dict], y: str, title: str, y_title: str, logy: bool = True, marker_rank=None) -> go.Figure:
    fig = go.Figure()
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method and r.get(y) is not None]
        fig.add_trace(go.Scatter(x=[r["rank"] for r in pts], y=[max(r[y], 1e-30) if logy else r[y] for r in pts],
                                 mode="lines+markers", name=label(method), line=dict(color=COLORS.get(method)),
                                 marker=dict(size=5)))
    if marker_rank:
        fig.add_vline(x=marker_rank, line_dash="dot", line_color="#555")
    return _layout(fig, title, "rank r", y_title, logy=logy)


def sweep_curves(rows: Sequence[dict], metric: str, higher_is_better: bool) -> go.Figure:
    fig = go.Figure()
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kept_layers"])
        fig.add_trace(go.Scatter(x=[r["kept_layers"] for r in pts], y=[r["metrics"][metric] for r in pts],
                                 mode="lines+markers", name=label(method), line=dict(color=COLORS.get(method))))
    if dense is not None:
        fig.add_hline(y=dense["metrics"][metric], line_dash="dash", line_color=COLORS["dense"],
                      annotation_text="dense", annotation_position="bottom right")
    arrow = "higher is better" if higher_is_better else "lower is better"
    return _layout(fig, f"{metric} vs parameters kept ({arrow})", "parameters kept in compressed layers (fraction)", metric)


def rank_heatmap(layers: Sequence[str], ranks_grid: Sequence[int], z, chosen: Mapping[str, object]) -> go.Figure:
    """Layer x rank heatmap of predicted loss (log10); chosen ranks marked; click to choose."""
    fig = go.Figure(go.Heatmap(z=z, x=[str(r) for r in ranks_grid], y=list(layers), colorscale="Viridis",
                               colorbar=dict(title="log10 loss", thickness=10),
                               hovertemplate="layer %{y}<br>rank %{x}<br>log10 predicted loss %{z:.2f}<extra></extra>"))
    xs, ys = [], []
    for name in layers:
        r = chosen.get(name)
        if r is not None:
            nearest = min(ranks_grid, key=lambda g: abs(g - r))
            xs.append(str(nearest))
            ys.append(name)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker=dict(symbol="x", color="white", size=9),
                             name="chosen", hoverinfo="skip"))
    fig.update_xaxes(type="category", title_text="rank r")
    fig.update_yaxes(autorange="reversed", title_text="layer")
    fig.update_layout(height=max(320, 16 * len(layers) + 80), margin=dict(l=10, r=10, t=30, b=10),
                      template="plotly_white", showlegend=False)
    return fig
