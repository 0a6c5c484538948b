"""Command line: `python -m ferd <command>`. The same engine and store as the dashboard, without a browser.

  run       one run of a preset or config file
  compare   several methods x seeds on one teacher -> DIR/results.json + a Markdown table
  ablate    one numeric config field over values x seeds -> DIR/results.json + DIR/ablation.csv
  eval      evaluate a saved student on the real test split
  teacher   train/cache the embedded teacher (or load a checkpoint) and print its per-class robustness
  runs      list stored runs;  export  zip a stored run
  bench     time each phase of an epoch and peak memory on this machine

Exit codes: 0 done; 1 a run did not finish, or a bug (with its traceback); 2 a user error (one line naming
the file, field or run id); 130 / 143 stopped by SIGINT / SIGTERM (the run is stored as `stopped`, resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ferd import experiments
from ferd.config import EVAL_ATTACKS, Config, ConfigError, load, load_preset, preset_names
from ferd.console import Progress, open_store, print_eval, print_record, run_configs
from ferd.executor import EXECUTORS, ExecutorError
from ferd.experiments import RunError
from ferd.labels import run_label
from ferd.pack import add_command as add_pack_command
from ferd.store import ACTIVE, RunNotFound, RunOwned, RunStore, StoreError

EXIT_USAGE = 2
USER_ERRORS = (ConfigError, StoreError, RunNotFound, ExecutorError, OSError)
"""What exits 2 with one line: bad input, not a bug (OSError: a path the user gave, a full disk)."""
COMPUTE_USER_ERRORS = (("ferd.data", "DataError"), ("ferd.teachers", "TeacherError"), ("ferd.weights", "WeightsError"))
"""User errors of the modules that import torch (~2 s): this module does not import them, so that a usage error
or `runs` answers at once; their errors can only have been raised once they were imported (`user_errors`)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """USER_ERRORS and the COMPUTE_USER_ERRORS of the modules imported by now."""
    loaded = tuple(getattr(sys.modules[m], name) for m, name in COMPUTE_USER_ERRORS if m in sys.modules)
    return USER_ERRORS + loaded


class Signals:
    """While active, SIGINT and SIGTERM set `stop`: the engine ends the run as `stopped` (resumable) within
    a step, then the CLI exits 128 + the signal number. A second signal interrupts at once."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self.stop.set()

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)



def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs; values are TOML literals (numbers, true/false, ["a", "b"]) or bare strings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def build_config(args: argparse.Namespace) -> Config:
    overrides = parse_overrides(args.set or [])
    cfg = load(args.config) if getattr(args, "config", None) else load_preset(args.preset)
    if getattr(args, "method", None):
        cfg = cfg.for_method(args.method)
    if getattr(args, "seed", None) is not None:
        overrides["seed"] = args.seed
    return cfg.replace(**overrides) if overrides else cfg


def cmd_run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    store = open_store(args)
    if args.resume:
        from ferd.runner import execute

        info = store.get_run(args.resume)
        if info.status in ACTIVE:  # a live process owns it (a dead owner reads as interrupted)
            raise RunOwned(info.run_id, info.owner)
        bar = Progress(f"resume {args.resume}", int(info.config["epochs"]), quiet=args.quiet)
        run_id = execute(cfg, store, run_id=args.resume, resume=True, on_event=bar, stop=args.stop)
        events = [ev for _s, ev in store.events(run_id)]
        rec = experiments.run_record(events, run_id=run_id)
        rec["status"] = store.get_run(run_id).status
        records = [rec]
        print_record(rec)
    else:
        records = run_configs(args, [cfg], [""])
    if args.out:
        path = experiments.write_results(Path(args.out), records, command=" ".join(sys.argv))
        print(f"results: {path}")
    return 0 if all(r.get("status") == "finished" for r in records) else 1


def _all_finished(records: list[dict[str, Any]], configs: list[Config]) -> int:
    return 0 if len(records) == len(configs) and all(r.get("status") == "finished" for r in records) else 1


def cmd_compare(args: argparse.Namespace) -> int:
    base = build_config(args)
    configs = experiments.compare_configs(base, args.methods, args.seeds)
    t0 = time.perf_counter()
    records = run_configs(args, configs, [""] * len(configs))
    wall = time.perf_counter() - t0
    out = Path(args.out)
    path = experiments.write_results(out, records, command=" ".join(sys.argv), extra={"wall_s": wall})
    table = experiments.markdown_compare_table(records)
    (out / "table.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\n{len(records)} runs in {wall:.0f} s; results: {path}")
    return _all_finished(records, configs)


def cmd_ablate(args: argparse.Namespace) -> int:
    base = build_config(args)
    configs = experiments.ablation_configs(base, args.param, args.values, args.seeds)
    names = [f"{args.param}={getattr(c, args.param)} seed {c.seed}" for c in configs]
    t0 = time.perf_counter()
    records = run_configs(args, configs, names)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    path = experiments.write_results(out, records, command=" ".join(sys.argv),
                                     extra={"wall_s": wall, "param": args.param})
    table = experiments.ablation_table(records, args.param)
    table.to_csv(out / "ablation.csv", index=False)
    md = experiments.markdown_ablation_table(table, args.param)
    (out / "table.md").write_text(md + "\n")
    experiments.ablation_plot({args.param: table}, args.param, out / "ablation.png")
    print("\n" + md)
    print(f"\n{len(records)} runs in {wall:.0f} s; results: {path}, table: {out / 'ablation.csv'}")
    return _all_finished(records, configs)


def cmd_eval(args: argparse.Namespace) -> int:
    from ferd.data import DATASETS, dataset_info, test_split
    from ferd.device import resolve_device
    from ferd.engine import load_student
    from ferd.evaluation import evaluate
    from ferd.weights import read_weights

    _check_eval_args(args, DATASETS)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise ConfigError(f"--device: {e}") from e
    model = load_student(args.student, device)
    meta = read_weights(args.student)
    dataset = args.dataset or meta.get("dataset", "digits")
    x, y = test_split(dataset, args.data_root)
    t0 = time.perf_counter()
    result = evaluate(model, x.to(device), y.to(device), num_classes=dataset_info(dataset).num_classes,
                      attacks=args.attacks, eps=args.eps, step_size=args.step_size or args.eps / 4,
                      steps=args.steps, aa_subset=args.aa_subset, device=device, seed=args.seed)
    out = experiments.eval_summary(result.correct, result.totals, result.subset_totals, result.aa_pgd20)
    print_eval(out)
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps({"student": args.student, "eps": args.eps, "eval": out}, indent=1))
    return 0


def _check_eval_args(args: argparse.Namespace, datasets: Collection[str]) -> None:
    """eval's numeric options and names, before anything is loaded (ConfigError names the option)."""
    if not 0 < args.eps <= 1:
        raise ConfigError(f"--eps: must be in (0, 1] (pixels are in [0,1]), got {args.eps}")
    if args.step_size is not None and not 0 < args.step_size <= args.eps:
        raise ConfigError(f"--step-size: must be in (0, eps={args.eps}], got {args.step_size}")
    if args.steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {args.steps}")
    if args.aa_subset < 0:
        raise ConfigError(f"--aa-subset: must be >= 0, got {args.aa_subset}")
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed: must be in [0, 2**32), got {args.seed}")
    bad = [a for a in args.attacks if a not in EVAL_ATTACKS]
    if bad:
        raise ConfigError(f"--attacks: unknown {bad}; choose from {', '.join(EVAL_ATTACKS)}")
    if args.dataset is not None and args.dataset not in datasets:
        raise ConfigError(f"--dataset: unknown {args.dataset!r}; choose one of {', '.join(datasets)}")


def cmd_teacher(args: argparse.Namespace) -> int:
    from ferd.device import resolve_device, set_threads
    from ferd.teachers import load_teacher

    cfg = build_config(args)
    set_threads(cfg.num_threads)
    bar = tqdm(total=cfg.teacher_epochs, desc="teacher (adversarial training, first use only)", unit="epoch",
               file=sys.stderr)

    def progress(epoch: int, total: int) -> None:
        bar.update(epoch - bar.n)

    t0 = time.perf_counter()
    _model, info = load_teacher(cfg, resolve_device(cfg.device), progress=progress)
    bar.close()
    d = info.to_dict()
    print(f"teacher {d['name']} ({d['arch']}), {d['path']}  [{time.perf_counter() - t0:.1f} s this call]")
    print(f"clean {d['clean_acc']:.1%}   PGD-20 (eps {cfg.eps}) {d['pgd_acc']:.1%}")
    for c, (a, r) in enumerate(zip(d["clean_per_class"], d["pgd_per_class"], strict=True)):
        print(f"  class {c}: clean {a:.1%}  PGD-20 {r:.1%}")
    return 0


def _headline(store: RunStore, run_id: str) -> str:
    """Clean mean, PGD-20 mean and worst class of the run's last evaluation (marked when not the final one)."""
    from ferd.metrics import class_metrics

    evals = [e for _s, e in store.events(run_id, kinds=("evaluated",))]
    if not evals:
        return "no evaluation yet"
    e = evals[-1]
    parts = [f"epoch {e.epoch}{'' if e.final else ' (not final)'}"]
    for attack, stats in (("clean", ("mean",)), ("pgd20", ("mean", "worst"))):
        if attack in e.correct:
            m = class_metrics(e.correct[attack], e.subset_totals.get(attack, e.totals))
            parts += [f"{attack} {stat} {getattr(m, stat):.1%}" for stat in stats]
    return "  ".join(parts).replace("pgd20 worst", "PGD-20 worst class").replace("pgd20", "PGD-20")


def cmd_runs(args: argparse.Namespace) -> int:
    """Two lines per run, newest first: id, status and label; headline metrics and the student's path."""
    store = open_store(args)
    for info in store.list_runs():
        student = info.run_dir / "student.pt"
        print(f"{info.run_id}  {info.status:11s}  {run_label(info.run_id, info.config, info.name)}")
        print(f"    {_headline(store, info.run_id)}   student: {student if student.is_file() else '–'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    path = open_store(args).export_run(args.run_id, Path(args.out))
    print(path)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ferd.bench import bench

    cfg = build_config(args)
    bench(cfg, epochs=args.epochs, as_json=args.json)
    return 0


def _add_config_args(p: argparse.ArgumentParser, *, method: bool = True) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="digits", help=f"preset name ({', '.join(preset_names())})")
    src.add_argument("--config", help="TOML or JSON config file (flat table of fields)")
    if method:
        p.add_argument("--method", choices=("ferd", "dfrd", "real-data"), help="override the preset's method")
        p.add_argument("--seed", type=int)
    p.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE",
                   help="override config fields, e.g. --set w_uni=2 epochs=10 (repeatable; a key's last value wins)")


def _add_executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: worker processes here (default); ray: a Ray cluster; inline: one at a time")
    p.add_argument("--workers", type=int, help="runs at once (default: cores / threads per run; with ray: "
                   "the cluster's CPUs / threads per run)")
    p.add_argument("--address", help="Ray cluster address HOST:PORT (default with --executor ray: start a local Ray)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ferd", description="FERD Studio: robust fairness in "
                                     "data-free robustness distillation.")
    parser.add_argument("--store", help="run store folder (default: $FERD_HOME or the user data dir)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="one run of a preset or config file")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_ID", help="resume a stopped/interrupted run from its last checkpoint")
    p.add_argument("--out", help="also write DIR/results.json")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="methods x seeds on one teacher")
    _add_config_args(p, method=False)
    p.add_argument("--methods", nargs="+", default=["ferd", "dfrd"], choices=("ferd", "dfrd", "real-data"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", required=True)
    _add_executor_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("ablate", help="one numeric field over values x seeds")
    _add_config_args(p)
    p.add_argument("--param", required=True)
    p.add_argument("--values", nargs="+", type=float, required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", required=True)
    _add_executor_args(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("eval", help="evaluate a saved student")
    p.add_argument("student", help="student checkpoint (student.pt of a run; `runs` lists their paths)")
    p.add_argument("--dataset", help="test split to evaluate on (default: the dataset stored in the checkpoint)")
    p.add_argument("--data-root", default="", help="folder of torchvision datasets (default: the user data dir)")
    p.add_argument("--attacks", nargs="+", default=["clean", "fgsm", "pgd20", "cw", "aa"],
                   help="attacks to run, from clean fgsm pgd20 cw aa (default: all)")
    p.add_argument("--eps", type=float, default=0.1, help="L-inf budget, pixels in [0,1] (default: 0.1)")
    p.add_argument("--step-size", type=float, help="PGD-20 / CW step size (default: eps / 4)")
    p.add_argument("--steps", type=int, default=20, help="PGD and CW steps (default: 20)")
    p.add_argument("--aa-subset", type=int, default=0,
                   help="run AutoAttack on a stratified subset of about this many samples (default: 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--out", help="write the metrics as JSON to this file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("teacher", help="train/cache the embedded teacher or inspect a checkpoint")
    _add_config_args(p, method=False)
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("runs", help="list stored runs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("export", help="zip a stored run (config, events, metrics CSV, student)")
    p.add_argument("run_id")
    p.add_argument("--out", default=".")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="time each phase of an epoch and peak memory")
    _add_config_args(p)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON line (FLOPs per epoch, GFLOP/s, ...)")
    p.set_defaults(func=cmd_bench)

    add_pack_command(sub, _add_executor_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    signals = Signals()
    args.stop = signals.stop
    try:
        with signals:
            code = args.func(args)
    except BrokenPipeError:  # `runs | head -1`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if e.bug else EXIT_USAGE
    except user_errors() as e:  # evaluated when an exception is matched, after the command ran
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # a second signal: the run's lease lapses and readers show it interrupted
        print("interrupted", file=sys.stderr)
        return 130
    if signals.signum is not None:
        name = signal.Signals(signals.signum).name
        print(f"stopped by {name}: the run is stored as stopped; `python -m ferd run --resume <its id above>` "
              f"continues it", file=sys.stderr)
        return 128 + signals.signum
    return code
