"""The reference results pack: a compact, read-only run store built by the project's own engine, so the
dashboard answers (Learn, Compare, Ablation) before anyone trains anything.

`python -m ferd pack --out assets/reference` runs ferd / dfrd / real-data x seeds on a preset plus a w_uni
sweep and a utae_weight (lambda_u) sweep at the first seed, through the CLI's executor (parallel worker processes
by default) into the run store; finished runs of the store with the same config are reused instead of run again
(so `compare` and `ablate` results feed a pack). It then keeps only what the pages read: every evaluation,
class-weight, warning and attack event, the last step of each epoch's losses, and the synthesised samples of
the first and last epochs. Layout of the folder:

  manifest.json  commit, command, machine, date, engine version, preset, seeds, and one entry per run
                 (run id, role, name, config, reused from the store or run by this command)
  runs.db        the pruned run store (SQLite, no WAL; open a copy: `open_pack`)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferd import atomic
from ferd.config import Config, load_preset, to_dict
from ferd.console import open_store, run_configs
from ferd.leases import scratch_folder
from ferd.store import DB_NAME, RunStore
from ferd.version import ENGINE_DIR, engine_version

MANIFEST = "manifest.json"
MAX_RUNS = 25
W_UNI_VALUES = (0.0, 1.0, 2.0, 5.0, 10.0)
UTAE_WEIGHT_VALUES = (0.1, 0.3, 1.0, 3.0, 10.0)
# Per-step events kept only at their epoch's last step; events dropped entirely.
_LAST_STEP_ONLY = ("generator_progress", "student_progress")
_DROPPED = ("stage_progress",)


class PackError(ValueError):
    """A pack folder that is missing or unreadable; the message names the file."""


@dataclass(frozen=True)
class PackPlan:
    """The runs of a pack: configs, their names and roles (`compare`, or the swept field's name)."""

    configs: list[Config]
    names: list[str]
    roles: list[str]


@dataclass(frozen=True)
class Pack:
    """An opened pack: its manifest, a run store over a private copy of runs.db, and whether the engine has
    changed since it was built."""

    root: Path
    manifest: dict[str, Any]
    store: RunStore
    stale: bool


def plan(preset: str, seeds: Sequence[int], *, w_uni: Sequence[float] = W_UNI_VALUES,
         utae_weight: Sequence[float] = UTAE_WEIGHT_VALUES, **overrides: Any) -> PackPlan:
    """ferd / dfrd / real-data x seeds, then w_uni and utae_weight sweeps of FERD at the first seed; a sweep
    point equal to a run already planned is not run twice. At most MAX_RUNS runs."""
    base = load_preset(preset, **overrides)
    configs: list[Config] = []
    names: list[str] = []
    roles: list[str] = []

    def add(cfg: Config, name: str, role: str) -> None:
        if cfg not in configs:
            configs.append(cfg)
            names.append(name)
            roles.append(role)

    for seed in seeds:
        for method in ("ferd", "dfrd", "real-data"):
            add(base.for_method(method).replace(seed=seed), f"reference {method} seed {seed}", "compare")
    first = base.for_method("ferd").replace(seed=seeds[0])
    for field, values in (("w_uni", w_uni), ("utae_weight", utae_weight)):
        for v in values:
            add(first.replace(**{field: float(v)}), f"reference {field}={float(v):g} seed {seeds[0]}", field)
    if len(configs) > MAX_RUNS:
        raise ValueError(f"pack: {len(configs)} runs planned, at most {MAX_RUNS}")
    return PackPlan(configs=configs, names=names, roles=roles)


def _machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__})"


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ENGINE_DIR, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ferd"], cwd=ENGINE_DIR, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (ferd/ modified)" if dirty else "")


def prune(db_path: Path) -> None:
    """Drop what the pages do not read (see the module docstring) and compact the file into one self-contained
    SQLite file (no WAL)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute(f"DELETE FROM events WHERE kind IN ({', '.join('?' * len(_DROPPED))})", _DROPPED)
        conn.execute(f"DELETE FROM events WHERE kind IN ({', '.join('?' * len(_LAST_STEP_ONLY))}) AND "
                     "json_extract(data, '$.step') != json_extract(data, '$.total_steps')", _LAST_STEP_ONLY)
        conn.execute("DELETE FROM events WHERE kind = 'samples_synthesised' AND epoch != 1 AND epoch != "
                     "(SELECT MAX(e.epoch) FROM events e WHERE e.run_id = events.run_id "
                     "AND e.kind = 'samples_synthesised')")
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("VACUUM")
    finally:
        conn.close()


def _config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def reusable_runs(store: RunStore, configs: Sequence[Config]) -> dict[int, str]:
    """Plan index -> id of the newest finished run in `store` whose config equals that planned config and whose
    engine version is this one's (a run of an older engine is run again)."""
    version = engine_version()
    finished: dict[str, str] = {}
    for info in reversed(store.list_runs(status="finished")):  # oldest first, so the newest wins
        started = store.events(info.run_id, kinds=("run_started",))
        if started and started[0][1].engine_version == version:
            finished[_config_key(info.config)] = info.run_id
    return {i: finished[k] for i, cfg in enumerate(configs) if (k := _config_key(to_dict(cfg))) in finished}


def _copy_runs(store: RunStore, run_ids: Sequence[str], dest: Path) -> None:
    """A self-contained copy of `store`'s database holding only `run_ids` (the SQLite backup API, so what is
    still in the WAL is copied too)."""
    src = sqlite3.connect(store.db_path)
    dst = sqlite3.connect(dest)
    try:
        src.backup(dst)
    finally:
        src.close()
    try:
        keep = list(run_ids)
        marks = ", ".join("?" * len(keep))
        with dst:
            dst.execute(f"DELETE FROM events WHERE run_id NOT IN ({marks})", keep)
            dst.execute(f"DELETE FROM runs WHERE run_id NOT IN ({marks})", keep)
            dst.execute("DELETE FROM leases")
    finally:
        dst.close()


def build(out: Path, pack_plan: PackPlan, *, command: str, store: RunStore,
          run_configs: Callable[[list[Config], list[str]], list[dict[str, Any]]] | None = None) -> Path:
    """Reuse the finished runs of `store` whose config equals a planned one, run the others into `store`
    (`run_configs(configs, names) -> records`, default `experiments.run_many` inline), then write a pruned copy
    holding only the pack's runs to out/runs.db and out/manifest.json (replacing a previous pack there).
    Returns the manifest's path; raises RuntimeError when a run did not finish."""
    if run_configs is None:
        from ferd.experiments import run_many

        def run_configs(configs: list[Config], names: list[str]) -> list[dict[str, Any]]:
            return run_many(configs, store, names=names)

    run_ids = reusable_runs(store, pack_plan.configs)
    missing = [i for i in range(len(pack_plan.configs)) if i not in run_ids]
    if missing:
        records = run_configs([pack_plan.configs[i] for i in missing], [pack_plan.names[i] for i in missing])
        failed = [r["run_id"] for r in records if r.get("status") != "finished"]
        if failed or len(records) != len(missing):
            raise RuntimeError(f"pack: runs did not finish: {failed or 'stopped early'}")
        run_ids.update({i: r["run_id"] for i, r in zip(missing, records, strict=True)})
    runs = [{"run_id": run_ids[i], "role": role, "name": name, "config": to_dict(cfg), "reused": i not in missing}
            for i, (role, name, cfg) in enumerate(zip(pack_plan.roles, pack_plan.names, pack_plan.configs,
                                                      strict=True))]
    out.mkdir(parents=True, exist_ok=True)
    tmp_db = out / f".{DB_NAME}.tmp"
    tmp_db.unlink(missing_ok=True)
    _copy_runs(store, [r["run_id"] for r in runs], tmp_db)
    prune(tmp_db)
    os.replace(tmp_db, out / DB_NAME)
    manifest = {"commit": _commit(), "command": command, "machine": _machine(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "engine_version": engine_version(),
                "preset": pack_plan.configs[0].preset, "runs": runs}
    path = out / MANIFEST
    atomic.write_text(path, json.dumps(manifest, indent=1))
    return path


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise PackError(f"{path}: no pack manifest") from e
    except json.JSONDecodeError as e:
        raise PackError(f"{path}: not a pack manifest ({e})") from e


def open_pack(root: Path, workdir: Path | None = None) -> Pack:
    """The pack at `root`, its runs.db copied into `workdir` (by default a new temporary folder, removed when the
    Pack is garbage-collected or the interpreter exits, or by a later process's `open_pack` if this one is killed)
    so that opening it never writes into the pack."""
    manifest = read_manifest(root)
    db = root / DB_NAME
    if not db.is_file():
        raise PackError(f"{db}: the pack has no run store")
    work = Path(workdir) if workdir is not None else scratch_folder("ferd-pack-view-")
    work.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(db, work / DB_NAME)
    pack = Pack(root=root, manifest=manifest, store=RunStore(work),
                stale=manifest.get("engine_version") != engine_version())
    if workdir is None:
        weakref.finalize(pack, shutil.rmtree, work, ignore_errors=True)
    return pack


def cmd_pack(args: argparse.Namespace) -> int:
    """`python -m ferd pack`: build the pack through the CLI's executor and progress bars, print where it went,
    its size and which runs were reused from the store."""
    pack_plan = plan(args.preset, args.seeds, w_uni=args.w_uni, utae_weight=args.utae_weight,
                     **({"num_threads": args.threads} if args.threads else {}))
    store = open_store(args)
    reused = reusable_runs(store, pack_plan.configs)
    print(f"pack: {len(pack_plan.configs)} runs of preset {args.preset!r} -> {args.out} ({len(reused)} reused from "
          f"{store.root})", file=sys.stderr)
    manifest = build(Path(args.out), pack_plan, command="python -m ferd " + " ".join(sys.argv[1:]), store=store,
                     run_configs=lambda configs, names: run_configs(args, configs, names))
    size = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file())
    print(f"{manifest} ({size / 2**20:.1f} MiB in {args.out})")
    return 0


def add_command(sub: Any, add_executor_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `pack` subcommand on the CLI's subparsers (with the CLI's --executor/--workers/--address)."""
    p = sub.add_parser("pack", help="build the reference results pack the dashboard shows before any run")
    p.add_argument("--out", default="assets/reference", help="pack folder (default: assets/reference)")
    p.add_argument("--preset", default="digits", help="preset of every run (default: digits)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of ferd / dfrd / real-data")
    p.add_argument("--w-uni", nargs="+", type=float, default=list(W_UNI_VALUES),
                   help="w_uni values swept at the first seed")
    p.add_argument("--utae-weight", nargs="+", type=float, default=list(UTAE_WEIGHT_VALUES),
                   help="utae_weight (lambda_u) values swept at the first seed")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: the preset's)")
    add_executor_args(p)
    p.set_defaults(func=cmd_pack)
