"""Measure the dashboard on this machine with the real engine: `python -m app.measure --out DIR`.

Starts `streamlit run app/main.py` the README's way on a fresh FERD_HOME (the teacher cache is the
default one; `python -m ferd teacher` runs first so no run trains it), drives it with headless system
Chromium through Playwright, and writes DIR/ui_measurements.json plus a table on stdout:

a) start-up: seconds from clicking Start on the Live page to the first plotly chart visible and to the
   first chart with data (UMAP warms up on the first Samples visit, not here); then how long the first
   Samples visit takes until its map is UMAP (warm-up included) rather than the PCA placeholder.
b) throughput, seconds per epoch from the run's stored EpochFinished events, `--epochs` epochs each,
   one condition after another on the same server:
   1. `no_page`: started through the Live page, which is then closed (the run trains with no session);
   2. `live_page`: the Live page stays open and polls (one fragment rerun a second);
   3. `live_page_and_umap`: as 2, plus a second tab on the Samples page that keeps changing the run
      selection through the earlier runs (singles and ordered pairs: more maps than the service caches,
      so nearly every change is a fresh UMAP fit in the server, holding the GIL as in real use).
c) memory: the server's VmRSS every 30 s for `--minutes` while a Live page stays open and a queue of
   preset-length runs trains; start, max and end.
The server is stopped with SIGTERM at the end (the registry stops and joins its jobs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from app.measure_browser import (
    SelectionLoop,
    follow_running,
    open_live,
    open_samples,
    start_run,
    time_to_first_chart,
    umap_ready_s,
)
from app.measure_server import (
    ROOT,
    epoch_stats,
    free_port,
    rss_mib,
    run_ids,
    run_status,
    start_server,
    stop_server,
    wait_ended,
)
from ferd.config import load_preset

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--enable-unsafe-swiftshader"]
RSS_EVERY_S = 30.0


def ensure_teacher(preset: str) -> float:
    """`python -m ferd teacher --preset P` (trains and caches it on first use); seconds taken."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "ferd", "-q", "teacher", "--preset", preset], cwd=ROOT, check=True,
                   env={k: v for k, v in os.environ.items() if k != "FERD_FAKE_ENGINE"})
    return time.monotonic() - t0


def measure(out: Path, *, preset: str, epochs: int, minutes: float) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"preset": preset, "epochs": epochs, "minutes": minutes, "cpus": os.cpu_count(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "teacher_s": round(ensure_teacher(preset), 1)}
    home = Path(tempfile.mkdtemp(prefix="ferd-measure-home-"))
    result["ferd_home"] = str(home)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(home, port, out)
    result["server_pid"] = proc.pid
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                _measure_in_browser(browser, url, home, proc.pid, result, preset=preset, epochs=epochs,
                                    minutes=minutes)
            finally:
                browser.close()
    finally:
        result["server_stop"] = stop_server(proc)
    return result


def _measure_in_browser(browser: Any, url: str, home: Path, pid: int, result: dict[str, Any], *, preset: str,
                        epochs: int, minutes: float) -> None:
    from playwright.sync_api import Error as PlaywrightError

    # a) start-up: a fresh Live page, Start at once; then the first Samples visit (UMAP's warm-up).
    result["rss_at_start_mib"] = round(rss_mib(pid), 1)
    page = open_live(browser, url)
    run_id, clicked = start_run(page, home, preset=preset, epochs=epochs, name="measure-startup")
    result["startup"] = time_to_first_chart(page, clicked)
    wait_ended(home, run_id)
    result["startup"]["run"] = epoch_stats(home, run_id)
    page.close()
    result["startup"]["umap_ready_after_run_s"] = round(umap_ready_s(browser, url), 1)

    # b) throughput in three conditions, one after another.
    conditions: dict[str, Any] = {}
    page = open_live(browser, url)
    run_id, _ = start_run(page, home, preset=preset, epochs=epochs, name="measure-no-page")
    page.close()
    wait_ended(home, run_id)
    conditions["no_page"] = epoch_stats(home, run_id)

    page = open_live(browser, url)
    run_id, _ = start_run(page, home, preset=preset, epochs=epochs, name="measure-live-page")
    wait_ended(home, run_id)
    conditions["live_page"] = epoch_stats(home, run_id)

    stored = [r for r in run_ids(home) if run_status(home, r) == "finished"]
    samples = open_samples(browser, url)
    loop = SelectionLoop(samples, sorted(stored))
    run_id, _ = start_run(page, home, preset=preset, epochs=epochs, name="measure-live-page-umap")
    wait_ended(home, run_id, while_waiting=loop.step)
    conditions["live_page_and_umap"] = epoch_stats(home, run_id) | {
        "samples_selection_changes": loop.changes, "samples_ui_failures": loop.failures,
        "samples_step_s_median": round(statistics.median(loop.step_s), 2) if loop.step_s else None}
    samples.close()
    result["throughput"] = conditions

    # c) memory over a long live session: queue runs of the preset's length, sample VmRSS every 30 s.
    per_epoch = conditions["live_page"].get("epoch_s_median") or 10.0
    run_s = per_epoch * load_preset(preset).epochs
    queued = min(20, max(2, math.ceil(minutes * 60 / run_s) + 1))
    names = []
    for i in range(queued):
        rid, _ = start_run(page, home, preset=preset, epochs=load_preset(preset).epochs, name=f"measure-rss-{i}")
        names.append(rid)
    samples_mib: list[tuple[float, float]] = []
    follow_failures = 0
    t0 = time.monotonic()
    while True:
        elapsed = time.monotonic() - t0
        samples_mib.append((round(elapsed, 1), round(rss_mib(pid), 1)))
        if elapsed >= minutes * 60:
            break
        try:
            follow_running(page, home)
        except PlaywrightError:
            follow_failures += 1
        time.sleep(min(RSS_EVERY_S, max(minutes * 60 - (time.monotonic() - t0), 0.0)))
    finished = sum(run_status(home, r) == "finished" for r in names)
    values = [v for _, v in samples_mib]
    result["memory"] = {"runs_queued": queued, "runs_finished": finished, "samples": samples_mib,
                        "start_mib": values[0], "max_mib": max(values), "end_mib": values[-1],
                        "follow_failures": follow_failures}
    page.close()


def table(result: dict[str, Any]) -> str:
    s, t, m = result["startup"], result["throughput"], result["memory"]
    rows = [("server RSS before the first page (MiB)", result["rss_at_start_mib"]),
            ("start -> first chart visible (s)", s["start_to_first_chart_s"]),
            ("start -> first chart with data (s)", s["start_to_first_data_s"]),
            ("UMAP ready after the start-up run (s)", s["umap_ready_after_run_s"])]
    for name, c in t.items():
        rows.append((f"{name}: s/epoch median (train phases mean)",
                     f"{c.get('epoch_s_median')} ({c.get('train_s_per_epoch_mean')}) over {c['epochs']} epochs"))
    rows += [("RSS start / max / end (MiB)", f"{m['start_mib']} / {m['max_mib']} / {m['end_mib']}"),
             ("runs queued / finished during RSS window", f"{m['runs_queued']} / {m['runs_finished']}"),
             ("server stopped cleanly (rc)", f"{result['server_stop']['exited_after_sigterm']} "
                                             f"({result['server_stop']['returncode']})")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.measure", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for ui_measurements.json and server logs")
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the RSS window")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each throughput run")
    parser.add_argument("--preset", default="digits", help="digits (default) or smoke (a quick check of the script)")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        parser.error(f"system Chromium not found at {CHROMIUM}")
    result = measure(args.out, preset=args.preset, epochs=args.epochs, minutes=args.minutes)
    (args.out / "ui_measurements.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out / 'ui_measurements.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
