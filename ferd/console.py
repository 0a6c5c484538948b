"""What the command line shows while runs execute: one progress bar per run (several at once with a pool of
workers), warnings and evaluations above the bars, each run's record at the end; and the executor and store the
command-line flags ask for. Used by `ferd.cli` and `ferd.pack`."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from tqdm import tqdm

from ferd import experiments
from ferd.config import Config, to_dict
from ferd.events import TERMINAL, Evaluated, Event, RunFailed, RunStopped, RunWarning, StageProgress
from ferd.executor import Executor, ExecutorError, InlineExecutor, LocalExecutor, plan_workers
from ferd.labels import preset_of, run_label
from ferd.store import RunStore


def open_store(args: argparse.Namespace) -> RunStore:
    """The run store `--store` names, else $FERD_HOME's or the user data dir's."""
    return RunStore(args.store) if args.store else RunStore()


class Progress:
    """tqdm bar over epochs for one run; warnings and evaluations printed above it."""

    def __init__(self, label: str, total_epochs: int, *, quiet: bool = False, position: int | None = None) -> None:
        # With several runs at once each bar keeps its own line (`position`) and is cleared when its run ends.
        self.bar = tqdm(total=total_epochs, desc=label, unit="epoch", disable=quiet, leave=position is None,
                        file=sys.stderr, dynamic_ncols=True, position=position)
        self.label, self.quiet, self.position = label, quiet, position
        self.teacher_bar: tqdm | None = None

    def _stage(self, ev: StageProgress) -> None:
        """Teacher training gets its own bar (above the epochs'); an evaluation's attacks go in the postfix."""
        if ev.stage == "teacher":
            if self.teacher_bar is None:
                self.teacher_bar = tqdm(total=ev.total_steps, desc=f"teacher: {ev.label}", unit="epoch",
                                        disable=self.quiet, leave=True, file=sys.stderr, dynamic_ncols=True)
            self.teacher_bar.update(ev.step - self.teacher_bar.n)
            if ev.step >= ev.total_steps:
                self.teacher_bar.close()
        elif ev.step < ev.total_steps:
            self.bar.set_postfix_str(f"eval: {ev.label} ({ev.step + 1}/{ev.total_steps})")

    def __call__(self, ev: Event) -> None:
        kind = ev.kind
        if isinstance(ev, StageProgress):
            self._stage(ev)
        elif kind == "epoch_finished":
            self.bar.update(ev.epoch - self.bar.n)
        elif kind == "student_progress" and ev.step == ev.total_steps:
            self.bar.set_postfix(loss=f"{ev.losses['total']:.3f}", refresh=False)
        elif kind == "samples_synthesised":
            self.bar.set_postfix(teacher_acc_xstar=f"{ev.teacher_acc:.2f}", robust=f"{ev.robust_fraction:.2f}",
                                 refresh=False)
        elif isinstance(ev, RunWarning):
            tqdm.write(f"warning (epoch {ev.epoch}): {ev.message}", file=sys.stderr)
        elif isinstance(ev, Evaluated) and not self.quiet and (ev.final or self.position is None):
            accs = "  ".join(f"{a} {float(ev.correct[a].sum()) / float(ev.subset_totals.get(a, ev.totals).sum()):.1%}"
                             for a in ev.correct)
            tqdm.write(f"{self.label}: epoch {ev.epoch} eval: {accs}", file=sys.stderr)
        elif isinstance(ev, RunFailed):
            tqdm.write(f"{self.label}: run failed: {ev.reason}", file=sys.stderr)
        elif isinstance(ev, RunStopped):
            tqdm.write(f"{self.label}: run stopped: {ev.reason}", file=sys.stderr)
        if kind in ("run_finished", "run_stopped", "run_failed"):
            if self.teacher_bar is not None:
                self.teacher_bar.close()
            self.bar.close()


def print_eval(ev: dict[str, Any]) -> None:
    """One line per attack (PGD-20 on AutoAttack's images right after AutoAttack)."""
    for attack, m in experiments.eval_rows(ev):
        per = " ".join(f"{a * 100:5.1f}" if a is not None else "   – " for a in m["per_class"])
        nsd = f"{m['nsd']:.3f}" if m["nsd"] is not None else "–"
        print(f"  {attack:8s} mean {m['mean'] * 100:5.1f}  worst {m['worst'] * 100:5.1f} (class {m['worst_class']})"
              f"  NSD {nsd}  n {sum(m['totals'])}  per class: {per}")


def print_record(rec: dict[str, Any]) -> None:
    print(f"\n{run_label(rec['run_id'], rec['config'])}: run {rec['run_id']}, status {rec.get('status', '?')}, "
          f"wall {rec['wall_s'] or 0:.1f} s")
    print_eval(rec["eval"])
    syn = rec.get("synthesis") or {}
    if syn:
        line = (f"  synthesis: teacher acc on x* {syn['teacher_acc']:.1%}, conf {syn['teacher_conf']:.2f}, "
                f"robust fraction {syn['robust_fraction']:.1%}" if syn["robust_fraction"] is not None else "")
        if "fraction_of_ceiling" in syn and syn["fraction_of_ceiling"] is not None:
            line += f", PGD-20 {syn['fraction_of_ceiling']:.0%} of the real-data ceiling"
        print(line)
    attack = rec.get("training_attack") or {}
    if attack.get("success_rate") is not None:
        ref = attack.get("reference_success_rate")
        entropy = attack.get("target_entropy")
        print(f"  training attack (last {len(attack['epochs'])} epochs): success {attack['success_rate']:.1%}"
              + (f", untargeted reference {ref:.1%} (ratio {attack['strength_ratio']:.2f})" if ref else "")
              + (f", target entropy {entropy:.2f}" if entropy is not None else ""))
    print(f"  student: {rec['student'] or '(none saved: the run did not finish)'}")


def make_executor(args: argparse.Namespace, configs: list[Config]) -> Executor:
    """The executor `--executor/--workers/--address` ask for (a lone `run` goes inline on every core)."""
    kind = getattr(args, "executor", None)
    workers, address = getattr(args, "workers", None), getattr(args, "address", None)
    if address and kind != "ray":
        raise ExecutorError("--address needs --executor ray")
    if kind == "ray":
        from ferd.ray_executor import RayExecutor

        return RayExecutor(address, threads=max(c.num_threads for c in configs) or 1, workers=workers)
    n, threads = plan_workers(configs, workers)
    if kind is None or (kind == "inline" and n == 1):
        return InlineExecutor(threads)
    if kind == "inline":
        raise ExecutorError(f"--executor inline runs one run at a time; got --workers {n}")
    return LocalExecutor(n, threads)


def run_configs(args: argparse.Namespace, configs: list[Config], names: list[str]) -> list[dict[str, Any]]:
    """Run `configs` through the store (`names` are the runs' names, "" for none), print each record."""

    from ferd.preflight import check_runnable

    for cfg in configs:  # every config, before the first run is stored
        check_runnable(cfg)
    executor = make_executor(args, configs)  # before the store: a bad --address writes nothing
    store = open_store(args)
    stop = args.stop
    bars: dict[int, Progress] = {}
    free = list(range(executor.slots))
    lock = threading.Lock()

    def on_event(i: int, ev: Event) -> None:
        with lock:
            if i not in bars:
                cfg = configs[i]
                label = names[i] or f"{preset_of(to_dict(cfg))} {cfg.method} seed {cfg.seed}"
                position = free.pop(0) if executor.slots > 1 else None
                bars[i] = Progress(label, cfg.epochs, quiet=args.quiet, position=position)
            bar = bars[i]
            bar(ev)
            if ev.kind in TERMINAL and bar.position is not None:
                free.append(bar.position)
                free.sort()

    if executor.slots > 1 and not args.quiet:
        print(f"{len(configs)} runs, {executor.describe()}", file=sys.stderr)
    try:
        records = experiments.run_many(configs, store, names=names, stop=stop, on_event=on_event,
                                       executor=executor)
    except KeyboardInterrupt:  # run_many has asked every run in flight to stop and waited for them
        stop.set()
        raise
    finally:
        executor.close()
    for rec in records:
        print_record(rec)
    if len(records) < len(configs):
        print(f"{len(configs) - len(records)} run(s) ended before the engine started (see `runs`)", file=sys.stderr)
    return records
