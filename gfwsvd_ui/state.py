"""Per-session workspace, the shared model cache and the on-screen job panel."""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import streamlit as st

from gfwsvd_core import background
from gfwsvd_core.jobs import Job
from gfwsvd_core.methods import available_methods, explorer_methods, method_class, method_label, parse_spec

#: methods the explorer compares (all come from one statistics pass); the registry decides
METHODS = explorer_methods()
DENSE_COLOR = "#111111"  # the uncompressed baseline in every chart
#: seconds between redraws of what a running job or the background filler reports (sidebar,
#: progress bars, pending notes); nothing is redrawn on a timer while neither runs
TICK = 0.5


#: methods and variants the sweep and Export offer beyond the explorer's (computed when chosen)
EXTRA_METHODS = ["asvd", "svdllm", "svdllm2", "svdllm[sequential=true]"]


def _known(method: str) -> bool:
    try:
        return parse_spec(method)[0] in available_methods()
    except ValueError:
        return False


def label(method: str) -> str:
    """Display name of a method or spec (e.g. "SVD + update"); other names pass through."""
    return method_label(method) if _known(method) else method


def color(method: str) -> str:
    """The one colour of a method in every chart (from its registered class; a variant such as
    ``svd[update=true]`` shares its method's colour and is drawn dotted, see :func:`dash`)."""
    return method_class(method).color if _known(method) else DENSE_COLOR


def dash(method: str) -> str:
    """Line style: solid for a method, dotted for a configured variant of it."""
    return "dot" if _known(method) and "[" in method else "solid"


def loss_units(method: str) -> bool:
    """Whether the method's predicted losses are comparable across layers (loss units)."""
    return _known(method) and method_class(method).loss_units


@dataclass
class Workspace:
    """Everything one browser session has built; jobs write into it, pages read it."""

    settings: dict = field(default_factory=dict)
    exp: Any = None  # gfwsvd_core.pipeline.Experiment
    job: Optional[Job] = None
    job_kind: str = ""
    ranks: dict = field(default_factory=dict)  # {layer: rank or None}
    rank_method: str = "gfwsvd"
    quadratics: dict = field(default_factory=dict)  # Layer lab: {(layer, method, id): (decomposition, per-sample)}
    rank_rule: str = "uniform: 0.50 of each layer's parameters kept"  # what made the current ranks
    sweep: Any = None
    compressed: Any = None  # (Compression, report)
    measured: dict = field(default_factory=dict)  # {(layer, method, rank): measured increase}
    curves: dict = field(default_factory=dict)  # {layer: rows}
    update_effects: dict = field(default_factory=dict)  # Layer lab: {"key": (layer, methods, id), "effects": ...}
    curve_errors: dict = field(default_factory=dict)  # {layer: message}: not retried automatically
    export_zip: Optional[bytes] = None
    notice: str = ""
    on_done: Optional[Callable[[Any], None]] = None  # applies the job's result, in the script thread
    applied: Optional[Job] = None  # the job whose result was applied
    redrawn: Optional[Job] = None  # the finished job the whole page was drawn again for
    dismissed: Optional[Job] = None  # a finished job whose outcome no longer matches the inputs
    filler: Any = None  # gfwsvd_core.background.Filler: per-layer decompositions after the statistics
    awaited: set = field(default_factory=set)  # {(method, layer)} a page waits for; redrawn when ready


def ws() -> Workspace:
    if "ws" not in st.session_state:
        st.session_state["ws"] = Workspace()
    w = st.session_state["ws"]
    apply_finished(w)
    if w.exp is not None:
        background.adopt(w.exp, w.filler)
    return w


def reset(w: Workspace, exp: Any) -> None:
    """A new experiment (or new statistics): everything computed from the old one goes, and the
    decompositions of the new statistics start filling in the background."""
    w.exp, w.ranks, w.sweep, w.compressed, w.measured, w.curves, w.curve_errors = exp, {}, None, None, {}, {}, {}
    w.quadratics = {}
    w.rank_rule = "uniform: 0.50 of each layer's parameters kept"
    w.export_zip = None
    w.awaited = set()
    if w.filler is not None:
        w.filler.cancel()
        w.filler = None
    if exp is not None and exp.stats:
        start_filling(w)


def start_filling(w: Workspace, first: Optional[str] = None) -> None:
    """Compute every explorer method's missing decompositions in the background (cheap ones first)."""
    if w.filler is not None and w.filler.running:
        return
    todo = [m for m in METHODS if m not in w.exp.decompositions]
    if todo:
        w.filler = background.fill(w.exp, todo, first=first)


def decompositions(method: str, layer: Optional[str] = None) -> dict:
    """The finished per-layer decompositions of ``method`` ({layer: decomposition}, possibly only
    some layers while the background filler runs). ``layer``: the page needs this one, so it is
    computed next and the page is redrawn when it is ready."""
    w = ws()
    exp = w.exp
    if method in exp.decompositions:
        return exp.decompositions[method]
    f = w.filler
    if f is None or method not in f.methods:
        return {}
    if layer is not None and not f.has(method, layer):
        f.prioritise(layer, method)
        w.awaited.add((method, layer))
    elif layer is None and not f.complete(method):
        w.awaited.add((method, None))
    return f.ready(method)


#: the per-layer choice among the explorer's methods, computed on request once they are complete
AUTO = "auto"


def rank_methods(exp: Any) -> list[str]:
    """Methods a user can choose ranks and export with: the explorer's, plus auto when the
    statistics came in two folds (its held-out fold)."""
    return METHODS + ([AUTO] if exp is not None and getattr(exp, "fold_stats", None) is not None else [])


def start_auto(w: "Workspace") -> None:
    """Compute auto's per-layer choice in the background (the candidates' decompositions exist)."""
    exp = w.exp

    def work(progress, cancel):
        from gfwsvd_core import pipeline

        new = exp.fork()
        pipeline.decompositions(new, AUTO, progress=progress, cancel=cancel)
        return new

    def done(new):
        if w.exp is exp:  # the statistics did not change meanwhile
            exp.decompositions[AUTO] = new.decompositions[AUTO]
            exp.fold_decompositions.update(new.fold_decompositions)

    start_job("Choosing methods per layer", work, on_done=done)


def complete(method: str) -> bool:
    """Whether every layer of ``method`` is decomposed."""
    w = ws()
    return method in w.exp.decompositions


def fill_status(method: str) -> str:
    """'12 of 36 layers ready' (or why none will come) for a method still being decomposed."""
    w = ws()
    f = w.filler
    if f is None or method not in f.methods:
        return "not computed (collect the statistics again)"
    if method in f.errors:
        return f"failed at {f.errors[method]}"
    done, total = f.progress(method)
    if not f.running and done < total:
        return f"stopped at {done} of {total} layers"
    return f"{done} of {total} layers ready"


def pending_methods() -> list[str]:
    w = ws()
    return [m for m in METHODS if w.exp is not None and w.exp.stats and m not in w.exp.decompositions]


def apply_finished(w: Workspace) -> bool:
    """Swap a finished job's result into the workspace (once, on whichever page runs next).

    Jobs never write into the workspace from their thread: a page never sees half a result."""
    job = w.job
    if job is None or job.running or w.applied is job:
        return False
    w.applied = job
    if job.error is None and not job.cancelled and w.on_done is not None:
        w.on_done(job.result)
    return True


# ---- shared model cache (all sessions; models are never mutated: compression deep-copies)
#: most models kept loaded at once (least recently used go first)
MAX_MODELS = max(1, int(os.environ.get("GFWSVD_MAX_MODELS", "2")))
_MODELS: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_MODELS_LOCK = threading.Lock()  # guards the two dicts, never held while loading
_KEY_LOCKS: dict = {}


def shared_model(name: str, task: Optional[str], device: Optional[str], loader: Optional[Callable] = None):
    """Load a model once per (name, task, device) for all sessions.

    One lock per key: two sessions asking for the same model load it once, while a session
    loading another model is not blocked. At most :data:`MAX_MODELS` stay cached."""
    if loader is None:
        from gfwsvd_core.models import load_model as loader
    key = (name, task, device)
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with lock:
        with _MODELS_LOCK:
            if key in _MODELS:
                _MODELS.move_to_end(key)
                return _MODELS[key]
        bundle = loader(name, task=task, device=device)
        with _MODELS_LOCK:
            _MODELS[key] = bundle
            while len(_MODELS) > MAX_MODELS:
                _MODELS.popitem(last=False)
            _KEY_LOCKS.pop(key, None)
        return bundle


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


def start_job(kind: str, fn: Callable[..., Any], *args, uses_model: bool = True,
              on_done: Optional[Callable[[Any], None]] = None, **kwargs) -> None:
    """Run ``fn(*args, progress=, cancel=, **kwargs)`` in the background as this session's job.

    ``fn`` returns its result; ``on_done(result)`` swaps it into the workspace in the script
    thread once the job has finished (see :func:`apply_finished`). ``uses_model``: the job runs
    the shared model (forward/backward passes, hooks), so it waits for other sessions' such jobs;
    pure post-processing (curves, zips) passes False.
    """
    w = ws()
    if w.job is not None and w.job.running:
        st.warning(f"'{w.job.name}' is still running; wait for it or cancel it first.")
        return
    w.on_done = on_done
    w.job = Job(kind, _serialised(fn) if uses_model else fn, *args, **kwargs)
    w.job_kind = kind
    # draw the page again now: the buttons above were rendered before the job existed and would
    # still look enabled, and the sidebar would not show the job yet
    st.rerun()


def busy() -> bool:
    w = ws()
    return w.job is not None and w.job.running


def _redraw_once(w: Workspace) -> None:
    """Draw the whole page again, once, after this session's job has finished: its result is in
    the workspace now (``ws()`` swapped it in), and pages without this job's panel (the sidebar,
    a page that says the job is running) would otherwise keep showing it as running."""
    job = w.job
    if job is None or job.running or w.redrawn is job:
        return
    w.redrawn = job
    apply_finished(w)
    st.rerun()


def dismiss_outcome(*kinds: str) -> None:
    """The inputs of a finished job (of one of ``kinds``) have changed: its error, warning or
    success message is about inputs no longer on screen, so its panel stops showing it."""
    w = ws()
    job = w.job
    if job is not None and not job.running and w.job_kind in kinds:
        w.dismissed = job


def job_status() -> str:
    """'Collecting statistics: statistics: 12 of 36 layers · 14 s' for this session's running job
    (its latest progress message), '' when none runs."""
    w = ws()
    job = w.job
    if job is None or not job.running:
        return ""
    return f"{job.name}: {job.message or 'starting'} · {job.elapsed:.0f} s"


def job_panel(kind: str) -> None:
    """Progress bar + cancel button of this page's background job; reruns the page when done."""
    w = ws()
    live = w.job is not None and w.job.running and w.job_kind == kind

    @st.fragment(run_every=TICK if live else None)
    def panel():
        w = ws()
        job = w.job
        if job is None or w.job_kind != kind or job is w.dismissed:
            return
        if job.running:
            text = f"{job.message} — {job.elapsed:.0f} s"
            st.progress(job.fraction, text=text)
            if st.button("Cancel", key=f"cancel-{kind}", help="stop after the current step"):
                job.cancel()
                st.toast("Cancelling after the current step…")
            return
        _redraw_once(w)  # redraw the whole page with the job's results
        if job.cancelled:
            st.warning(f"{job.name} was cancelled after {job.elapsed:.0f} s. "
                       "Press the button again to restart it.")
        elif job.error and job.user_error:
            st.error(f"{job.error} — fix the input above and try again.")
        elif job.error:
            st.error(f"{job.name} failed: {job.error}. This is a bug in gfwsvd; the details below help report it.")
            with st.expander("Traceback"):
                st.code(job.details or "", language="text")
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


def _filler_running(w: Workspace) -> bool:
    return w.filler is not None and w.filler.running


def sidebar_status() -> None:
    """The sidebar's live part: this session's running job with its latest message, and the
    background decompositions of each method, in one fragment redrawn every :data:`TICK` seconds
    while either runs. When the job finishes, something a page waits for is ready, or nothing runs
    any more, the whole page is drawn again (and then nothing is redrawn on a timer)."""
    w = ws()
    if w.job is not None and not w.job.running:
        w.redrawn = w.job  # a full run (never a fragment's) that ws() swapped the result in for
    live = busy() or _filler_running(w)

    @st.fragment(run_every=TICK if live else None)
    def panel():
        w = ws()
        job, f = w.job, w.filler
        if job is not None and job.running:
            st.caption(f":material/hourglass_top: {job_status()}")
        else:
            _redraw_once(w)  # a job that finished since the page was drawn
        if f is not None and w.awaited:  # ws() may just have adopted them
            ready = {a for a in w.awaited if f.settled(*a)}
            if ready:
                w.awaited -= ready
                st.rerun()  # the whole page: what it waited for is ready
        if live and not busy() and not _filler_running(w):
            st.rerun()  # nothing runs any more: the page as it is now, without timers
        if w.exp is None or not w.exp.stats:
            return
        todo = pending_methods()
        if not todo:
            return
        st.caption("Background decompositions (the layer on screen first):")
        for m in todo:
            st.caption(fill_line(m))
        if f is not None and f.running:
            if st.button("Stop computing", key="filler-cancel", help="finished layers stay; resume any time"):
                f.cancel()
        elif st.button("Resume", key="filler-resume", help="compute the remaining decompositions"):
            start_filling(w)
            st.rerun()

    panel()


def fill_line(method: str) -> str:
    """One method's background progress, drawn alike in the sidebar and on the pages."""
    w = ws()
    icon = ":material/hourglass_top:" if _filler_running(w) else ":material/pause:"
    return f"{icon} {label(method)}: {fill_status(method)}"


def pending_note(method: str, what: str = "this page") -> None:
    """An on-page marker that ``method``'s decompositions are still being computed, redrawn with
    the sidebar's progress while the filler runs."""
    w = ws()

    @st.fragment(run_every=TICK if _filler_running(w) else None)
    def note():
        w = ws()
        f = w.filler
        if f is not None and method in f.errors:
            st.error(f"{label(method)}'s decomposition failed ({f.errors[method]}); {what} cannot use it. "
                     + ("Fix the input and collect again." if method in f.user_errors else "This is a bug in gfwsvd."))
        elif f is not None and method in f.methods and not f.running and not complete(method):
            st.info(f":material/pause: {label(method)} is not being computed ({fill_status(method)}); {what} fills in "
                    "when it is. Press **Resume** in the sidebar to compute the rest.")
        elif not complete(method):
            st.info(f":material/hourglass_top: {label(method)} is still being computed ({fill_status(method)}); {what} "
                    "fills in when it is ready. The other methods can be used meanwhile.")

    note()


def require_stats() -> Any:
    exp = require_experiment()
    if exp.stats is None:
        w = ws()
        if w.job is not None and w.job.running and w.job.name == "Collecting statistics":
            st.info(f":material/hourglass_top: The statistics are being collected ({w.job.message or 'starting'}); "
                    "this page fills in when they are in.")
        else:
            st.info("Collect statistics on the **Model & data** page first.")
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
