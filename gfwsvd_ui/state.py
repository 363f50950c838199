"""Per-session workspace, the shared model cache and the on-screen job panel."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import streamlit as st

from gfwsvd_core.jobs import Job
from gfwsvd_core.methods import get_method

#: one colour per method, everywhere
COLORS = {
    "svd": "#7f7f7f", "fwsvd": "#1f77b4", "kfac": "#2ca02c", "gfwsvd": "#d62728",
    "asvd": "#9467bd", "svdllm": "#8c564b", "dense": "#111111",
}
#: methods the explorer compares (all come from one statistics pass)
METHODS = ["svd", "fwsvd", "kfac", "gfwsvd"]


def label(method: str) -> str:
    return get_method(method).label if method in COLORS and method != "dense" else method


@dataclass
class Workspace:
    """Everything one browser session has built; jobs write into it, pages read it."""

    settings: dict = field(default_factory=dict)
    exp: Any = None  # gfwsvd_core.pipeline.Experiment
    job: Optional[Job] = None
    job_kind: str = ""
    ranks: dict = field(default_factory=dict)  # {layer: rank or None}
    rank_method: str = "gfwsvd"
    sweep: Any = None
    compressed: Any = None  # (Compression, report)
    measured: dict = field(default_factory=dict)  # {(layer, method, rank): measured increase}
    curves: dict = field(default_factory=dict)  # {layer: rows}
    curve_errors: dict = field(default_factory=dict)  # {layer: message}: not retried automatically
    export_zip: Optional[bytes] = None
    notice: str = ""


def ws() -> Workspace:
    if "ws" not in st.session_state:
        st.session_state["ws"] = Workspace()
    return st.session_state["ws"]


# ---- shared model cache (all sessions; models are never mutated: compression deep-copies)
_MODELS: dict = {}
_MODELS_LOCK = threading.Lock()


def shared_model(name: str, task: Optional[str], device: Optional[str]):
    """Load a model once per (name, task, device) for all sessions (thread-safe)."""
    from gfwsvd_core.models import load_model

    key = (name, task, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_model(name, task=task, device=device)
        return _MODELS[key]


#: One model-using job at a time across all sessions: the statistics pass attaches forward hooks
#: and toggles ``requires_grad`` on the *shared* cached model, so a second session's forward passes
#: (or deep copies made meanwhile) would see them. Jobs queue here instead.
_MODEL_JOBS = threading.Lock()


def _serialised(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args, progress, cancel, **kwargs):
        from gfwsvd_core.stats import Cancelled

        while not _MODEL_JOBS.acquire(timeout=0.25):
            progress(0, None, "waiting for another session's job on the shared model")
            if cancel.is_set():
                raise Cancelled("cancelled while waiting")
        try:
            return fn(*args, progress=progress, cancel=cancel, **kwargs)
        finally:
            _MODEL_JOBS.release()

    return run


def start_job(kind: str, fn: Callable[..., Any], *args, uses_model: bool = True, **kwargs) -> None:
    """Run ``fn(*args, progress=, cancel=, **kwargs)`` in the background as this session's job.

    ``uses_model``: the job runs the shared model (forward/backward passes, hooks), so it waits for
    other sessions' such jobs; pure post-processing (curves, zips) passes False.
    """
    w = ws()
    if w.job is not None and w.job.running:
        st.warning(f"'{w.job.name}' is still running; wait for it or cancel it first.")
        return
    w.job = Job(kind, _serialised(fn) if uses_model else fn, *args, **kwargs)
    w.job_kind = kind


def busy() -> bool:
    w = ws()
    return w.job is not None and w.job.running


def job_panel(kind: str) -> None:
    """Progress bar + cancel button of this page's background job; reruns the page when done."""

    @st.fragment(run_every=0.5)
    def panel():
        w = ws()
        job = w.job
        if job is None or w.job_kind != kind:
            return
        if job.running:
            text = f"{job.message} — {job.elapsed:.0f} s"
            st.progress(job.fraction, text=text)
            if st.button("Cancel", key=f"cancel-{kind}", help="stop after the current step"):
                job.cancel()
                st.toast("Cancelling after the current step…")
            return
        if not getattr(job, "_shown", False):
            job._shown = True
            st.rerun()  # redraw the whole page with the job's results
        if job.cancelled:
            st.warning(f"{job.name} was cancelled after {job.elapsed:.0f} s. "
                       "Press the button again to restart it.")
        elif job.error:
            st.error(f"{job.error} — fix the input above and try again.")
        else:
            st.success(f"{job.name} finished in {job.elapsed:.1f} s")

    panel()


def require_experiment() -> Any:
    w = ws()
    if w.exp is None:
        st.info("Load a model and data on the **Model & data** page first.")
        st.page_link("pages/model_data.py", label="Go to Model & data", icon=":material/database:")
        st.stop()
    return w.exp


def require_stats() -> Any:
    exp = require_experiment()
    if exp.stats is None or not set(METHODS) <= set(exp.decompositions):
        st.info("Collect statistics on the **Model & data** page first (it also prepares every method's decomposition).")
        st.page_link("pages/model_data.py", label="Go to Model & data", icon=":material/database:")
        st.stop()
    return exp


def short(name: str) -> str:
    """Compact layer label: 'encoder.layer.3.intermediate.dense' -> 'L3 intermediate.dense'."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return f"L{p} " + ".".join(parts[i + 1:])
    return name
