"""Fisher factors: spectra and heatmaps of GFWSVD's Kronecker factors beside K-FAC and the diagonal Fisher."""

import streamlit as st

from gfwsvd_core.explore import kronecker_table, pool, spectrum
from gfwsvd_ui import charts
from gfwsvd_ui.state import COLORS, require_stats, short

st.title("Fisher factors")
exp = require_stats()
decs = exp.decompositions["gfwsvd"]

with st.expander("What am I looking at?", expanded=False):
    st.markdown(
        """
A layer's empirical Fisher `F = 1/K Σ vec(G_k) vec(G_k)ᵀ` (one `G_k` per calibration sample) says how
the loss reacts to a weight change `dW`: `ΔL ≈ ½ vec(dW)ᵀ F vec(dW)`. It is `mn × mn`, far too big to
store, so GFWSVD fits the **nearest Kronecker product** `F ≈ A ⊗ B`: `A` (in × in) weighs input
directions, `B` (out × out) output directions. The fit is the top singular pair of a rearranged `F`,
found by alternating least squares without ever forming `F`.

**K-FAC** builds a Kronecker product differently: the product of the input second moment `E[x xᵀ]` and
the output-gradient second moment `E[d dᵀ]`, assuming inputs and gradients are independent. Where the
two disagree, tokens and gradients are coupled. **η** (captured energy) is the share of `‖F‖²` that
`A ⊗ B` explains; **gap** `s₂/s₁` near 1 means the factors are ill-determined. The **diagonal
Fisher** is what FWSVD uses: one number per weight, no correlations.
"""
    )

names = list(decs)
layer = st.selectbox("Layer", names, format_func=short, key="factors_layer",
                     index=names.index(st.session_state.get("factors_layer_v", names[0])) if st.session_state.get("factors_layer_v") in names else 0)
st.session_state["factors_layer_v"] = layer
d = decs[layer]
stats = exp.stats[layer]
A, B = d.factors
kfac_in, kfac_out = stats.kfac_in, stats.kfac_out
k = d.info.get("kronecker", {})

c = st.columns(5)
c[0].metric("captured energy η", f"{k.get('eta', float('nan')):.3f}")
c[1].metric("fit error √(1−η)", f"{k.get('fit_error', float('nan')):.3f}")
c[2].metric("gap s₂/s₁", f"{k.get('gap', float('nan')):.3f}")
c[3].metric("ALS sweeps", k.get("sweeps"))
c[4].metric("damping (out / in)", f"{d.info.get('left_damping', 0):.0e} / {d.info.get('right_damping', 0):.0e}")
if d.info.get("left_fell_back") or d.info.get("right_fell_back"):
    st.warning("A factor of this layer was unusable and fell back to the identity: this layer is plain SVD on that side.")

col1, col2 = st.columns(2)
col1.plotly_chart(charts.spectra({"GFWSVD A": spectrum(A).tolist(), "K-FAC E[x xᵀ]": spectrum(kfac_in).tolist()},
                                 f"input side (n = {A.shape[0]}): eigenvalues",
                                 colors={"GFWSVD A": COLORS["gfwsvd"], "K-FAC E[x xᵀ]": COLORS["kfac"]}),
                  config=charts.EXPORT_CONFIG, key="spec_in")
col2.plotly_chart(charts.spectra({"GFWSVD B": spectrum(B).tolist(), "K-FAC E[d dᵀ]": spectrum(kfac_out).tolist()},
                                 f"output side (m = {B.shape[0]}): eigenvalues",
                                 colors={"GFWSVD B": COLORS["gfwsvd"], "K-FAC E[d dᵀ]": COLORS["kfac"]}),
                  config=charts.EXPORT_CONFIG, key="spec_out")
st.caption("Spectra are scale-free comparisons of shape: both factor pairs are only defined up to a scalar split between A and B.")

st.subheader("Factors as heatmaps (average-pooled to at most 256 × 256)")
h = st.columns(4)
h[0].plotly_chart(charts.heatmap(pool(A), "GFWSVD A (input)"), config=charts.EXPORT_CONFIG, key="hm_a")
h[1].plotly_chart(charts.heatmap(pool(kfac_in), "K-FAC E[x xᵀ]"), config=charts.EXPORT_CONFIG, key="hm_kin")
h[2].plotly_chart(charts.heatmap(pool(B), "GFWSVD B (output)"), config=charts.EXPORT_CONFIG, key="hm_b")
h[3].plotly_chart(charts.heatmap(pool(kfac_out), "K-FAC E[d dᵀ]"), config=charts.EXPORT_CONFIG, key="hm_kout")
st.plotly_chart(charts.heatmap(pool(stats.diagonal_fisher.log10().clamp_min(-30)), "diagonal Fisher log10 E[G²] (out × in)",
                               colorscale="Viridis", symmetric=False), config=charts.EXPORT_CONFIG, key="hm_diag")

st.subheader("Kronecker diagnostics, all layers")
st.dataframe(kronecker_table(decs), hide_index=True, width="stretch",
             column_config={"eta": st.column_config.NumberColumn(format="%.3f"),
                            "fit_error": st.column_config.NumberColumn(format="%.3f"),
                            "gap": st.column_config.NumberColumn(format="%.3f")})
