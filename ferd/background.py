"""Progress from calls that cannot yield: run them in a helper thread and pass on what they report."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator
from typing import TypeVar

T = TypeVar("T")
E = TypeVar("E")
_DONE = object()


def pumped(work: Callable[[Callable[[E], None]], T]) -> Generator[E, None, T]:
    """Run `work(emit)` in a helper thread, yield the events it emits while it runs, and return its result (or
    raise its exception). Long calls that cannot yield themselves (training the teacher, an evaluation) report
    their progress this way while they run."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work(events.put)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            outcome["error"] = e
        finally:
            events.put(_DONE)

    thread = threading.Thread(target=target, name="ferd-stage", daemon=True)
    thread.start()
    while (item := events.get()) is not _DONE:
        yield item
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
