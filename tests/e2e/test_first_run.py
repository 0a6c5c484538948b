"""A newcomer's first run in a real browser: on an empty teacher cache, Start shows the teacher-training stage
at once, and the run (progress bar and charts) is in view at 1400x900 with the run form collapsed.

The run is stopped during teacher training (nothing is cached), so the test costs one teacher epoch."""

from __future__ import annotations

import re
import time

import pytest

from tests.e2e.conftest import CHROMIUM, AppServer

if not CHROMIUM.exists():
    pytest.skip(f"system Chromium not found at {CHROMIUM}", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

from ferd.config import load_preset  # noqa: E402
from ferd.labels import started_at  # noqa: E402
from tests.e2e.test_dashboard import (  # noqa: E402
    MAIN,
    PRESET,
    UI_TIMEOUT_MS,
    assert_no_exception,
    choose,
    record_timings,
    run_ids,
    run_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SMALL_SCREEN = {"width": 1400, "height": 900}
STOP_TIMEOUT_S = 300.0


def in_view(page, locator) -> bool:
    """True when the element's top edge lies inside the browser window."""
    box = locator.bounding_box()
    return box is not None and 0 <= box["y"] < SMALL_SCREEN["height"]


def test_first_run_shows_the_teacher_stage_and_the_run_in_view(chromium, fresh_cache_server: AppServer) -> None:
    context = chromium.new_context(viewport=SMALL_SCREEN)
    page = context.new_page()
    try:
        page.goto(fresh_cache_server.url)
        expect(page.locator(f"{MAIN} h1").filter(has_text="Live run")).to_be_visible(timeout=UI_TIMEOUT_MS)
        choose(page, "Preset", PRESET)
        choose(page, "Method", "FERD")
        page.get_by_role("button", name="Start", exact=True).click()
        clicked = time.monotonic()
        stage = page.locator(MAIN).get_by_text(re.compile(r"^Teacher: training the embedded teacher"))
        expect(stage).to_be_visible(timeout=UI_TIMEOUT_MS)
        shown = time.monotonic() - clicked
        # The 2-s target is measured here and reported (a timing, not an assertion: it depends on the machine's load).
        record_timings(first_run_start_to_teacher_stage_s=shown)
        expect(page.locator(MAIN).get_by_text(re.compile(r"Epoch 0/(\d+|\?) · training the teacher"))).to_be_visible()

        # The run is in view: the form is collapsed, the progress bars and the first chart start on screen.
        expect(page.get_by_role("button", name="Start", exact=True)).to_be_hidden()
        bars = page.locator(f'{MAIN} [data-testid="stProgress"]')
        expect(bars).to_have_count(2)
        chart = page.locator(f"{MAIN} .js-plotly-plot").first
        expect(chart).to_be_visible(timeout=UI_TIMEOUT_MS)
        assert in_view(page, bars.first) and in_view(page, bars.last), "the progress bars are below the fold"
        assert in_view(page, chart), "the first chart starts below the fold"
        (run_id,) = run_ids(fresh_cache_server)
        expect(page.get_by_role("combobox", name="Run", exact=True)).to_have_value(
            f"{PRESET} · ferd · seed 0 · {load_preset(PRESET).epochs} ep · {started_at(run_id)}")
        assert_no_exception(page)

        page.get_by_role("button", name="Stop", exact=True).click()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while run_status(fresh_cache_server, run_id) != "stopped":
            assert time.monotonic() < deadline, f"run {run_id} did not stop within {STOP_TIMEOUT_S:.0f} s"
            time.sleep(0.5)
    finally:
        context.close()
