"""Fisher factors: spectra and heatmaps of GFWSVD's Kronecker factors beside K-FAC and the diagonal Fisher."""

import pandas as pd
import streamlit as st

from gfwsvd_core.explore import (ETA_RANGES, GAP_RANGES, effective_ranks, fisher_alignment_table, judge_kronecker,
                                 kronecker_table, pool, spectrum)
from gfwsvd_ui import charts
from gfwsvd_ui.state import color, decompositions, label, pending_note, require_stats, short

st.title("Fisher factors")
exp = require_stats()

with st.expander("What am I looking at?", expanded=False):
    st.markdown(
        """
A layer's empirical Fisher `F = 1/K Σ vec(G_k) vec(G_k)ᵀ` (one `G_k` per calibration sample) says how
the loss reacts to a weight change `dW`: `ΔL ≈ ½ vec(dW)ᵀ F vec(dW)`. It is `mn × mn`, far too big to
store, so GFWSVD fits the **nearest Kronecker product** `F ≈ A ⊗ B`: `A` (in × in) weighs input
directions, `B` (out × out) output directions. The fit is the top singular pair of a rearranged `F`,
found by a Krylov (Lanczos) solver on maps that never form `F` (alternating least squares is the option).

**K-FAC** builds a Kronecker product differently: the product of the input second moment `E[x xᵀ]` and
the output-gradient second moment `E[d dᵀ]`, assuming inputs and gradients are independent. Where the
two disagree, tokens and gradients are coupled. **η** (captured energy) is the share of `‖F‖²` that
`A ⊗ B` explains; **gap** `s₂/s₁` near 1 means the factors are ill-determined. The **diagonal
Fisher** is what FWSVD uses: one number per weight, no correlations.
"""
    )

names = list(exp.stats)
ready = decompositions("gfwsvd")
layer = st.selectbox("Layer", names, key="factors_layer", format_func=short,
                     help=None if len(ready) == len(names) else f"{len(ready)} of {len(names)} layers ready",
                     index=names.index(st.session_state.get("factors_layer_v", names[0])) if st.session_state.get("factors_layer_v") in names else 0)
st.session_state["factors_layer_v"] = layer
decs = decompositions("gfwsvd", layer)  # this layer next, when it is not ready yet
if layer not in decs:
    pending_note("gfwsvd", "this layer's factors")
    st.stop()
d = decs[layer]
stats = exp.stats[layer]
A, B = d.factors
kfac_in, kfac_out = stats.kfac_in, stats.kfac_out
k = d.info.get("kronecker", {})

c = st.columns(6)
c[0].metric("captured energy η", f"{k.get('eta', float('nan')):.3f}", help="share of ‖F‖² explained by A ⊗ B")
c[1].metric("fit error √(1−η)", f"{k.get('fit_error', float('nan')):.3f}")
c[2].metric("gap s₂/s₁", f"{k.get('gap', float('nan')):.3f}", help="near 1: the Kronecker factors are ill-determined")
c[3].metric("solver steps", k.get("sweeps"), help=f"{k.get('method', '')}: Krylov (Lanczos) steps, or ALS sweeps")
c[4].metric("damping, output side", f"{d.info.get('left_damping', 0):.0e}", help="added to B before its root (relative)")
c[5].metric("damping, input side", f"{d.info.get('right_damping', 0):.0e}", help="added to A before its root (relative)")
judged = judge_kronecker(k, stats.num_samples, d.shape, stats.sample_unit)
show = {"good": st.success, "fair": st.info, "poor": st.warning}[judged["verdict"]]
show(f"Kronecker fit of this layer: **{judged['verdict']}**"
     + ("" if not judged["reasons"] else ". " + " ".join(r[0].upper() + r[1:] + "." for r in judged["reasons"])))
if d.info.get("left_fell_back") or d.info.get("right_fell_back"):
    st.warning("A factor of this layer was unusable and fell back to the identity: this layer is plain SVD on that side.")

col1, col2 = st.columns(2)
col1.plotly_chart(charts.spectra({"GFWSVD A": spectrum(A).tolist(), "K-FAC E[x xᵀ]": spectrum(kfac_in).tolist()},
                                 f"input side (n = {A.shape[0]}): eigenvalues", normalise=True,
                                 colors={"GFWSVD A": color("gfwsvd"), "K-FAC E[x xᵀ]": color("kfac")}),
                  config=charts.EXPORT_CONFIG, key="spec_in")
col2.plotly_chart(charts.spectra({"GFWSVD B": spectrum(B).tolist(), "K-FAC E[d dᵀ]": spectrum(kfac_out).tolist()},
                                 f"output side (m = {B.shape[0]}): eigenvalues", normalise=True,
                                 colors={"GFWSVD B": color("gfwsvd"), "K-FAC E[d dᵀ]": color("kfac")}),
                  config=charts.EXPORT_CONFIG, key="spec_out")
st.caption("Each spectrum is divided by its largest eigenvalue: both factor pairs are only defined up to a scalar "
           "split between A and B, so only their shapes compare. Eigenvalues below 10⁻¹⁵ of the largest "
           "(numerically zero, e.g. from fewer samples than dimensions) are not drawn.")

st.subheader("Factors as heatmaps")
st.caption("Large factors are block-averaged to at most 256 × 256 cells; axes keep the original indices. "
           "Red = positive, blue = negative, each map on its own symmetric scale clipped at the 99th "
           "percentile of |entries| (hover for exact values).")
cells = [(A, "GFWSVD A", "input"), (kfac_in, "K-FAC E[x xᵀ]", "input"),
         (B, "GFWSVD B", "output"), (kfac_out, "K-FAC E[d dᵀ]", "output")]
for row in range(2):
    h = st.columns(2)
    for col, (M, title, side) in zip(h, cells[2 * row: 2 * row + 2]):
        col.plotly_chart(charts.heatmap(pool(M), f"{title}, {side} side", f"{side} index", f"{side} index",
                                        full_shape=tuple(M.shape)),
                         config=charts.EXPORT_CONFIG, key=f"hm_{title}")
diag = stats.diagonal_fisher
st.plotly_chart(charts.heatmap(pool(diag.clamp_min(1e-30).log10()), "diagonal Fisher E[G²] per weight (FWSVD's weights)",
                               "input index (column of W)", "output index (row of W)", full_shape=tuple(diag.shape),
                               colorscale="Viridis", symmetric=False, colorbar_title="log10"),
                config=charts.EXPORT_CONFIG, key="hm_diag")

st.subheader("Kronecker diagnostics, all layers")
if len(decs) < len(names):
    st.caption(f"{len(decs)} of {len(names)} layers ready; the others are still being computed.")
table = [{**r, "layer": short(r["layer"])} for r in kronecker_table(decs, exp.stats)]
st.caption(f"Verdict: good when eta >= {ETA_RANGES[0]} and the gap s₂/s₁ <= {GAP_RANGES[0]}; poor when eta < "
           f"{ETA_RANGES[1]}, the gap > {GAP_RANGES[1]} or the solver did not converge; fair otherwise. Select a "
           "layer above for the reasons.")
VERDICT_COLOURS = {"good": "#d8f0d8", "fair": "#fff3c4", "poor": "#f8d0d0"}
styled = pd.DataFrame(table).style.apply(
    lambda row: [f"background-color: {VERDICT_COLOURS.get(row['verdict'], '')}" if c == "verdict" else "" for c in row.index],
    axis=1)
st.dataframe(styled, hide_index=True, width="stretch",
             column_config={"eta": st.column_config.NumberColumn(format="%.3f"),
                            "fit_error": st.column_config.NumberColumn(format="%.3f"),
                            "gap": st.column_config.NumberColumn(format="%.3f")})

st.subheader("Why GFWSVD can lose: effective rank of the factors")
eff = effective_ranks(decs, exp.stats)
if eff:
    st.plotly_chart(charts.effective_rank_chart(eff, [short(r["layer"]) for r in eff]), config=charts.EXPORT_CONFIG,
                    key="eff_ranks")
    st.caption("Effective rank tr(F)² / ‖F‖²_F counts a factor's significant directions (n for the identity, 1 for a "
               "single direction). GFWSVD's factors are sums over the K per-sample gradients; K-FAC's moments sum "
               "over every token. Far fewer significant directions than K-FAC's mean GFWSVD weights most of the "
               "layer's directions alike (the damping decides them), which is where it loses; more samples "
               "(a finer sample unit, more texts) raise its effective rank.")

st.subheader("Fisher-aligned view (ours)")
with st.expander("What is this view?", expanded=False):
    st.markdown(
        """
**Our own diagnostic**, inspired by the "dependence violation score" of FASC (*Fisher-Aligned Subspace
Compression*). We could not consult the paper's formula, so this is a well-defined version of the idea,
not the paper's number.

**ρ_KF** (K-FAC independence violation) `= min_c ‖F − c · E[x xᵀ] ⊗ E[d dᵀ]‖ / ‖F‖`. K-FAC assumes a
token's input `x` and its output gradient `d` are independent (and the tokens of one sample uncorrelated);
then the Fisher would be exactly the Kronecker product of their second moments. ρ_KF says how wrong that
is: 0 = K-FAC's product is the Fisher (up to the best scale c), 1 = it explains none of it. The **NKP fit
error** `√(1−η)` is the error of GFWSVD's nearest Kronecker product, the best any single `A ⊗ B` can do, so
ρ_KF is never below it. The difference between the two is what the independence assumption costs on top
of using a Kronecker product. With few samples K (e.g. one per calibration batch) `F` has rank at most K
and no full-rank product fits it: both numbers are then close to 1.

**Subspace overlap**: which input directions are kept? PCA-style methods (SVD-LLM) keep the top-k
eigenvectors of `E[x xᵀ]` (the highest-variance inputs); GFWSVD's `A` ranks inputs by how much the loss
reacts to them. The cosines of the principal angles between the two k-dimensional subspaces give the
**overlap** = mean cos²: 1 = the same subspace, k/n = what two random subspaces share (chance). Here k is
the rank that keeps half of the layer's parameters. **Exact / K-FAC quadratic** compares, for the
rank-k GFWSVD truncation `dW`, the loss increase the full Fisher predicts with the one K-FAC predicts
(at the best scale): 1 = K-FAC gets this change right.
"""
    )
with st.spinner("Computing the Fisher-aligned view"):
    mine = fisher_alignment_table({layer: d}, exp.stats, exp.model)
    rows = fisher_alignment_table(decs, exp.stats)
if not mine:
    st.info("This view needs the per-sample gradients and K-FAC's moments of the layer ('samples' and 'kfac').")
else:
    fa = mine[0]
    c = st.columns(5)
    c[0].metric("ρ_KF (ours)", f"{fa['rho_kfac']:.3f}" if fa["rho_kfac"] is not None else "n/a",
                help="‖F − c·E[x xᵀ]⊗E[d dᵀ]‖ / ‖F‖ at the best scale c"
                     + (" (‖F‖ estimated from a random subset of sample pairs)" if fa["fisher_norm_estimated"] else ""))
    c[1].metric("NKP fit error √(1−η)", f"{fa['nkp_fit_error']:.3f}" if fa.get("nkp_fit_error") is not None else "n/a",
                help="the floor: the best single Kronecker product (GFWSVD's)")
    c[2].metric(f"input-subspace overlap (k = {fa['k']})", f"{fa['overlap']:.3f}",
                help="mean cos² of the principal angles between the top-k eigenvectors of GFWSVD's A and of E[x xᵀ]")
    c[3].metric("overlap by chance k/n", f"{fa['chance_overlap']:.3f}")
    ratio = fa.get("quadratic_ratio")
    c[4].metric("exact / K-FAC quadratic", f"{ratio:.2f}" if ratio is not None else "n/a",
                help="at rank k: the full-Fisher loss increase over K-FAC's best-scaled prediction")
    if fa.get("gap_fisher") is not None and fa["gap_fisher"] < 1e-6:
        st.caption("GFWSVD's A has (almost) no eigengap at k (e.g. fewer samples than k): its top-k subspace is "
                   "partly arbitrary, and so is the overlap.")
if rows:
    st.plotly_chart(charts.fisher_alignment_chart(rows, [short(r["layer"]) for r in rows]),
                    config=charts.EXPORT_CONFIG, key="fisher_alignment")
    st.caption("Per layer: ρ_KF (ours) never lies below the NKP fit error; a large gap between them means the "
               "inputs and output gradients are coupled, which K-FAC ignores and GFWSVD captures. The overlap "
               "says whether the Fisher keeps the same input directions as variance (PCA) does, against the "
               "chance level k/n."
               + ("" if len(decs) == len(names) else f" {len(decs)} of {len(names)} layers ready; the others are "
                  "still being computed."))
