"""The process-wide job registry: hands runs to an executor from background driver threads.

Plain Python (no Streamlit): a job is a daemon thread that drives one run through `ferd.runner.execute`,
with its own stop event. With an executor (`ferd.executor`: local worker processes or Ray) up to
`executor.slots` jobs run at once, the engine in the workers; without one the engine runs in the job
thread itself, one job at a time per device (tests pass a fake engine this way). Every event goes to the
run store (so nothing is lost) and to the job's in-memory list, which pages poll while the job is alive.
Queued jobs wait in submission order; `stop` works on them too.
This process holds the lease (ferd.leases) of every run it queues or runs: another process's run is never
resumed here (RunOwned), and a config that cannot run here is refused before a run row exists.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ferd import events as ev
from ferd.config import Config
from ferd.device import resolve_device
from ferd.executor import Executor

RunFn = Callable[..., Iterator[ev.Event]]
ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class JobView:
    """A snapshot of one job for the sidebar queue and the Live page."""

    run_id: str
    name: str
    status: str
    """queued, running, finished, stopped or failed."""
    position: int | None
    """1-based place in the queue while queued, else None."""
    epoch: int
    total_epochs: int
    started: float | None
    """Wall-clock time (time.time()) the job started running, None while queued."""
    eta_s: float | None
    """Seconds left, from the mean epoch wall time of this job (None before the first epoch ends)."""


@dataclass
class _Job:
    run_id: str
    name: str
    cfg: Config
    device: str
    resume: bool
    stop: threading.Event = field(default_factory=threading.Event)
    status: str = "queued"
    events: list[ev.Event] | None = field(default_factory=list)
    """Events while the job is alive; None once finished (the store then holds them all)."""
    thread: threading.Thread | None = None
    in_thread: bool = False
    """The engine runs in the job thread itself (a lone job with `inline_lone_job`), not in a worker."""
    started: float | None = None
    first_epoch_t: float | None = None
    last_epoch_t: float | None = None
    epochs_done: int = 0
    epoch: int = 0
    total_epochs: int = 0


def _device_key(cfg: Config) -> str:
    try:
        return str(resolve_device(cfg.device))
    except ValueError:
        return cfg.device


class JobRegistry:
    """Submit, queue, stop and observe engine runs; one registry per process.

    `executor` runs the jobs (`executor.slots` at once, in submission order; the registry closes it on
    shutdown). With `inline_lone_job` a job that starts while no other job runs executes in its own thread
    instead (no worker to start: its first event comes at once); jobs started beside it go to the executor.
    Whatever runs in a job thread runs `run_fn` (tests pass a fake engine), None: `ferd.runner.execute`'s
    default engine.
    """

    def __init__(self, store: Any, *, run_fn: RunFn | None = None, max_concurrent_per_device: int = 1,
                 executor: Executor | None = None, inline_lone_job: bool = False) -> None:
        if max_concurrent_per_device < 1:
            raise ValueError("max_concurrent_per_device must be >= 1")
        self.store = store
        self.executor = executor
        self._inline_lone_job = inline_lone_job
        self._run_fn = run_fn
        self._max_per_device = max_concurrent_per_device
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._closed = False
        atexit.register(self.shutdown)

    # ---- control ----
    def submit(self, cfg: Config, *, name: str = "", resume_run_id: str | None = None) -> str:
        """Queue a run (a new one, or `resume_run_id` from its last checkpoint); returns its run id at once.

        ConfigError if the config cannot run here (ferd.preflight); RunOwned if another live process
        writes `resume_run_id`."""
        from ferd.preflight import check_runnable  # imports torch: only when a run is submitted

        check_runnable(cfg)
        with self._lock:
            if self._closed:
                raise RuntimeError("the job registry is shut down")
            if resume_run_id is not None:
                if resume_run_id in self._jobs and self._jobs[resume_run_id].status in ACTIVE:
                    raise ValueError(f"run {resume_run_id} is already queued or running")
                info = self.store.get_run(resume_run_id)
                run_id = resume_run_id
                name = name or info.name
                self.store.acquire(run_id)
                self.store.set_status(run_id, "queued")
            else:
                run_id = self.store.create_run(cfg, name=name, status="queued")
            # A resumed run's log is truncated to its checkpoint by the runner: read it from the store.
            self._jobs[run_id] = _Job(run_id=run_id, name=name, cfg=cfg, device=_device_key(cfg),
                                      resume=resume_run_id is not None,
                                      events=None if resume_run_id is not None else [])
            self._schedule_locked()
        return run_id

    def stop(self, run_id: str) -> bool:
        """Ask a job to stop (a queued job leaves the queue as stopped). False if it is not active."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is None or job.status not in ACTIVE:
                return False
            job.stop.set()
            if job.status == "queued":
                self._finish_queued_locked(job, "stopped before it started")
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every job and join their threads (registered with atexit: torch threads must not outlive us)."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                job.stop.set()
                if job.status == "queued":
                    self._finish_queued_locked(job, "server shut down before it started")
            threads = [j.thread for j in self._jobs.values() if j.thread is not None]
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self.executor is not None:
            self.executor.close()
        atexit.unregister(self.shutdown)

    # ---- observation ----
    def jobs(self) -> list[JobView]:
        """Every job of this process, newest first; queued ones carry their queue position."""
        with self._lock:
            queued = [j.run_id for j in self._jobs.values() if j.status == "queued"]
            views = [self._view_locked(j, queued) for j in self._jobs.values()]
        return views[::-1]

    def job(self, run_id: str) -> JobView | None:
        with self._lock:
            job = self._jobs.get(run_id)
            if job is None:
                return None
            return self._view_locked(job, [j.run_id for j in self._jobs.values() if j.status == "queued"])

    def events(self, run_id: str, since: int = 0) -> list[ev.Event]:
        """Events of a run from index `since` (0-based position in its log): in memory while live, else stored."""
        with self._lock:
            job = self._jobs.get(run_id)
            if job is not None and job.events is not None and job.status == "running":
                return job.events[since:]
        return [e for _, e in self.store.events(run_id)][since:]

    def is_alive(self, run_id: str) -> bool:
        """True while the run is queued or running in this process."""
        with self._lock:
            job = self._jobs.get(run_id)
            return job is not None and job.status in ACTIVE

    def alive_ids(self) -> list[str]:
        with self._lock:
            return [j.run_id for j in self._jobs.values() if j.status in ACTIVE]

    # ---- internals (call with the lock held) ----
    def _view_locked(self, job: _Job, queued: list[str]) -> JobView:
        eta = None
        if job.status == "running" and job.epochs_done and job.first_epoch_t is not None:
            per_epoch = (job.last_epoch_t - job.first_epoch_t) / job.epochs_done
            eta = per_epoch * max(job.total_epochs - job.epoch, 0)
        position = queued.index(job.run_id) + 1 if job.status == "queued" else None
        return JobView(run_id=job.run_id, name=job.name, status=job.status, position=position, epoch=job.epoch,
                       total_epochs=job.total_epochs or job.cfg.epochs, started=job.started, eta_s=eta)

    def _finish_queued_locked(self, job: _Job, reason: str) -> None:
        job.status = "stopped"
        job.events = None
        self.store.append(job.run_id, ev.RunStopped(epoch=0, reason=reason))  # sets the stored status
        self.store.release(job.run_id)

    def _schedule_locked(self) -> None:
        if self._closed:
            return
        # With an executor every job shares its slots; without one each device runs its own queue.
        pool = (lambda j: "executor") if self.executor is not None else (lambda j: j.device)
        limit = self.executor.slots if self.executor is not None else self._max_per_device
        running: dict[str, int] = {}
        for j in self._jobs.values():
            if j.status == "running":
                running[pool(j)] = running.get(pool(j), 0) + 1
        for j in self._jobs.values():
            if j.status != "queued" or running.get(pool(j), 0) >= limit:
                continue
            j.in_thread = self._inline_lone_job and sum(running.values()) == 0
            running[pool(j)] = running.get(pool(j), 0) + 1
            j.status = "running"
            j.started = time.time()
            j.thread = threading.Thread(target=self._work, args=(j,), name=f"ferd-job-{j.run_id}", daemon=True)
            j.thread.start()

    # ---- the job thread (never touches Streamlit) ----
    def _on_event(self, job: _Job, event: ev.Event) -> None:
        now = time.monotonic()
        with self._lock:
            if job.events is not None:
                job.events.append(event)
            if isinstance(event, ev.EpochStarted):
                job.total_epochs = event.total_epochs
                if job.first_epoch_t is None:
                    job.first_epoch_t = now
            elif isinstance(event, ev.EpochFinished):
                job.epoch = event.epoch
                job.epochs_done += 1
                job.last_epoch_t = now
            elif event.kind in ev.TERMINAL:
                job.status = {"run_finished": "finished", "run_stopped": "stopped"}.get(event.kind, "failed")

    def _work(self, job: _Job) -> None:
        try:
            from ferd.runner import execute  # imports torch and the engine: only when a job runs

            self.store.set_status(job.run_id, "running")
            on_event = lambda e: self._on_event(job, e)  # noqa: E731
            if self.executor is not None and not job.in_thread:
                self.executor.execute(job.cfg, self.store, run_id=job.run_id, stop=job.stop, resume=job.resume,
                                      on_event=on_event)
            else:
                kwargs: dict[str, Any] = {"run_fn": self._run_fn} if self._run_fn is not None else {}
                execute(job.cfg, self.store, stop=job.stop, run_id=job.run_id, resume=job.resume,
                        on_event=on_event, **kwargs)
        except Exception as e:  # noqa: BLE001 - the runner's own failure path failed; keep the reason in the store
            failed = ev.RunFailed(epoch=job.epoch, reason=f"{type(e).__name__}: {e}")
            try:
                self.store.append(job.run_id, failed)  # sets the stored status
            finally:
                with self._lock:
                    job.status = "failed"
        finally:
            self._release(job.run_id)
            with self._lock:
                if job.status in ACTIVE:
                    job.status = self._store_status(job.run_id)
                job.events = None
                self._schedule_locked()

    def _release(self, run_id: str) -> None:
        try:
            self.store.release(run_id)
        except Exception:  # noqa: BLE001 - an unreachable store: the lease lapses by its timeout
            return

    def _store_status(self, run_id: str) -> str:
        try:
            status = self.store.get_run(run_id).status
        except Exception:  # noqa: BLE001 - a deleted or unreadable run counts as failed
            return "failed"
        return status if status not in ACTIVE else "failed"
