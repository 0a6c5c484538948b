"""Where runs execute: in the calling thread (`inline`), in local worker processes (`local`) or on Ray (`ray`).

Every executor gives `ferd.runner.execute` a `run_fn` with the engine's signature, so the driver (the
process that owns the run store) stays its only writer. A worker runs `ferd.engine.run` in a private
temporary folder and sends back the typed events plus the bytes of each file the engine wrote (checkpoint,
student); the driver writes those files atomically into the run's folder and points the events' paths at
them. On resume the driver sends the stored checkpoint to the worker. So a worker needs no shared disk,
and `--resume` works whichever executor ran the run.

A stop request is forwarded to the worker at once (an mp.Event, or a Ray actor method). A worker that dies
ends its run with RunStopped(reason "worker died: ..."), and `execute` then marks the run `interrupted`:
it keeps its last checkpoint and can be resumed.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from multiprocessing.context import ForkServerProcess, SpawnProcess
from pathlib import Path
from typing import Any, Protocol

from ferd import atomic
from ferd.config import Config
from ferd.events import TERMINAL, CheckpointSaved, Event, RunFinished, RunStopped
from ferd.leases import scratch_folder
from ferd.store import RunStore

EXECUTORS = ("inline", "local", "ray")
CHECKPOINT = "checkpoint.pt"  # the engine's file names (ferd.engine imports torch: not at module level)
STUDENT = "student.pt"
WORKER_DIED = "worker died"
POLL_S = 0.2
CONNECT_TIMEOUT_S = 3.0


class ExecutorError(ValueError):
    """A user error in choosing or reaching an executor (bad --workers, unreachable --address)."""


@dataclass(frozen=True)
class FileBlob:
    """A file the engine wrote in the worker, to be written under the same name in the run's folder."""

    name: str
    data: bytes


WORKER_FOLDER = "ferd-worker-"
"""Prefix of a run's working folder in the temporary folder (`ferd.leases.scratch_folder`)."""


class WorkerGone(Exception):
    """The worker process or actor ended without a final event."""


# ---- worker side ----
def worker_messages(cfg: Config, stop: Any, *, resume: bool, checkpoint: bytes | None, threads: int | None,
                    evaluation_cores: Callable[[], int] | None = None,
                    folder: Path | None = None) -> Iterator[Event | FileBlob]:
    """Run the engine in `folder` (a temporary folder of its own when None); yield its events, each file it wrote
    just before the event that announces it. `evaluation_cores()`, where given, is how many threads the run's
    evaluations may use now (`ferd.device.set_evaluation_threads`)."""
    if folder is None:  # a folder of this process's own (`scratch_folder`: removed later should this process be killed)
        tmp = scratch_folder(WORKER_FOLDER)
        try:
            yield from worker_messages(cfg, stop, resume=resume, checkpoint=checkpoint, threads=threads,
                                       evaluation_cores=evaluation_cores, folder=tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    from ferd import engine
    from ferd.device import set_auto_threads, set_evaluation_threads

    if threads:
        set_auto_threads(threads)
    set_evaluation_threads(evaluation_cores)
    if checkpoint is not None:
        (folder / CHECKPOINT).write_bytes(checkpoint)
    for ev in engine.run(cfg, stop, run_dir=folder, resume=resume):
        if isinstance(ev, CheckpointSaved):
            yield FileBlob(CHECKPOINT, (folder / CHECKPOINT).read_bytes())
        elif isinstance(ev, RunFinished) and ev.student_path:
            yield FileBlob(STUDENT, (folder / STUDENT).read_bytes())
        yield ev


def _process_main(cfg: Config, resume: bool, checkpoint: bytes | None, threads: int | None,
                  out: Any, stop: Any, evaluation_cores: Any, environ: dict[str, str], cwd: str, folder: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, which forwards a stop
    # A fork of the forkserver has the forkserver's environment and folder; a run sees the driver's, as spawned
    # workers did (FERD_CACHE_DIR, FERD_DATA_DIR, relative data roots).
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    for msg in worker_messages(cfg, stop, resume=resume, checkpoint=checkpoint, threads=threads,
                               evaluation_cores=lambda: evaluation_cores.value, folder=Path(folder)):
        out.put(msg)


# ---- driver side ----
class _Handle(Protocol):
    def poll(self, timeout: float) -> list[Event | FileBlob]: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


def relay(handle: _Handle, stop: threading.Event | None, run_dir: Path) -> Iterator[Event]:
    """The events of a remote run as if the engine ran here: files written into `run_dir`, stop forwarded,
    a dead worker turned into RunStopped."""
    epoch, stop_sent = 0, False
    try:
        while True:
            if stop is not None and stop.is_set() and not stop_sent:
                handle.stop()
                stop_sent = True
            try:
                messages = handle.poll(POLL_S)
            except WorkerGone as e:
                yield RunStopped(epoch=epoch, reason=f"{WORKER_DIED}: {e}")
                return
            for msg in messages:
                if isinstance(msg, FileBlob):
                    atomic.write_bytes(run_dir / msg.name, msg.data)
                    continue
                if isinstance(msg, CheckpointSaved):
                    msg = dataclasses.replace(msg, path=str(run_dir / CHECKPOINT))
                elif isinstance(msg, RunFinished) and msg.student_path:
                    msg = dataclasses.replace(msg, student_path=str(run_dir / STUDENT))
                epoch = max(epoch, msg.epoch)
                yield msg
                if msg.kind in TERMINAL:
                    return
    finally:
        handle.close()


def stored_checkpoint(run_dir: Path, resume: bool) -> bytes | None:
    path = run_dir / CHECKPOINT
    return path.read_bytes() if resume and path.is_file() else None


class _NoMainStart:
    """start() without the parent's `__main__` script: under `streamlit run` that is the app script, which would
    run outside any script run in the child (st.* calls logging "missing ScriptRunContext", the app's job
    registry and store created there). A placeholder main module without a file is installed for just the
    `start()` call (when spawn and forkserver take their preparation data)."""

    _lock = threading.Lock()  # driver threads start workers concurrently: one swap at a time

    def start(self) -> None:
        with self._lock:
            real = sys.modules.get("__main__")
            placeholder = types.ModuleType("__main__")
            sys.modules["__main__"] = placeholder
            try:
                super().start()  # type: ignore[misc]
            finally:
                if sys.modules.get("__main__") is placeholder:  # a script run may have installed its own meanwhile
                    sys.modules["__main__"] = real


class NoMainSpawnProcess(_NoMainStart, SpawnProcess):
    """A spawned process that does not import the parent's `__main__` (see `_NoMainStart`). Used by the
    dashboard's UMAP worker, and by the run workers where forkserver is not available."""


class NoMainForkServerProcess(_NoMainStart, ForkServerProcess):
    """A process forked from the forkserver, without the parent's `__main__` (see `_NoMainStart`)."""


WORKER_PRELOAD = ("ferd.executor", "ferd.engine", "ferd.data", "ferd.split_kernel", "torch._dynamo")
"""What the forkserver imports once, so that each run worker forked from it starts with them imported: a spawned
worker spent ~4 s importing torch and ferd, and ~2 s importing torch._dynamo (torch.optim's optimisers import it
when built). scikit-learn (~2 s) is not preloaded: the digits splits come from the cache folder after their first
use (ferd.data). The feature split's numba loop (ferd.split_kernel) is imported, not compiled: each worker loads it
from numba's disk cache at its first split. The forkserver runs no torch op, so no OpenMP thread pool exists to be
inherited by a fork."""


@cache
def worker_context() -> tuple[Any, type]:
    """The multiprocessing context and process class of the run workers: forkserver where the platform has it
    (Linux, macOS), preloaded with `WORKER_PRELOAD`; spawn elsewhere. Decided once per process."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(WORKER_PRELOAD))
        return ctx, NoMainForkServerProcess
    return mp.get_context("spawn"), NoMainSpawnProcess


class _ProcessHandle:
    def __init__(self, cfg: Config, resume: bool, checkpoint: bytes | None, threads: int,
                 on_close: Callable[[_ProcessHandle], None] = lambda _h: None) -> None:
        ctx, process = worker_context()
        self._queue = ctx.Queue()
        self._stop = ctx.Event()
        self.evaluation_cores = ctx.RawValue("i", threads)  # the driver raises it while other cores are idle
        self._on_close = on_close
        # The run's working folder belongs to the driver, which removes it in close(): a worker that is killed
        # or dies leaves nothing behind (nor, once a later driver makes its first folder, a killed driver).
        self._folder = str(scratch_folder(WORKER_FOLDER))
        self._proc = process(target=_process_main, name="ferd-worker",
                             args=(cfg, resume, checkpoint, threads, self._queue, self._stop, self.evaluation_cores,
                                   dict(os.environ), os.getcwd(), self._folder))
        self._proc.start()

    def poll(self, timeout: float) -> list[Event | FileBlob]:
        try:
            out = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            if self._proc.is_alive():
                return []
            try:  # it may have put its last messages just before exiting
                out = [self._queue.get(timeout=1.0)]
            except queue.Empty:
                raise WorkerGone(f"worker process {self._proc.pid} exited with code {self._proc.exitcode}") from None
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._queue.close()
        shutil.rmtree(self._folder, ignore_errors=True)
        self._on_close(self)


class Executor:
    """Base: `slots` runs at once, each through `run_fn` (the engine's signature)."""

    name = "inline"
    slots = 1

    def run_fn(self, cfg: Config, stop: threading.Event | None = None, *, run_dir: Path | None = None,
               resume: bool = False) -> Iterator[Event]:
        from ferd import engine

        return engine.run(cfg, stop, run_dir=run_dir, resume=resume)

    def execute(self, cfg: Config, store: RunStore, *, run_id: str, stop: threading.Event | None = None,
                resume: bool = False, on_event: Callable[[Event], None] | None = None) -> str:
        """`ferd.runner.execute` through this executor; a run whose worker died is left `interrupted`."""
        from ferd.runner import execute

        execute(cfg, store, stop=stop, run_id=run_id, resume=resume, on_event=on_event, run_fn=self.run_fn)
        last = store.events(run_id, kinds=TERMINAL)
        if last and isinstance(last[-1][1], RunStopped) and last[-1][1].reason.startswith(WORKER_DIED):
            store.set_status(run_id, "interrupted")
        return run_id

    def close(self) -> None:
        """Release what the executor started (a local Ray); idempotent."""

    def describe(self) -> str:
        return f"{self.name}: {self.slots} run(s) at a time"

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InlineExecutor(Executor):
    """The engine in the calling thread, one run at a time; `threads` sets torch threads for `num_threads = 0`."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def run_fn(self, cfg: Config, stop: threading.Event | None = None, *, run_dir: Path | None = None,
               resume: bool = False) -> Iterator[Event]:
        if self.threads:
            from ferd.device import set_auto_threads

            set_auto_threads(self.threads)
        return super().run_fn(cfg, stop, run_dir=run_dir, resume=resume)


def plan_workers(configs: list[Config] | tuple[Config, ...], workers: int | None,
                 cores: int | None = None) -> tuple[int, int]:
    """(worker processes, torch threads per run) with workers x threads <= cores.

    Threads per run: the configs' `num_threads` when set (> 0), else the cores shared evenly between the
    workers. Raises ExecutorError for workers < 1 or more workers x threads than cores."""
    cores = cores or os.cpu_count() or 1
    fixed = max((c.num_threads for c in configs), default=0)
    if workers is not None:
        if workers < 1:
            raise ExecutorError(f"--workers must be at least 1, got {workers}")
        threads = fixed or max(1, cores // workers)
        if workers * threads > cores:
            raise ExecutorError(f"--workers {workers} x {threads} torch thread(s) per run needs {workers * threads} "
                                f"cores; this machine has {cores} (lower --workers or num_threads)")
        return workers, threads
    threads = fixed or 1
    if threads > cores:
        raise ExecutorError(f"num_threads {threads} is more than this machine's {cores} cores")
    n = max(1, min(len(configs) or 1, cores // threads))
    return n, fixed or max(1, cores // n)


def evaluation_share(cores: int, threads: int, running: int) -> int:
    """Torch threads each of `running` runs (of `threads` threads each) may give its evaluations on `cores`
    cores: its own plus an even share of the idle ones."""
    if running < 1:
        return threads
    return threads + max(0, cores - threads * running) // running


class LocalExecutor(Executor):
    """`workers` worker processes at most (one per run, forked from a preloaded forkserver: a crash costs one
    run, no state leaks). While fewer runs than workers are running (the queue is drained), the runs'
    evaluations use the idle cores (`evaluation_share`); their training keeps its thread count."""

    name = "local"

    def __init__(self, workers: int, threads: int, cores: int | None = None) -> None:
        if workers < 1 or threads < 1:
            raise ExecutorError(f"local executor needs workers >= 1 and threads >= 1, got {workers} and {threads}")
        self.slots, self.threads = workers, threads
        self.cores = max(cores or os.cpu_count() or 1, workers * threads)
        self._running: list[_ProcessHandle] = []
        self._lock = threading.Lock()

    def run_fn(self, cfg: Config, stop: threading.Event | None = None, *, run_dir: Path | None = None,
               resume: bool = False) -> Iterator[Event]:
        if run_dir is None:
            raise ValueError("the local executor needs the run's folder")
        handle = _ProcessHandle(cfg, resume, stored_checkpoint(Path(run_dir), resume), self.threads,
                                on_close=self._ended)
        with self._lock:
            self._running.append(handle)
            self._share()
        return relay(handle, stop, Path(run_dir))

    def _ended(self, handle: _ProcessHandle) -> None:
        with self._lock:
            if handle in self._running:
                self._running.remove(handle)
            self._share()

    def _share(self) -> None:
        share = evaluation_share(self.cores, self.threads, len(self._running))
        for handle in self._running:
            handle.evaluation_cores.value = share

    def describe(self) -> str:
        return f"local: {self.slots} worker process(es) x {self.threads} torch thread(s)"


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ExecutorError unless a TCP connection to the Ray address (host:port or ray://host:port) opens."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ExecutorError(f"--address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ExecutorError(f"--address {address}: no Ray cluster reachable there ({e}); start one with "
                            "`ray start --head` or check the address") from None
