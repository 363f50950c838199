"""Model & data: choose a model and calibration text, estimate the cost, collect statistics."""

import tempfile
from pathlib import Path

import streamlit as st

from gfwsvd_core import pipeline
from gfwsvd_core.errors import GfwsvdUserError
from gfwsvd_core.explore import sample_note
from gfwsvd_core.tasks import available_tasks, task_class
from gfwsvd_ui.state import METHODS, busy, dismiss_outcome, job_panel, reset, shared_model, start_job, ws

st.title("Model & data")
st.caption("The embedded default (all-MiniLM-L6-v2 on Python's own help topics) needs no setup: press the two buttons.")
w = ws()
s = {**pipeline.DEFAULTS, **w.settings}
#: this page's jobs: a message about their outcome is about the inputs they ran with, so it goes
#: as soon as the inputs change (another source, or the form submitted again)
JOBS = ("Loading model and data", "Collecting statistics")

# outside the form so that only the chosen source's input is shown
source = st.radio("Calibration text", ["Default corpus (pydoc topics)", "Hugging Face dataset", "Upload a file"],
                  horizontal=True, key="calib_source", on_change=dismiss_outcome, args=JOBS)
with st.form("settings"):
    c1, c2 = st.columns(2)
    model = c1.text_input("Model", value=s["model"], help="'default' = bundled all-MiniLM-L6-v2; or a Hugging Face id "
                          "or a local folder. A hub id that is not cached here fails after the hub's retries "
                          "(about half a minute offline).")
    tasks = ["auto", *available_tasks()]
    task = c2.selectbox("Task", tasks, index=tasks.index(s["task"] or "auto"),
                        format_func=lambda t: "auto (from the model's config)" if t == "auto" else task_class(t).label)
    dataset, upload = "", None
    if source.startswith("Hugging"):
        dataset = st.text_input("HF dataset (name or name:config)",
                                value="" if s["calib"] == "default" else str(s["calib"]))
    elif source.startswith("Upload"):
        upload = st.file_uploader("Text file (.txt, .jsonl, .csv)", type=["txt", "jsonl", "csv"])
    c3, c3b, c4, c5, c6 = st.columns(5)
    text_column = c3.text_input("Text column", value=s["text_column"] or "",
                                help="of a .jsonl/.csv file or an HF dataset: the column of texts; empty = 'text', "
                                     "else 'sentence' (an HF dataset: else its first text column)")
    label_column = c3b.text_input("Label column", value=s["label_column"] or "",
                                  help="of a .jsonl/.csv file or an HF dataset: the column of class labels, for "
                                       "classification tasks; empty = 'label' when there is one")
    samples = c4.number_input("Calibration texts", 4, 100000, int(s["samples"]), step=8)
    eval_samples = c5.number_input("Held-out texts", 4, 100000, int(s["eval_samples"]), step=8)
    max_length = c6.number_input("Max tokens per text", 8, 4096, int(s["max_length"]), step=8)
    c7, c8, c9 = st.columns(3)
    layer_filter = c7.text_input("Layer filter", value=",".join(s["layers"] or []), placeholder="all block linears",
                                 help="comma-separated name patterns, e.g. 'layer.0.,intermediate'; empty = every "
                                      "linear layer of the transformer blocks")
    fisher = c8.selectbox("Fisher", ["empirical", "mc"], index=["empirical", "mc"].index(s["fisher"]),
                          help="empirical: data labels; mc: targets sampled from the model's own predictions")
    unit = c9.selectbox("Sample unit", ["task default", "token", "sequence", "batch"],
                        index=["task default", "token", "sequence", "batch"].index(s["sample_unit"] or "task default"))
    submitted = st.form_submit_button("Load model and data", type="primary", disabled=busy())

if submitted:
    dismiss_outcome(*JOBS)  # the inputs are new: whatever went wrong before is not on screen any more
    calib = "default"
    if source.startswith("Hugging"):
        calib = dataset.strip()
        if not calib:
            st.error("Enter a dataset name, or choose the default corpus.")
            st.stop()
    elif source.startswith("Upload"):
        if upload is None:
            st.error("Choose a .txt, .jsonl or .csv file to upload, or choose the default corpus.")
            st.stop()
        folder = Path(tempfile.mkdtemp(prefix="gfwsvd-upload-"))
        calib = str(folder / Path(upload.name).name)
        Path(calib).write_bytes(upload.getvalue())
    settings = {
        "model": model.strip() or "default", "task": None if task == "auto" else task, "calib": calib,
        "text_column": text_column.strip() or None, "label_column": label_column.strip() or None,
        "samples": int(samples), "eval_samples": int(eval_samples),
        "max_length": int(max_length), "fisher": fisher, "sample_unit": None if unit == "task default" else unit,
        "layers": [p.strip() for p in layer_filter.split(",") if p.strip()] or None,
    }
    w.settings = settings

    shown_name = upload.name if upload is not None else None

    def load(progress, cancel):
        progress(0, 3, "loading the model")
        bundle = shared_model(settings["model"], settings["task"], None)
        progress(1, 3, "tokenising calibration and held-out text")
        try:
            exp = pipeline.prepare(bundle=bundle, **settings)
        except GfwsvdUserError as exc:  # name the uploaded file as the user knows it, not its temporary copy
            if shown_name is None or settings["calib"] not in str(exc):
                raise
            raise type(exc)(str(exc).replace(settings["calib"], shown_name)) from exc
        progress(2, 3, "timing one calibration batch for the estimate")
        try:
            exp.time_estimate()  # measured once here, in the background; the page reads the cached value
        except Exception:  # an estimate must never block loading
            pass
        progress(3, 3, "done")
        return exp

    start_job("Loading model and data", load, on_done=lambda exp: reset(w, exp))

job_panel("Loading model and data")

exp = w.exp
if exp is None:
    st.stop()

st.subheader("Loaded")
c1, c2, c3, c4 = st.columns(4)
n_params = sum(p.numel() for p in exp.model.parameters())
c1.metric("Model", exp.settings["model"], exp.bundle.task, delta_color="off", delta_arrow="off")
c2.metric("Parameters", f"{n_params / 1e6:.1f} M")
c3.metric("Layers to compress", len(exp.layers))
c4.metric("Calibration / held-out", f"{len(exp.calib.texts)} / {len(exp.evaluation.texts)}")
mem = sum(exp.memory_estimate().values())
batches = len(exp.calib_batches)
est = getattr(exp, "_time_estimate", None)  # measured by the load job (gfwsvd_core.pipeline.Experiment.time_estimate)
if est:
    when = (f"about **{est['statistics']:.0f} s** for the statistics pass (measured on this machine); the pages "
            f"are usable then, while GFWSVD's Kronecker factors (about **{est['kronecker']:.0f} s**) and one weighted "
            "SVD per layer and method are computed in the background")
else:
    when = f"about **{max(2, round(batches * exp.settings['max_length'] * len(exp.layers) / 9000))} s** for the statistics pass"
st.caption(
    f"Sample unit **{exp.sample_unit}**, Fisher **{exp.settings['fisher']}**, {batches} calibration batches. "
    f"Estimated statistics memory: **{mem / 2**20:.0f} MiB**; estimated time: {when}. "
    "Fewer texts, shorter texts or a layer filter make it faster."
)

try:  # the memory/time plan of the statistics and factors below (gfwsvd_core.plan; numerics there)
    from gfwsvd_core.plan import plan_experiment

    _plan = plan_experiment(exp, None, METHODS, ("inputs",))
    with st.expander(f"Plan: peak {_plan.peak_host / 2**30:.2f} GiB host, {len(_plan.groups)} pass(es)"):
        st.table(_plan.stage_rows())
        st.caption(" ".join(_plan.notes))
except Exception as exc:  # a plan must never block collecting
    st.caption(f"No memory plan for this model ({exc}).")

if st.button("Collect statistics", type="primary", disabled=busy()):
    def collect(progress, cancel):
        new = exp.fork()  # the page keeps showing ``exp`` until the job's result is swapped in
        # in two folds (same cost): the Ranks page can then choose a method per layer (auto)
        # plus the input moments (one more cheap sum) for SVD-LLM, ASVD and the closed-form update
        pipeline.collect(new, METHODS, progress=progress, cancel=cancel, folds=len(new.calib_batches) >= 2,
                         extra_kinds=("inputs",))
        return new

    # every page is usable once the statistics are in; each method's per-layer decompositions
    # then fill in the background (cheap methods first, the layer on screen before the others)
    start_job("Collecting statistics", collect, on_done=lambda new: reset(w, new))

job_panel("Collecting statistics")

if exp.stats:
    st.subheader("Statistics")
    rows = [{"layer": n, "shape (out x in)": f"{s.out_features} x {s.in_features}", "samples K": s.num_samples,
             "tokens": s.num_tokens, "storage": s.storage or "-", "MiB": round(s.nbytes() / 2**20, 1)}
            for n, s in exp.stats.items()]
    st.dataframe(rows, hide_index=True, width="stretch")
    widest = max(exp.stats.values(), key=lambda s: min(s.shape))  # K is the same for every layer
    note = sample_note(widest.num_samples, widest.shape, widest.sample_unit)
    if note:
        st.info(note, icon=":material/info:")
    t = exp.timings
    st.caption("Timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
    st.page_link("pages/factors.py", label="Next: look at the Fisher factors", icon=":material/arrow_forward:")
