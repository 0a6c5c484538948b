"""Typed events: what the engine yields, what the store persists and what the UI reads.

Events are frozen dataclasses of plain Python values and numpy arrays, never live tensors.
`to_dict` / `from_dict` give a JSON-safe form (arrays as base64 .npy) for the event log.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    epoch: int  # 0 before the first epoch; epochs count from 1


@dataclass(frozen=True)
class RunStarted(Event):
    kind: ClassVar[str] = "run_started"
    config: dict[str, Any]
    teacher: dict[str, Any]
    """name, arch, path, clean/pgd accuracy (overall and per class) on the test split."""
    device: str
    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    resumed_from: int = 0
    """Epoch of the checkpoint this run resumed from (0 = fresh start)."""
    engine_version: str = ""
    """`ferd.version.engine_version()` of the code that ran it ("" in logs written before it was recorded)."""


@dataclass(frozen=True)
class StageProgress(Event):
    """Progress of a long stage outside the epoch's step events: training the embedded teacher on first use
    (stage `teacher`, epoch 0, before RunStarted) and the evaluations' attacks (stage `evaluation`)."""

    kind: ClassVar[str] = "stage_progress"
    stage: str
    """`teacher` or `evaluation`."""
    step: int
    """Units done so far (0 = the stage just began)."""
    total_steps: int
    label: str
    """What runs now, e.g. "training the embedded teacher" or "PGD-20" / "AutoAttack: APGD-T"."""


@dataclass(frozen=True)
class RunResumed(Event):
    """Marks where a resumed run picked up: `epoch` is the checkpoint's epoch (the log before it is kept,
    everything after it was dropped). Written by the runner in place of the engine's second RunStarted."""

    kind: ClassVar[str] = "run_resumed"
    time: float
    """Epoch seconds when the resumed run started."""
    device: str


@dataclass(frozen=True)
class EpochStarted(Event):
    kind: ClassVar[str] = "epoch_started"
    total_epochs: int


@dataclass(frozen=True)
class GeneratorProgress(Event):
    kind: ClassVar[str] = "generator_progress"
    step: int
    total_steps: int
    losses: dict[str, float]
    """total, bn, oh, adv, uni."""
    robust_fraction: float
    """Share of (sample, channel) pairs the feature split marked robust (nan when not computed)."""


@dataclass(frozen=True)
class SamplesSynthesised(Event):
    kind: ClassVar[str] = "samples_synthesised"
    images: np.ndarray
    """(N, H, W, C) uint8 thumbnails of the kept batch x* (first `thumbnails` samples)."""
    labels: np.ndarray
    """(N,) sampled classes."""
    features: np.ndarray
    """(N, D) float32 teacher features (pooled feature layer) for the embedding."""
    teacher_pred: np.ndarray
    """(N,) teacher's predicted class on each thumbnail."""
    teacher_acc: float
    """Teacher accuracy on the whole kept batch (prediction == sampled class)."""
    teacher_conf: float
    """Mean teacher softmax probability of the sampled class on the kept batch."""
    class_acc: np.ndarray
    """(C,) teacher accuracy per sampled class (nan where the class was not sampled)."""
    class_conf: np.ndarray
    """(C,) mean confidence per sampled class (nan where not sampled)."""
    robust_fraction: float
    """Robust-mask fraction of the feature split on the kept batch (nan when not computed)."""
    memory_counts: np.ndarray
    """(C,) samples of each class in the synthetic memory after this epoch."""


@dataclass(frozen=True)
class ClassWeightsUpdated(Event):
    kind: ClassVar[str] = "class_weights"
    weights: np.ndarray
    """(C,) proportions pi used to sample classes next epoch (sum 1)."""
    scores: np.ndarray
    """(C,) r_c = mean negative teacher margin under PGD (higher = weaker class)."""


@dataclass(frozen=True)
class AttackTargets(Event):
    kind: ClassVar[str] = "attack_targets"
    counts: np.ndarray
    """(C, C) int: row = true class, column = predicted class of the adversarial example, pred != true."""
    source: str
    """`train` (the epoch's training adversarial examples) or `eval` (PGD-20 on the real test split)."""


@dataclass(frozen=True)
class TrainingAttackStrength(Event):
    kind: ClassVar[str] = "training_attack"
    samples: int
    """Adversarial examples the student trained on this epoch."""
    success_rate: float
    """Share of them the student (eval mode, before the update) assigns to a class other than y, the label the
    attack works against: the sampled class of a synthetic sample, the true label on real data."""
    target_entropy: float
    """Mean row entropy of the epoch's attack-target histogram / log(C - 1) (1 = spread evenly; nan if empty)."""
    reference_success_rate: float = float("nan")
    """The same for an untargeted KL-PGD on the same batches (nan on epochs without the reference)."""
    reference_target_entropy: float = float("nan")


@dataclass(frozen=True)
class StudentProgress(Event):
    kind: ClassVar[str] = "student_progress"
    step: int
    total_steps: int
    losses: dict[str, float]
    """total, nat, rob."""
    lr: float


@dataclass(frozen=True)
class Evaluated(Event):
    kind: ClassVar[str] = "evaluated"
    correct: dict[str, np.ndarray]
    """attack -> (C,) correct counts per class."""
    totals: np.ndarray
    """(C,) test samples per class."""
    subset_totals: dict[str, np.ndarray] = field(default_factory=dict)
    """attack -> (C,) totals where the attack ran on a subset (AutoAttack)."""
    final: bool = False
    wall_s: float = 0.0
    aa_pgd20: np.ndarray | None = None
    """(C,) PGD-20 correct counts on AutoAttack's images (totals `subset_totals["aa"]`); None without both."""


@dataclass(frozen=True)
class EpochFinished(Event):
    kind: ClassVar[str] = "epoch_finished"
    wall_s: float
    """Seconds since the run (or resumed run) started."""
    phase_s: dict[str, float]
    """Seconds spent in each phase this epoch: synthesis, reweighting, distillation, evaluation."""


@dataclass(frozen=True)
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint_saved"
    path: str


@dataclass(frozen=True)
class RunFinished(Event):
    kind: ClassVar[str] = "run_finished"
    wall_s: float
    student_path: str


@dataclass(frozen=True)
class RunStopped(Event):
    kind: ClassVar[str] = "run_stopped"
    reason: str


@dataclass(frozen=True)
class RunFailed(Event):
    kind: ClassVar[str] = "run_failed"
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class RunWarning(Event):
    kind: ClassVar[str] = "warning"
    message: str
    key: str = ""
    """What the warning is about (a `ferd.diagnostics` problem key), "" for anything else."""


EVENT_TYPES: dict[str, type[Event]] = {
    t.kind: t
    for t in (RunStarted, RunResumed, StageProgress, EpochStarted, GeneratorProgress, SamplesSynthesised,
              ClassWeightsUpdated, AttackTargets, TrainingAttackStrength, StudentProgress, Evaluated, EpochFinished,
              CheckpointSaved, RunFinished, RunStopped, RunFailed, RunWarning)
}
TERMINAL = ("run_finished", "run_stopped", "run_failed")


def _enc(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, v, allow_pickle=False)
        return {"__nd__": base64.b64encode(buf.getvalue()).decode("ascii")}
    if isinstance(v, dict):
        return {k: _enc(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_enc(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and v != v:
        return {"__nan__": True}
    return v


def _dec(v: Any) -> Any:
    if isinstance(v, dict):
        if "__nd__" in v:
            return np.load(io.BytesIO(base64.b64decode(v["__nd__"])), allow_pickle=False)
        if "__nan__" in v:
            return float("nan")
        return {k: _dec(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_dec(x) for x in v]
    return v


def to_dict(ev: Event) -> dict[str, Any]:
    """JSON-safe dict with a `kind` key."""
    d = {f.name: _enc(getattr(ev, f.name)) for f in dataclasses.fields(ev)}
    d["kind"] = ev.kind
    return d


def from_dict(d: dict[str, Any]) -> Event:
    d = dict(d)
    cls = EVENT_TYPES[d.pop("kind")]
    kwargs = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for k, v in d.items():
        v = _dec(v)
        if isinstance(v, list) and str(hints.get(k, "")).startswith("tuple"):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        kwargs[k] = v
    return cls(**kwargs)
