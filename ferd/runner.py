"""One run, persisted: the engine's events go to the run store as they happen.

Shared by the CLI and the dashboard's job threads, so a run started anywhere is stored the same way and
can be listed, reopened, resumed or exported from anywhere. The process calling `execute` writes the run
and holds its lease (ferd.leases) until the run ends; a second writer is refused (store.RunOwned).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Iterator

from ferd import engine
from ferd.config import Config, from_dict
from ferd.events import TERMINAL, Event, RunFailed, RunResumed, RunStarted
from ferd.preflight import check_runnable
from ferd.store import RunStore

RunFn = Callable[..., Iterator[Event]]


def execute(cfg: Config, store: RunStore, *, stop: threading.Event | None = None, run_id: str | None = None,
            resume: bool = False, name: str = "", on_event: Callable[[Event], None] | None = None,
            run_fn: RunFn | None = None) -> str:
    """Run `cfg` (or resume stored run `run_id` from its last checkpoint), storing every event.

    With `run_id` the stored run's own config is used (`cfg` is ignored) and it restarts from scratch when
    resume=False or when it has no checkpoint yet. Returns the run id.
    The config is checked (`check_runnable`) before a new run is stored or a stored one is touched: a
    ConfigError leaves the store as it was. RunOwned if another live process holds `run_id`.
    An exception from the engine becomes a stored RunFailed event; nothing already stored is lost.
    A resumed run's log keeps everything up to the checkpoint's epoch and marks the resume with RunResumed
    (the engine's second RunStarted is not stored).
    """
    run_fn = run_fn or engine.run
    fresh = run_id is None
    if run_id is None:
        check_runnable(cfg)
        run_id = store.create_run(cfg, name=name, status="queued")  # leased to this process
    else:
        cfg = from_dict(store.get_run(run_id).config)
        check_runnable(cfg)
        store.acquire(run_id)
    try:
        resume = resume and not fresh and (store.run_dir(run_id) / engine.CHECKPOINT).is_file()
        if not fresh and not resume:
            store.truncate_events(run_id, after_epoch=-1)  # a restart from scratch: every event goes
        _stream(cfg, store, run_id, stop, resume, on_event, run_fn)
    finally:
        store.release(run_id)
    return run_id


def _stream(cfg: Config, store: RunStore, run_id: str, stop: threading.Event | None, resume: bool,
            on_event: Callable[[Event], None] | None, run_fn: RunFn) -> None:
    terminal = False
    try:
        for ev in run_fn(cfg, stop, run_dir=store.run_dir(run_id), resume=resume):
            if isinstance(ev, RunStarted) and resume:
                # The log then equals an uninterrupted run's log up to the checkpoint's epoch, plus this marker.
                store.truncate_events(run_id, after_epoch=ev.resumed_from)
                ev = RunResumed(epoch=ev.resumed_from, time=time.time(), device=ev.device)
            store.append(run_id, ev)
            terminal = terminal or ev.kind in TERMINAL
            if on_event is not None:
                on_event(ev)
    except Exception as e:  # a crash in the loop itself (or an observer) is still recorded
        ev = RunFailed(epoch=0, reason=f"{type(e).__name__}: {e}", detail=traceback.format_exc())
        store.append(run_id, ev)
        if on_event is not None:
            on_event(ev)
        return
    if not terminal:
        store.append(run_id, RunFailed(epoch=0, reason="the engine ended without a final event"))
