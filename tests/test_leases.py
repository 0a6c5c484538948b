"""Run ownership across processes: one writer per run, and a dead owner's run reads as interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from app.jobs import JobRegistry
from ferd import leases
from ferd.cli import main
from ferd.config import Config
from ferd.store import RunOwned, RunStore

ROOT = Path(__file__).resolve().parent.parent
HOLDER = ("import sys, time\n"
          "from ferd.config import Config\n"
          "from ferd.store import RunStore\n"
          "store = RunStore(sys.argv[1])\n"
          "print(store.create_run(Config(), status='running'), flush=True)\n"
          "time.sleep(120)\n")


@pytest.fixture
def holder(tmp_path):
    """A second process that created a running run (so holds its lease) and stays alive until killed."""
    root = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        run_id = proc.stdout.readline().strip()
        yield root, run_id, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_live_owner_keeps_its_run_and_a_second_writer_is_refused(holder, capsys):
    root, run_id, proc = holder
    with RunStore(root) as store:
        info = store.get_run(run_id)
        assert info.status == "running" and info.owner.pid == proc.pid and info.owner.host == leases.HOST
        with pytest.raises(RunOwned, match=f"pid {proc.pid} on host"):
            store.acquire(run_id)
        assert store.mark_interrupted() == []  # the dashboard's start-up sweep leaves it alone
        assert store.get_run(run_id).status == "running"
        registry = JobRegistry(store)
        with pytest.raises(RunOwned, match=f"pid {proc.pid}"):  # the dashboard's Resume
            registry.submit(Config(), resume_run_id=run_id)
        registry.shutdown()
        assert store.get_run(run_id).status == "running"
    assert main(["-q", "--store", str(root), "run", "--resume", run_id]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert run_id in last and f"pid {proc.pid}" in last
    # kill -9: nothing is released, yet every reader now sees the run as interrupted, and it can be taken over.
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with RunStore(root) as store:
        assert store.get_run(run_id).status == "interrupted"
        assert [r.status for r in store.list_runs(status="interrupted")] == ["interrupted"]
        store.acquire(run_id)
        assert store.get_run(run_id).owner.pid == os.getpid()
    assert main(["--store", str(root), "runs"]) == 0
    assert "interrupted" in capsys.readouterr().out


def test_a_stale_heartbeat_counts_as_gone_on_any_host(tmp_path):
    with RunStore(tmp_path / "store") as store:
        run_id = store.create_run(Config(), status="running")
        store._conn.execute("UPDATE leases SET host = 'elsewhere', pid = 1, heartbeat = ? WHERE run_id = ?",
                            (time.time(), run_id))
        assert store.get_run(run_id).status == "running"  # another host's pid cannot be checked: trust the beat
        with pytest.raises(RunOwned, match="host elsewhere"):
            store.acquire(run_id)
        store._conn.execute("UPDATE leases SET heartbeat = ? WHERE run_id = ?",
                            (time.time() - leases.LEASE_TIMEOUT_S - 1, run_id))
        assert store.get_run(run_id).status == "interrupted"
        assert store.mark_interrupted() == [run_id]


def test_the_heartbeat_refreshes_held_leases(tmp_path):
    beats = []
    hb = leases.Heartbeat(lambda: beats.append(time.monotonic()), interval_s=0.05)
    time.sleep(0.3)
    hb.close()
    assert len(beats) >= 2
    with RunStore(tmp_path / "store") as store:
        run_id = store.create_run(Config(), status="running")
        store._conn.execute("UPDATE leases SET heartbeat = 0 WHERE run_id = ?", (run_id,))
        store._beat()
        assert time.time() - store.get_run(run_id).owner.heartbeat < 5
        store.release(run_id)
        assert store.get_run(run_id).owner is None and store.get_run(run_id).status == "interrupted"


def test_a_store_without_leases_is_migrated(tmp_path):
    import sqlite3

    root = tmp_path / "store"
    root.mkdir()
    with sqlite3.connect(root / "runs.db") as c:  # a schema-1 store with a run left running by a crash
        c.executescript("CREATE TABLE runs (run_id TEXT PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL, "
                        "updated REAL NOT NULL, status TEXT NOT NULL, method TEXT NOT NULL, dataset TEXT NOT NULL, "
                        "seed INTEGER NOT NULL, config TEXT NOT NULL, summary TEXT, parent TEXT);"
                        "INSERT INTO runs VALUES ('20250101-000000-abcdef', '', 1, 1, 'running', 'ferd', 'digits', 0, "
                        "'{}', NULL, NULL); PRAGMA user_version=1;")
    with RunStore(root) as store:
        assert store.get_run("20250101-000000-abcdef").status == "interrupted"
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == 2


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_cli_run_and_stores_stopped(tmp_path, sig, code):
    root = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "ferd", "-q", "--store", str(root), "run", "--preset", "smoke",
                             "--set", "epochs=30", "num_threads=1"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and status != "running":
            time.sleep(0.2)
            if (root / "runs.db").exists():
                with RunStore(root) as store:
                    runs = store.list_runs()
                    status = runs[0].status if runs else None
        assert status == "running"
        sent = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == code
        assert time.monotonic() - sent < 10
    finally:
        proc.kill()
        proc.wait()
    with RunStore(root) as store:
        info = store.list_runs()[0]
        assert info.status == "stopped" and info.owner is None
    assert "stopped by" in proc.stderr.read()


SCRATCH_HOLDER = ("import sys, time\n"
                  "from ferd.leases import scratch_folder\n"
                  "print(scratch_folder('ferd-test-scratch-'), flush=True)\n"
                  "time.sleep(120)\n")


def test_a_killed_process_scratch_folder_goes_with_the_next_one_made(tmp_path, monkeypatch):
    """A process SIGKILLed with its temporary folder in place (a dashboard's pack view, a Ray actor's run folder)
    cannot remove it; the next scratch_folder of the same prefix does, and keeps the folders of live processes
    and of other names."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    killed = subprocess.Popen([sys.executable, "-c", SCRATCH_HOLDER], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env=env)
    live = subprocess.Popen([sys.executable, "-c", SCRATCH_HOLDER], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)
    try:
        dead_folder = Path(killed.stdout.readline().strip())
        live_folder = Path(live.stdout.readline().strip())
        assert dead_folder.parent == tmp and dead_folder.name.startswith(f"ferd-test-scratch-{killed.pid}-")
        (dead_folder / "student.pt").write_bytes(b"x")
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        other = tmp / "ferd-test-scratchy"
        other.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        mine = leases.scratch_folder("ferd-test-scratch-")
        assert mine.is_dir() and mine.name.startswith(f"ferd-test-scratch-{os.getpid()}-")
        assert not dead_folder.exists()
        assert live_folder.is_dir() and other.is_dir()
        again = leases.scratch_folder("ferd-test-scratch-")  # this process's own folders stay
        assert mine.is_dir() and again.is_dir() and again != mine
    finally:
        for proc in (killed, live):
            proc.kill()
            proc.wait()
