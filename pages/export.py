"""Export: compress with the chosen ranks, evaluate, download a zip or save to a folder."""

import io
import tempfile
import zipfile
from pathlib import Path

import streamlit as st

from gfwsvd_core import pipeline
from gfwsvd_core.errors import GfwsvdUserError
from gfwsvd_core.methods import get_method, method_key
from gfwsvd_core.io import output_root, resolve_output_folder, save_compressed
from gfwsvd_core.ranks import kept_params, uniform_ranks
from gfwsvd_ui.state import METHODS, busy, rank_methods, complete, decompositions, job_panel, label, pending_note, require_stats, start_job, ws

st.title("Export")
exp = require_stats()
w = ws()
if not w.ranks:
    st.info("No ranks chosen yet: the uniform default (half the parameters of every layer) will be used. "
            "Choose ranks on the **Ranks** page.")
options = [m for m in rank_methods(exp) if m in METHODS or m in exp.decompositions]
method = st.selectbox("Method", options, index=options.index(w.rank_method) if w.rank_method in options else 0,
                      format_func=label, key="export_method")
oc = st.columns(2)
with_update = oc[0].checkbox(
    "Closed-form update", key="export_update",
    help="After truncation, re-solve each layer's output side by least squares on the calibration inputs, so the "
         "layer reproduces its dense outputs as well as the kept input directions allow (SVD-LLM's update; it "
         "changes nothing for SVD-LLM itself)")
blocks = len(pipeline.blocks_of(list(exp.stats)))
sequential = oc[1].checkbox(
    "Sequential calibration", key="export_sequential", disabled=method == "auto",
    help=f"Compress block by block, collecting each block's statistics on the model whose earlier blocks are "
         f"already compressed: {blocks} more statistics passes" + (" (not available for auto)" if method == "auto" else ""))
spec = method_key(get_method(method, update=with_update, sequential=sequential and method != "auto"))
dense = sum(1 for r in w.ranks.values() if r is None)
st.caption(f"{len(w.ranks) - dense} layers factorised, {dense} kept dense; ranks from the Ranks page "
           f"({w.rank_rule}).")
shapes = {n: tuple(s.shape) for n, s in exp.stats.items()}
after, before = kept_params(shapes, w.ranks or uniform_ranks(shapes, 0.5))
total = sum(p.numel() for p in exp.model.parameters())
saved = before - after
bytes_per = next(exp.model.parameters()).element_size()
st.caption(f"Before compressing: the chosen ranks keep {after / before:.3f} of the compressed layers' weights and "
           f"{(total - saved) / total:.3f} of the model, about {saved * bytes_per / 2**20:.1f} MiB smaller.")

if not complete(method):
    decompositions(method)  # redraw when it is complete
    pending_note(method, "compressing with it")
if st.button("Compress and evaluate", type="primary", disabled=busy() or not complete(method)):
    ranks = dict(w.ranks) or None

    def work(progress, cancel):
        return pipeline.run_compression(exp, spec, ratio=None if ranks else 0.5, ranks=ranks,
                                        progress=progress, cancel=cancel)

    def done(result):
        w.compressed, w.export_zip = result, None

    start_job("Compressing and evaluating", work, on_done=done)
job_panel("Compressing and evaluating")

if w.compressed is None:
    st.stop()
comp, rep = w.compressed
st.subheader(f"{label(rep.get('method_key', rep['method']))}: kept {rep['kept_ratio']['layers']:.3f} of the compressed layers, "
             f"{rep['kept_ratio']['model']:.3f} of the model")
hib = getattr(exp.task, "higher_is_better", {})
iv = rep.get("intervals") or {}


def _span(pair) -> str:
    return "" if not pair else f"[{pair[0]:.4g}, {pair[1]:.4g}]"


st.dataframe([{"metric": k, "dense": rep["baseline_metrics"][k], "compressed": v,
               "compressed 95%": _span(iv.get("metrics", {}).get(k)),
               "change": v - rep["baseline_metrics"][k], "change 95%": _span(iv.get("change", {}).get(k)),
               "resolved": iv.get("resolved", {}).get(k),
               "better is": "higher" if hib.get(k) else "lower",
               "meaning": getattr(exp.task, "metric_help", {}).get(k, "")}
              for k, v in rep["metrics"].items()], hide_index=True, width="stretch")
if iv:
    st.caption(f"Intervals: {iv['level']:.0%} bootstrap over the {iv['examples']} held-out examples; the change is "
               "paired (dense and compressed on the same draws). A change whose interval includes 0 is not resolved: "
               "with this many held-out texts it could be noise.")
check = rep.get("prediction_check")
if check:
    pc = st.columns(3)
    pc[0].metric("predicted loss increase", f"{check['predicted_increase']:.3g}",
                 help=f"{check['yardstick']}, on the calibration texts")
    pc[1].metric("measured loss increase", f"{check['measured_increase']:.3g}",
                 help="compressed minus dense loss on the calibration texts")
    pc[2].metric("measured / predicted", f"{check['measured_over_predicted']:.2f}",
                 "agrees" if check["agrees"] else f"off by more than {check['factor']:g}x", delta_color="off",
                 delta_arrow="off")
for warning in rep.get("warnings", []):
    st.warning(warning, icon=":material/warning:")


def export_folder(folder: Path) -> Path:
    """Write the compressed folder (a temporary sibling, then renamed; never into a non-empty one)."""
    return save_compressed(comp.model, folder, tokenizer=exp.bundle.tokenizer, method=comp.method,
                           source_model=str(exp.settings["model"]), calibration=exp.data_record())


c1, c2 = st.columns(2)
with c1:
    st.markdown("**Download**")
    if w.export_zip is None:
        if st.button("Prepare zip", disabled=busy(), help="writes the folder and zips it in the background"):
            def zip_job(progress, cancel):
                progress(0, 2, "writing the compressed folder")
                with tempfile.TemporaryDirectory() as tmp:
                    folder = export_folder(Path(tmp) / "compressed")
                    progress(1, 2, "zipping")
                    buf = io.BytesIO()
                    # weights barely compress: a light level keeps it fast
                    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
                        for f in sorted(folder.rglob("*")):
                            if f.is_file():
                                zf.write(f, Path("compressed") / f.relative_to(folder))
                progress(2, 2, "done")
                return buf.getvalue()

            start_job("Preparing zip", zip_job, uses_model=False, on_done=lambda data: setattr(w, "export_zip", data))
        job_panel("Preparing zip")
    if w.export_zip is not None:
        st.download_button("Download compressed model (.zip)", w.export_zip, file_name=f"gfwsvd-{comp.method}.zip",
                           mime="application/zip", key="download_zip", type="primary")
        st.caption(f"{len(w.export_zip) / 2**20:.1f} MiB · unzips to a folder `compressed/`")
with c2:
    st.markdown("**Save to a folder on this machine**")
    root = output_root()
    target = st.text_input("Folder", value=f"compressed-{comp.method}", key="export_path",
                           help=f"a new or empty folder under the output root {root} (set GFWSVD_OUTPUT_ROOT to change it)")
    st.caption(f"Folders are written under `{root}`; an existing non-empty folder is never overwritten.")
    if st.button("Save"):
        try:
            path = export_folder(resolve_output_folder(target, root))
            st.success(f"Saved to {path}")
        except GfwsvdUserError as exc:
            st.error(f"Could not save to {target!r}: {exc}")

st.markdown("**Load it again**")
st.code('from gfwsvd_core.io import load_compressed\nmodel = load_compressed("compressed")  # the unzipped or saved folder',
        language="python")
st.caption("Plain `from_pretrained` on this folder would silently build a wrong dense model; use the loader above, "
           "or `gfwsvd_core.io.export_dense` for other tools.")
with st.expander("Per-layer report"):
    st.dataframe([{k: r.get(k) for k in ("layer", "shape", "rank", "params_before", "params_after", "predicted_loss",
                                         "exact_quadratic", "relative_error", "reason")} for r in rep["layers"]],
                 hide_index=True, width="stretch")
