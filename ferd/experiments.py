"""Experiments over many runs: compare (methods x seeds) and ablate (one numeric field x values x seeds).

A run's *record* is its results.json entry: method, seed, wall time, student path, eps, the final
evaluation per attack (per-class accuracy, counts, mean, worst, NSD, Wilson intervals) and its synthesis
diagnostics. The CLI and the dashboard build records from stored events with the same function.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ferd import atomic
from ferd.config import Config, ConfigError
from ferd.events import (
    ClassWeightsUpdated,
    Evaluated,
    Event,
    RunFailed,
    RunFinished,
    RunStarted,
    RunStopped,
    SamplesSynthesised,
    TrainingAttackStrength,
)
from ferd.executor import Executor, InlineExecutor
from ferd.metrics import class_metrics
from ferd.store import RunStore

if TYPE_CHECKING:  # pandas (~0.4 s to import) only where a table is built, not for every run
    import pandas as pd

RESULTS = "results.json"


def _json_float(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _list(a: Iterable) -> list:
    return [_json_float(float(v)) for v in a]


class RunError(ValueError):
    """A run that failed before it started (no RunStarted): the message is the run's own failure reason."""

    def __init__(self, message: str, *, bug: bool) -> None:
        super().__init__(message)
        self.bug = bug
        """True when the failure came with a traceback (an unexpected error, not a user mistake)."""


def run_record(events: Sequence[Event], *, run_id: str = "", student_path: str = "") -> dict[str, Any]:
    """The results.json entry of one run, from its events (the last evaluation counts).

    RunError (with the run's failure reason) when the run failed before its RunStarted event."""
    started = next((e for e in events if isinstance(e, RunStarted)), None)
    if started is None:
        failed = next((e for e in reversed(events) if isinstance(e, RunFailed)), None)
        if failed is not None:
            raise RunError(f"run {run_id or '?'} failed before it started: {failed.reason}", bug=bool(failed.detail))
        raise ValueError("no RunStarted event: not a run's event log")
    cfg = started.config
    finished = next((e for e in reversed(events) if isinstance(e, RunFinished)), None)
    last_eval = next((e for e in reversed(events) if isinstance(e, Evaluated)), None)
    ev_out: dict[str, Any] = {}
    if last_eval is not None:
        ev_out = eval_summary(last_eval.correct, last_eval.totals, last_eval.subset_totals, last_eval.aa_pgd20)
    return {
        "run_id": run_id, "method": cfg["method"], "seed": cfg["seed"],
        "wall_s": finished.wall_s if finished else None,
        "student": student_path or (finished.student_path if finished else ""),
        "eps": cfg["eps"], "eval_epoch": last_eval.epoch if last_eval else None,
        "final": bool(last_eval and last_eval.final),
        "config": cfg, "teacher": started.teacher, "eval": ev_out, "synthesis": synthesis_summary(events),
        "training_attack": training_attack_summary(events),
    }


def eval_summary(correct: dict[str, np.ndarray], totals: np.ndarray, subset_totals: dict[str, np.ndarray],
                 aa_pgd20: np.ndarray | None) -> dict[str, Any]:
    """Per attack, its class metrics against the totals it ran on. When AutoAttack ran on a subset beside PGD-20,
    its entry also holds PGD-20 on the same images (METHOD.md §7): `pgd20_same_images` (mean over classes) and
    `pgd20_same_images_metrics` (the full class metrics)."""
    out = {attack: class_metrics(c, subset_totals.get(attack, totals)).to_dict() for attack, c in correct.items()}
    if "aa" in out and aa_pgd20 is not None:
        same = class_metrics(aa_pgd20, subset_totals.get("aa", totals))
        out["aa"]["pgd20_same_images"] = same.mean
        out["aa"]["pgd20_same_images_metrics"] = same.to_dict()
    return out


def eval_rows(ev: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(attack, class metrics) pairs of a record's `eval`, with PGD-20 on AutoAttack's images as its own row
    (`AA_PGD20`) right after AutoAttack."""
    rows = []
    for attack, m in ev.items():
        rows.append((attack, m))
        if attack == "aa" and "pgd20_same_images_metrics" in m:
            rows.append((AA_PGD20, m["pgd20_same_images_metrics"]))
    return rows


def synthesis_summary(events: Sequence[Event], last: int = 5) -> dict[str, Any]:
    """Synthesis diagnostics averaged over the last `last` epochs (empty for the real-data method)."""
    samples = [e for e in events if isinstance(e, SamplesSynthesised)][-last:]
    if not samples:
        return {}
    weights = next((e for e in reversed(events) if isinstance(e, ClassWeightsUpdated)), None)
    mem = samples[-1].memory_counts.astype(float)
    with warnings.catch_warnings():  # a class never sampled in those epochs stays nan
        warnings.simplefilter("ignore", RuntimeWarning)
        class_acc = np.nanmean(np.stack([s.class_acc for s in samples]), axis=0)
    return {
        "epochs": [s.epoch for s in samples],
        "teacher_acc": float(np.mean([s.teacher_acc for s in samples])),
        "teacher_conf": float(np.mean([s.teacher_conf for s in samples])),
        "robust_fraction": _json_float(float(np.mean([s.robust_fraction for s in samples]))),
        "class_acc": _list(class_acc),
        "memory_share": _list(mem / max(mem.sum(), 1.0)),
        "class_weights": _list(weights.weights) if weights else None,
    }


def _nanmean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v == v]
    return float(np.mean(finite)) if finite else None


def training_attack_summary(events: Sequence[Event], last: int = 5) -> dict[str, Any]:
    """The training attack's strength (METHOD.md §6): `success_rate`, `target_entropy` and the untargeted
    reference's `reference_success_rate` / `reference_target_entropy`, each the mean over the last `last` epochs
    with a value (a reference runs every `attack_reference_every` epochs), `strength_ratio` = success rate over
    the reference's on the epochs where both ran, and the per-epoch series (`per_epoch`). Empty without a
    distillation epoch."""
    series = [e for e in events if isinstance(e, TrainingAttackStrength)]
    if not series:
        return {}
    tail = series[-last:]
    with_ref = [e for e in series if e.reference_success_rate == e.reference_success_rate][-last:]
    ref_mean = _nanmean([e.reference_success_rate for e in with_ref])
    same = _nanmean([e.success_rate for e in with_ref])
    return {
        "epochs": [e.epoch for e in tail],
        "success_rate": _nanmean([e.success_rate for e in tail]),
        "target_entropy": _nanmean([e.target_entropy for e in tail]),
        "reference_epochs": [e.epoch for e in with_ref],
        "reference_success_rate": ref_mean,
        "reference_target_entropy": _nanmean([e.reference_target_entropy for e in with_ref]),
        "strength_ratio": same / ref_mean if same is not None and ref_mean else None,
        "per_epoch": {
            "epoch": [e.epoch for e in series],
            "success_rate": _list(e.success_rate for e in series),
            "target_entropy": _list(e.target_entropy for e in series),
            "reference_success_rate": _list(e.reference_success_rate for e in series),
            "reference_target_entropy": _list(e.reference_target_entropy for e in series),
        },
    }


def add_ceiling_gaps(records: list[dict[str, Any]]) -> None:
    """For each data-free record with a real-data run of the same seed (else any seed), the PGD-20 mean
    gap to it and the fraction of it reached, stored under record["synthesis"]."""
    ceilings = {r["seed"]: r for r in records if r["method"] == "real-data" and "pgd20" in r["eval"]}
    if not ceilings:
        return
    for r in records:
        if r["method"] == "real-data" or "pgd20" not in r["eval"]:
            continue
        ceil = ceilings.get(r["seed"]) or next(iter(ceilings.values()))
        c, s = ceil["eval"]["pgd20"]["mean"], r["eval"]["pgd20"]["mean"]
        r["synthesis"]["ceiling_run"] = ceil["run_id"]
        r["synthesis"]["pgd20_gap_to_ceiling"] = c - s
        r["synthesis"]["fraction_of_ceiling"] = s / c if c else None


# ---- running many ----
def run_many(configs: Sequence[Config], store: RunStore, *, names: Sequence[str] | None = None,
             stop: threading.Event | None = None, on_event: Callable[[int, Event], None] | None = None,
             executor: Executor | None = None) -> list[dict[str, Any]]:
    """Run configs through `executor` (default: inline, one at a time), `executor.slots` at once, in order;
    returns their records in the configs' order (stopped runs included).

    Every run is stored as queued first, so the queue is visible from the start; a run the stop request
    reaches before it started is stored as stopped, and has no record. `on_event(i, ev)` is called from the
    run's driver thread."""
    from ferd.preflight import check_runnable  # imports torch

    for cfg in configs:  # a config that cannot run stops the command before any run is stored
        check_runnable(cfg)
    executor = executor or InlineExecutor()
    stop = stop or threading.Event()
    run_ids = [store.create_run(cfg, name=names[i] if names else "", status="queued") for i, cfg in enumerate(configs)]

    def one(i: int) -> None:
        if stop.is_set():  # stored as stopped, like a queued dashboard job; it has no record
            store.append(run_ids[i], RunStopped(epoch=0, reason="stopped before it started"))
            store.release(run_ids[i])
            return
        executor.execute(configs[i], store, run_id=run_ids[i], stop=stop,
                         on_event=(lambda ev: on_event(i, ev)) if on_event else None)

    with ThreadPoolExecutor(max_workers=executor.slots, thread_name_prefix="ferd-driver") as pool:
        try:
            for future in [pool.submit(one, i) for i in range(len(configs))]:
                future.result()
        except BaseException:  # Ctrl-C or a driver error: every run in flight is asked to stop (before the
            stop.set()         # pool waits for them on the way out)
            raise
    records = []
    for run_id in run_ids:
        events = [ev for _seq, ev in store.events(run_id)]
        if not any(isinstance(ev, RunStarted) for ev in events):
            continue  # stopped or failed before the engine started (the store keeps why)
        record = run_record(events, run_id=run_id)
        record["status"] = store.get_run(run_id).status
        store.set_summary(run_id, {k: record[k] for k in ("eval", "synthesis", "wall_s")})
        records.append(record)
    add_ceiling_gaps(records)
    return records


def compare_configs(base: Config, methods: Sequence[str], seeds: Sequence[int]) -> list[Config]:
    """One config per (seed, method), seeds outermost so early results already pair up."""
    return [base.for_method(m).replace(seed=s) for s in seeds for m in methods]


def ablation_configs(base: Config, param: str, values: Sequence[float], seeds: Sequence[int]) -> list[Config]:
    """The grid `param` in values x seeds on top of `base` (any numeric config field)."""
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    if param not in fields or fields[param] not in ("int", "float"):
        numeric = sorted(k for k, t in fields.items() if t in ("int", "float"))
        raise ConfigError(f"ablate: {param!r} is not a numeric config field; choose one of {', '.join(numeric)}")
    cast = int if fields[param] == "int" else float
    out = []
    for v in values:
        if cast is int and float(v) != int(v):
            raise ConfigError(f"ablate: {param} takes integers, got {v}")
        out.extend(base.replace(**{param: cast(v)}, seed=s) for s in seeds)
    return out


def write_results(out: Path, records: list[dict[str, Any]], *, command: str, extra: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    atomic.write_text(path, json.dumps({"command": command, **(extra or {}), "runs": records}, indent=1))
    return path


# ---- tables ----
AA_PGD20 = "pgd20@aa"
"""Table row: PGD-20 on AutoAttack's images (compare it with AA, not with PGD-20 on the whole split)."""
ATTACK_ORDER = ("clean", "fgsm", "pgd20", "cw", "aa", AA_PGD20)


def aggregate(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Long table: method, attack, class ('mean', 'worst', 'nsd' or a class index), mean and std over seeds, n."""
    import pandas as pd

    rows = []
    for r in records:
        for attack, m in eval_rows(r["eval"]):
            for c, a in enumerate(m["per_class"]):
                rows.append((r["method"], r["seed"], attack, str(c), a))
            for stat in ("mean", "worst", "nsd"):
                rows.append((r["method"], r["seed"], attack, stat, m[stat]))
    df = pd.DataFrame(rows, columns=["method", "seed", "attack", "class", "value"]).astype({"value": float})
    g = df.groupby(["method", "attack", "class"], sort=False)["value"]
    return g.agg(mean="mean", std="std", n="count").reset_index()


def pm(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    if mean != mean:
        return "–"
    if std != std:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown_compare_table(records: Sequence[dict[str, Any]]) -> str:
    """Per attack and method: per-class accuracy (%), mean, worst, NSD as mean ± std over seeds."""
    agg = aggregate(records)
    if agg.empty:
        return "(no evaluations)"
    methods = list(dict.fromkeys(r["method"] for r in records))
    num_classes = max(len(m["per_class"]) for r in records for m in r["eval"].values())
    head = ["attack", "method"] + [str(c) for c in range(num_classes)] + ["mean", "worst", "NSD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for attack in [a for a in ATTACK_ORDER if a in set(agg["attack"])]:
        for method in methods:
            sub = agg[(agg.attack == attack) & (agg.method == method)].set_index("class")
            if sub.empty:
                continue
            cells = [pm(sub.loc[str(c), "mean"], sub.loc[str(c), "std"], digits=0) for c in range(num_classes)]
            cells += [pm(sub.loc["mean", "mean"], sub.loc["mean", "std"]),
                      pm(sub.loc["worst", "mean"], sub.loc["worst", "std"]),
                      pm(sub.loc["nsd", "mean"], sub.loc["nsd", "std"], scale=1.0, digits=3)]
            lines.append(f"| {attack} | {method} (n={int(sub['n'].max())}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(records: Sequence[dict[str, Any]], param: str) -> pd.DataFrame:
    """Per value of `param`: n and mean/std over seeds of clean mean, PGD-20 mean, PGD-20 worst class, PGD-20 NSD,
    and of the training attack's success rate and target entropy (results.json `training_attack`, means over the
    last 5 epochs; NaN for runs recorded before those fields existed)."""
    import pandas as pd

    rows = []
    for r in records:
        if "pgd20" not in r["eval"] or "clean" not in r["eval"]:
            continue
        attack = r.get("training_attack") or {}
        rows.append({"value": r["config"][param], "clean": r["eval"]["clean"]["mean"],
                     "pgd20_mean": r["eval"]["pgd20"]["mean"], "pgd20_worst": r["eval"]["pgd20"]["worst"],
                     "pgd20_nsd": r["eval"]["pgd20"]["nsd"],
                     "attack_success": _number(attack.get("success_rate")),
                     "target_entropy": _number(attack.get("target_entropy"))})
    cols = ["value", "n", "clean_mean", "clean_std", "pgd20_mean", "pgd20_mean_std", "pgd20_worst",
            "pgd20_worst_std", "pgd20_nsd", "pgd20_nsd_std", "attack_success", "attack_success_std",
            "target_entropy", "target_entropy_std"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows).astype(float)
    g = df.groupby("value")
    stats = {"n": g.size()}
    for name, column in (("clean_mean", "clean"), ("pgd20_mean", "pgd20_mean"), ("pgd20_worst", "pgd20_worst"),
                         ("pgd20_nsd", "pgd20_nsd"), ("attack_success", "attack_success"),
                         ("target_entropy", "target_entropy")):
        stats[name] = g[column].mean()
        stats[("clean_std" if name == "clean_mean" else f"{name}_std")] = g[column].std()
    return pd.DataFrame(stats).reset_index()[cols]


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def markdown_ablation_table(table: pd.DataFrame, param: str) -> str:
    head = [param, "n", "clean %", "PGD-20 mean %", "PGD-20 worst class %", "PGD-20 NSD",
            "training-attack success %", "target entropy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        lines.append(f"| {r['value']:g} | {int(r['n'])} | {pm(r['clean_mean'], r['clean_std'])} | "
                     f"{pm(r['pgd20_mean'], r['pgd20_mean_std'])} | {pm(r['pgd20_worst'], r['pgd20_worst_std'])} | "
                     f"{pm(r['pgd20_nsd'], r['pgd20_nsd_std'], scale=1.0, digits=3)} | "
                     f"{pm(r['attack_success'], r['attack_success_std'])} | "
                     f"{pm(r['target_entropy'], r['target_entropy_std'], scale=1.0, digits=3)} |")
    return "\n".join(lines)


def error_bars(mean: pd.Series, std: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bar lengths for mean ± std over seeds: a missing std (one seed) draws no bar, and the
    lower bar stops at 0, since no accuracy or NSD is negative."""
    upper = std.fillna(0).to_numpy(dtype=float)
    return np.minimum(upper, mean.to_numpy(dtype=float).clip(min=0)), upper


def ablation_plot(tables: dict[str, pd.DataFrame], param: str, path: Path) -> Path:
    """PNG: PGD-20 mean, PGD-20 worst class and PGD-20 NSD (mean ± std over seeds) against `param`,
    one line per table (e.g. one per mask rule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), constrained_layout=True)
    panels = (("pgd20_mean", "PGD-20 mean accuracy (%)", 100), ("pgd20_worst", "PGD-20 worst class (%)", 100),
              ("pgd20_nsd", "PGD-20 NSD (lower = fairer)", 1))
    for label, table in tables.items():
        for ax, (col, title, scale) in zip(axes, panels, strict=True):
            lower, upper = error_bars(table[col], table[f"{col}_std"])
            ax.errorbar(table["value"], table[col] * scale, yerr=[lower * scale, upper * scale], marker="o",
                        capsize=3, label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(param)
            ax.grid(alpha=0.3)
    if len(tables) > 1:
        axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
