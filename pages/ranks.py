"""Ranks: choose per-layer ranks (uniform, budget, table, heatmap), see parameters kept, run sweeps."""

import math

import streamlit as st

from gfwsvd_core import pipeline
from gfwsvd_core.compress import EXACT_YARDSTICK, allocation_curves, loss_curve
from gfwsvd_core.explore import rank_grid
from gfwsvd_core.methods import get_method, method_key
from gfwsvd_core.ranks import break_even_rank, budget_ranks, kept_params, shrinks, uniform_ranks, validate_ranks
from gfwsvd_ui import charts
from gfwsvd_ui.state import (AUTO, EXTRA_METHODS, METHODS, busy, complete, decompositions, fill_status, job_panel, label, loss_units,
                            pending_note, rank_methods, require_stats, short, start_auto, start_job, ws)

st.title("Ranks")
exp = require_stats()
w = ws()

choices = rank_methods(exp)
method = st.segmented_control("Method whose predicted losses guide the choice", choices, format_func=label,
                              default=w.rank_method if w.rank_method in choices else METHODS[0],
                              key="rank_method_pick") or w.rank_method
w.rank_method = method
shapes = {n: tuple(s.shape) for n, s in exp.stats.items()}
if method == AUTO:
    decs = exp.decompositions.get(AUTO, {})
    st.caption("**Auto** picks, per layer and rank, the method whose truncation loses least on the held-out "
               "half of the calibration samples (each method fitted on the other half), and allocates ranks on "
               "those held-out losses: method and rank are chosen together under one budget.")
    if not decs:
        waiting = [m for m in METHODS if not complete(m)]
        for m in waiting:
            decompositions(m)  # redraw this page when they are complete
        if st.button("Choose a method per layer", type="primary", disabled=busy() or bool(waiting),
                     help="fits every method once more on one fold of the samples (GFWSVD's factors dominate)"):
            start_auto(w)
        if waiting:
            st.caption("Waiting for " + ", ".join(f"{label(m)} ({fill_status(m)})" for m in waiting))
        job_panel("Choosing methods per layer")
        st.stop()
else:
    decs = decompositions(method)  # every layer, or those ready while the method is still computing
    if len(decs) < len(shapes):
        pending_note(method, "the predicted losses of the remaining layers")
NAN = float("nan")


def predicted(name: str, rank) -> float:
    """The layer's loss increase at ``rank`` on the yardstick (NaN while that layer is computing)."""
    if rank is None:
        return 0.0
    d = decs.get(name)
    if d is None:
        return NAN
    curve = loss_curve(d)
    return float(curve[min(rank, len(curve) - 1)])


yardstick = allocation_curves(decs)[1] if decs else EXACT_YARDSTICK


if not w.ranks:
    w.ranks = uniform_ranks(shapes, 0.5)
st.session_state.setdefault("editor_version", 0)

c1, c2 = st.columns(2)
with c1:
    ratio = st.slider("Uniform: parameters kept per layer", 0.05, 1.0, 0.5, 0.05, key="uniform_ratio")
    if st.button("Fill uniform ranks"):
        w.ranks = uniform_ranks(shapes, ratio)
        w.rank_rule = f"uniform: {ratio:.2f} of each layer's parameters kept"
        st.session_state["editor_version"] += 1
with c2:
    budget = st.slider("Global budget: parameters kept over all compressed layers", 0.05, 1.0, 0.5, 0.05, key="budget_ratio")
    if st.button("Allocate by predicted loss", disabled=len(decs) < len(shapes),
                 help=None if len(decs) == len(shapes) else f"needs every layer: {fill_status(method)}"):
        try:
            w.ranks = budget_ranks(allocation_curves(decs)[0], shapes, budget)
            w.rank_rule = f"allocated by the {yardstick} at a global budget of {budget:.2f}"
            st.session_state["editor_version"] += 1
        except ValueError as exc:
            st.error(f"{exc}. Raise the budget, or fill uniform ranks instead.")
    st.caption(f"Allocation minimises the summed {yardstick} of the chosen ranks: "
               + ("the same loss units for every layer and method, computed from the per-sample gradients."
                  if yardstick == EXACT_YARDSTICK else "per-sample gradients were not collected."))
    if yardstick != EXACT_YARDSTICK and not loss_units(method):
        st.caption("⚠ This method's predicted losses are not in loss units, so a global budget compares unlike "
                   "quantities across layers; K-FAC or GFWSVD keep the Fisher scale.")

st.caption(f"Current ranks: {w.rank_rule}.")

# --- live parameter counts
after, before = kept_params(shapes, w.ranks)
total = sum(p.numel() for p in exp.model.parameters())
model_after = total - before + after
pred = sum(predicted(n, r) for n, r in w.ranks.items())
m = st.columns(4)
m[0].metric("kept, compressed layers", f"{after / before:.3f}", f"−{1 - after / before:.1%} removed", delta_color="off",
            delta_arrow="off")
m[1].metric("kept, whole model", f"{model_after / total:.3f}", f"{model_after / 1e6:.2f} M of {total / 1e6:.2f} M",
            delta_color="off", delta_arrow="off")
m[2].metric("dense layers", sum(1 for r in w.ranks.values() if r is None))
m[3].metric("Σ predicted loss increase", "computing…" if math.isnan(pred) else f"{pred:.3e}",
            help=f"Summed over layers, on the {yardstick} of {label(method)}'s truncations.")

# --- heatmap (click a cell to choose that rank)
# ranks up to the largest break-even rank: above it every layer is cheaper dense
grid = rank_grid(max(max(1, int(break_even_rank(mm, nn))) for mm, nn in shapes.values()), 20)
layers = list(shapes)
z = [[math.log10(max(predicted(n, g), 1e-30)) if n in decs else None for g in grid] for n in layers]
event = st.plotly_chart(charts.rank_heatmap([short(n) for n in layers], grid, z,
                                            {short(n): r for n, r in w.ranks.items()},
                                            title=f"log10 {yardstick} ({label(method)}), per layer and rank",
                                            break_even={short(n): break_even_rank(*shapes[n]) for n in layers}),
                        on_select="rerun", selection_mode="points", key=f"rank_heatmap_{st.session_state['editor_version']}",
                        config=charts.EXPORT_CONFIG)
points = (event or {}).get("selection", {}).get("points", []) if isinstance(event, dict) or hasattr(event, "get") else []
if points:
    p = points[0]
    by_short = {short(n): n for n in layers}
    name = by_short.get(p.get("y"))
    if name is not None and p.get("x") is not None:
        col = int(round(float(p["x"])))  # the heatmap's x is a column index (see charts.rank_heatmap)
        r = grid[min(max(col, 0), len(grid) - 1)]
        mm, nn = shapes[name]
        new = min(r, min(mm, nn)) if shrinks(mm, nn, r) else None
        if w.ranks.get(name) != new:
            w.ranks[name] = new
            w.rank_rule = "edited by hand (heatmap or table)"
            st.session_state["editor_version"] += 1
            st.rerun()
st.caption(f"Colour: log10 of the {yardstick} at each rank (empty rows: still computing). "
           "The rank columns are log-spaced, not evenly spaced. White x: the layer's current rank, at its exact "
           "position between columns; orange tick: its break-even rank, from which the layer stays dense. Click a "
           "cell to give that layer that column's rank (any rank: type it in the table below).")

# --- editable table
rows = [{"layer": n, "shape": f"{shapes[n][0]}x{shapes[n][1]}", "rank": w.ranks.get(n),
         "break-even": int(break_even_rank(*shapes[n])),
         "kept": (w.ranks[n] * sum(shapes[n]) / (shapes[n][0] * shapes[n][1])) if w.ranks.get(n) else 1.0,
         "predicted loss": predicted(n, w.ranks.get(n)),  # on the yardstick
         **({"method": label(decs[n].method_at(w.ranks.get(n)) or "dense")} if method == AUTO and n in decs else {})}
        for n in layers]
edited = st.data_editor(rows, hide_index=True, width="stretch", key=f"rank_editor_{st.session_state['editor_version']}",
                        disabled=["layer", "shape", "break-even", "kept", "predicted loss", "method"],
                        column_config={"rank": st.column_config.NumberColumn("rank (empty = dense)", min_value=1, step=1),
                                       "kept": st.column_config.NumberColumn(format="%.2f"),
                                       "predicted loss": st.column_config.NumberColumn(format="%.2e")})
new_ranks = {r["layer"]: (None if r["rank"] is None or (isinstance(r["rank"], float) and math.isnan(r["rank"])) else int(r["rank"]))
             for r in edited}
if new_ranks != w.ranks:
    try:
        w.ranks = validate_ranks(shapes, new_ranks)
        w.rank_rule = "edited by hand (heatmap or table)"
        st.rerun()
    except ValueError as exc:
        st.error(f"{exc}. Enter a rank in range, or leave it empty to keep the layer dense.")

# --- sweep
st.subheader("Sweep: metrics over kept ratios")
sc1, sc2 = st.columns([2, 1])
sweep_methods = sc1.multiselect("Methods", METHODS + EXTRA_METHODS, default=METHODS, format_func=label,
                                key="sweep_methods",
                                help="The four explorer methods are computed in the background; the others are "
                                     "computed when the sweep runs (SVD-LLM sequential: one statistics pass per block "
                                     "and ratio)")
with_update = sc1.checkbox("Also with the closed-form update", key="sweep_update",
                           help="Each chosen method again, its truncation followed by a least-squares re-fit of the "
                                "output side on the calibration inputs (drawn dotted)")
ratios_text = sc2.text_input("Kept ratios", "0.2, 0.35, 0.5, 0.7", key="sweep_ratios")
waiting = [m for m in sweep_methods if m in METHODS and not complete(m)]
if with_update:
    sweep_methods = sweep_methods + [method_key(get_method(m, update=True)) for m in sweep_methods]
for m in waiting:
    decompositions(m)  # redraw this page when it is complete
if waiting:
    sc1.caption("Waiting for " + ", ".join(f"{label(m)} ({fill_status(m)})" for m in waiting))
if st.button("Run sweep", disabled=busy() or bool(waiting)):
    try:
        ratios = [float(x) for x in ratios_text.replace(";", ",").split(",") if x.strip()]
        if not ratios or not all(0 < r <= 1 for r in ratios):
            raise ValueError
    except ValueError:
        st.error("Kept ratios must be numbers in (0, 1], separated by commas, e.g. 0.3, 0.5, 0.7.")
        st.stop()
    if not sweep_methods:
        st.error("Pick at least one method for the sweep.")
        st.stop()

    def run(progress, cancel):
        return pipeline.run_sweep(exp, sweep_methods, ratios, progress=progress, cancel=cancel)

    start_job("Running sweep", run, on_done=lambda rep: setattr(w, "sweep", rep))
job_panel("Running sweep")
if w.sweep:
    rows = w.sweep["rows"]
    metrics = list(rows[0]["metrics"])
    hib = getattr(exp.task, "higher_is_better", {})
    cols = st.columns(min(2, len(metrics)))
    for i, metric in enumerate(metrics):
        cols[i % len(cols)].plotly_chart(charts.sweep_curves(rows, metric, hib.get(metric, False)),
                                         config=charts.EXPORT_CONFIG, key=f"sweep_{metric}")
    verdict_lines = []
    seen_ratios = set()
    for r in rows:
        comp_ = r.get("comparison")
        if comp_ and r["ratio"] not in seen_ratios:
            seen_ratios.add(r["ratio"])
            parts = []
            for metric_, v in comp_.items():
                tail = ("resolved" if v["all_resolved"] else
                        "not resolved from " + ", ".join(label(u) for u in v["unresolved"]))
                parts.append(f"{metric_}: {label(v['best'])} ({tail})")
            verdict_lines.append(f"**{r['ratio']:.2f} kept** — " + "; ".join(parts))
    if verdict_lines:
        st.markdown("Best method per ratio and metric (paired 95% bootstrap over the held-out examples; "
                    "'not resolved' means the difference could be noise):\n\n" + "\n\n".join(verdict_lines))
    helps = getattr(exp.task, "metric_help", {})
    if helps:
        st.caption(" · ".join(f"**{k}**: {v}" for k, v in helps.items() if k in metrics))
    st.dataframe([{"method": label(r["method"]) if r["method"] != "dense" else "dense", "kept": round(r["kept_layers"], 3),
                   **{k: round(v, 4) for k, v in r["metrics"].items()}} for r in rows], hide_index=True, width="stretch")
