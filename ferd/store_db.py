"""Opening the run store's SQLite database: schema, migration, and read-only fallback.

A store whose folder or database is not writable (read-only media) opens read-only: `mode=ro`, or
`immutable=1` where WAL's shared-memory file cannot be created. A path that is not a folder, or a folder
that cannot be created, is a StoreError naming it.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

DB_NAME = "runs.db"
BUSY_TIMEOUT_MS = 30_000
SCHEMA_VERSION = 2
"""1: runs + events; 2: + leases (created on open; a run of an older store without a lease reads as
interrupted when it was left queued or running)."""

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
CREATE TABLE IF NOT EXISTS leases (
    run_id    TEXT PRIMARY KEY REFERENCES runs(run_id) ON DELETE CASCADE,
    pid       INTEGER NOT NULL,
    host      TEXT NOT NULL,
    heartbeat REAL NOT NULL
);
"""


class StoreError(ValueError):
    """A request the store refuses: a malformed run id, an unknown status, deleting a running run."""


class StoreReadOnly(StoreError):
    """A write to a store opened read-only (its folder or database is not writable)."""


@dataclass(frozen=True)
class OpenedDb:
    conn: sqlite3.Connection
    readonly: bool
    has_leases: bool
    """False only for a pre-lease database opened read-only (it cannot be migrated)."""


def open_db(root: Path) -> OpenedDb:
    """Create `root` if needed and open its database (read-write with the current schema, else read-only)."""
    db = root / DB_NAME
    readonly = _prepare_root(root)
    try:
        conn = _connect_readonly(root, db) if readonly else _connect(db)
    except sqlite3.OperationalError as e:
        if readonly or not db.exists():
            raise StoreError(f"cannot open the run store {db}: {e}") from e
        readonly = True  # e.g. read-only media that os.access does not report
        conn = _connect_readonly(root, db)
    has_leases = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'leases'").fetchone()
    return OpenedDb(conn=conn, readonly=readonly, has_leases=bool(has_leases))


def _prepare_root(root: Path) -> bool:
    """Create the store folder if needed; return True when it (or its database) is not writable."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"run store {root} is not a folder (point FERD_HOME or --store at a folder)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create the run store folder {root}: {e.strerror or e}") from e
    db = root / DB_NAME
    return not (os.access(root, os.W_OK) and (not db.exists() or os.access(db, os.W_OK)))


def _connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.executescript(_SCHEMA)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return conn


def _connect_readonly(root: Path, db: Path) -> sqlite3.Connection:
    """mode=ro first (sees a live writer's WAL); immutable=1 where WAL's shared memory cannot be created."""
    if not db.is_file():
        raise StoreError(f"run store {root} is read-only and holds no {DB_NAME} yet")
    last: sqlite3.Error | None = None
    for flags in ("mode=ro", "immutable=1"):
        conn = sqlite3.connect(f"file:{quote(str(db.resolve()))}?{flags}", uri=True, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("SELECT count(*) FROM runs").fetchone()
        except sqlite3.Error as e:
            conn.close()
            last = e
            continue
        return conn
    raise StoreError(f"cannot read the run store {db}: {last}")
