"""Atomic file writes: write a temp file in the target's folder, fsync it, then os.replace.

A reader (or a crash) sees either the old file or the complete new one, never a torn write.
The temp file lives in the same folder so the final rename never crosses a filesystem. A full disk
raises DiskFull ("no space left on device while writing <path>") and leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class DiskFull(OSError):
    """ENOSPC while writing a file atomically (the target keeps its old content)."""

    def __str__(self) -> str:
        return f"no space left on device while writing {self.filename}"


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `path` when the block exits without error.

    On an error (in the block, in fsync or in the rename) the temp file is removed and `path`
    keeps its old content.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and not isinstance(e, DiskFull):
            raise DiskFull(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX only; Windows cannot open a folder for fsync)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    """UTF-8 text, written atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Indented JSON, written atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save, written atomically (a checkpoint is never half-written).

    Serialised in memory first, so a write error (a full disk) surfaces as that OSError, not as torch's
    inline_container error. torch is imported here, not at module level, so the run store stays
    importable without it.
    """
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_file(path) as f:
        f.write(buf.getbuffer())
