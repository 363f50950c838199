"""The explorer in a real browser: Playwright's Python API driving Debian's Chromium.

One flow on the embedded default model with a small sample: load, collect statistics, open every
page from the sidebar, check that charts render and no exception element appears, move a rank,
compress, evaluate, download the zip and load it with ``load_compressed``. A full-page screenshot
of each page is taken; it replaces ``assets/screenshots/<page>.png`` (used by the README) only
when ``GFWSVD_SCREENSHOTS=1`` is set, and goes to a temporary folder otherwise.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse
import urllib.request
import zipfile
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} not found: install Debian's Chromium (apt-get install -y chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed: pip install -e '.[test]'")

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "assets" / "screenshots" if os.environ.get("GFWSVD_SCREENSHOTS") == "1" else None
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
LONG = 420_000  # ms: statistics on the default model on a 2-core CPU (busy machines are slow)
PLOT = '[data-testid="stPlotlyChart"] .js-plotly-plot'
EXCEPTION = '[data-testid="stException"]'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("streamlit") / "server.log", "w+")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless=true", "--server.address=127.0.0.1",
         f"--server.port={port}", "--browser.gatherUsageStats=false", "--server.fileWatcherType=none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()

    request.addfinalizer(stop)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() - t0 > 60:
            log.seek(0)
            pytest.fail(f"streamlit did not start (exit {proc.poll()}):\n{log.read()[-3000:]}")
        time.sleep(0.2)
    return url, log


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 900}, accept_downloads=True)
        outside: list[str] = []  # every request that would leave this machine (the app must work offline)

        def record(request):
            host = urlparse(request.url).hostname
            if request.url.split(":", 1)[0] in ("http", "https", "ws", "wss") and host not in ("127.0.0.1", "localhost"):
                outside.append(request.url)

        context.on("request", record)
        pg = context.new_page()
        pg.outside_requests = outside
        pg.set_default_timeout(60_000)
        yield pg
        context.close()
        browser.close()


def no_exception(page) -> None:
    assert page.locator(EXCEPTION).count() == 0, page.locator(EXCEPTION).first.inner_text()


def shot(page, name: str, folder=None) -> None:
    """Full-page screenshot: Streamlit scrolls inside its main container, so grow the viewport to fit."""
    page.wait_for_timeout(800)  # let plotly finish its transitions
    height = page.evaluate(
        "() => Math.max(...['[data-testid=stMain]', '[data-testid=stMainBlockContainer]', '[data-testid=stAppViewContainer]']"
        ".map(s => document.querySelector(s)).filter(Boolean).map(e => e.scrollHeight))")
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": min(max(int(height) + 40, 900), 6000)})
    page.wait_for_timeout(800)
    folder = SHOTS or folder
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
    page.set_viewport_size(size)


def go(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).click()
    page.get_by_role("heading", name=title, level=1).wait_for()


def charts_render(page, n: int, timeout: int = 60_000) -> None:
    page.locator(PLOT).nth(n - 1).wait_for(timeout=timeout)
    # a drawn plotly figure has its SVG layers with traces
    page.wait_for_function(f"n => [...document.querySelectorAll('{PLOT}')].filter(e => e.querySelector('.main-svg')).length >= n",
                           arg=n, timeout=timeout)
    no_exception(page)


def metric(page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]').filter(has=page.get_by_text(label, exact=True))
    return box.locator('[data-testid="stMetricValue"]').inner_text()


def test_explorer_end_to_end(server, page, tmp_path):
    url, log = server
    timings = {}
    t0 = time.time()
    page.goto(url)
    load = page.get_by_role("button", name="Load model and data")
    load.wait_for(timeout=30_000)
    timings["first page interactive"] = time.time() - t0
    assert timings["first page interactive"] < 30
    assert page.locator('[data-testid="stSidebarUserContent"]').get_by_text("No model loaded.").is_visible()

    # --- Model & data: small sample, load, collect statistics
    for label, value in (("Calibration texts", 16), ("Held-out texts", 16), ("Max tokens per text", 64)):
        page.get_by_label(label).fill(str(value))  # no Enter: that would submit the form early
    load.click()
    page.get_by_text("Loading model and data finished").wait_for(timeout=120_000)
    assert metric(page, "Calibration / held-out") == "16 / 16"
    collect = page.get_by_role("button", name="Collect statistics")
    t = time.time()
    collect.click()
    # the sidebar names the job at once and redraws its line (latest message, seconds) while it runs
    job_line = ("() => [...document.querySelectorAll('[data-testid=stSidebarUserContent] [data-testid=stCaptionContainer]')]"
                ".map(e => e.innerText).filter(s => s.includes('Collecting statistics:'))")
    page.wait_for_function(f"() => ({job_line})().length > 0", timeout=5_000)
    lines = set()
    finished = page.get_by_text("Collecting statistics finished")
    while not finished.count():
        assert time.time() - t < LONG / 1000, "the statistics did not finish"
        lines.update(page.evaluate(job_line))
        page.wait_for_timeout(250)
    timings["statistics"] = time.time() - t  # click -> every page usable (decompositions fill in after)
    t_collect = t
    if timings["statistics"] > 3:  # a line drawn once (not redrawn) would never change
        assert len(lines) >= 2, lines
    page.wait_for_function(f"() => ({job_line})().length === 0", timeout=10_000)  # gone once it has finished
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    assert page.locator('[data-testid="stSidebarUserContent"]').get_by_text("statistics: collected").is_visible()
    no_exception(page)
    shot(page, "model_data", tmp_path)

    # --- Fisher factors: two spectra, four factor heatmaps, the diagonal Fisher, the effective ranks
    go(page, "Fisher factors")
    charts_render(page, 8)
    page.locator('[data-testid="stDataFrame"]').first.wait_for()
    shot(page, "factors", tmp_path)

    # --- Layer lab: curves computed in the background, then a rank moved with the keyboard
    go(page, "Layer lab")
    charts_render(page, 5, timeout=LONG)
    first = page.locator('[data-testid="stMetricValue"]').first
    before = first.inner_text()
    slider = page.get_by_role("slider")
    slider.focus()
    t = time.time()
    slider.press("ArrowLeft")  # one rank down: the page re-truncates cached SVDs
    page.wait_for_function("([sel, old]) => document.querySelector(sel).innerText !== old",
                           arg=['[data-testid="stMetricValue"]', before], timeout=30_000)
    timings["rank move -> new numbers"] = time.time() - t
    for _ in range(4):
        slider.press("ArrowLeft")
    charts_render(page, 5)
    shot(page, "layer_lab", tmp_path)

    # --- Ranks: uniform ranks at a lower ratio change the parameter count
    go(page, "Ranks")
    charts_render(page, 1)
    kept = metric(page, "kept, compressed layers")
    uniform = page.get_by_role("slider").first
    uniform.focus()
    for _ in range(4):
        uniform.press("ArrowLeft")  # 0.50 -> 0.30
    page.wait_for_timeout(500)
    page.get_by_role("button", name="Fill uniform ranks").click()
    page.wait_for_function(
        "([label, old]) => [...document.querySelectorAll('[data-testid=stMetric]')].some("
        "m => m.innerText.includes(label) && !m.innerText.includes(old))",
        arg=["kept, compressed layers", kept], timeout=30_000)
    assert float(metric(page, "kept, compressed layers")) < float(kept)
    charts_render(page, 1)
    # a small sweep: SVD vs GFWSVD at two kept ratios, one chart per metric against the dense line
    for name in ("FWSVD", "K-FAC"):
        page.get_by_role("button", name=f"Remove {name}").click()
        page.get_by_role("button", name=f"Remove {name}").wait_for(state="detached")
    ratios = page.get_by_role("textbox", name="Kept ratios")
    ratios.fill("0.3, 0.6")
    ratios.press("Enter")
    page.wait_for_timeout(500)
    run_sweep = page.get_by_role("button", name="Run sweep")
    deadline = time.time() + LONG / 1000
    while not run_sweep.is_enabled():  # enabled once every method's decompositions are in
        assert time.time() < deadline, "the background decompositions did not finish"
        page.wait_for_timeout(500)
    timings["collect click -> all four methods ready"] = time.time() - t_collect
    t = time.time()
    run_sweep.click()
    page.get_by_text("Running sweep finished").wait_for(timeout=LONG)
    timings["sweep (2 methods x 2 ratios)"] = time.time() - t
    charts_render(page, 3)  # heatmap + at least two metric charts
    page.locator('[data-testid="stDataFrame"]').last.wait_for()
    shot(page, "ranks", tmp_path)

    # --- Export: compress, evaluate, zip, download, load again
    go(page, "Export")
    t = time.time()
    page.get_by_role("button", name="Compress and evaluate").click()
    page.get_by_text("Compressing and evaluating finished").wait_for(timeout=LONG)
    timings["compress + evaluate"] = time.time() - t
    page.get_by_role("button", name="Prepare zip").click()
    download_button = page.get_by_role("button", name="Download compressed model (.zip)")
    download_button.wait_for(timeout=120_000)
    no_exception(page)
    shot(page, "export", tmp_path)
    with page.expect_download() as info:
        download_button.click()
    path = tmp_path / "model.zip"
    info.value.save_as(path)
    with zipfile.ZipFile(path) as zf:
        zf.extractall(tmp_path)

    import torch

    from gfwsvd_core.factorized import LowRankLinear
    from gfwsvd_core.io import load_compressed

    model = load_compressed(tmp_path / "compressed")
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "compressed"))
    with torch.no_grad():
        out = model(**tok(["a compressed sentence encoder", "still runs"], return_tensors="pt", padding=True))
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    assert hidden.shape[:2][0] == 2 and torch.isfinite(hidden).all()
    no_exception(page)
    assert page.outside_requests == [], f"requests left 127.0.0.1: {sorted(set(page.outside_requests))[:10]}"
    print("\nbrowser timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
