"""The dashboard in a real headless browser: a live smoke run, then every page over a FERD/DFRD pair.

Drives the real engine through `streamlit run`, so the first test also trains (and caches) the embedded
teacher. Screenshots land in assets/screenshots/. Set FERD_E2E_TIMINGS to a file path to get the measured
latencies as JSON. Run: `.venv/bin/python -m pytest tests/e2e -x -s -m e2e`.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import CHROMIUM, ROOT, VIEWPORT, AppServer

if not CHROMIUM.exists():
    pytest.skip(f"system Chromium not found at {CHROMIUM}", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

from ferd.config import load_preset  # noqa: E402
from ferd.labels import started_at  # noqa: E402
from ferd.store import RunStore  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCREENSHOTS = ROOT / "assets" / "screenshots"
PRESET = "smoke"
RUN_TIMEOUT_S = 900.0
"""A smoke run; the first one also trains the embedded teacher (minutes on a busy CPU)."""
UI_TIMEOUT_MS = 60_000
POLL_S = 0.5
MAIN = '[data-testid="stMain"]'
PROGRESS = re.compile(r"Epoch (\d+)/(\d+|\?) · (\w+)")
ENDED = ("finished", "stopped", "failed")
# Points drawn per chart (plotly's own trace lengths): grows as events arrive.
CHART_POINTS_JS = """() => Array.from(document.querySelectorAll('[data-testid="stMain"] .js-plotly-plot'))
    .map(g => (g._fullData || []).reduce((n, t) => n + (t._length || 0), 0))"""
BAR_TRACES_JS = """() => Array.from(document.querySelectorAll('[data-testid="stMain"] .js-plotly-plot'))
    .flatMap(g => (g._fullData || []).filter(t => t.type === 'bar' && t._length > 0 && t.visible !== false)).length"""


def record_timings(**seconds: float) -> None:
    """Print the timings and merge them into the JSON file named by $FERD_E2E_TIMINGS (when set)."""
    for name, value in seconds.items():
        print(f"[e2e timing] {name}: {value:.1f} s")
    target = os.environ.get("FERD_E2E_TIMINGS")
    if not target:
        return
    path = Path(target)
    data = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}
    data.update({k: round(v, 2) for k, v in seconds.items()})
    path.write_text(json.dumps(data, indent=2) + "\n")


def run_ids(server: AppServer, *, method: str | None = None, status: str | None = None) -> set[str]:
    with RunStore(server.home) as store:
        return {r.run_id for r in store.list_runs(status=status) if method is None or r.method == method}


def run_status(server: AppServer, run_id: str) -> str:
    with RunStore(server.home) as store:
        return store.get_run(run_id).status


def assert_no_exception(page) -> None:
    expect(page.locator('[data-testid="stException"]')).to_have_count(0)


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the selectbox labelled `label` and wait until it shows."""
    box = page.get_by_role("combobox", name=label, exact=True)
    box.click()
    page.get_by_role("option", name=option, exact=True).click()
    expect(page.get_by_role("listbox")).to_have_count(0)
    expect(box).to_have_value(option)


def open_page(page, nav_title: str, heading: str) -> None:
    """Follow the sidebar link `nav_title` and wait for the page's title."""
    page.locator('[data-testid="stSidebarNav"] a').filter(has_text=nav_title).click()
    expect(page.locator(f"{MAIN} h1").filter(has_text=heading)).to_be_visible(timeout=UI_TIMEOUT_MS)


def save_screenshot(page, name: str) -> Path:
    """The whole page: Streamlit scrolls inside its main container, so grow the viewport to its height."""
    height = page.evaluate(f"() => document.querySelector('{MAIN}').scrollHeight")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], height)})
    page.wait_for_timeout(1500)  # let plotly re-layout at the new size
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(VIEWPORT)
    assert path.stat().st_size > 10_000, f"{path} looks empty"
    return path


def progress(page) -> tuple[int, str, str] | None:
    """(epoch, total, status) of the Live page's progress bar, None before it shows."""
    bar = page.locator(f'{MAIN} [data-testid="stProgress"]')
    if bar.count() == 0:
        return None
    match = PROGRESS.search(bar.first.inner_text())
    return (int(match[1]), match[2], match[3]) if match else None


def start_run(page, server: AppServer, method_label: str) -> tuple[str, float]:
    """On the Live page, start a smoke run of `method_label`; returns its run id and the click time."""
    expect(page.locator(f"{MAIN} h1").filter(has_text="Live run")).to_be_visible(timeout=UI_TIMEOUT_MS)
    choose(page, "Preset", PRESET)
    choose(page, "Method", method_label)
    expect(page.get_by_role("spinbutton", name="epochs E", exact=True)).to_have_value(
        str(load_preset(PRESET).epochs), timeout=UI_TIMEOUT_MS)
    before = run_ids(server)
    page.get_by_role("button", name="Start", exact=True).click()
    clicked = time.monotonic()
    deadline = clicked + UI_TIMEOUT_MS / 1000
    while not (new := run_ids(server) - before):
        assert time.monotonic() < deadline, "pressing Start created no run in the store"
        time.sleep(POLL_S)
    (run_id,) = new
    expect(page.get_by_role("combobox", name="Run", exact=True)).to_have_value(
        re.compile(re.escape(started_at(run_id))), timeout=UI_TIMEOUT_MS)
    return run_id, clicked


def wait_finished(page, server: AppServer, run_id: str) -> None:
    """Wait until the Live page shows the run finished; fail with the page's text if it ended otherwise."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (state := progress(page)) is None or state[2] not in ENDED:
        assert time.monotonic() < deadline, f"run {run_id} did not end within {RUN_TIMEOUT_S:.0f} s: {state}"
        time.sleep(POLL_S)
    assert state[2] == "finished", f"run {run_id} ended {state[2]}:\n{page.locator(MAIN).inner_text()[:2000]}"
    assert run_status(server, run_id) == "finished"


def test_live_run_charts_appear_and_update(app_page, app_server: AppServer) -> None:
    page = app_page
    run_id, clicked = start_run(page, app_server, "FERD")

    first_chart = first_points = None
    observed: list[tuple[int, tuple[int, ...]]] = []  # (epoch, points per chart) while charts were visible
    deadline = clicked + RUN_TIMEOUT_S
    while True:
        state = progress(page)
        charts = page.locator(f"{MAIN} .js-plotly-plot")
        if charts.count() and charts.first.is_visible():
            now = time.monotonic()
            first_chart = first_chart or now
            points = tuple(page.evaluate(CHART_POINTS_JS))
            if sum(points) and first_points is None:
                first_points = now
            if state is not None:
                observed.append((state[0], points))
        if state is not None and state[2] in ENDED:
            break
        assert time.monotonic() < deadline, f"run {run_id} did not end within {RUN_TIMEOUT_S:.0f} s: {state}"
        time.sleep(POLL_S)
    finished = time.monotonic()
    assert state[2] == "finished", f"run ended {state[2]}:\n{page.locator(MAIN).inner_text()[:2000]}"
    assert run_status(app_server, run_id) == "finished"
    assert_no_exception(page)

    assert first_chart is not None, "no plotly chart appeared on the Live page"
    total = int(state[1])
    assert state[0] == total
    assert observed, "the progress bar never showed next to the charts"
    epochs_seen = {epoch for epoch, _ in observed}
    assert min(epochs_seen) < total, f"charts only appeared once the run had ended (epochs seen {epochs_seen})"
    assert len({points for _, points in observed}) >= 2, "the charts never changed while the run trained"
    # Every chart ends with data, more than it showed when it first appeared.
    page.wait_for_function(f"() => ({CHART_POINTS_JS})().length >= 5", timeout=UI_TIMEOUT_MS)
    final_points = page.evaluate(CHART_POINTS_JS)
    assert sum(final_points) > sum(observed[0][1])
    # The headline metrics of the final evaluation, and the training attack's strength beside the heatmap.
    for label in ("PGD-20 worst class", "PGD-20 NSD", "attack success", "target entropy"):
        expect(page.locator(f'{MAIN} [data-testid="stMetric"]', has_text=label).first).to_be_visible()

    record_timings(live_start_to_first_chart_s=first_chart - clicked,
                   live_start_to_first_data_s=(first_points or finished) - clicked,
                   live_start_to_finished_s=finished - clicked)
    save_screenshot(page, "live.png")


def test_pages_over_a_ferd_dfrd_pair(app_page, app_server: AppServer) -> None:
    page = app_page
    ferd_ids = run_ids(app_server, method="ferd", status="finished")
    if ferd_ids:
        ferd_id = max(ferd_ids)
    else:  # when run on its own
        ferd_id, _ = start_run(page, app_server, "FERD")
        wait_finished(page, app_server, ferd_id)
    dfrd_id, clicked = start_run(page, app_server, "DFRD (vanilla baseline)")
    wait_finished(page, app_server, dfrd_id)
    record_timings(dfrd_start_to_finished_s=time.monotonic() - clicked)
    assert_no_exception(page)

    open_page(page, "Compare", "Compare runs")
    expect(page.locator(f"{MAIN} .js-plotly-plot").first).to_be_visible(timeout=UI_TIMEOUT_MS)
    # Labels tell the runs apart: preset (not the dataset), method, seed, epochs and start time.
    epochs = load_preset(PRESET).epochs
    for method, run_id in (("ferd", ferd_id), ("dfrd", dfrd_id)):
        label = f"{PRESET} · {method} · seed 0 · {epochs} ep · {started_at(run_id)}"
        expect(page.locator(MAIN).get_by_text(label).first).to_be_attached()  # run picker and chart legend
    page.wait_for_function(f"() => ({BAR_TRACES_JS})() >= 2", timeout=UI_TIMEOUT_MS)
    expect(page.get_by_text("Missing counterpart", exact=False)).to_have_count(0)
    expect(page.get_by_role("tab")).not_to_have_count(0)
    expect(page.locator(f'{MAIN} [data-testid="stDataFrame"]').first).to_be_visible()  # summary (+ attack strength)
    assert_no_exception(page)
    save_screenshot(page, "compare.png")

    open_page(page, "Samples", "Synthesised samples")
    expect(page.locator(f'{MAIN} [data-testid="stImage"] img').first).to_be_visible(timeout=UI_TIMEOUT_MS)
    for method in ("FERD", "DFRD"):  # one gallery column per run of the pair
        expect(page.locator(MAIN).get_by_text(re.compile(rf"^{method} · seed \d+$"))).to_be_visible()
    page.wait_for_function(f"() => ({CHART_POINTS_JS})().some(n => n > 0)", timeout=UI_TIMEOUT_MS)
    page.wait_for_function(
        f"() => Array.from(document.querySelectorAll('{MAIN} [data-testid=\"stImage\"] img'))"
        ".every(img => img.complete && img.naturalWidth > 0)", timeout=UI_TIMEOUT_MS)
    assert_no_exception(page)
    save_screenshot(page, "samples.png")

    open_page(page, "Ablation", "Ablation")
    expect(page.get_by_role("button", name="Queue grid")).to_be_visible(timeout=UI_TIMEOUT_MS)
    assert_no_exception(page)

    open_page(page, "Learn", "Learn")
    expect(page.locator(f"{MAIN} .js-plotly-plot").first).to_be_visible(timeout=UI_TIMEOUT_MS)
    assert_no_exception(page)

    open_page(page, "Runs", "Runs")
    expect(page.locator(f'{MAIN} [data-testid="stDataFrame"]')).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(page.get_by_role("combobox", name="Run", exact=True)).to_have_value(re.compile(rf"^{PRESET} · "))
    expect(page.get_by_role("button", name="Metrics (CSV)")).to_be_visible(timeout=UI_TIMEOUT_MS)
    assert_no_exception(page)
    save_screenshot(page, "runs.png")
