"""Per-class evaluation on real test data under each attack (METHOD.md §7).

`evaluate` returns per-class correct counts per attack (the raw material of every fairness metric), the
class totals, and the PGD attack-target histogram. It leaves the caller's world as it found it: the model's
mode and requires_grad flags, and torch's global random state (the attacks' random starts draw from a
private seed), so evaluating mid-training does not change what training does next. A `should_stop`
callback ends an evaluation (AutoAttack included) at the model's next forward pass with `Interrupted`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ferd.attacks import AA_STAGES, ATTACKS, attack_mode, autoattack, get_attack, isolated_rng
from ferd.metrics import ClassMetrics, class_metrics, class_totals, correct_counts, target_counts
from ferd.models import folded_batchnorm

CLEAN = "clean"
Progress = Callable[[str, int, int], None]
"""progress(label, units done, units in all): one unit per batch of each batched attack, one per AutoAttack
sub-attack; the label names the attack running now."""


class Interrupted(Exception):
    """`should_stop` returned True during an evaluation."""


@contextmanager
def _interruptible(model: nn.Module, should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """Raise `Interrupted` before any forward pass of `model` once `should_stop()` is true. Attacks call the model
    at every step, so this reaches inside long attacks (AutoAttack) without changing what they compute."""
    if should_stop is None:
        yield
        return

    def check(_module: nn.Module, _args: tuple) -> None:
        if should_stop():
            raise Interrupted

    handle = model.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class Evaluation:
    correct: dict[str, np.ndarray]
    """attack (or "clean") -> (C,) int correctly classified samples per true class."""
    totals: np.ndarray
    """(C,) int test samples per class."""
    subset_totals: dict[str, np.ndarray]
    """attack -> (C,) int samples per class where the attack ran on a subset (AutoAttack)."""
    pgd_targets: np.ndarray | None
    """(C, C) int (true, predicted) counts of samples misclassified under PGD; None without "pgd20"."""
    aa_pgd20: np.ndarray | None = None
    """(C,) int PGD-20 correct counts on AutoAttack's images (its subset, totals `subset_totals["aa"]`), so the
    two compare on the same images; None unless both "aa" and "pgd20" ran."""

    def metrics(self, z: float = 1.96) -> dict[str, ClassMetrics]:
        """Per-attack class metrics, each against the totals its attack actually ran on."""
        return {name: class_metrics(c, self.subset_totals.get(name, self.totals), z=z)
                for name, c in self.correct.items()}


def stratified_subset(y: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """Indices of the first max(1, n // C) samples of each class (fewer where a class has fewer), in order."""
    y = np.asarray(y)
    per_class = max(1, n // num_classes)
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(num_classes)])
    return np.sort(keep)


def _predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).argmax(dim=1).cpu().numpy()


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, attacks: Sequence[str],
             eps: float, step_size: float, steps: int = 20, kappa: float = 50.0, batch_size: int = 256,
             aa_subset: int = 0, device: str | torch.device, seed: int = 0,
             should_stop: Callable[[], bool] | None = None, progress: Progress | None = None) -> Evaluation:
    """Per-class accuracy of `model` (already on `device`) on (x, y) in [0,1] under each of `attacks`.

    attacks: names from ("clean", "fgsm", "pgd20", "cw", "aa"); PGD-20 and CW use `steps` steps of `step_size`.
    aa_subset > 0 runs AutoAttack on a stratified subset of about that size (`stratified_subset`) and records
    its per-class totals in `subset_totals`; with "pgd20" too, `aa_pgd20` holds PGD-20's counts on those images.
    Random starts are seeded from `seed`; the global RNG is restored.
    Raises `Interrupted` (with the model's mode, flags and the RNG restored) once `should_stop()` is true.
    `progress` (see `Progress`) is called before each unit of work and once at the end.
    """
    unknown = [a for a in attacks if a != CLEAN and a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {', '.join((CLEAN, *ATTACKS))}")
    y_np = y.cpu().numpy()
    totals = class_totals(y_np, num_classes)
    correct = {name: np.zeros(num_classes, dtype=np.int64) for name in attacks}
    pgd_targets = np.zeros((num_classes, num_classes), dtype=np.int64) if "pgd20" in attacks else None
    pgd_pred = np.zeros(len(y_np), dtype=np.int64)
    aa_pgd20 = None
    batched = [a for a in attacks if a not in (CLEAN, "aa")]
    settings = dict(eps=eps, step_size=step_size, steps=steps, kappa=kappa, device=device, seed=seed)
    subset_totals: dict[str, np.ndarray] = {}
    units = -(-len(x) // batch_size) * len(batched) + (len(AA_STAGES) if "aa" in attacks else 0)
    done = [0]

    def report(label: str) -> None:
        if progress is not None:
            progress(label, done[0], units)
        done[0] += 1

    with attack_mode(model), folded_batchnorm(model), isolated_rng(seed), _interruptible(model, should_stop):
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device)
            yb = y[start:start + batch_size].to(device)
            yb_np = y_np[start:start + batch_size]
            if CLEAN in attacks:
                correct[CLEAN] += correct_counts(_predict(model, xb), yb_np, num_classes)
            for name in batched:
                report(ATTACKS[name].label)
                pred = _predict(model, get_attack(name)(model, xb, yb, **settings))
                correct[name] += correct_counts(pred, yb_np, num_classes)
                if name == "pgd20":
                    pgd_targets += target_counts(yb_np, pred, num_classes)
                    pgd_pred[start:start + batch_size] = pred
        if "aa" in attacks:
            idx = np.arange(len(y_np))
            if aa_subset > 0:
                idx = stratified_subset(y_np, aa_subset, num_classes)
                subset_totals["aa"] = class_totals(y_np[idx], num_classes)
            rows = torch.from_numpy(idx).to(x.device)
            seen: set[str] = set()

            def aa_stage(label: str) -> None:  # called per batch: one unit per sub-attack
                if label not in seen:
                    seen.add(label)
                    report(f"AutoAttack: {label}")

            x_adv = autoattack(model, x[rows], y[rows], eps=eps, device=device, seed=seed, on_stage=aa_stage)
            preds = np.concatenate([_predict(model, x_adv[s:s + batch_size].to(device))
                                    for s in range(0, len(idx), batch_size)])
            correct["aa"] = correct_counts(preds, y_np[idx], num_classes)
            if "pgd20" in attacks:
                aa_pgd20 = correct_counts(pgd_pred[idx], y_np[idx], num_classes)
    if progress is not None and units:
        progress("done", units, units)
    return Evaluation(correct=correct, totals=totals, subset_totals=subset_totals, pgd_targets=pgd_targets,
                      aa_pgd20=aa_pgd20)

