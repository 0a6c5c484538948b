"""The run store: a SQLite index of runs plus their event logs, and one folder per run for artifacts.

Layout under the root: `runs.db` (WAL mode, so readers never block the writer and a crash leaves the
last committed transaction intact) and `<run_id>/` (config.toml, checkpoints, samples, student.pt).
One RunStore is shared by the server's job threads and page reruns: a single connection guarded by a
lock serialises calls inside the process; WAL plus a busy timeout handle a second process (the CLI).
Run ids are validated on the way in, so no id can name a path outside the root.

Ownership: the process that writes a run holds its lease (table `leases`, see ferd.leases). Readers show
a `queued`/`running` run whose owner is gone as `interrupted`, so no status stays `running` after a crash.
A store whose folder or database is not writable opens read-only: reads work, writes raise StoreReadOnly.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs

from ferd import atomic
from ferd import config as config_mod
from ferd import events as ev
from ferd.leases import HOST, Heartbeat, Owner
from ferd.store_db import DB_NAME, SCHEMA_VERSION, StoreError, StoreReadOnly, open_db

__all__ = ["DB_NAME", "SCHEMA_VERSION", "RunInfo", "RunNotFound", "RunOwned", "RunStore", "StoreError",
           "StoreReadOnly", "default_root", "validate_run_id"]

STATUSES = ("queued", "running", "finished", "stopped", "failed", "interrupted")
RUN_ID_RE = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
ACTIVE = ("queued", "running")
_COLUMNS = "run_id, name, created, updated, status, method, dataset, seed, config, summary, parent"
_OWNER = "pid, host, heartbeat"

# Event kind -> the run status it sets.
_STATUS_OF_KIND = {"stage_progress": "running", "run_started": "running", "run_resumed": "running",
                   "run_finished": "finished", "run_stopped": "stopped", "run_failed": "failed"}

class RunNotFound(KeyError):
    """No run with this id in the store."""

    def __init__(self, run_id: str, root: Path | None = None) -> None:
        super().__init__(run_id)
        self.run_id, self.root = run_id, root

    def __str__(self) -> str:
        where = f" {self.root}" if self.root is not None else ""
        return f"no run with id {self.run_id!r} in the run store{where} (`python -m ferd runs` lists them)"


class RunOwned(StoreError):
    """A second writer for a run whose lease another live process holds."""

    def __init__(self, run_id: str, owner: Owner) -> None:
        self.run_id, self.owner = run_id, owner
        super().__init__(f"run {run_id} is being written by another process ({owner.describe()}, heartbeat "
                         f"{max(time.time() - owner.heartbeat, 0):.0f} s ago); stop it there or wait for it to end")


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    name: str
    created: float
    """Epoch seconds."""
    updated: float
    """Epoch seconds of the last change (status, summary or appended event)."""
    status: str
    """One of STATUSES."""
    method: str
    dataset: str
    seed: int
    config: dict[str, Any]
    """`ferd.config.to_dict` of the run's config."""
    run_dir: Path
    summary: dict[str, Any] | None
    parent: str | None
    """Run this one was derived from (e.g. the run a comparison baseline belongs to)."""
    owner: Owner | None = None
    """The lease holder (None when no process holds the run). `status` is already `interrupted` when a
    queued or running run's owner is gone."""


def default_root() -> Path:
    """$FERD_HOME if set, else the user data dir's `ferd-studio/runs`."""
    home = os.environ.get("FERD_HOME")
    return Path(home) if home else Path(platformdirs.user_data_dir("ferd-studio")) / "runs"


def validate_run_id(run_id: Any) -> str:
    """Return `run_id` if it has the form YYYYmmdd-HHMMSS-xxxxxx, else raise StoreError."""
    if not isinstance(run_id, str) or RUN_ID_RE.fullmatch(run_id) is None:
        raise StoreError(f"invalid run id {run_id!r}: expected YYYYmmdd-HHMMSS-<6 hex digits>")
    return run_id


def _validate_status(status: str) -> str:
    if status not in STATUSES:
        raise StoreError(f"unknown status {status!r}; choose one of {', '.join(STATUSES)}")
    return status


def _owner(pid: int | None, host: str | None, heartbeat: float | None) -> Owner | None:
    return Owner(int(pid), str(host), float(heartbeat)) if pid is not None else None


def _gone(owner: Owner | None, now: float) -> bool:
    """No lease, or its process is dead, or its heartbeat is stale."""
    return owner is None or not owner.alive(now)


def _effective_status(status: str, owner: Owner | None, now: float) -> str:
    """A queued/running run whose owner is gone is interrupted."""
    return "interrupted" if status in ACTIVE and _gone(owner, now) else status


def _json_default(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


class RunStore:
    """Run index, event logs and run folders under one root (created if missing)."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.db_path = self.root / DB_NAME
        self._lock = threading.RLock()
        self._held: set[str] = set()
        self._heartbeat: Heartbeat | None = None
        db = open_db(self.root)
        self._conn = db.conn
        self.readonly = db.readonly
        """True when the store opened read-only (its folder or database is not writable)."""
        self._select = (f"SELECT {_COLUMNS}, {_OWNER} FROM runs LEFT JOIN leases USING (run_id)" if db.has_leases
                        else f"SELECT {_COLUMNS}, NULL, NULL, NULL FROM runs")

    # ---- plumbing ----
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE takes the write lock up front, so read-then-write is safe)."""
        if self.readonly:
            raise StoreReadOnly(f"the run store {self.root} is read-only; this command needs to write to it")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    @staticmethod
    def _require(c: sqlite3.Connection, run_id: str) -> str:
        row = c.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFound(run_id)
        return row[0]

    def close(self) -> None:
        """Release the leases this store holds and close the database."""
        if self._heartbeat is not None:
            self._heartbeat.close()
        for run_id in sorted(self._held):
            try:
                self.release(run_id)
            except sqlite3.Error:
                continue
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- leases ----
    def acquire(self, run_id: str) -> None:
        """Take the run's lease for this process; RunOwned if another live process holds it."""
        validate_run_id(run_id)
        with self._tx() as c:
            self._require(c, run_id)
            row = c.execute(f"SELECT {_OWNER} FROM leases WHERE run_id = ?", (run_id,)).fetchone()
            owner = _owner(*row) if row else None
            if owner is not None and not owner.is_mine() and owner.alive():
                raise RunOwned(run_id, owner)
            self._insert_lease(c, run_id)

    def release(self, run_id: str) -> None:
        """Give up this process's lease on the run (no-op if it holds none)."""
        validate_run_id(run_id)
        with self._lock:
            held = run_id in self._held
            self._held.discard(run_id)
        if held and not self.readonly:
            with self._tx() as c:
                c.execute("DELETE FROM leases WHERE run_id = ? AND pid = ? AND host = ?", (run_id, os.getpid(), HOST))

    def _insert_lease(self, c: sqlite3.Connection, run_id: str) -> None:
        c.execute("INSERT OR REPLACE INTO leases (run_id, pid, host, heartbeat) VALUES (?, ?, ?, ?)",
                  (run_id, os.getpid(), HOST, time.time()))
        with self._lock:
            self._held.add(run_id)
            if self._heartbeat is None:
                self._heartbeat = Heartbeat(self._beat)

    def _beat(self) -> None:
        with self._lock:
            held = sorted(self._held)
        if held:
            now = time.time()
            with self._tx() as c:
                c.executemany("UPDATE leases SET heartbeat = ? WHERE run_id = ? AND pid = ? AND host = ?",
                              [(now, r, os.getpid(), HOST) for r in held])

    # ---- runs ----
    def create_run(self, cfg: config_mod.Config, *, name: str = "", status: str = "queued",
                   parent: str | None = None) -> str:
        """Register a new run, create its folder with config.toml, and return its id.

        A queued or running run is leased to this process (the one that queued it owns it)."""
        _validate_status(status)
        if self.readonly:
            raise StoreReadOnly(f"the run store {self.root} is read-only; this command needs to write to it")
        if parent is not None:
            validate_run_id(parent)
        cfg_dict = config_mod.to_dict(cfg)
        while True:
            now = time.time()
            run_id = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + "-" + secrets.token_hex(3)
            folder = self.root / run_id
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            break
        try:
            atomic.write_text(folder / "config.toml", config_mod.to_toml(cfg))
            with self._tx() as c:
                if parent is not None:
                    self._require(c, parent)
                c.execute("INSERT INTO runs (run_id, name, created, updated, status, method, dataset, seed, config, "
                          "summary, parent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                          (run_id, name, now, now, status, cfg.method, cfg.dataset, cfg.seed, json.dumps(cfg_dict),
                           parent))
                if status in ACTIVE:
                    self._insert_lease(c, run_id)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return run_id

    def run_dir(self, run_id: str) -> Path:
        """The run's artifact folder (the id is validated; existence is not checked)."""
        return self.root / validate_run_id(run_id)

    def _info(self, row: tuple[Any, ...], now: float) -> RunInfo:
        run_id, name, created, updated, status, method, dataset, seed, cfg, summary, parent, *lease = row
        owner = _owner(*lease)
        return RunInfo(run_id=run_id, name=name, created=created, updated=updated,
                       status=_effective_status(status, owner, now), method=method, dataset=dataset, seed=seed,
                       config=json.loads(cfg), run_dir=self.root / run_id,
                       summary=json.loads(summary) if summary is not None else None, parent=parent, owner=owner)

    def get_run(self, run_id: str) -> RunInfo:
        validate_run_id(run_id)
        rows = self._query(f"{self._select} WHERE run_id = ?", (run_id,))
        if not rows:
            raise RunNotFound(run_id, self.root)
        return self._info(rows[0], time.time())

    def list_runs(self, *, status: str | Collection[str] | None = None) -> list[RunInfo]:
        """All runs (or those with the given status or statuses), newest first; statuses as `get_run` gives."""
        wanted = None
        if status is not None:
            wanted = {status} if isinstance(status, str) else set(status)
            for s in wanted:
                _validate_status(s)
        now = time.time()
        infos = [self._info(r, now) for r in self._query(f"{self._select} ORDER BY created DESC, run_id DESC")]
        return [i for i in infos if wanted is None or i.status in wanted]

    def set_status(self, run_id: str, status: str) -> None:
        validate_run_id(run_id)
        _validate_status(status)
        with self._tx() as c:
            self._require(c, run_id)
            c.execute("UPDATE runs SET status = ?, updated = ? WHERE run_id = ?", (status, time.time(), run_id))

    def set_summary(self, run_id: str, summary: dict[str, Any]) -> None:
        """Store a JSON summary (numpy scalars and arrays become plain numbers and lists)."""
        validate_run_id(run_id)
        text = json.dumps(summary, default=_json_default)
        with self._tx() as c:
            self._require(c, run_id)
            c.execute("UPDATE runs SET summary = ?, updated = ? WHERE run_id = ?", (text, time.time(), run_id))

    def mark_interrupted(self, alive: Collection[str] = ()) -> list[str]:
        """Persist "interrupted" for runs left "running" or "queued" whose owner is gone; return their ids.

        Runs whose lease a live process holds (this one or another) are left alone, and so are `alive`.
        """
        keep = set(alive)
        with self._tx() as c:
            rows = c.execute(f"SELECT run_id, {_OWNER} FROM runs LEFT JOIN leases USING (run_id) "
                             f"WHERE status IN ('running', 'queued')").fetchall()
            now = time.time()
            ids = sorted(r[0] for r in rows if r[0] not in keep and _gone(_owner(*r[1:]), now))
            c.executemany("UPDATE runs SET status = 'interrupted', updated = ? WHERE run_id = ?",
                          [(now, i) for i in ids])
            c.executemany("DELETE FROM leases WHERE run_id = ?", [(i,) for i in ids])
        return ids

    def delete_run(self, run_id: str) -> None:
        """Delete the run's rows and folder; refused while a live process runs or queues it."""
        validate_run_id(run_id)
        with self._tx() as c:
            row = c.execute(f"SELECT status, {_OWNER} FROM runs LEFT JOIN leases USING (run_id) WHERE run_id = ?",
                            (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(run_id, self.root)
            status = _effective_status(row[0], _owner(*row[1:]), time.time())
            if status in ACTIVE:
                raise StoreError(f"run {run_id} is {status} ({_owner(*row[1:]).describe()}); stop it before "
                                 f"deleting it")
            c.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
            c.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
        shutil.rmtree(self.root / run_id, ignore_errors=True)

    # ---- events ----
    def append(self, run_id: str, event: ev.Event) -> int:
        """Persist one event; return its sequence number. Start and terminal events set the run status."""
        return self.append_many(run_id, [event])[-1]

    def append_many(self, run_id: str, events: Sequence[ev.Event]) -> list[int]:
        """Persist several events in one transaction; return their sequence numbers in order."""
        validate_run_id(run_id)
        if not events:
            return []
        rows = [(run_id, e.kind, int(e.epoch), json.dumps(ev.to_dict(e))) for e in events]
        statuses = [_STATUS_OF_KIND[e.kind] for e in events if e.kind in _STATUS_OF_KIND]
        with self._tx() as c:
            self._require(c, run_id)
            seqs = [c.execute("INSERT INTO events (run_id, kind, epoch, data) VALUES (?, ?, ?, ?)", r).lastrowid
                    for r in rows]
            if statuses:
                c.execute("UPDATE runs SET status = ?, updated = ? WHERE run_id = ?",
                          (statuses[-1], time.time(), run_id))
            else:
                c.execute("UPDATE runs SET updated = ? WHERE run_id = ?", (time.time(), run_id))
        return seqs

    def _event_rows(self, run_id: str, since: int, kinds: Sequence[str] | None) -> list[tuple[int, str]]:
        validate_run_id(run_id)
        sql, params = "SELECT seq, data FROM events WHERE run_id = ? AND seq > ?", [run_id, int(since)]
        if kinds is not None:
            unknown = [k for k in kinds if k not in ev.EVENT_TYPES]
            if unknown:
                raise StoreError(f"unknown event kind(s) {unknown}; choose from {', '.join(ev.EVENT_TYPES)}")
            sql += f" AND kind IN ({', '.join('?' * len(kinds))})"
            params += list(kinds)
        with self._lock:
            self._require(self._conn, run_id)
            return self._conn.execute(sql + " ORDER BY seq", params).fetchall()

    def events(self, run_id: str, *, since: int = 0,
               kinds: Sequence[str] | None = None) -> list[tuple[int, ev.Event]]:
        """(seq, event) pairs with seq > since, in the order they were appended.

        Sequence numbers grow across the whole store and are never reused, so a poller can pass the
        last seq it saw as `since`.
        """
        return [(seq, ev.from_dict(json.loads(data))) for seq, data in self._event_rows(run_id, since, kinds)]

    def truncate_events(self, run_id: str, after_epoch: int) -> int:
        """Delete events of epochs > after_epoch and all terminal events; return how many were deleted.

        Used before resuming from the checkpoint of epoch `after_epoch`, so that the log then equals an
        uninterrupted run's log up to that point.
        """
        validate_run_id(run_id)
        kinds = ev.TERMINAL
        with self._tx() as c:
            self._require(c, run_id)
            cur = c.execute(f"DELETE FROM events WHERE run_id = ? AND (epoch > ? OR kind IN "
                            f"({', '.join('?' * len(kinds))}))", (run_id, int(after_epoch), *kinds))
            c.execute("UPDATE runs SET updated = ? WHERE run_id = ?", (time.time(), run_id))
        return cur.rowcount

    def event_json(self, run_id: str) -> list[tuple[int, str]]:
        """(seq, stored JSON text) of every event of the run, in order (what an export writes verbatim)."""
        return self._event_rows(run_id, 0, None)

    # ---- export (ferd.export) ----
    def metrics_csv(self, run_id: str) -> str:
        """See ferd.export.metrics_csv."""
        from ferd import export

        return export.metrics_csv(self, run_id)

    def export_run(self, run_id: str, dest: Path | str) -> Path:
        """See ferd.export.export_run."""
        from ferd import export

        return export.export_run(self, run_id, dest)
