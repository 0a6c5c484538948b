"""The dashboard offline and its UMAP map, in a real headless browser (issue 14, items 6 and 8).

- No page requests anything from a host other than 127.0.0.1 / localhost (every request is recorded).
- The "Charts (HTML)" download carries plotly.js inline: no <script src="http...">.
- On a fresh server, the Samples page shows PCA first and then, left alone, the UMAP map; the thumbnails are
  drawn at their upscaled size, pixelated; the UMAP worker writes no "missing ScriptRunContext" warning.

Uses a finished FERD smoke run: the one test_dashboard.py made when run in the same session, else its own.
Run: `.venv/bin/python -m pytest tests/e2e -x -s -m e2e`.
"""

from __future__ import annotations

import re
import shutil
import time
from urllib.parse import urlparse

import pytest

from tests.e2e.conftest import CHROMIUM, VIEWPORT, AppServer, serve

if not CHROMIUM.exists():
    pytest.skip(f"system Chromium not found at {CHROMIUM}", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

from tests.e2e.test_dashboard import (  # noqa: E402
    MAIN,
    UI_TIMEOUT_MS,
    assert_no_exception,
    open_page,
    record_timings,
    run_ids,
    start_run,
    wait_finished,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LOCAL_HOSTS = {"127.0.0.1", "localhost"}
PAGES = (("Live run", "Live run"), ("Compare", "Compare runs"), ("Samples", "Synthesised samples"),
         ("Ablation", "Ablation"), ("Learn", "Learn"), ("Runs", "Runs"))
UMAP_TIMEOUT_MS = 600_000
"""UMAP's first use compiles numba kernels in the worker: a minute or more on a busy 2-core machine."""
SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?\s*(https?:)?//", re.IGNORECASE)
THUMBS_JS = """() => Array.from(document.querySelectorAll('[data-testid="stMain"] [data-testid="stImage"] img'))
    .map(img => [img.naturalWidth, img.getBoundingClientRect().width, getComputedStyle(img).imageRendering])"""


def ensure_ferd_run(page, server: AppServer) -> None:
    """A finished FERD smoke run in the server's store (started from the Live page when there is none)."""
    if run_ids(server, method="ferd", status="finished"):
        return
    page.goto(server.url)
    run_id, _ = start_run(page, server, "FERD")
    wait_finished(page, server, run_id)


def test_no_page_requests_a_host_other_than_localhost(app_page, app_server: AppServer) -> None:
    page = app_page
    ensure_ferd_run(page, app_server)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(app_server.url)  # a fresh load, recorded from its first request
    for nav_title, heading in PAGES:
        open_page(page, nav_title, heading)
        page.wait_for_timeout(3000)  # let charts, images and the favicon load
        assert_no_exception(page)

    with page.expect_download(timeout=UI_TIMEOUT_MS) as download:
        page.get_by_role("button", name="Charts (HTML)").click()
    html = download.value.path().read_text()
    assert "Plotly.newPlot(" in html and len(html) > 1_000_000, "the export does not carry plotly.js inline"
    assert not SCRIPT_SRC.search(html), f"the export loads a script from the network: {SCRIPT_SRC.search(html)[0]}"

    urls = [u for u in requested if urlparse(u).scheme in ("http", "https", "ws", "wss")]
    assert len(urls) > 20, f"too few requests recorded to mean anything: {urls}"
    foreign = sorted({u for u in urls if urlparse(u).hostname not in LOCAL_HOSTS})
    assert not foreign, f"requests left 127.0.0.1: {foreign}"


def test_samples_map_turns_to_umap_by_itself(chromium, app_server: AppServer, tmp_path) -> None:
    setup = chromium.new_context(viewport=VIEWPORT)
    ensure_ferd_run(setup.new_page(), app_server)
    setup.close()
    home = tmp_path / "ferd-home"  # a copy of the store for a fresh server, whose UMAP has never warmed up
    shutil.copytree(app_server.home, home)
    with serve(home, tmp_path) as server:
        context = chromium.new_context(viewport=VIEWPORT)
        page = context.new_page()
        page.goto(f"{server.url}/Samples")
        caption = page.locator(MAIN).get_by_text(re.compile(r"^(PCA|UMAP) of the samples"))
        expect(caption).to_contain_text("PCA of the samples", timeout=UI_TIMEOUT_MS)
        assert "switches to UMAP by itself" in caption.inner_text()
        shown = time.monotonic()
        expect(caption).to_contain_text("UMAP of the samples", timeout=UMAP_TIMEOUT_MS)  # no click, no reload
        record_timings(samples_pca_to_umap_s=time.monotonic() - shown)
        page.wait_for_function(f"() => ({THUMBS_JS})().length > 0", timeout=UI_TIMEOUT_MS)
        thumbs = page.evaluate(THUMBS_JS)
        assert all(natural == shown_w and rendering == "pixelated" for natural, shown_w, rendering in thumbs), thumbs
        assert_no_exception(page)
        context.close()
    log = server.stderr.read_text(errors="replace") + server.stdout.read_text(errors="replace")
    assert "missing ScriptRunContext" not in log, log[-3000:]
