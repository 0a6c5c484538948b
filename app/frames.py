"""Event lists -> tidy pandas frames (pure: no Streamlit, no engine objects).

Every page turns the events of a run (from the job registry or the store) into these frames and
hands them to the chart builders in app.charts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ferd import events as ev
from ferd.diagnostics import LOW_TEACHER_ACC, ROBUST_FRACTION_BAND, WEAK_ATTACK_RATIO, synthesis_problems
from ferd.metrics import class_metrics

WEIGHT_COLUMNS = ["epoch", "class", "weight", "score"]
ACCURACY_COLUMNS = ["epoch", "attack", "class", "accuracy", "correct", "total"]
LOSS_COLUMNS = ["epoch", "step", "phase", "name", "value"]
SYNTHESIS_COLUMNS = ["epoch", "teacher_acc", "teacher_conf", "robust_fraction"]


def _of(events: Sequence[ev.Event], kind: type[ev.Event]) -> list:
    return [e for e in events if isinstance(e, kind)]


def class_names(events: Sequence[ev.Event]) -> list[str]:
    """Class names from the (last) RunStarted event; [] before it arrives."""
    started = _of(events, ev.RunStarted)
    return list(started[-1].class_names) if started else []


def reweighting(events: Sequence[ev.Event]) -> bool:
    """Whether the run reweights classes (its config's `reweight`; DFRD and real-data runs do not)."""
    started = _of(events, ev.RunStarted)
    return bool(started[-1].config.get("reweight", True)) if started else True


def weights_frame(events: Sequence[ev.Event]) -> pd.DataFrame:
    """One row per (epoch, class): sampling proportion pi and robustness score r."""
    rows = [{"epoch": e.epoch, "class": c, "weight": float(w), "score": float(s)}
            for e in _of(events, ev.ClassWeightsUpdated)
            for c, (w, s) in enumerate(zip(e.weights, e.scores, strict=True))]
    return pd.DataFrame(rows, columns=WEIGHT_COLUMNS)


def target_epochs(events: Sequence[ev.Event], source: str) -> list[int]:
    """Epochs that have an AttackTargets event from `source` (train or eval), ascending."""
    return sorted({e.epoch for e in _of(events, ev.AttackTargets) if e.source == source})


def targets_matrix(events: Sequence[ev.Event], epoch: int, source: str) -> np.ndarray | None:
    """The (C, C) attack-target counts of `epoch` and `source` (the last such event), None if absent."""
    hits = [e for e in _of(events, ev.AttackTargets) if e.source == source and e.epoch == epoch]
    return np.asarray(hits[-1].counts) if hits else None


def accuracy_frame(events: Sequence[ev.Event]) -> pd.DataFrame:
    """One row per (evaluation epoch, attack, class); subset totals (AutoAttack) where given."""
    rows = []
    for e in _of(events, ev.Evaluated):
        for attack, correct in e.correct.items():
            totals = e.subset_totals.get(attack, e.totals)
            for c, (k, n) in enumerate(zip(correct, totals, strict=True)):
                rows.append({"epoch": e.epoch, "attack": attack, "class": c, "accuracy": float(k) / n if n else np.nan,
                             "correct": int(k), "total": int(n)})
    return pd.DataFrame(rows, columns=ACCURACY_COLUMNS)


def losses_frame(events: Sequence[ev.Event]) -> pd.DataFrame:
    """One row per reported loss: phase `generator` or `student`."""
    rows = []
    for e in events:
        if isinstance(e, ev.GeneratorProgress | ev.StudentProgress):
            phase = "generator" if isinstance(e, ev.GeneratorProgress) else "student"
            rows.extend({"epoch": e.epoch, "step": e.step, "phase": phase, "name": k, "value": float(v)}
                        for k, v in e.losses.items())
    return pd.DataFrame(rows, columns=LOSS_COLUMNS)


def synthesis_frame(events: Sequence[ev.Event]) -> pd.DataFrame:
    """Per epoch: teacher accuracy and confidence on the kept synthetic batch, robust-mask fraction."""
    rows = [{"epoch": e.epoch, "teacher_acc": e.teacher_acc, "teacher_conf": e.teacher_conf,
             "robust_fraction": e.robust_fraction} for e in _of(events, ev.SamplesSynthesised)]
    return pd.DataFrame(rows, columns=SYNTHESIS_COLUMNS)


def progress(events: Sequence[ev.Event]) -> tuple[int, int, float | None]:
    """(epochs finished, total epochs, ETA in seconds from the mean epoch wall time; None if unknown or done)."""
    total = 0
    for e in events:
        if isinstance(e, ev.EpochStarted):
            total = e.total_epochs
        elif isinstance(e, ev.RunStarted) and not total:
            total = int(e.config.get("epochs", 0))
    # wall_s restarts with a resumed run: time only the epochs after the last start (RunResumed marks a
    # resume; logs written before it existed carry a second RunStarted with resumed_from instead).
    starts = [i for i, e in enumerate(events) if isinstance(e, (ev.RunStarted, ev.RunResumed))]
    last = events[starts[-1]] if starts else None
    first_epoch = last.resumed_from if isinstance(last, ev.RunStarted) else (last.epoch if last else 0)
    finished = _of(events, ev.EpochFinished)
    finished_here = [e for e in events[starts[-1]:] if isinstance(e, ev.EpochFinished)] if starts else finished
    epoch = finished[-1].epoch if finished else 0
    done = any(e.kind in ev.TERMINAL for e in events)
    if done or not finished_here or epoch >= total:
        return epoch, total, None
    per_epoch = finished_here[-1].wall_s / max(finished_here[-1].epoch - first_epoch, 1)
    return epoch, total, per_epoch * (total - epoch)


def current_stage(events: Sequence[ev.Event]) -> ev.StageProgress | None:
    """The stage (teacher training, an evaluation's attacks) running now: its latest StageProgress, unless the
    stage is complete, RunStarted / Evaluated ended it, or the run ended."""
    stage = None
    for e in events:
        if isinstance(e, ev.StageProgress):
            stage = e
        elif isinstance(e, ev.RunStarted | ev.Evaluated) or e.kind in ev.TERMINAL:
            stage = None
    return stage if stage is not None and stage.step < stage.total_steps else None


def stage_text(stage: ev.StageProgress) -> str:
    """One line for a progress bar: what runs and how far, e.g. "Evaluation, epoch 3: PGD-20 (2 of 7)"."""
    if stage.stage == "teacher":
        return f"Teacher: {stage.label} · epoch {stage.step} of {stage.total_steps} done"
    return f"Evaluation, epoch {stage.epoch}: {stage.label} ({stage.step + 1} of {stage.total_steps})"


def warnings(events: Sequence[ev.Event]) -> list[str]:
    """Messages of the run's RunWarning events that are not about synthesis, in order. Synthesis warnings mark
    the first bad batch, which later batches may have left behind: `synthesis_warnings` says how it is now."""
    return [e.message for e in _of(events, ev.RunWarning) if e.key not in SYNTHESIS_KEYS]


def terminal(events: Sequence[ev.Event]) -> ev.Event | None:
    """The RunFinished / RunStopped / RunFailed event that ended the run, if any (the last one)."""
    ends = [e for e in events if e.kind in ev.TERMINAL]
    return ends[-1] if ends else None


def headline(events: Sequence[ev.Event]) -> dict[str, float]:
    """{attack}_mean for every attack plus pgd20_worst and pgd20_nsd, from the last Evaluated event ({} before)."""
    evals = _of(events, ev.Evaluated)
    if not evals:
        return {}
    e = evals[-1]
    out: dict[str, float] = {}
    for attack, correct in e.correct.items():
        m = class_metrics(correct, e.subset_totals.get(attack, e.totals))
        out[f"{attack}_mean"] = m.mean
        if attack == "pgd20":
            out["pgd20_worst"] = m.worst
            out["pgd20_nsd"] = m.nsd
    return out


SYNTHESIS_KEYS = ("teacher_acc", "robust_fraction")
"""The problems `ferd.diagnostics.synthesis_problems` reports."""
ROBUST_BAND = ROBUST_FRACTION_BAND[0]
"""A robust-mask fraction within this distance of 0 or 1 means the feature split degenerated."""
TEACHER_ACC_FLOOR = LOW_TEACHER_ACC
"""Below this teacher accuracy on x* the synthetic samples no longer look like their sampled class."""


def synthesis_warnings(events: Sequence[ev.Event]) -> list[str]:
    """Problems of the latest synthesised batch (`ferd.diagnostics`): a degenerate split, an unconvinced teacher."""
    frame = synthesis_frame(events)
    if frame.empty:
        return []
    last = frame.iloc[-1]
    started = _of(events, ev.RunStarted)
    config = started[-1].config if started else {}
    problems = synthesis_problems(float(last["teacher_acc"]), float(last["robust_fraction"]),
                                  w_uni=float(config.get("w_uni", 1.0)), mask_rule=str(config.get("mask_rule", "?")))
    return [f"Latest batch (epoch {int(last['epoch'])}): {m}." for m in problems.values()]


ATTACK_STRENGTH_COLUMNS = ["epoch", "success_rate", "target_entropy", "reference_success_rate",
                           "reference_target_entropy"]


def attack_strength_frame(events: Sequence[ev.Event]) -> pd.DataFrame:
    """Per distillation epoch: the training attack's success rate and target entropy, and the untargeted
    reference's (NaN on epochs without the reference)."""
    rows = [{c: getattr(e, c) for c in ATTACK_STRENGTH_COLUMNS} for e in _of(events, ev.TrainingAttackStrength)]
    return pd.DataFrame(rows, columns=ATTACK_STRENGTH_COLUMNS)


def attack_strength_text(method: str, summary: dict) -> str:
    """One paragraph on a run's training attack, told with its own numbers (`ferd.experiments.
    training_attack_summary`); "" without a distillation epoch."""
    if not summary or summary.get("success_rate") is None:
        return ""

    def entropy(key: str) -> str:
        return "–" if summary.get(key) is None else f"{summary[key]:.2f}"

    n = len(summary["epochs"])
    text = (f"**{method.upper()}**: over its last {n} epoch{'s' * (n > 1)} the training attack changed the student's "
            f"prediction on **{summary['success_rate']:.0%}** of its adversarial examples (target entropy "
            f"{entropy('target_entropy')}, where 1 = each class pushed evenly to all others).")
    ref, ratio = summary.get("reference_success_rate"), summary.get("strength_ratio")
    if ref is None or ratio is None:
        return text
    text += (f" An untargeted KL-PGD on the same batches changed **{ref:.0%}** (target entropy "
             f"{entropy('reference_target_entropy')}): the training attack keeps **{ratio:.0%}** of its strength.")
    if ratio < WEAK_ATTACK_RATIO:
        text += (" That is under half: the constraint has switched the attack off, and the student trains on nearly "
                 "clean inputs.")
    return text
