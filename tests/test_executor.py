"""Executors: sizing, the driver-side relay (files, stop, dead workers), bad input, and the same per-class
counts inline, in the local pool and on Ray (slow: real smoke runs)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from ferd import cli
from ferd.events import CheckpointSaved, EpochFinished, Evaluated, Event, RunFinished, RunResumed, RunStopped
from ferd.executor import (
    CHECKPOINT,
    STUDENT,
    WORKER_DIED,
    Executor,
    ExecutorError,
    FileBlob,
    InlineExecutor,
    LocalExecutor,
    WorkerGone,
    check_reachable,
    plan_workers,
    relay,
)
from ferd.experiments import run_many
from ferd.store import RunStore
from tests.fakes import fake_run, slow_fake_run


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- sizing ----
def test_plan_shares_the_cores_between_workers(tiny_cfg):
    auto = tiny_cfg.replace(num_threads=0)
    assert plan_workers([auto], None, cores=2) == (1, 2)  # a lone run gets every core
    assert plan_workers([auto] * 3, None, cores=2) == (2, 1)
    assert plan_workers([auto] * 3, None, cores=16) == (3, 5)
    assert plan_workers([tiny_cfg.replace(num_threads=2)] * 4, None, cores=8) == (4, 2)
    assert plan_workers([auto] * 5, 3, cores=16) == (3, 5)


@pytest.mark.parametrize("workers", [0, -1])
def test_plan_rejects_no_workers(tiny_cfg, workers):
    with pytest.raises(ExecutorError, match="--workers must be at least 1"):
        plan_workers([tiny_cfg], workers, cores=2)


def test_plan_rejects_more_workers_than_cores(tiny_cfg):
    with pytest.raises(ExecutorError, match="--workers 3 x 1 torch thread.*this machine has 2"):
        plan_workers([tiny_cfg.replace(num_threads=1)], 3, cores=2)
    with pytest.raises(ExecutorError, match="num_threads 4 is more than this machine's 2 cores"):
        plan_workers([tiny_cfg.replace(num_threads=4)], None, cores=2)


# ---- the relay (driver side), with a scripted worker ----
class ScriptedHandle:
    """Plays back batches of worker messages; raises WorkerGone when the script runs out (if `dies`)."""

    def __init__(self, batches: list[list], dies: bool = False) -> None:
        self.batches, self.dies = list(batches), dies
        self.stopped = self.closed = False

    def poll(self, timeout: float) -> list:
        if self.batches:
            return self.batches.pop(0)
        if self.dies:
            raise WorkerGone("exit code -9")
        return []

    def stop(self) -> None:
        self.stopped = True

    def close(self) -> None:
        self.closed = True


def test_relay_writes_files_and_points_events_at_them(tmp_path):
    handle = ScriptedHandle([[FileBlob(CHECKPOINT, b"ckpt-1"), CheckpointSaved(epoch=1, path="/worker/tmp/c.pt")],
                             [FileBlob(STUDENT, b"student"),
                              RunFinished(epoch=1, wall_s=1.0, student_path="/worker/tmp/s.pt")]])
    out = list(relay(handle, None, tmp_path))
    assert out == [CheckpointSaved(epoch=1, path=str(tmp_path / CHECKPOINT)),
                   RunFinished(epoch=1, wall_s=1.0, student_path=str(tmp_path / STUDENT))]
    assert (tmp_path / CHECKPOINT).read_bytes() == b"ckpt-1" and (tmp_path / STUDENT).read_bytes() == b"student"
    assert handle.closed


def test_relay_forwards_a_stop_and_turns_a_dead_worker_into_a_stop(tmp_path):
    stop = threading.Event()
    stop.set()
    handle = ScriptedHandle([[EpochFinished(epoch=2, wall_s=1.0, phase_s={})]], dies=True)
    out = list(relay(handle, stop, tmp_path))
    assert handle.stopped and handle.closed
    assert isinstance(out[-1], RunStopped) and out[-1].epoch == 2 and out[-1].reason.startswith(WORKER_DIED)


class DyingExecutor(Executor):
    """The fake engine's events up to the first finished epoch, then a dead worker."""

    def run_fn(self, cfg, stop=None, *, run_dir=None, resume=False) -> Iterator[Event]:
        events = []
        for ev in fake_run(cfg):
            events.append(ev)
            if isinstance(ev, EpochFinished):
                break
        return relay(ScriptedHandle([events], dies=True), stop, run_dir)


def test_a_dead_worker_leaves_its_run_interrupted(tmp_path, tiny_cfg):
    store = RunStore(tmp_path)
    records = run_many([tiny_cfg], store, executor=DyingExecutor())
    assert records[0]["status"] == "interrupted"
    assert store.get_run(records[0]["run_id"]).status == "interrupted"


def test_run_many_runs_slots_at_once_and_keeps_the_configs_order(tmp_path, tiny_cfg):
    active, peak, lock = [0], [0], threading.Lock()

    class Counting(Executor):
        slots = 2

        def run_fn(self, cfg, stop=None, *, run_dir=None, resume=False):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.3)
            yield from fake_run(cfg)
            with lock:
                active[0] -= 1

    configs = [tiny_cfg.replace(seed=s) for s in range(4)]
    records = run_many(configs, RunStore(tmp_path), executor=Counting())
    assert peak[0] == 2
    assert [r["seed"] for r in records] == [0, 1, 2, 3] and all(r["status"] == "finished" for r in records)


def test_ctrl_c_stops_every_run_in_flight_and_drops_the_queued_ones(tmp_path, tiny_cfg):
    class Pool(Executor):
        slots = 2

        def run_fn(self, cfg, stop=None, *, run_dir=None, resume=False):
            if cfg.seed == 1:  # a real Ctrl-C once both slots run (not at a fixed time: start-up varies under load)
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            return slow_fake_run(0.01)(cfg, stop, run_dir=run_dir, resume=resume)

    store = RunStore(tmp_path)
    configs = [tiny_cfg.replace(epochs=500, seed=s) for s in range(3)]
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own Ctrl-C, whatever ran before
    t = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_many(configs, store, executor=Pool())
    finally:
        signal.signal(signal.SIGINT, before)
    assert time.perf_counter() - t < 5
    assert sorted(r.status for r in store.list_runs()) == ["stopped"] * 3  # the third one before it started
    third = next(r for r in store.list_runs() if r.seed == 2)
    assert [e.kind for _, e in store.events(third.run_id)] == ["run_stopped"]


# ---- bad input (CLI) ----
def test_unreachable_address_fails_fast(tmp_path):
    port = _closed_port()
    t = time.perf_counter()
    with pytest.raises(ExecutorError, match=f"127.0.0.1:{port}: no Ray cluster reachable"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.perf_counter() - t < 5
    with pytest.raises(ExecutorError, match="expected HOST:PORT"):
        check_reachable("nowhere")


def test_cli_rejects_bad_executor_input_and_writes_nothing(tmp_path, capsys):
    store = tmp_path / "store"
    base = ["--store", str(store), "-q", "compare", "--preset", "smoke", "--out", str(tmp_path / "out")]
    t = time.perf_counter()
    assert cli.main(base + ["--executor", "ray", "--address", f"127.0.0.1:{_closed_port()}"]) == cli.EXIT_USAGE
    assert time.perf_counter() - t < 10
    assert "no Ray cluster reachable" in capsys.readouterr().err
    assert cli.main(base + ["--workers", "0"]) == cli.EXIT_USAGE
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert cli.main(base + ["--workers", str((os.cpu_count() or 1) + 1), "--set", "num_threads=1"]) == cli.EXIT_USAGE
    assert "cores" in capsys.readouterr().err
    assert cli.main(base + ["--address", "127.0.0.1:1"]) == cli.EXIT_USAGE
    assert "--address needs --executor ray" in capsys.readouterr().err
    assert not store.exists() and not (tmp_path / "out").exists()


# ---- real runs (slow) ----
def _counts(store: RunStore, run_id: str) -> dict[str, list[int]]:
    final = [e for _, e in store.events(run_id) if isinstance(e, Evaluated) and e.final]
    return {a: final[-1].correct[a].tolist() for a in final[-1].correct}


@pytest.fixture
def ray_local():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_same_counts_inline_local_pool_and_ray(tmp_path, tiny_cfg, ray_local):
    from ferd.ray_executor import RayExecutor

    configs = [tiny_cfg.replace(epochs=2, seed=0), tiny_cfg.for_method("dfrd").replace(epochs=2, seed=1)]
    counts = {}
    for name, executor in (("inline", InlineExecutor()), ("local", LocalExecutor(2, 1)),
                           ("ray", RayExecutor(threads=1))):
        store = RunStore(tmp_path / name)
        records = run_many(configs, store, executor=executor)
        assert [r["status"] for r in records] == ["finished", "finished"], name
        assert all((store.run_dir(r["run_id"]) / STUDENT).is_file() for r in records)
        counts[name] = [_counts(store, r["run_id"]) for r in records]
    assert counts["local"] == counts["inline"]
    assert counts["ray"] == counts["inline"]


@pytest.mark.slow
def test_local_pool_stops_fast_resumes_and_survives_a_killed_worker(tmp_path, tiny_cfg, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the workers' run folders go
    (tmp_path / "tmp").mkdir()
    cfg = tiny_cfg.replace(epochs=3)
    store = RunStore(tmp_path)
    whole = run_many([cfg], store, executor=InlineExecutor())[0]

    stop, stopped_at = threading.Event(), []

    def stop_after_epoch_1(_i: int, ev: Event) -> None:
        if isinstance(ev, EpochFinished) and ev.epoch == 1:
            stop.set()
            stopped_at.append(time.perf_counter())
        if isinstance(ev, RunStopped):
            stopped_at.append(time.perf_counter())

    part = run_many([cfg], store, executor=LocalExecutor(1, 1), stop=stop, on_event=stop_after_epoch_1)[0]
    assert part["status"] == "stopped" and stopped_at[1] - stopped_at[0] < 2.0
    LocalExecutor(1, 1).execute(cfg, store, run_id=part["run_id"], resume=True)
    assert [e.epoch for _, e in store.events(part["run_id"]) if isinstance(e, RunResumed)] == [1]
    assert _counts(store, part["run_id"]) == _counts(store, whole["run_id"])

    def kill_worker(_i: int, ev: Event) -> None:
        if isinstance(ev, EpochFinished) and ev.epoch == 1:
            for child in mp.active_children():
                if child.name == "ferd-worker":
                    os.kill(child.pid, signal.SIGKILL)

    killed = run_many([cfg], store, executor=LocalExecutor(1, 1), on_event=kill_worker)[0]
    assert killed["status"] == "interrupted"
    LocalExecutor(1, 1).execute(cfg, store, run_id=killed["run_id"], resume=True)
    assert store.get_run(killed["run_id"]).status == "finished"
    assert _counts(store, killed["run_id"]) == _counts(store, whole["run_id"])
    assert list((tmp_path / "tmp").glob("ferd-worker-*")) == []  # the killed worker's folder too


@pytest.mark.parametrize("kind", ["spawn", "forkserver"])
def test_a_worker_does_not_run_the_parents_main_script(tmp_path, monkeypatch, kind):
    """Under `streamlit run` the app script is `__main__`; a worker (spawned, or forked from the forkserver) must
    not execute it."""
    import sys
    import types

    from ferd.executor import NoMainForkServerProcess, NoMainSpawnProcess, worker_context

    if kind == "forkserver":
        worker_context()  # the forkserver's preload, as the run workers get it
    process = NoMainSpawnProcess if kind == "spawn" else NoMainForkServerProcess

    marker = tmp_path / "ran"
    script = tmp_path / "app_script.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    main = types.ModuleType("__main__")
    main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", main)
    proc = process(target=time.sleep, args=(0,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0 and not marker.exists()
    assert sys.modules["__main__"] is main


def _preloaded(out) -> None:
    import sys

    from ferd.executor import WORKER_PRELOAD

    out.put([name for name in WORKER_PRELOAD if name not in sys.modules])


def test_run_workers_start_with_the_engine_and_its_imports_loaded():
    from ferd.executor import worker_context

    ctx, process = worker_context()
    out = ctx.Queue()
    proc = process(target=_preloaded, args=(out,))
    proc.start()
    assert out.get(timeout=120) == []
    proc.join(60)


def test_evaluations_share_the_idle_cores_between_the_running_runs():
    from ferd.executor import evaluation_share

    assert evaluation_share(cores=2, threads=1, running=2) == 1
    assert evaluation_share(cores=2, threads=1, running=1) == 2  # the other worker is idle
    assert evaluation_share(cores=8, threads=2, running=3) == 2 + 2 // 3
    assert evaluation_share(cores=8, threads=2, running=1) == 8
    assert evaluation_share(cores=2, threads=1, running=0) == 1


def test_the_pool_raises_a_lone_runs_evaluation_threads_and_lowers_them_when_another_starts(tmp_path, tiny_cfg):
    """The driver-side bookkeeping: each running worker's share follows how many runs are running."""
    ex = LocalExecutor(2, 1, cores=2)
    for name in "ab":
        (tmp_path / name).mkdir()
    first = ex.run_fn(tiny_cfg, run_dir=tmp_path / "a")
    assert [h.evaluation_cores.value for h in ex._running] == [2]
    second = ex.run_fn(tiny_cfg, run_dir=tmp_path / "b")
    assert [h.evaluation_cores.value for h in ex._running] == [1, 1]
    for events in (first, second):
        assert list(events)[-1].kind == "run_finished"
    assert ex._running == []



@pytest.mark.slow
def test_a_worker_runs_with_the_drivers_environment_and_folder(tmp_path, monkeypatch, tiny_cfg):
    """The forkserver started earlier, under another environment and folder; a run must see the driver's as they
    are now (its teacher cache, data folder, relative paths), as a spawned worker would."""
    ex = LocalExecutor(1, 1)
    (tmp_path / "first").mkdir()
    assert list(ex.run_fn(tiny_cfg, run_dir=tmp_path / "first"))[-1].kind == "run_finished"  # forkserver up
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FERD_CACHE_DIR", "cache")  # relative: to the driver's folder
    (tmp_path / "second").mkdir()
    events = list(ex.run_fn(tiny_cfg, run_dir=tmp_path / "second"))
    assert events[-1].kind == "run_finished"
    assert list((tmp_path / "cache").rglob("*.pt"))  # the smoke teacher was trained into the driver's cache folder
