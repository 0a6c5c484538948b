"""The browser side of `python -m app.measure`: Playwright helpers that drive the dashboard's Live and Samples
pages as a user would (pick, type, Start, wait for charts and for the UMAP map)."""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import Any

from app.measure_server import RUN_TIMEOUT_S, run_ids
from ferd.store import RunStore

VIEWPORT = {"width": 1400, "height": 1000}
MAIN = '[data-testid="stMain"]'
CHART_POINTS_JS = """() => Array.from(document.querySelectorAll('[data-testid="stMain"] .js-plotly-plot'))
    .map(g => (g._fullData || []).reduce((n, t) => n + (t._length || 0), 0))"""
UI_TIMEOUT_MS = 120_000
POLL_S = 0.25


def open_live(browser: Any, url: str) -> Any:
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(url)
    page.locator(f"{MAIN} h1").filter(has_text="Live run").wait_for()
    return page


def wait_idle(page: Any) -> None:
    """Until the script run that the last interaction started has finished (Streamlit's status widget gone)."""
    page.wait_for_timeout(300)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                           timeout=UI_TIMEOUT_MS)


def choose(page: Any, label: str, option: str) -> None:
    from playwright.sync_api import expect

    box = page.get_by_role("combobox", name=label, exact=True)
    if box.input_value() == option:
        return
    box.click()
    page.get_by_role("option", name=option, exact=True).click()
    expect(box).to_have_value(option)
    wait_idle(page)


def fill(page: Any, key: str, value: str) -> None:
    """Type `value` into the input of the widget with key `key` (by key: a rerun can briefly show stale copies)."""
    from playwright.sync_api import expect

    field = page.locator(f".st-key-{key} input")
    if field.input_value() == value:
        return
    field.fill(value)
    field.press("Enter")
    expect(field).to_have_value(value)
    wait_idle(page)


def start_run(page: Any, home: Path, *, preset: str, epochs: int, name: str) -> tuple[str, float]:
    """Configure `preset` with `epochs` on the Live page and press Start; (run id, click time)."""
    choose(page, "Preset", preset)
    fill(page, f"live-{preset}-ferd-epochs", str(epochs))  # the config form's keys: live-<preset>-<method>-<field>
    fill(page, "live-name", name)
    before = run_ids(home)
    page.get_by_role("button", name="Start", exact=True).click()
    clicked = time.monotonic()
    while not (new := run_ids(home) - before):
        if time.monotonic() - clicked > UI_TIMEOUT_MS / 1000:
            raise TimeoutError("pressing Start created no run")
        time.sleep(POLL_S)
    return new.pop(), clicked


def time_to_first_chart(page: Any, clicked: float) -> dict[str, float]:
    """Seconds from `clicked` until a plotly chart is visible on the page, and until one has data points."""
    first_chart = None
    deadline = clicked + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        points = page.evaluate(CHART_POINTS_JS)
        now = time.monotonic()
        if points and first_chart is None and page.locator(f"{MAIN} .js-plotly-plot").first.is_visible():
            first_chart = now
        if sum(points):
            return {"start_to_first_chart_s": round((first_chart or now) - clicked, 2),
                    "start_to_first_data_s": round(now - clicked, 2)}
        time.sleep(0.1)
    raise TimeoutError("no chart with data appeared on the Live page")


def follow_running(page: Any, home: Path) -> None:
    """Show the running run in the Live page's run picker (as a user following the queue would)."""
    with RunStore(home) as store:
        running = store.list_runs(status="running")
    box = page.get_by_role("combobox", name="Run", exact=True)
    if not running or box.input_value().startswith(f"{running[0].name} · "):
        return
    box.click()
    page.get_by_role("option", name=re.compile(rf"^{re.escape(running[0].name)} · ")).click()
    wait_idle(page)


def open_samples(browser: Any, url: str) -> Any:
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(f"{url}/Samples")
    page.locator(f"{MAIN} h1").filter(has_text="Synthesised samples").wait_for()
    wait_idle(page)
    return page


def umap_ready_s(browser: Any, url: str, *, timeout: float = 600.0) -> float:
    """Seconds until the Samples page, left alone, shows a UMAP map (it replaces the PCA view by itself)."""
    page = open_samples(browser, url)
    t0 = time.monotonic()
    try:
        page.locator(MAIN).get_by_text("UMAP of the samples").wait_for(timeout=timeout * 1000)
        return time.monotonic() - t0
    finally:
        page.close()


class SelectionLoop:
    """The Samples page with its run selection cycled through singles and ordered pairs of `run_ids`: more
    distinct selections than the UMAP service caches maps, so almost every change is a fresh fit."""

    def __init__(self, page: Any, run_ids: list[str]) -> None:
        self.page = page
        self.targets = itertools.cycle([list(p) for p in itertools.permutations(run_ids, 2)] or [run_ids])
        self.changes = 0
        self.failures = 0
        self.step_s: list[float] = []

    def _box(self) -> Any:
        return self.page.locator('[data-testid="stMultiSelect"]').first

    def step(self) -> None:
        """One selection change cycle; a UI hiccup reloads the page and counts as a failure."""
        from playwright.sync_api import Error as PlaywrightError

        try:
            self._step()
        except PlaywrightError:
            self.failures += 1
            self.page.reload()
            self.page.locator(f"{MAIN} h1").filter(has_text="Synthesised samples").wait_for()

    def _step(self) -> None:
        t0 = time.monotonic()
        while (remove := self._box().get_by_role("button", name=re.compile(r"^Remove "))).count():
            remove.first.click()
            wait_idle(self.page)
            self.changes += 1
        for run_id in next(self.targets):
            self.page.get_by_role("combobox", name="Runs", exact=True).click()
            self.page.get_by_role("option", name=re.compile(re.escape(run_id))).click(timeout=30_000)
            self.page.keyboard.press("Escape")
            wait_idle(self.page)
            self.changes += 1
        self.step_s.append(time.monotonic() - t0)

