"""The job registry with the fake engine: queueing, stop, shutdown, persistence, failures."""

from __future__ import annotations

import threading
import time

import pytest

from app.jobs import JobRegistry
from ferd import events as ev
from ferd.config import Config
from ferd.executor import Executor
from ferd.store import RunStore
from tests.fakes import fake_run, slow_fake_run

CFG = Config(epochs=3, eval_every=1, warmup_epochs=0, device="cpu")


def wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def store(tmp_path):
    s = RunStore(tmp_path / "runs")
    yield s
    s.close()


@pytest.fixture
def make(store):
    """Registry factory; every registry is shut down (threads joined) before the store closes."""
    made = []

    def factory(store, run_fn) -> JobRegistry:
        made.append(JobRegistry(store, run_fn=run_fn))
        return made[-1]

    yield factory
    for reg in made:
        reg.shutdown(5)


def test_events_reach_the_store_and_status_is_finished(store, make):
    reg = make(store, fake_run)
    run_id = reg.submit(CFG, name="first")
    wait_until(lambda: not reg.is_alive(run_id))
    stored = [e for _, e in store.events(run_id)]
    assert [e.kind for e in stored] == [e.kind for e in fake_run(CFG)]
    assert store.get_run(run_id).status == "finished"
    assert store.get_run(run_id).name == "first"
    assert [e.kind for e in reg.events(run_id)] == [e.kind for e in stored]
    assert reg.events(run_id, since=len(stored) - 1)[0].kind == "run_finished"
    view = reg.jobs()[0]
    assert (view.status, view.epoch, view.total_epochs) == ("finished", 3, 3)
    reg.shutdown(5)


def test_second_job_waits_for_the_first(store, make):
    reg = make(store, slow_fake_run(0.01))
    first = reg.submit(CFG)
    second = reg.submit(CFG.replace(seed=1))
    views = {v.run_id: v for v in reg.jobs()}
    assert views[first].status == "running"
    assert views[second].status == "queued" and views[second].position == 1
    assert store.get_run(second).status == "queued"
    assert reg.jobs()[0].run_id == second  # newest first
    wait_until(lambda: len(store.events(second)) > 0, timeout=20)
    assert reg.job(first).status == "finished"
    # the second only started after the first ended: its first event follows the first's last one
    assert store.events(second)[0][0] > store.events(first)[-1][0]
    wait_until(lambda: not reg.is_alive(second), timeout=20)
    reg.shutdown(5)


def test_live_events_and_eta(store, make):
    reg = make(store, slow_fake_run(0.02))
    run_id = reg.submit(CFG.replace(epochs=20))
    wait_until(lambda: reg.job(run_id).epoch >= 2)
    view = reg.job(run_id)
    assert view.status == "running" and view.eta_s is not None and view.eta_s > 0
    live = reg.events(run_id)
    assert live[0].kind == "run_started" and any(isinstance(e, ev.EpochFinished) for e in live)
    reg.stop(run_id)
    wait_until(lambda: not reg.is_alive(run_id))
    reg.shutdown(5)


def test_stop_running_and_queued(store, make):
    reg = make(store, slow_fake_run(0.02))
    running = reg.submit(CFG.replace(epochs=50))
    queued = reg.submit(CFG)
    assert reg.stop(queued)
    assert reg.job(queued).status == "stopped"
    assert store.get_run(queued).status == "stopped"
    wait_until(lambda: reg.job(running).epoch >= 1)
    assert reg.stop(running)
    wait_until(lambda: not reg.is_alive(running))
    assert store.get_run(running).status == "stopped"
    assert store.events(running)[-1][1].kind == "run_stopped"
    assert not reg.stop(running)  # no longer active
    reg.shutdown(5)


def test_shutdown_stops_and_joins_threads(store, make):
    reg = make(store, slow_fake_run(0.05))
    running = reg.submit(CFG.replace(epochs=100))
    queued = reg.submit(CFG)
    wait_until(lambda: len(reg.events(running)) > 2)
    before = {t.name for t in threading.enumerate()}
    assert f"ferd-job-{running}" in before
    reg.shutdown(5)
    assert f"ferd-job-{running}" not in {t.name for t in threading.enumerate()}
    assert store.get_run(running).status == "stopped"
    assert store.get_run(queued).status == "stopped"
    with pytest.raises(RuntimeError):
        reg.submit(CFG)


def test_failing_run_fn_gives_a_failed_run_with_the_reason(store, make):
    def broken(cfg, stop=None, *, run_dir=None, resume=False):
        yield next(iter(fake_run(cfg)))
        raise RuntimeError("teacher checkpoint missing")

    reg = make(store, broken)
    run_id = reg.submit(CFG)
    wait_until(lambda: not reg.is_alive(run_id))
    assert store.get_run(run_id).status == "failed"
    last = store.events(run_id)[-1][1]
    assert isinstance(last, ev.RunFailed) and "teacher checkpoint missing" in last.reason
    assert reg.job(run_id).status == "failed"
    reg.shutdown(5)


def test_resume_reuses_the_run_id(store, make):
    reg = make(store, fake_run)
    run_id = reg.submit(CFG)
    wait_until(lambda: not reg.is_alive(run_id))
    again = reg.submit(CFG, resume_run_id=run_id)
    assert again == run_id
    wait_until(lambda: not reg.is_alive(run_id))
    kinds = [e.kind for _, e in store.events(run_id)]
    assert kinds.count("run_finished") == 1 and kinds[-1] == "run_finished"  # the old terminal event is gone
    assert store.get_run(run_id).status == "finished"
    reg.shutdown(5)


@pytest.mark.slow
def test_real_engine_smoke_run_through_the_registry(store, make):
    from ferd.config import load_preset

    reg = make(store, None)
    run_id = reg.submit(load_preset("smoke", device="cpu"))
    wait_until(lambda: not reg.is_alive(run_id), timeout=600)
    assert store.get_run(run_id).status == "finished"
    kinds = [e.kind for _, e in store.events(run_id)]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished" and "evaluated" in kinds


class FakePool(Executor):
    """An executor of `slots` slots whose workers play the slow fake engine (in the driver threads)."""

    def __init__(self, slots: int, delay_s: float) -> None:
        self.slots, self._run = slots, slow_fake_run(delay_s)
        self.closed = False

    def run_fn(self, cfg, stop=None, *, run_dir=None, resume=False):
        return self._run(cfg, stop, run_dir=run_dir, resume=resume)

    def close(self) -> None:
        self.closed = True


def test_an_executor_runs_its_slots_at_once_with_true_queue_positions(store):
    pool = FakePool(2, 0.02)
    reg = JobRegistry(store, executor=pool)
    ids = [reg.submit(CFG.replace(epochs=30, seed=s)) for s in range(4)]
    views = {v.run_id: v for v in reg.jobs()}
    assert [views[i].status for i in ids] == ["running", "running", "queued", "queued"]
    assert [views[i].position for i in ids] == [None, None, 1, 2]
    wait_until(lambda: all(reg.job(i).epoch >= 1 for i in ids[:2]))  # both stream events at the same time
    assert all(len(reg.events(i)) > 0 for i in ids[:2])
    reg.stop(ids[0])
    wait_until(lambda: reg.job(ids[2]).status == "running")
    assert reg.job(ids[3]).position == 1
    reg.shutdown(5)
    assert pool.closed and store.get_run(ids[0]).status == "stopped"


def test_a_lone_job_runs_in_thread_and_the_next_ones_go_to_the_executor(store):
    class Recording(FakePool):
        def __init__(self) -> None:
            super().__init__(2, 0.02)
            self.seen: list[int] = []

        def run_fn(self, cfg, stop=None, *, run_dir=None, resume=False):
            self.seen.append(cfg.seed)
            return super().run_fn(cfg, stop, run_dir=run_dir, resume=resume)

    pool = Recording()
    reg = JobRegistry(store, executor=pool, run_fn=slow_fake_run(0.02), inline_lone_job=True)
    first = reg.submit(CFG.replace(epochs=30, seed=0))
    second = reg.submit(CFG.replace(epochs=2, seed=1))
    wait_until(lambda: not reg.is_alive(second))
    assert pool.seen == [1] and reg.job(first).status == "running"  # the first never reached the executor
    reg.stop(first)
    wait_until(lambda: not reg.is_alive(first))
    assert store.get_run(first).status == "stopped" and store.get_run(second).status == "finished"
    reg.shutdown(5)


def test_dashboard_executor_setting(monkeypatch):
    from app.state import make_executor
    from ferd.executor import LocalExecutor

    assert make_executor({"FERD_EXECUTOR": "inline"}) is None
    local = make_executor({"FERD_WORKERS": "1"})
    assert isinstance(local, LocalExecutor) and local.slots == 1
    with pytest.raises(ValueError, match="FERD_EXECUTOR must be one of inline, local, ray"):
        make_executor({"FERD_EXECUTOR": "cluster"})
    with pytest.raises(ValueError, match="FERD_WORKERS must be a whole number"):
        make_executor({"FERD_WORKERS": "two"})
    with pytest.raises(ValueError, match="--workers must be at least 1"):
        make_executor({"FERD_WORKERS": "0"})
