"""The dashboard server of `python -m app.measure` and the run store it writes: start / stop the server the
README's way, read its memory, and read runs' status and epoch times from the store."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ferd.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 3600.0
ENDED = ("finished", "stopped", "failed", "interrupted")


def free_port() -> int:
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

