"""A run computes in one thread of its own and hands its events to the caller one at a time.

Why a thread of its own: torch's CPU kernels run on libgomp (OpenMP), and on this project's 2-core machine a
parallel region opened by any thread other than the first one that opened one ran about 2x slower (a 3x3 conv
at 2 threads: 0.46 ms in the first thread, 0.9-1.3 ms in a later one; README "Benchmark"). An evaluation used
to run in a helper thread so that its progress could be reported while it ran, and with two torch threads the
final evaluation took 67-71 s instead of 28 s. Here every step of a run (teacher, epochs, evaluations) runs in
the same compute thread, so it stays the only thread that opens parallel regions; the stages report their
progress straight into the hand-over (`direct_emitter`).

The hand-over is in lockstep, like a plain generator: the compute thread stops after each event until the
caller asks for the next one, so a stop request set while handling an event is seen before any more work.
Closing the iterator early halts the run (its stop checks see it) and joins the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

E = TypeVar("E")

_local = threading.local()


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


class _Either:
    """Set when the caller's stop flag is set or the caller closed the iterator."""

    def __init__(self, stop: StopFlag, closed: threading.Event) -> None:
        self._stop = stop
        self._closed = closed

    def is_set(self) -> bool:
        return self._closed.is_set() or self._stop.is_set()


def direct_emitter() -> Callable[[Any], None] | None:
    """In a compute thread: the function that hands an event to the caller now (and waits until it asks for the
    next one). Elsewhere None."""
    return getattr(_local, "emit", None)


_ITEM, _ERROR, _DONE = range(3)


def computed(events_of: Callable[[StopFlag], Iterator[E]], stop: StopFlag, *,
             name: str = "ferd-compute") -> Iterator[E]:
    """Iterate `events_of(halt)` in a new thread and yield its events here, one per request. `halt.is_set()` is
    true once `stop` is set or this iterator is closed; an exception in the thread is raised here."""
    items: queue.SimpleQueue = queue.SimpleQueue()
    demand = threading.Semaphore(0)
    closed = threading.Event()

    def emit(event: Any) -> None:
        items.put((_ITEM, event))
        if not closed.is_set():
            demand.acquire()  # until the caller asks for the next event (or closes)

    def body() -> None:
        _local.emit = emit
        try:
            demand.acquire()  # the caller's first request
            for event in events_of(_Either(stop, closed)):
                emit(event)
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            items.put((_ERROR, e))
        finally:
            _local.emit = None
            items.put((_DONE, None))

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    try:
        while True:
            demand.release()
            kind, value = items.get()
            if kind == _DONE:
                return
            if kind == _ERROR:
                raise value
            yield value
    finally:
        closed.set()
        demand.release()  # at most one emit waits; later ones see `closed`
        thread.join()
