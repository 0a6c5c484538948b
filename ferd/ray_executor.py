"""The `ray` executor: each run is a Ray actor that requests the CPUs and GPU its config needs.

The actor runs `ferd.executor.worker_messages` in a thread and buffers its messages; the driver polls them
(`poll`), forwards a stop request (`stop`, answered between two engine steps) and notices a dead actor
(RayActorError on the next poll). Without an address a local Ray is started (usage statistics off, no Ray
dashboard, listening on 127.0.0.1 only) and shut down by `close`. The `ferd` package travels to the
workers with the actor's runtime environment (`py_modules`), so cluster nodes need the Python packages of
requirements.txt but not this checkout.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ferd.config import Config
from ferd.events import Event, RunFailed
from ferd.executor import Executor, ExecutorError, FileBlob, WorkerGone, check_reachable, relay, stored_checkpoint

USAGE_STATS_ENV = "RAY_USAGE_STATS_ENABLED"
FERD_PACKAGE = str(Path(__file__).resolve().parent)


class RunActor:
    """One run on a Ray worker (wrapped with ray.remote by RayExecutor)."""

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._messages: list[Event | FileBlob] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self, cfg: Config, resume: bool, checkpoint: bytes | None) -> None:
        threading.Thread(target=self._loop, args=(cfg, resume, checkpoint), name="ferd-run", daemon=True).start()

    def _loop(self, cfg: Config, resume: bool, checkpoint: bytes | None) -> None:
        from ferd.executor import worker_messages

        try:
            for msg in worker_messages(cfg, self._stop, resume=resume, checkpoint=checkpoint, threads=self._threads):
                with self._lock:
                    self._messages.append(msg)
        except Exception as e:  # noqa: BLE001 - e.g. a file the engine wrote cannot be read back
            with self._lock:
                self._messages.append(RunFailed(epoch=0, reason=f"{type(e).__name__}: {e}",
                                                detail=traceback.format_exc()))

    def poll(self) -> list[Event | FileBlob]:
        with self._lock:
            out, self._messages = self._messages, []
        return out

    def stop(self) -> None:
        self._stop.set()


class _ActorHandle:
    def __init__(self, actor: Any, cfg: Config, resume: bool, checkpoint: bytes | None) -> None:
        self._actor = actor
        actor.start.remote(cfg, resume, checkpoint)

    def poll(self, timeout: float) -> list[Event | FileBlob]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            out = ray.get(self._actor.poll.remote(), timeout=max(timeout, 1.0))
        except GetTimeoutError:  # still waiting for resources, or busy: ask again
            return []
        except RayActorError as e:
            raise WorkerGone(f"Ray actor died ({type(e).__name__})") from None
        if not out:
            time.sleep(timeout)
        return out

    def stop(self) -> None:
        self._actor.stop.remote()

    def close(self) -> None:
        import ray

        ray.kill(self._actor, no_restart=True)


class RayExecutor(Executor):
    """Runs as Ray actors on the cluster at `address` (None: a local Ray with every core of this machine)."""

    name = "ray"

    def __init__(self, address: str | None = None, *, threads: int = 1, workers: int | None = None) -> None:
        if workers is not None and workers < 1:
            raise ExecutorError(f"--workers must be at least 1, got {workers}")
        if threads < 1:
            raise ExecutorError(f"threads per run must be at least 1, got {threads}")
        os.environ.setdefault(USAGE_STATS_ENV, "0")
        if address:
            check_reachable(address)  # before ray.init, which would retry for a long time
        import ray

        self._owns = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "runtime_env": {"py_modules": [FERD_PACKAGE]}}
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=os.cpu_count() or 1, _node_ip_address="127.0.0.1", **kwargs)
            self._owns = True
        resources = ray.cluster_resources()
        self.threads = threads
        self.gpus = int(resources.get("GPU", 0))
        self.slots = workers or max(1, int(resources.get("CPU", 1)) // threads)
        self._actor_cls = ray.remote(RunActor)

    def _gpus_for(self, cfg: Config) -> int:
        device = cfg.device.strip().lower()
        return 1 if device.startswith("cuda") or (device == "auto" and self.gpus > 0) else 0

    def run_fn(self, cfg: Config, stop: threading.Event | None = None, *, run_dir: Path | None = None,
               resume: bool = False) -> Iterator[Event]:
        if run_dir is None:
            raise ValueError("the ray executor needs the run's folder")
        actor = self._actor_cls.options(num_cpus=self.threads, num_gpus=self._gpus_for(cfg)).remote(self.threads)
        handle = _ActorHandle(actor, cfg, resume, stored_checkpoint(Path(run_dir), resume))
        return relay(handle, stop, Path(run_dir))

    def describe(self) -> str:
        return f"ray: {self.slots} run(s) at a time x {self.threads} CPU(s), {self.gpus} GPU(s) in the cluster"

    def close(self) -> None:
        if self._owns:
            import ray

            ray.shutdown()
            self._owns = False
