"""The run store: a SQLite index of runs plus their event logs, and one folder per run for artifacts.

Layout under the root: `runs.db` (WAL mode, so readers never block the writer and a crash leaves the
last committed transaction intact) and `<run_id>/` (config.toml, checkpoints, samples, student.pt).
One RunStore is shared by the server's job threads and page reruns: a single connection guarded by a
lock serialises calls inside the process; WAL plus a busy timeout handle a second process (the CLI).
Run ids are validated on the way in, so no id can name a path outside the root.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
import zipfile
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import tomli_w

from ferd import atomic
from ferd import config as config_mod
from ferd import events as ev

STATUSES = ("queued", "running", "finished", "stopped", "failed", "interrupted")
RUN_ID_RE = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
DB_NAME = "runs.db"
BUSY_TIMEOUT_MS = 30_000
SCHEMA_VERSION = 1
_COLUMNS = "run_id, name, created, updated, status, method, dataset, seed, config, summary, parent"

# Event kind -> the run status it sets.
_STATUS_OF_KIND = {"stage_progress": "running", "run_started": "running", "run_finished": "finished",
                   "run_stopped": "stopped", "run_failed": "failed"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id  TEXT PRIMARY KEY,
    name    TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    status  TEXT NOT NULL,
    method  TEXT NOT NULL,
    dataset TEXT NOT NULL,
    seed    INTEGER NOT NULL,
    config  TEXT NOT NULL,
    summary TEXT,
    parent  TEXT
);
CREATE TABLE IF NOT EXISTS events (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    kind   TEXT NOT NULL,
    epoch  INTEGER NOT NULL,
    data   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run_seq ON events(run_id, seq);
"""


class RunNotFound(KeyError):
    """No run with this id in the store."""


class StoreError(ValueError):
    """A request the store refuses: a malformed run id, an unknown status, deleting a running run."""


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
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / DB_NAME
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)
        self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ---- plumbing ----
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE takes the write lock up front, so read-then-write is safe)."""
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
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- runs ----
    def create_run(self, cfg: config_mod.Config, *, name: str = "", status: str = "queued",
                   parent: str | None = None) -> str:
        """Register a new run, create its folder with config.toml, and return its id."""
        _validate_status(status)
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
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return run_id

    def run_dir(self, run_id: str) -> Path:
        """The run's artifact folder (the id is validated; existence is not checked)."""
        return self.root / validate_run_id(run_id)

    def _info(self, row: tuple[Any, ...]) -> RunInfo:
        run_id, name, created, updated, status, method, dataset, seed, cfg, summary, parent = row
        return RunInfo(run_id=run_id, name=name, created=created, updated=updated, status=status, method=method,
                       dataset=dataset, seed=seed, config=json.loads(cfg), run_dir=self.root / run_id,
                       summary=json.loads(summary) if summary is not None else None, parent=parent)

    def get_run(self, run_id: str) -> RunInfo:
        validate_run_id(run_id)
        rows = self._query(f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise RunNotFound(run_id)
        return self._info(rows[0])

    def list_runs(self, *, status: str | Collection[str] | None = None) -> list[RunInfo]:
        """All runs (or those with the given status or statuses), newest first."""
        sql, params = f"SELECT {_COLUMNS} FROM runs", []
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            for s in wanted:
                _validate_status(s)
            sql += f" WHERE status IN ({', '.join('?' * len(wanted))})"
            params = wanted
        sql += " ORDER BY created DESC, run_id DESC"
        return [self._info(r) for r in self._query(sql, params)]

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
        """Flip runs left "running" or "queued" (by a crash or restart) to "interrupted"; return their ids.

        `alive` are runs owned by live jobs of this process; they are left alone.
        """
        keep = set(alive)
        with self._tx() as c:
            rows = c.execute("SELECT run_id FROM runs WHERE status IN ('running', 'queued')").fetchall()
            ids = sorted(r[0] for r in rows if r[0] not in keep)
            now = time.time()
            c.executemany("UPDATE runs SET status = 'interrupted', updated = ? WHERE run_id = ?",
                          [(now, i) for i in ids])
        return ids

    def delete_run(self, run_id: str) -> None:
        """Delete the run's rows and folder; refused while the run is running."""
        validate_run_id(run_id)
        with self._tx() as c:
            if self._require(c, run_id) == "running":
                raise StoreError(f"run {run_id} is running; stop it before deleting it")
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

    # ---- export ----
    def metrics_csv(self, run_id: str) -> str:
        """One row per Evaluated event x attack x class.

        Columns: epoch, attack, class (index), correct, total, accuracy (empty when total is 0),
        class_name (from the last RunStarted, else empty), final (1 for the final evaluation).
        """
        names: tuple[str, ...] = ()
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["epoch", "attack", "class", "correct", "total", "accuracy", "class_name", "final"])
        for _, e in self.events(run_id, kinds=("run_started", "evaluated")):
            if isinstance(e, ev.RunStarted):
                names = tuple(e.class_names)
            elif isinstance(e, ev.Evaluated):
                for attack, correct in e.correct.items():
                    totals = np.asarray(e.subset_totals.get(attack, e.totals)).tolist()
                    for c, (k, n) in enumerate(zip(np.asarray(correct).tolist(), totals, strict=True)):
                        w.writerow([e.epoch, attack, c, int(k), int(n), f"{k / n:.6g}" if n else "",
                                    names[c] if c < len(names) else "", int(e.final)])
        return buf.getvalue()

    def export_run(self, run_id: str, dest: Path | str) -> Path:
        """Write a zip with config.toml, events.jsonl, metrics.csv and student.pt (if present).

        `dest` is a folder (created if missing; the zip is `<run_id>.zip` in it) or a path ending in .zip.
        """
        info = self.get_run(run_id)
        dest = Path(dest)
        if dest.suffix == ".zip":
            out = dest
        else:
            dest.mkdir(parents=True, exist_ok=True)
            out = dest / f"{run_id}.zip"
        cfg_file = info.run_dir / "config.toml"
        cfg_text = cfg_file.read_text() if cfg_file.is_file() else tomli_w.dumps(info.config)
        with self._lock:
            rows = self._conn.execute("SELECT seq, data FROM events WHERE run_id = ? ORDER BY seq",
                                      (run_id,)).fetchall()
        lines = "".join(json.dumps({"seq": seq, **json.loads(data)}) + "\n" for seq, data in rows)
        student = info.run_dir / "student.pt"
        with atomic.atomic_file(out) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("config.toml", cfg_text)
            z.writestr("events.jsonl", lines)
            z.writestr("metrics.csv", self.metrics_csv(run_id))
            if student.is_file():
                z.write(student, "student.pt")
        return out
