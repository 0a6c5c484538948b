"""Run ownership: the process that writes a run holds a lease on it (pid + host + heartbeat in the store).

A lease is alive while its owner process is (same host: the pid exists) and its heartbeat is younger than
LEASE_TIMEOUT_S (any host). Readers show a `queued`/`running` run whose lease is gone or dead as
`interrupted`; a second writer of a run with a live lease is refused with a message naming the owner.
One Heartbeat thread per RunStore refreshes every lease that store holds each HEARTBEAT_S seconds.

Temporary folders are owned the same way (`scratch_folder`): named after their process, and removed by the next
process that makes one of the same kind once that process is gone, so that a process killed before it could
clean up (SIGKILL, a killed Ray actor) leaves nothing behind for long.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LEASE_TIMEOUT_S = 30.0
"""A lease whose heartbeat is older than this counts as dead (its owner hung, or lives on a lost host)."""
HEARTBEAT_S = 5.0
"""How often a store refreshes the heartbeat of the leases it holds."""
HOST = socket.gethostname()


@dataclass(frozen=True)
class Owner:
    """Who holds a run's lease."""

    pid: int
    host: str
    heartbeat: float
    """Epoch seconds of the last refresh."""

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}"

    def is_mine(self) -> bool:
        return self.pid == os.getpid() and self.host == HOST

    def alive(self, now: float | None = None) -> bool:
        """False when the heartbeat is stale, or the owner ran on this host and its process is gone."""
        now = time.time() if now is None else now
        if now - self.heartbeat > LEASE_TIMEOUT_S:
            return False
        return self.host != HOST or pid_alive(self.pid)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one we may not signal counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def scratch_folder(prefix: str) -> Path:
    """A new temporary folder owned by this process, `<prefix><pid>-<random>`, made after removing the folders of
    the same prefix whose process has ended (on this machine: the temporary folder is local)."""
    for old in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


class Heartbeat:
    """A daemon thread calling `beat()` every HEARTBEAT_S seconds until `close()`; errors in a beat are
    ignored (the next beat retries; a lease that misses beats for LEASE_TIMEOUT_S expires)."""

    def __init__(self, beat: Callable[[], None], interval_s: float = HEARTBEAT_S) -> None:
        self._beat = beat
        self._interval = interval_s
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ferd-lease-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closing.wait(self._interval):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - a locked or full database: the next beat retries
                continue

    def close(self) -> None:
        self._closing.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self._interval + 1.0)
