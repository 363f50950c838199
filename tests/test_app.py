"""AppTest tests of the Streamlit explorer, page by page, on a tiny BERT saved as a local folder.

AppTest does not tick ``@st.fragment(run_every=...)`` timers, so background jobs are awaited by
re-running the script until the session's Job has finished.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import pytest

import tiny_models
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app.py")
LATER_PAGES = ["pages/factors.py", "pages/layer_lab.py", "pages/ranks.py", "pages/export.py"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, one torch thread


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return str(tiny_models.save_tiny(tiny_models.tiny_bert(), tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def new_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    return at


def wait_job(at: AppTest, timeout: float = 60) -> None:
    """Re-run the script until the background job is done (what the fragment timer does in a browser)."""
    t0 = time.time()
    while (job := at.session_state["ws"].job) is not None and job.running:
        assert time.time() - t0 < timeout, f"job {job.name!r} still running after {timeout} s"
        time.sleep(0.05)
        at.run()
    at.run()  # the page as drawn after the job
    assert not at.exception, at.exception


def button(at: AppTest, label: str):
    found = [b for b in at.button if b.label == label]
    assert found, f"no button {label!r}; have {[b.label for b in at.button]}"
    return found[0]


def text_box(at: AppTest, label: str):
    found = [t for t in at.text_input if t.label == label]
    assert found, f"no text input {label!r}; have {[t.label for t in at.text_input]}"
    return found[0]


def submit_settings(at: AppTest, model: str, samples=16, eval_samples=16, max_length=32, source=None, upload=None,
                    dataset=None, label_column=None):
    if source is not None:  # outside the form: it decides which source input the form shows
        at.radio(key="calib_source").set_value(source).run()
        labels = {t.label for t in at.text_input}
        assert ("HF dataset (name or name:config)" in labels) == source.startswith("Hugging")
        assert bool(at.file_uploader) == source.startswith("Upload")
    text_box(at, "Model").set_value(model)
    if dataset is not None:
        text_box(at, "HF dataset (name or name:config)").set_value(dataset)
    if label_column is not None:
        text_box(at, "Label column").set_value(label_column)
    nums = {n.label: n for n in at.number_input}
    nums["Calibration texts"].set_value(samples)
    nums["Held-out texts"].set_value(eval_samples)
    nums["Max tokens per text"].set_value(max_length)
    if upload is not None:
        at.file_uploader[0].set_value(upload)
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception, at.exception


def charts(at: AppTest) -> list[dict]:
    """Plotly figures on the page (AppTest exposes them as unknown elements), each checked for
    data and for titled axes."""
    figs = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    for fig in figs:
        name = fig["layout"].get("title")
        assert fig["data"] and any(t.get("x") or t.get("z") for t in fig["data"]), f"empty chart {name}"
        for axis in ("xaxis", "yaxis"):
            assert fig["layout"].get(axis, {}).get("title", {}).get("text"), f"{axis} without a title in {name}"
    return figs


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


@pytest.fixture(scope="module")
def collected(tiny_dir) -> AppTest:
    """Through the UI: the tiny model loaded and its statistics collected (once per module)."""
    at = new_app()
    submit_settings(at, tiny_dir)
    wait_job(at)
    assert at.session_state["ws"].exp is not None, errors(at)
    button(at, "Collect statistics").click()
    at.run()
    wait_job(at)
    assert not errors(at)
    w = at.session_state["ws"]
    assert w.filler is not None  # the decompositions fill in after the statistics
    w.filler.wait(120)
    at.run()
    assert set(w.exp.decompositions) == {"svd", "fwsvd", "kfac", "gfwsvd"}, w.filler.errors
    return at


@pytest.fixture
def loaded(collected) -> AppTest:
    """A fresh session that starts from the collected experiment (pages never modify it)."""
    from gfwsvd_ui.state import Workspace

    done = collected.session_state["ws"]
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["ws"] = Workspace(settings=dict(done.settings), exp=done.exp)
    at.run()
    assert not at.exception
    return at


def test_default_page_renders_quickly():
    t0 = time.time()
    at = new_app()
    assert time.time() - t0 < 10
    assert at.title[0].value == "Model & data"
    assert [t.value for t in at.text_input if t.label == "Model"] == ["default"]
    assert [b.label for b in at.form_submit_button] == ["Load model and data"]
    assert any("No model loaded" in m.value for m in at.sidebar.markdown)


@pytest.mark.parametrize("page", LATER_PAGES)
def test_later_pages_ask_to_load_first(page):
    at = new_app()
    at.switch_page(page).run()
    assert not at.exception
    assert at.info and "Model & data" in at.info[0].value
    assert not at.get("plotly_chart")


def test_load_and_collect_statistics(collected):
    at = collected
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Layers to compress"] == "12"  # 2 blocks x 6 linears
    assert metrics["Calibration / held-out"] == "16 / 16"
    assert any("Collecting statistics finished" in s.value for s in at.success)
    assert len(at.dataframe) == 1
    # (the sidebar is drawn by app.py before nav.run(); AppTest 1.67 keeps it on the first run only,
    # so the browser test checks it)
    assert any("estimated time" in c.value for c in at.caption)


def test_factors_page(loaded):
    at = loaded
    at.switch_page("pages/factors.py").run()
    assert not at.exception
    figs = charts(at)
    # two spectra, four factor heatmaps, the diagonal Fisher, the effective ranks, the Fisher-aligned view
    assert len(figs) == 9
    assert len(at.dataframe) == 1  # Kronecker diagnostics of all layers
    from gfwsvd_core.explore import effective_ranks, fisher_alignment_table

    w = at.session_state["ws"]
    eff = effective_ranks(w.exp.decompositions["gfwsvd"], w.exp.stats)
    shown = {t["name"]: t["y"] for t in figs[-2]["data"]}
    assert list(shown["GFWSVD A (input side)"]) == pytest.approx([r["gfwsvd_in"] for r in eff])
    assert list(shown["K-FAC E[d dᵀ] (output side)"]) == pytest.approx([r["kfac_out"] for r in eff])
    # the Fisher-aligned view (ours): the library's numbers, per layer and for the selected layer
    fa = fisher_alignment_table(w.exp.decompositions["gfwsvd"], w.exp.stats)
    shown = {t["name"].split(":")[0]: t["y"] for t in figs[-1]["data"]}
    assert list(shown["ρ_KF"]) == pytest.approx([r["rho_kfac"] for r in fa])
    assert "ours" in figs[-1]["layout"]["title"]["text"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["ρ_KF (ours)"] == f"{fa[0]['rho_kfac']:.3f}"
    assert any("Fisher-aligned view (ours)" in h.value for h in at.subheader)
    at.selectbox(key="factors_layer").select_index(3).run()
    assert not at.exception and len(charts(at)) == 9
    assert {m.label: m.value for m in at.metric}["ρ_KF (ours)"] == f"{fa[3]['rho_kfac']:.3f}"
    # the fit is judged, and the judgement is the library's for this layer
    from gfwsvd_core.explore import judge_kronecker

    w = at.session_state["ws"]
    layer = at.selectbox(key="factors_layer").value
    d, s = w.exp.decompositions["gfwsvd"][layer], w.exp.stats[layer]
    want = judge_kronecker(d.info["kronecker"], s.num_samples, d.shape, s.sample_unit)["verdict"]
    shown = [e.value for e in (*at.success, *at.info, *at.warning) if "Kronecker fit of this layer" in e.value]
    assert shown == [next(e.value for e in {"good": at.success, "fair": at.info, "poor": at.warning}[want]
                          if "Kronecker fit" in e.value)]
    assert f"**{want}**" in shown[0]
    table = at.dataframe[0].value
    assert list(table.columns[:2]) == ["layer", "verdict"] and set(table["verdict"]) <= {"good", "fair", "poor"}


def label_of(method: str) -> str:
    from gfwsvd_core.methods import method_class

    return method_class(method).label


def test_layer_lab_page(loaded):
    at = loaded
    at.switch_page("pages/layer_lab.py").run()
    wait_job(at)  # rank curves of the first layer
    assert len(charts(at)) == 5  # four yardsticks over rank + the weighted spectra
    before = [m.value for m in at.metric]
    at.slider(key="lab_rank").set_value(2).run()
    assert not at.exception
    assert [m.value for m in at.metric] != before
    # the headline: one unit (the exact quadratic) for every method, its interval, and the best method
    from gfwsvd_core.yardstick import best_of

    w = at.session_state["ws"]
    layer = at.selectbox(key="lab_layer").value
    decs = {m: w.exp.decompositions[k][layer] for m in ("svd", "fwsvd", "kfac", "gfwsvd")
            for k in w.exp.decompositions if k == m}
    assert len(at.metric) == len(decs) == 4
    for metric, (m, d) in zip(at.metric, decs.items()):
        assert float(metric.value) == pytest.approx(float(d.exact_curve[2]), rel=6e-3)  # shown to 3 digits
        assert "95% [" in metric.delta and "rel. error" in metric.delta
    best = min(decs, key=lambda m: float(decs[m].exact_curve[2]))
    verdict = [md.value for md in at.markdown if md.value.startswith("**Lowest loss at rank 2")]
    assert len(verdict) == 1 and f": {label_of(best)}**" in verdict[0]
    assert ("resolved against every other method" in verdict[0]) == best_of(
        {m: w.quadratics[(layer, m, id(d))][1][:, 2] for m, d in decs.items()})["all_resolved"]
    button(at, "Measure at this rank").click()
    at.run()
    wait_job(at)
    assert len(at.dataframe) == 1 and not errors(at)


def test_ranks_page(loaded):
    at = loaded
    at.switch_page("pages/ranks.py").run()
    assert not at.exception
    assert len(charts(at)) == 1  # layer x rank heatmap
    kept = lambda: {m.label: m.value for m in at.metric}["kept, compressed layers"]  # noqa: E731
    assert kept() == "0.500" or float(kept()) <= 0.5
    at.slider(key="uniform_ratio").set_value(0.2).run()
    button(at, "Fill uniform ranks").click()
    at.run()
    assert not at.exception
    assert float(kept()) <= 0.2 < 0.45
    button(at, "Allocate by predicted loss").click()
    at.run()
    assert not at.exception and not errors(at)
    at.slider(key="budget_ratio").set_value(0.05).run()  # the smallest budget: feasible, or an st.error
    button(at, "Allocate by predicted loss").click()
    at.run()
    assert not at.exception
    errs = errors(at)
    if errs:  # infeasible: one clear message and the ranks untouched
        assert len(errs) == 1 and "Raise the budget" in errs[0], errs
    else:
        assert float(kept()) <= 0.05 + 1e-9

    at.text_input(key="sweep_ratios").set_value("0.5, 2, abc").run()
    button(at, "Run sweep").click()
    at.run()
    assert not at.exception
    assert any("Kept ratios must be numbers" in e for e in errors(at))

    at.multiselect(key="sweep_methods").set_value(["svd", "gfwsvd"]).run()
    at.text_input(key="sweep_ratios").set_value("0.3, 0.6").run()
    button(at, "Run sweep").click()
    at.run()
    wait_job(at)
    assert not errors(at)
    sweep = at.session_state["ws"].sweep
    assert {r["method"] for r in sweep["rows"]} >= {"svd", "gfwsvd"}
    lo, hi = sorted({r["kept_layers"] for r in sweep["rows"] if r["method"] == "svd"})
    assert 0.2 < lo <= 0.3 < hi <= 0.6  # one row per requested ratio, never above it (ranks floor)
    assert len(charts(at)) == 1 + len(sweep["rows"][0]["metrics"])  # heatmap + one chart per metric
    verdicts = [m.value for m in at.markdown if m.value.startswith("Best method per ratio")]
    assert len(verdicts) == 1 and verdicts[0].count(" kept** — ") == 2  # one line per ratio


def test_ranks_page_chooses_a_method_per_layer(loaded):
    at = loaded
    at.switch_page("pages/ranks.py").run()
    assert "Auto (per layer)" in at.segmented_control(key="rank_method_pick").options  # statistics in two folds
    at.segmented_control(key="rank_method_pick").set_value("auto").run()
    assert not at.exception
    button(at, "Choose a method per layer").click()
    at.run()
    wait_job(at)
    w = at.session_state["ws"]
    decs = w.exp.decompositions["auto"]
    assert set(decs) == set(w.exp.stats)
    assert len(charts(at)) == 1  # the heatmap, now on auto's held-out losses
    button(at, "Allocate by predicted loss").click()
    at.run()
    assert not at.exception and "held-out" in w.rank_rule
    # every compressed layer has a chosen method among the explorer's methods
    chosen = {n: decs[n].method_at(r) for n, r in w.ranks.items() if r is not None}
    assert chosen and set(chosen.values()) <= set(decs[next(iter(decs))].info["candidates"])
    assert any("Current ranks: allocated by the held-out" in m.value for m in at.caption)
    at.switch_page("pages/export.py").run()
    assert at.selectbox(key="export_method").value == "auto"


def test_export_page(loaded, tmp_path, monkeypatch):
    import torch

    from gfwsvd_core.io import load_compressed

    root = tmp_path / "out-root"
    monkeypatch.setenv("GFWSVD_OUTPUT_ROOT", str(root))
    at = loaded
    at.switch_page("pages/export.py").run()
    assert not at.exception
    assert not at.download_button
    button(at, "Compress and evaluate").click()
    at.run()
    wait_job(at)
    assert not errors(at)
    comp, rep = at.session_state["ws"].compressed
    metrics = at.dataframe[0].value
    assert list(metrics["metric"]) == list(rep["metrics"])  # one row per metric, dense vs compressed
    assert [w.value for w in at.warning] == rep["warnings"]  # every fallback on screen, none invented
    button(at, "Prepare zip").click()
    at.run()
    wait_job(at)  # written and zipped in the background
    assert [d.label for d in at.download_button] == ["Download compressed model (.zip)"]
    data = at.session_state["ws"].export_zip
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path)
    model = load_compressed(tmp_path / "compressed")
    exp = at.session_state["ws"].exp
    batch = {k: v for k, v in exp.eval_batches[0].items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, comp.model(**batch).last_hidden_state)

    # Save to a path: inside the output root only, never into a non-empty folder
    for outside in ("../elsewhere", str(tmp_path / "elsewhere"), "/proc/not-writable/here"):
        at.text_input(key="export_path").set_value(outside).run()
        button(at, "Save").click()
        at.run()
        assert not at.exception
        assert any("outside the output root" in e for e in errors(at)), errors(at)
    assert not (tmp_path / "elsewhere").exists()
    busy_dir = root / "taken"
    busy_dir.mkdir(parents=True)
    (busy_dir / "mine.txt").write_text("keep me")
    at.text_input(key="export_path").set_value("taken").run()
    button(at, "Save").click()
    at.run()
    assert any("is not empty" in e for e in errors(at)), errors(at)
    assert [p.name for p in busy_dir.iterdir()] == ["mine.txt"] and (busy_dir / "mine.txt").read_text() == "keep me"
    at.text_input(key="export_path").set_value("run-1").run()
    button(at, "Save").click()
    at.run()
    assert not errors(at)
    assert [s.value for s in at.success] == [f"Saved to {root.resolve() / 'run-1'}"]
    torch.testing.assert_close(load_compressed(root / "run-1")(**batch).last_hidden_state,
                               comp.model(**batch).last_hidden_state)


def test_the_seed_methods_and_options_in_the_app(loaded):
    """SVD-LLM V2, the closed-form update and sequential calibration: in the sweep (with their own
    curves), the Layer lab (output error with and without the update) and Export."""
    at = loaded
    w = at.session_state["ws"]
    at.switch_page("pages/layer_lab.py").run()
    wait_job(at)
    n_charts = len(charts(at))
    at.toggle(key="lab_update").set_value(True).run()
    assert not at.exception and len(charts(at)) == n_charts + 1
    for m, e in w.update_effects["effects"].items():  # the update never raises the output error
        assert all(b <= a + 1e-6 for a, b in zip(e["without"], e["with"]) if a is not None), m

    at.switch_page("pages/ranks.py").run()
    at.multiselect(key="sweep_methods").set_value(["svd", "svdllm2", "svdllm[sequential=true]"]).run()
    at.checkbox(key="sweep_update").check().run()
    at.text_input(key="sweep_ratios").set_value("0.4").run()
    button(at, "Run sweep").click()
    at.run()
    wait_job(at)
    assert not errors(at)
    keys = {r["method"] for r in w.sweep["rows"]}
    assert keys == {"dense", "svd", "svdllm2", "svdllm[sequential=true]", "svd[update=true]", "svdllm2[update=true]",
                    "svdllm[sequential=true,update=true]"}
    traces = {t["name"]: t for t in charts(at)[1]["data"]}  # the first metric's curves (after the heatmap)
    assert {"SVD-LLM V2", "SVD + update", "SVD-LLM + update + sequential"} <= set(traces)
    assert traces["SVD + update"]["line"]["dash"] == "dot" and traces["SVD"]["line"].get("dash", "solid") == "solid"

    at.switch_page("pages/export.py").run()
    at.selectbox(key="export_method").set_value("kfac").run()
    at.checkbox(key="export_update").check().run()
    button(at, "Compress and evaluate").click()
    at.run()
    wait_job(at)
    assert not errors(at)
    comp, rep = w.compressed
    assert rep["method_key"] == "kfac[update=true]" and comp.method == "kfac[update=true]"
    assert any("K-FAC + update" in h.value for h in at.subheader)


def test_user_errors_are_messages_not_tracebacks(tmp_path):
    at = new_app()
    submit_settings(at, "no/such-model-xyz")
    wait_job(at)
    msgs = errors(at)
    assert msgs and "no/such-model-xyz" in msgs[0] and "local folder" in msgs[0]
    assert at.session_state["ws"].exp is None

    submit_settings(at, "default", source="Upload a file")
    assert any("Choose a .txt, .jsonl or .csv file" in e for e in errors(at))
    assert at.session_state["ws"].job.error  # nothing new was started

    submit_settings(at, "default", source="Hugging Face dataset")
    assert any("dataset name" in e for e in errors(at))

    submit_settings(at, "default", source="Upload a file", upload=("notes.txt", b"\x00\x01binary", "text/plain"))
    wait_job(at)
    assert any("binary" in e for e in errors(at))
    assert any("notes.txt" in e for e in errors(at)) and not any("gfwsvd-upload-" in e for e in errors(at)), errors(at)

    submit_settings(at, "default", source="Upload a file", upload=("notes.txt", b"one text only\n", "text/plain"))
    wait_job(at)
    assert any("text" in e and "more" in e for e in errors(at)), errors(at)
    assert not at.exception


def test_an_error_goes_once_the_input_is_fixed(tiny_dir):
    """An error is about the inputs it was made for: a new source, or the form submitted again,
    takes it off the screen, and a load that then succeeds leaves none behind."""
    at = new_app()
    submit_settings(at, tiny_dir, label_column=" label ")  # the default corpus has no columns
    assert at.session_state["ws"].settings["label_column"] == "label"  # the label column reaches the library
    wait_job(at)
    msgs = errors(at)
    assert len(msgs) == 1 and "label_column" in msgs[0], msgs

    at.radio(key="calib_source").set_value("Hugging Face dataset").run()  # the input changes
    assert not at.exception and errors(at) == []  # the failed load's error was about the old input

    submit_settings(at, tiny_dir)  # the HF source, its name left empty
    assert errors(at) == ["Enter a dataset name, or choose the default corpus."]
    text_box(at, "HF dataset (name or name:config)").set_value("no-such-dataset-xyz")
    at.form_submit_button[0].click()
    at.run()  # filled in: the load starts, the message about the empty name is gone
    assert not any("Enter a dataset name" in e for e in errors(at)), errors(at)
    wait_job(at)
    msgs = errors(at)
    assert len(msgs) == 1 and "no-such-dataset-xyz" in msgs[0], msgs  # this input's error, not an older one

    submit_settings(at, tiny_dir, source="Default corpus (pydoc topics)", label_column="")
    assert errors(at) == []
    wait_job(at)
    assert errors(at) == [] and at.session_state["ws"].exp is not None
    assert [s.value for s in at.success if "finished" in s.value][0].startswith("Loading model and data finished")
    assert at.session_state["ws"].settings["label_column"] is None  # empty -> the library's default


@pytest.fixture
def served(monkeypatch):
    """AppTest as the server runs the app: app.py (with its sidebar) on every run, and a record of
    the fragment timers each run asks the browser for (``served.timers``: [(seconds, fragment id)])
    and of which fragment drew each text in the sidebar (``served.sidebar``: {text: fragment id},
    '' outside any fragment). AppTest never fires those timers; the browser test sees them fire.

    AppTest resets ``PagesManager.uses_pages_directory`` before every run; with a ``pages/`` folder
    beside app.py it then runs the page file alone from the second run on. The server keeps the
    False that ``st.navigation`` sets on the first run, and so does this fixture."""
    from types import SimpleNamespace

    import streamlit.testing.v1.local_script_runner as lsr
    from streamlit.runtime.pages_manager import PagesManager

    out = SimpleNamespace(timers=[], sidebar={})
    init, run = PagesManager.__init__, lsr.LocalScriptRunner.run

    def served_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    def recorded_run(self, *args, **kwargs):
        tree = run(self, *args, **kwargs)
        msgs = self.forward_msgs()
        out.timers = [(m.auto_rerun.interval, m.auto_rerun.fragment_id) for m in msgs if m.WhichOneof("type") == "auto_rerun"]
        out.sidebar = {m.delta.new_element.markdown.body: m.delta.fragment_id for m in msgs
                       if m.WhichOneof("type") == "delta" and m.metadata.delta_path[:1] == [1]
                       and m.delta.new_element.WhichOneof("type") == "markdown"}
        return tree

    monkeypatch.setattr(PagesManager, "__init__", served_init)
    monkeypatch.setattr(lsr.LocalScriptRunner, "run", recorded_run)
    return out


def job_lines(at: AppTest) -> list[str]:
    return [c.value for c in at.sidebar.caption if c.value.startswith(":material/hourglass_top: Collecting")]


def test_the_sidebar_shows_the_running_jobs_latest_message(collected, served, monkeypatch):
    """The sidebar names a job as soon as it starts and shows its latest progress message on every
    run, on any page, redrawing itself on a timer while the job runs and not after."""
    import threading

    from gfwsvd_core import pipeline
    from gfwsvd_core.stats import Cancelled
    from gfwsvd_ui.state import TICK, Workspace

    said = ["statistics: batch 1 of 2 (test stand-in)", "GFWSVD: Kronecker factors of layer 3 (test stand-in)"]
    reported, go_on = [threading.Event() for _ in said], [threading.Event() for _ in said]

    def stepwise_collect(exp, methods, progress=None, cancel=None, **kw):
        for i, message in enumerate(said):
            progress(i, len(said), message)
            reported[i].set()
            while not go_on[i].wait(0.05):
                if cancel.is_set():
                    raise Cancelled("cancelled")

    monkeypatch.setattr(pipeline, "collect", stepwise_collect)
    done = collected.session_state["ws"]
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["ws"] = Workspace(settings=dict(done.settings), exp=done.exp)
    at.run()
    assert not at.exception and job_lines(at) == []
    assert any(m.value == "statistics: collected" for m in at.sidebar.markdown)
    assert served.timers == []  # nothing runs: nothing is redrawn on a timer
    try:
        button(at, "Collect statistics").click()
        at.run()
        lines = job_lines(at)  # at once, before the job has said anything (or with what it said first)
        assert len(lines) == 1 and lines[0].startswith(":material/hourglass_top: Collecting statistics: "), lines
        assert reported[0].wait(10)
        at.run()
        assert len(job_lines(at)) == 1 and said[0] in job_lines(at)[0], job_lines(at)
        at.switch_page("pages/ranks.py").run()  # no progress bar of this job here: the sidebar is where it shows
        assert not at.exception
        go_on[0].set()
        assert reported[1].wait(10)
        at.run()
        lines = job_lines(at)
        assert len(lines) == 1 and said[1] in lines[0] and said[0] not in lines[0], lines  # the latest, not the first
        [(every, timer)] = served.timers
        assert every == TICK and served.sidebar[lines[0]] == timer  # the line is redrawn on the timer between runs
    finally:
        for e in go_on:
            e.set()
    wait_job(at)
    assert not at.exception and job_lines(at) == [] and served.timers == []


def test_cancelled_job_is_a_message(loaded, monkeypatch):
    """A cancelled job ends in a warning that says how to restart, never a traceback."""
    from gfwsvd_core import pipeline
    from gfwsvd_core.stats import Cancelled

    def slow_collect(exp, methods, progress=None, cancel=None, **kw):
        for i in range(600):  # ~60 s unless cancelled
            progress(i, 600, "statistics (test stand-in)")
            if cancel.wait(0.1):
                raise Cancelled("statistics collection cancelled")

    monkeypatch.setattr(pipeline, "collect", slow_collect)
    at = loaded
    button(at, "Collect statistics").click()
    at.run()
    assert at.session_state["ws"].job.running
    assert button(at, "Collect statistics").disabled  # drawn again at once: no longer looks enabled
    button(at, "Cancel").click()
    at.run()
    wait_job(at, timeout=10)
    assert any("was cancelled" in w.value and "again" in w.value for w in at.warning)
    assert not errors(at) and not at.exception


# ------------------------------------------------------------------ one registry, results, cache


def test_the_app_reads_methods_and_tasks_from_the_registries():
    from gfwsvd_core.methods import available_methods, explorer_methods, method_class
    from gfwsvd_core.tasks import available_tasks
    from gfwsvd_ui import state

    assert state.METHODS == explorer_methods() == ["svd", "fwsvd", "kfac", "gfwsvd"]
    for m in available_methods():
        cls = method_class(m)
        assert (state.label(m), state.color(m), state.loss_units(m)) == (cls.label, cls.color, cls.loss_units)
    assert state.label("dense") == "dense" and state.color("dense") == state.DENSE_COLOR
    # no page or UI helper keeps its own table of method names, colours or tasks
    root = Path(APP).parent
    for f in [*root.glob("pages/*.py"), *root.glob("gfwsvd_ui/*.py")]:
        text = f.read_text()
        for fragment in ('"svd", "fwsvd"', '"#d62728"', '"retrieval", "causal-lm"', 'in ("svd", "fwsvd")'):
            assert fragment not in text, (f.name, fragment)
    from gfwsvd_core.tasks import task_class

    at = new_app()
    task_box = [s for s in at.selectbox if s.label == "Task"][0]
    assert task_box.options == ["auto (from the model's config)"] + [task_class(t).label for t in available_tasks()]


def test_job_results_are_swapped_in_only_when_done():
    import threading

    from gfwsvd_core.jobs import Job
    from gfwsvd_ui.state import Workspace, apply_finished

    w = Workspace()
    gate = threading.Event()

    def fn(progress, cancel):
        gate.wait(10)
        return {"rows": [1, 2]}

    w.job = Job("sweep", fn)
    w.on_done = lambda result: setattr(w, "sweep", result)
    assert not apply_finished(w) and w.sweep is None  # running: nothing half-written
    gate.set()
    w.job.wait(10)
    assert apply_finished(w) and w.sweep == {"rows": [1, 2]}
    w.sweep = None
    assert not apply_finished(w) and w.sweep is None  # applied once

    def broken(progress, cancel):
        raise RuntimeError("a bug")

    w.job = Job("broken", broken).wait(10)
    assert apply_finished(w) and w.sweep is None and not w.job.user_error
    from gfwsvd_core.errors import DataError

    def user(progress, cancel):
        raise DataError("bad data")

    assert Job("user", user).wait(10).user_error


def test_shared_model_cache_locks_per_key_and_evicts(monkeypatch):
    import threading

    from gfwsvd_ui import state

    monkeypatch.setattr(state, "_MODELS", state.collections.OrderedDict())
    monkeypatch.setattr(state, "MAX_MODELS", 2)
    calls: list[str] = []
    slow_started, release = threading.Event(), threading.Event()

    def loader(name, task=None, device=None):
        calls.append(name)
        if name == "slow":
            slow_started.set()
            release.wait(10)
        return f"bundle:{name}"

    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, state.shared_model("slow", None, None, loader)))
               for i in range(3)]
    for t in threads:
        t.start()
    assert slow_started.wait(10)
    # another model loads while "slow" is still loading: no global lock held while loading
    assert state.shared_model("fast", None, None, loader) == "bundle:fast"
    release.set()
    for t in threads:
        t.join(10)
    assert set(results.values()) == {"bundle:slow"} and calls.count("slow") == 1  # loaded once for three sessions
    state.shared_model("third", None, None, loader)
    assert list(state._MODELS) == [("slow", None, None), ("third", None, None)]  # "fast" was least recently used
    state.shared_model("fast", None, None, loader)
    assert calls.count("fast") == 2


def test_pages_are_usable_while_gfwsvd_computes_and_the_layer_on_screen_comes_first(loaded, monkeypatch):
    import threading

    from gfwsvd_core import background
    from gfwsvd_core.methods.gfwsvd import GFWSVD

    gate, order = threading.Event(), []
    real = GFWSVD.weights

    def gated(self, stats):
        gate.wait(30)
        order.append(stats.name)
        return real(self, stats)

    monkeypatch.setattr(GFWSVD, "weights", gated)
    at = loaded
    w = at.session_state["ws"]
    exp = w.exp.fork()  # the module's experiment stays complete for the other tests
    exp.decompositions.pop("gfwsvd")
    w.exp = exp
    w.filler = background.fill(exp, ["gfwsvd"])
    try:
        layers = list(exp.stats)
        at.switch_page("pages/factors.py").run()
        assert not at.exception and any("still being computed" in i.value for i in at.info)
        at.selectbox(key="factors_layer").set_value(layers[-1]).run()
        assert not at.exception and any("still being computed" in i.value for i in at.info)
        at.switch_page("pages/ranks.py").run()  # the other methods work meanwhile
        assert not at.exception and any("still being computed" in i.value for i in at.info)
        assert button(at, "Allocate by predicted loss").disabled
        assert len(charts(at)) == 1
        at.switch_page("pages/export.py").run()
        assert not at.exception and button(at, "Compress and evaluate").disabled
        at.selectbox(key="export_method").set_value("svd").run()
        assert not button(at, "Compress and evaluate").disabled
    finally:
        gate.set()
    w.filler.wait(60)
    assert order[1] == layers[-1]  # asked for by the page while the first layer was computing
    assert sorted(order) == sorted(layers)
    at.switch_page("pages/factors.py").run()  # ws() adopts the finished method
    assert not at.exception and "gfwsvd" in exp.decompositions
    assert not any("still being computed" in i.value for i in at.info) and len(charts(at)) == 9


def test_a_failing_background_method_is_an_error_on_its_pages_not_a_crash(loaded, monkeypatch):
    from gfwsvd_core import background
    from gfwsvd_core.methods.gfwsvd import GFWSVD

    def broken(self, stats):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(GFWSVD, "weights", broken)
    at = loaded
    w = at.session_state["ws"]
    exp = w.exp.fork()
    exp.decompositions.pop("gfwsvd")
    w.exp = exp
    w.filler = background.fill(exp, ["gfwsvd"]).wait(30)
    assert "planted failure" in w.filler.errors["gfwsvd"]
    at.switch_page("pages/factors.py").run()
    assert not at.exception and any("planted failure" in e for e in errors(at))
    at.switch_page("pages/ranks.py").run()
    assert not at.exception and any("planted failure" in e for e in errors(at))
