"""Fixtures of the browser tests: a real `streamlit run` server on a fresh run store, and headless Chromium.

The server is started the README's way from the repository root, on a free port, with FERD_HOME set to a
fresh directory and FERD_CACHE_DIR shared with the test session (tests/conftest.py sets it), so a teacher
trained by one test is reused by the next.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--enable-unsafe-swiftshader"]
VIEWPORT = {"width": 1400, "height": 1000}
HEALTH_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 30.0
CRASH_MARKERS = ("Aborted", "core dumped", "Fatal Python error", "Segmentation fault")


@dataclass(frozen=True)
class AppServer:
    """A running dashboard: its base URL, its run-store root and where its output goes."""

    url: str
    home: Path
    stdout: Path
    stderr: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.read().decode().strip() == "ok"
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _wait_healthy(proc: subprocess.Popen, server: AppServer) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode} before answering:\n{server.stderr.read_text()}")
        if _healthy(server.url):
            return
        time.sleep(0.5)
    pytest.fail(f"{server.url}/_stcore/health did not answer 'ok' within {HEALTH_TIMEOUT_S:.0f} s:\n"
                f"{server.stderr.read_text()}")


def _stop(proc: subprocess.Popen) -> bool:
    """SIGTERM, wait, then kill; True when the server exited by itself after SIGTERM."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        return False


@contextmanager
def serve(home: Path, work: Path, cache_dir: str | None = None) -> Iterator[AppServer]:
    """`streamlit run app/main.py` on the run store `home` with the real engine, output under `work`, the teacher
    cache `cache_dir` (default: the test session's); on exit stops it and checks a clean exit."""
    port = _free_port()
    server = AppServer(url=f"http://127.0.0.1:{port}", home=home, stdout=work / "stdout.log",
                       stderr=work / "stderr.log")
    env = dict(os.environ, FERD_HOME=str(home), FERD_CACHE_DIR=cache_dir or os.environ["FERD_CACHE_DIR"])
    env.pop("FERD_FAKE_ENGINE", None)  # these tests drive the real engine
    cmd = [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.port", str(port),
           "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]
    with server.stdout.open("wb") as out, server.stderr.open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
    try:
        _wait_healthy(proc, server)
        yield server
    finally:
        exited = _stop(proc)
    stderr = server.stderr.read_text(errors="replace")
    assert exited, f"streamlit ignored SIGTERM for {SHUTDOWN_TIMEOUT_S:.0f} s and was killed:\n{stderr}"
    crashes = [m for m in CRASH_MARKERS if m in stderr]
    assert not crashes, f"streamlit did not exit cleanly ({crashes}, rc={proc.returncode}):\n{stderr}"
    assert proc.returncode in (0, -signal.SIGTERM), f"streamlit exited with {proc.returncode}:\n{stderr}"


@pytest.fixture(scope="session")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """`streamlit run app/main.py` on a fresh store with the real engine; checks a clean exit on teardown."""
    work = tmp_path_factory.mktemp("e2e-server")
    home = work / "ferd-home"
    home.mkdir()
    with serve(home, work) as server:
        yield server


@pytest.fixture
def fresh_cache_server(tmp_path: Path) -> Iterator[AppServer]:
    """The dashboard on a fresh store and an empty teacher cache: a first run trains its teacher, as on a
    newcomer's machine."""
    home, cache = tmp_path / "ferd-home", tmp_path / "cache"
    home.mkdir()
    cache.mkdir()
    with serve(home, tmp_path, str(cache)) as server:
        yield server


@pytest.fixture(scope="session")
def chromium() -> Iterator:
    """Headless system Chromium driven by Playwright (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def app_page(chromium, app_server: AppServer) -> Iterator:
    """A fresh browser tab (1400x1000) on the dashboard's default page."""
    context = chromium.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(app_server.url)
    yield page
    context.close()
