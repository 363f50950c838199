"""Layer lab: one layer, four methods, every yardstick over rank — the teaching view."""

import streamlit as st

from gfwsvd_core.evaluate import measured_increase
from gfwsvd_core.explore import kron_quadratic, layer_curves, rank_grid, weighted_spectra
from gfwsvd_core.layers import get_weight
from gfwsvd_core.ranks import break_even_rank
from gfwsvd_core.update import update_effect
from gfwsvd_core.yardstick import best_of, bootstrap_interval, per_sample_quadratics
from gfwsvd_ui import charts
from gfwsvd_ui.state import METHODS, busy, color, decompositions, job_panel, label, pending_note, require_stats, short, start_job, ws

st.title("Layer lab")
exp = require_stats()
w = ws()
st.caption(
    "Each method solves the same problem — the best rank-r approximation of W — under a different "
    "norm. Compare them under common yardsticks: plain reconstruction error, GFWSVD's Kronecker "
    "prediction of the loss increase, and the exact second-order loss with the full empirical Fisher."
)

names = list(exp.stats)
layer = st.selectbox("Layer", names, format_func=short, key="lab_layer")
methods = st.multiselect("Methods", METHODS, default=METHODS, format_func=label, key="lab_methods")
if not methods:
    st.warning("Pick at least one method.")
    st.stop()
ready = {m: decompositions(m, layer) for m in METHODS}  # this layer first for the methods still computing
decs = {m: ready[m][layer] for m in METHODS if layer in ready[m]}
for m in [m for m in methods if m not in decs]:
    pending_note(m, "its column and curves")
methods = [m for m in methods if m in decs]
if not methods:
    st.stop()
W = get_weight(exp.model.get_submodule(layer))
max_rank = min(W.shape)
breakeven = break_even_rank(*W.shape)



def lab_quadratics(layer_name: str, m: str):
    """Per-sample exact quadratics of one method on this layer at every rank (kept per decomposition)."""
    dec = decs[m]
    key = (layer_name, m, id(dec))
    if key not in w.quadratics:
        if len(w.quadratics) >= 32:  # a few layers' worth: (K, min(m, n) + 1) floats each
            w.quadratics.pop(next(iter(w.quadratics)))
        w.quadratics[key] = (dec, per_sample_quadratics(exp.stats[layer_name], dec.decomposition, W))
    return w.quadratics[key][1]


rank = st.slider("Rank r", 1, max_rank, min(max_rank, max(1, int(breakeven // 2))), key="lab_rank",
                 help=f"break-even rank {breakeven:.0f}: above it the factorised layer is larger than the dense one")

# --- instant numbers at the chosen rank, on one yardstick (re-truncating cached SVDs)
per_sample = {m: q[:, rank] for m in methods if (q := lab_quadratics(layer, m)) is not None}
cols = st.columns(len(methods))
for col, m in zip(cols, methods):
    dec = decs[m].decomposition
    rel = float((W.double() - dec.reconstruct(rank)).norm() / W.double().norm())
    if m in per_sample:
        mean, lo, hi = bootstrap_interval(per_sample[m])
        col.metric(label(m), f"{mean:.3g}", f"95% [{lo:.2g}, {hi:.2g}] · rel. error {rel:.3f}", delta_color="off",
                   delta_arrow="off", help="exact empirical-Fisher quadratic ½ mean_k ⟨G_k, W − W_r⟩² (loss units) with "
                   "its bootstrap interval over the calibration samples; then ‖W − W_r‖/‖W‖")
    else:
        col.metric(label(m), f"{rel:.3f}", "rel. error (no per-sample gradients)", delta_color="off", delta_arrow="off")
if len(per_sample) >= 2:
    verdict = best_of(per_sample)
    unresolved = [label(o) for o, ok in verdict["resolved"].items() if not ok]
    st.markdown(f"**Lowest loss at rank {rank}: {label(verdict['best'])}** — "
                + ("resolved against every other method (paired 95% bootstrap interval of the difference excludes 0)."
                   if not unresolved else f"not resolved against {', '.join(unresolved)}: with "
                   f"{exp.stats[layer].num_samples} calibration samples the difference is within noise."))
st.caption("Why reconstruction error and loss disagree: plain SVD minimises ‖W − W_r‖ and treats every direction "
           "alike, while the loss only cares about directions the calibration inputs and gradients excite. A "
           "Fisher-weighted method can have a larger reconstruction error (even above 1, worse than zeroing W, in "
           "directions the data never uses) and still change the loss less.")

# --- curves over rank (computed once per layer in the background)
if layer in w.curve_errors:
    st.error(f"Could not compute the rank curves of this layer: {w.curve_errors[layer]}. "
             "Pick another layer, or collect the statistics again.")
elif layer not in w.curves and len(decs) < len(METHODS):
    st.info("The rank curves are drawn once every method's decomposition of this layer is ready.")
elif layer not in w.curves and busy():
    st.info(f"The rank curves are computed once '{w.job.name}' has finished; come back to this page then.")
elif layer not in w.curves:
    gf = decs["gfwsvd"].factors

    def work(progress, cancel, layer=layer):
        progress(0, 1, f"curves for {short(layer)}")
        try:
            rows = layer_curves(W, decs, exp.stats[layer], kronecker=gf)
        except Exception as exc:  # shown on the page and not retried automatically
            return layer, None, " ".join(str(exc).split()) or type(exc).__name__
        progress(1, 1, "done")
        return layer, rows, None

    def done(result):
        name, rows, error = result
        if error is None:
            w.curves[name] = rows
        else:
            w.curve_errors[name] = error

    start_job("Computing rank curves", work, uses_model=False, on_done=done)
job_panel("Computing rank curves")
rows = [r for r in w.curves.get(layer, []) if r["method"] in methods]
if rows:
    c1, c2 = st.columns(2)
    c1.plotly_chart(charts.curves(rows, "relative_error", "reconstruction error", "‖W − W_r‖ / ‖W‖", marker_rank=rank, x_max=max_rank),
                    config=charts.EXPORT_CONFIG, key="c_rel")
    c2.plotly_chart(charts.curves(rows, "own_weighted_error", "each method's own weighted error",
                                  "‖L_outᵀ (W − W_r) L_in‖² (own units)", marker_rank=rank, x_max=max_rank),
                    config=charts.EXPORT_CONFIG, key="c_own")
    c3, c4 = st.columns(2)
    c3.plotly_chart(charts.curves(rows, "kronecker_predicted_loss", "predicted loss increase (GFWSVD Kronecker Fisher)",
                                  "½ tr(dWᵀ B dW A) (loss units)", marker_rank=rank, x_max=max_rank),
                    config=charts.EXPORT_CONFIG, key="c_kron")
    c4.plotly_chart(charts.curves(rows, "exact_quadratic", "exact empirical-Fisher quadratic",
                                  "mean_k ⟨G_k, dW⟩² / 2 (loss units)", marker_rank=rank, x_max=max_rank),
                    config=charts.EXPORT_CONFIG, key="c_exact")

spec = {label(m): v.tolist() for m, v in weighted_spectra({m: decs[m] for m in methods}).items()}
st.plotly_chart(charts.spectra(spec, "singular values of each method's weighted matrix L_outᵀ W L_in", "singular value",
                               colors={label(m): color(m) for m in methods}), config=charts.EXPORT_CONFIG, key="c_spec")
st.caption("Each spectrum is in its own method's units; its tail energy ½ Σ_{i>r} s_i² is that method's predicted loss.")

# --- the closed-form update (on request: one small least-squares factorisation per method)
st.subheader("Closed-form update")
st.caption("After truncation, the output side can be re-solved by least squares on the calibration inputs X so that "
           "the layer reproduces its dense outputs W X as well as the kept input directions allow (SVD-LLM's update). "
           "It can only lower this output error; for SVD-LLM, whose truncation already minimises it, it changes "
           "nothing. Whether the loss follows is what the sweep's 'Also with the closed-form update' measures.")
if exp.stats[layer].xx_sum is None:
    st.info("The input Gram of this layer was not collected: collect the statistics again.")
elif st.toggle("Show the update's effect on this layer", key="lab_update"):
    grid = rank_grid(max_rank)
    key = (layer, tuple(methods), id(exp.stats[layer]))
    if w.update_effects.get("key") != key:
        w.update_effects = {"key": key, "effects": {m: update_effect(decs[m].decomposition, W, exp.stats[layer].input_gram,
                                                                     grid) for m in methods}}
    st.plotly_chart(charts.update_effect_chart(w.update_effects["effects"], marker_rank=rank),
                    config=charts.EXPORT_CONFIG, key="c_update")

# --- measured loss increase on demand
st.subheader("Measured loss increase")
st.caption(f"Compress only this layer at rank {rank} and measure the change of the mean calibration loss "
           f"({len(exp.calib_batches)} batches per method).")
if st.button("Measure at this rank", disabled=busy()):
    def measure(progress, cancel):
        base = exp.task.measured_loss(exp.model, exp.calib_batches)
        out = {}
        for i, m in enumerate(methods):
            if cancel.is_set():
                break
            progress(i, len(methods), f"measuring {label(m)}")
            out[(layer, m, rank)] = measured_increase(exp.model, exp.task, exp.calib_batches, decs[m], rank, base)
        progress(len(methods), len(methods), "done")
        return out

    start_job("Measuring loss increase", measure, on_done=w.measured.update)
job_panel("Measuring loss increase")
found = [(m, r, v) for (lay, m, r), v in w.measured.items() if lay == layer]
if found:
    table = []
    for m, r, v in sorted(found, key=lambda t: (t[1], METHODS.index(t[0]))):
        dec = decs[m]
        dW = W.double() - dec.decomposition.reconstruct(r)
        table.append({"method": label(m), "rank": r, "measured increase": v,
                      "Kronecker predicted": kron_quadratic(dW, *decs["gfwsvd"].factors) if "gfwsvd" in decs else None,
                      "exact quadratic": exp.stats[layer].quadratic(dW)})
    st.dataframe(table, hide_index=True, width="stretch")
