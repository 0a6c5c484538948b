"""Process-wide resources of the dashboard: the run store and the job registry (one each per process).

Set FERD_HOME to choose the store root. FERD_FAKE_ENGINE selects the fake engine of tests/fakes.py
instead of the real one (for AppTest and UI work without training): `1` = instant, a number of seconds
= that delay before every event (e.g. `0.05` to watch a run progress). UMAP warms up on the Samples
page's first use, in a worker process; FERD_UMAP_PROCESS=0 runs it in this process instead (tests that
stand in a fake `umap` module).

Where runs execute (read once, when the server creates its job registry):
  FERD_EXECUTOR=local (default) | ray | inline    local: worker processes on this machine; ray: a Ray
                                                   cluster; inline: one run at a time in the server process
  FERD_WORKERS=N                                  runs at once (default: one per core)
  FERD_RAY_ADDRESS=HOST:PORT                      with ray: the cluster (default: a local Ray)
The fake engine always runs inline.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import streamlit as st

from app import reference
from app.embedding import UmapService
from app.frames import headline
from app.jobs import JobRegistry, RunFn
from ferd import events as ev
from ferd.executor import EXECUTORS, Executor, LocalExecutor, plan_workers
from ferd.pack import Pack
from ferd.store import RunStore

FAKE_ENGINE_ENV = "FERD_FAKE_ENGINE"
UMAP_PROCESS_ENV = "FERD_UMAP_PROCESS"
PACK_DIR_ENV = "FERD_PACK_DIR"
EXECUTOR_ENV, WORKERS_ENV, RAY_ADDRESS_ENV = "FERD_EXECUTOR", "FERD_WORKERS", "FERD_RAY_ADDRESS"


def _engine_override() -> RunFn | None:
    value = os.environ.get(FAKE_ENGINE_ENV, "")
    if not value:
        return None
    from tests.fakes import fake_run, slow_fake_run

    if value == "1":
        return fake_run
    try:
        return slow_fake_run(float(value))
    except ValueError as e:
        raise ValueError(f"{FAKE_ENGINE_ENV} must be 1 or a delay in seconds, got {value!r}") from e


def make_executor(env: Mapping[str, str]) -> Executor | None:
    """The executor the environment asks for (None: in the server process, one run at a time)."""
    kind = env.get(EXECUTOR_ENV, "local").strip().lower() or "local"
    if kind not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV} must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    try:
        workers = int(env[WORKERS_ENV]) if env.get(WORKERS_ENV) else None
    except ValueError as e:
        raise ValueError(f"{WORKERS_ENV} must be a whole number, got {env[WORKERS_ENV]!r}") from e
    if kind == "inline":
        return None
    if kind == "ray":
        from ferd.ray_executor import RayExecutor

        return RayExecutor(env.get(RAY_ADDRESS_ENV) or None, workers=workers)
    cores = os.cpu_count() or 1
    n, threads = plan_workers([], cores if workers is None else workers, cores)
    return LocalExecutor(n, threads)


@st.cache_resource
def get_store() -> RunStore:
    """The run store under $FERD_HOME (or the user data dir)."""
    return RunStore()


def _executor_registry(store: RunStore) -> JobRegistry:
    """A lone local job runs in the server's own job thread (no worker to spawn: its first event comes at
    once); jobs started beside it go to the worker processes. Ray always gets every job."""
    executor = make_executor(os.environ)
    return JobRegistry(store, executor=executor, inline_lone_job=executor is None or executor.name == "local")


@st.cache_resource
def get_registry() -> JobRegistry:
    """The job registry; creating it marks runs left queued/running by a dead process as interrupted (runs
    another live process owns keep their status: see ferd.leases)."""
    store = get_store()
    fake = _engine_override()
    registry = JobRegistry(store, run_fn=fake) if fake else _executor_registry(store)
    store.mark_interrupted(alive=registry.alive_ids())
    return registry


@st.cache_resource(show_spinner=False)
def get_umap_service() -> UmapService:
    """The process's UMAP service; its warm-up (numba compilation) starts in the background on first use.

    Not at server start-up: the compilation (in the worker process) takes about a minute of CPU, which a
    run started right after opening the app (the common case) would compete with on a small machine. The
    Samples page shows PCA until UMAP is ready."""
    service = UmapService(isolate=os.environ.get(UMAP_PROCESS_ENV, "1") != "0")
    service.warm_up()
    return service


@st.cache_resource(show_spinner=False)
def get_pack() -> Pack | None:
    """The reference pack ($FERD_PACK_DIR, default assets/reference), opened read-only; None without one."""
    return reference.load(Path(os.environ.get(PACK_DIR_ENV) or reference.PACK_DIR))


@st.cache_resource(max_entries=16, show_spinner=False)
def _stored_events(root: str, run_id: str, updated: float) -> list[ev.Event]:
    """Decoded events of a stored run, shared (read-only) between sessions until the run changes."""
    return [e for _, e in get_store().events(run_id)]


def run_events(run_id: str) -> list[ev.Event]:
    """All events of a run: from the live job while it is alive, else from the store (cached per update)."""
    registry = get_registry()
    if registry.is_alive(run_id):
        return registry.events(run_id)
    store = get_store()
    return _stored_events(str(store.root), run_id, store.get_run(run_id).updated)


def run_headline(run_id: str) -> dict[str, float]:
    """Headline metrics (clean / PGD-20 mean, worst, NSD) from the run's last evaluation."""
    return headline(run_events(run_id))
