"""Exports of a stored run: its metrics as CSV, and a zip with config, event log, metrics and student."""

from __future__ import annotations

import csv
import errno
import io
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tomli_w

from ferd import atomic
from ferd import events as ev

if TYPE_CHECKING:
    from ferd.store import RunInfo, RunStore


def metrics_csv(store: RunStore, run_id: str) -> str:
    """One row per Evaluated event x attack x class.

    Columns: epoch, attack, class (index), correct, total, accuracy (empty when total is 0),
    class_name (from the last RunStarted, else empty), final (1 for the final evaluation).
    """
    names: tuple[str, ...] = ()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["epoch", "attack", "class", "correct", "total", "accuracy", "class_name", "final"])
    for _, e in store.events(run_id, kinds=("run_started", "evaluated")):
        if isinstance(e, ev.RunStarted):
            names = tuple(e.class_names)
        elif isinstance(e, ev.Evaluated):
            for attack, correct in e.correct.items():
                totals = np.asarray(e.subset_totals.get(attack, e.totals)).tolist()
                for c, (k, n) in enumerate(zip(np.asarray(correct).tolist(), totals, strict=True)):
                    w.writerow([e.epoch, attack, c, int(k), int(n), f"{k / n:.6g}" if n else "",
                                names[c] if c < len(names) else "", int(e.final)])
    return buf.getvalue()


def export_run(store: RunStore, run_id: str, dest: Path | str) -> Path:
    """Write a zip with config.toml, events.jsonl, metrics.csv and student.pt (if present).

    `dest` is a folder (created if missing; the zip is `<run_id>.zip` in it) or a path ending in .zip.
    A destination that cannot be written raises StoreError naming it (and "no space left on device").
    """
    from ferd.store import StoreError

    info = store.get_run(run_id)
    dest = Path(dest)
    try:
        return _write_zip(store, info, dest)
    except OSError as e:
        why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise StoreError(f"cannot write the export to {dest}: {why}") from e


def _write_zip(store: RunStore, info: RunInfo, dest: Path) -> Path:
    run_id = info.run_id
    if dest.suffix == ".zip":
        out = dest
    else:
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / f"{run_id}.zip"
    cfg_file = info.run_dir / "config.toml"
    cfg_text = cfg_file.read_text() if cfg_file.is_file() else tomli_w.dumps(info.config)
    lines = "".join(json.dumps({"seq": seq, **json.loads(data)}) + "\n" for seq, data in store.event_json(run_id))
    student = info.run_dir / "student.pt"
    with atomic.atomic_file(out) as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("config.toml", cfg_text)
        z.writestr("events.jsonl", lines)
        z.writestr("metrics.csv", metrics_csv(store, run_id))
        if student.is_file():
            z.write(student, "student.pt")
    return out
