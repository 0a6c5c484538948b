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
import itertools
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ferd.config import load_preset
from ferd.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--enable-unsafe-swiftshader"]
VIEWPORT = {"width": 1400, "height": 1000}
MAIN = '[data-testid="stMain"]'
CHART_POINTS_JS = """() => Array.from(document.querySelectorAll('[data-testid="stMain"] .js-plotly-plot'))
    .map(g => (g._fullData || []).reduce((n, t) => n + (t._length || 0), 0))"""
UI_TIMEOUT_MS = 120_000
RSS_EVERY_S = 30.0
POLL_S = 0.25
RUN_TIMEOUT_S = 3600.0
ENDED = ("finished", "stopped", "failed", "interrupted")


# ---- server ----
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, port: int, log_dir: Path) -> subprocess.Popen:
    """`streamlit run app/main.py` as in the README, on `home`; returns once /_stcore/health answers ok."""
    env = dict(os.environ, FERD_HOME=str(home))
    env.pop("FERD_FAKE_ENGINE", None)
    cmd = [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]
    with (log_dir / "server.stdout.log").open("wb") as out, (log_dir / "server.stderr.log").open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}; see {log_dir / 'server.stderr.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.read().decode().strip() == "ok":
                    return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("streamlit did not answer /_stcore/health within 120 s")


def stop_server(proc: subprocess.Popen, *, timeout: float = 60.0) -> dict[str, Any]:
    """SIGTERM and wait (kill after `timeout`); whether it exited by itself, its return code and the seconds taken."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
        clean = True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
        clean = False
    return {"exited_after_sigterm": clean, "returncode": proc.returncode, "stop_s": round(time.monotonic() - t0, 1)}


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` in MiB, from /proc/<pid>/status (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---- store ----
def run_ids(home: Path) -> set[str]:
    with RunStore(home) as store:
        return {r.run_id for r in store.list_runs()}


def run_status(home: Path, run_id: str) -> str:
    with RunStore(home) as store:
        return store.get_run(run_id).status


def wait_ended(home: Path, run_id: str, *, while_waiting=None) -> str:
    """Poll the store until the run has ended; `while_waiting()` is called between polls (a UI loop step)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (status := run_status(home, run_id)) not in ENDED:
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {status} after {RUN_TIMEOUT_S:.0f} s")
        if while_waiting is not None:
            while_waiting()
        else:
            time.sleep(1.0)
    return status


def epoch_stats(home: Path, run_id: str) -> dict[str, Any]:
    """Seconds per epoch of a run from its EpochFinished events: wall time between epochs (all phases) and the
    training phases alone (synthesis + reweighting + distillation, i.e. without the periodic evaluation)."""
    with RunStore(home) as store:
        finished = [e for _, e in store.events(run_id, kinds=["epoch_finished"])]
        status = store.get_run(run_id).status
    walls = [b - a for a, b in itertools.pairwise([0.0, *(e.wall_s for e in finished)])]
    train = [sum(v for k, v in e.phase_s.items() if k != "evaluation") for e in finished]
    out: dict[str, Any] = {"run_id": run_id, "status": status, "epochs": len(finished)}
    if finished:
        out.update(epoch_s=[round(w, 2) for w in walls], epoch_s_median=round(statistics.median(walls), 2),
                   train_s_per_epoch_mean=round(statistics.mean(train), 2),
                   first_epoch_s=round(walls[0], 2))
    return out


# ---- browser ----
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
    """Seconds until the Samples page shows a UMAP map (pressing Refresh while it still shows PCA)."""
    page = open_samples(browser, url)
    t0 = time.monotonic()
    try:
        while "UMAP of the samples" not in page.locator(MAIN).inner_text():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("UMAP never became ready on the Samples page")
            time.sleep(2.0)
            page.get_by_role("button", name="Refresh").click()
            wait_idle(page)
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


# ---- the measurement ----
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
    port = _free_port()
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
