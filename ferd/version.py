"""The engine version: a hash of the ferd sources that decide what a run computes. Every run records it (in
RunStarted), and the reference pack compares it with the running code to say when its runs are out of date."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

ENGINE_DIR = Path(__file__).resolve().parent
# Sources that do not change what a run computes: left out of the engine version.
NOT_RESULTS = frozenset({
    "__init__.py", "__main__.py", "atomic.py", "attack_study.py", "bench.py", "cli.py", "executor.py",
    "experiments.py", "export.py", "labels.py", "leases.py", "pack.py", "preflight.py", "ray_executor.py",
    "runner.py", "store.py", "store_db.py", "version.py",
})


def source_version(root: Path) -> str:
    """First 12 hex digits of a SHA-256 over the result-deciding .py files under `root` (paths and contents)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if path.name in NOT_RESULTS or "__pycache__" in path.parts:
            continue
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


@cache
def engine_version() -> str:
    """The version of the code in this process (computed once)."""
    return source_version(ENGINE_DIR)
