"""Per-class accuracy and robust-fairness metrics (METHOD.md §6-7), pure numpy.

The raw material is per-class counts: how many test samples of class c an attack left correctly
classified, out of how many. From them: a_c, mean_c a_c, worst = min_c a_c, NSD = std_c(a_c) / mean_c(a_c)
with the sample standard deviation (divisor C - 1), and a Wilson score interval per class so a reader
can judge how noisy a_c is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClassMetrics:
    """Accuracy per class and its summaries. Classes with no samples have nan accuracy and interval and
    are left out of mean, worst and nsd."""

    per_class: np.ndarray
    """(C,) float accuracy a_c = counts / totals (nan where totals == 0)."""
    counts: np.ndarray
    """(C,) int correctly classified samples."""
    totals: np.ndarray
    """(C,) int samples."""
    mean: float
    """mean_c a_c (nan when no class has samples)."""
    worst: float
    """min_c a_c."""
    worst_class: int
    """Index of the (first) class attaining `worst`; -1 when no class has samples."""
    nsd: float
    """Normalised standard deviation std_c(a_c) / mean_c(a_c), ddof = 1; nan with < 2 classes or mean 0."""
    ci_low: np.ndarray
    """(C,) lower end of the Wilson score interval of a_c."""
    ci_high: np.ndarray
    """(C,) upper end of the Wilson score interval of a_c."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: arrays as lists, NaN as None."""
        return {
            "per_class": [_json_float(v) for v in self.per_class],
            "counts": [int(v) for v in self.counts],
            "totals": [int(v) for v in self.totals],
            "mean": _json_float(self.mean),
            "worst": _json_float(self.worst),
            "worst_class": int(self.worst_class),
            "nsd": _json_float(self.nsd),
            "ci_low": [_json_float(v) for v in self.ci_low],
            "ci_high": [_json_float(v) for v in self.ci_high],
        }


def _json_float(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def wilson_interval(correct: np.ndarray, totals: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (Wilson 1927) of the proportion correct / totals, elementwise; nan where totals == 0."""
    k = np.asarray(correct, dtype=float)
    n = np.asarray(totals, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        denom = 1.0 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z / denom * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    low = np.where(n > 0, np.clip(centre - half, 0.0, 1.0), np.nan)
    high = np.where(n > 0, np.clip(centre + half, 0.0, 1.0), np.nan)
    return low, high


def class_metrics(correct: np.ndarray, totals: np.ndarray, z: float = 1.96) -> ClassMetrics:
    """Per-class accuracy, mean, worst class, NSD and Wilson intervals (z = 1.96: 95 %) from counts."""
    counts = np.asarray(correct, dtype=np.int64)
    n = np.asarray(totals, dtype=np.int64)
    if counts.shape != n.shape or counts.ndim != 1:
        raise ValueError(f"correct and totals must be 1-D of equal length, got {counts.shape} and {n.shape}")
    if (counts < 0).any() or (counts > n).any():
        raise ValueError("need 0 <= correct <= totals for every class")
    valid = n > 0
    per_class = np.full(n.shape, np.nan)
    per_class[valid] = counts[valid] / n[valid]
    acc = per_class[valid]
    if acc.size:
        mean = float(acc.mean())
        worst = float(acc.min())
        worst_class = int(np.flatnonzero(valid)[int(acc.argmin())])
    else:
        mean, worst, worst_class = math.nan, math.nan, -1
    nsd = float(acc.std(ddof=1) / mean) if acc.size >= 2 and mean > 0 else math.nan
    low, high = wilson_interval(counts, n, z)
    return ClassMetrics(per_class=per_class, counts=counts, totals=n, mean=mean, worst=worst,
                        worst_class=worst_class, nsd=nsd, ci_low=low, ci_high=high)


def _labels(a: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    a = np.asarray(a).astype(np.int64, copy=False).reshape(-1)
    if a.size and (a.min() < 0 or a.max() >= num_classes):
        raise ValueError(f"{name} must hold class indices in [0, {num_classes}), got range [{a.min()}, {a.max()}]")
    return a


def class_totals(y: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) int number of samples of each class."""
    return np.bincount(_labels(y, num_classes, "y"), minlength=num_classes)


def correct_counts(pred: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) int number of samples of each true class with pred == y."""
    pred = _labels(pred, num_classes, "pred")
    y = _labels(y, num_classes, "y")
    if pred.shape != y.shape:
        raise ValueError(f"pred and y differ in length: {pred.size} vs {y.size}")
    return np.bincount(y[pred == y], minlength=num_classes)


def target_counts(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int counts of (true class, predicted class) pairs over the misclassified samples (pred != y):
    the attack-target histogram, row = true class."""
    y = _labels(y, num_classes, "y")
    pred = _labels(pred, num_classes, "pred")
    if pred.shape != y.shape:
        raise ValueError(f"pred and y differ in length: {pred.size} vs {y.size}")
    wrong = pred != y
    flat = y[wrong] * num_classes + pred[wrong]
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def row_normalise(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (float); rows that sum to 0 stay 0."""
    c = np.asarray(counts, dtype=float)
    sums = c.sum(axis=-1, keepdims=True)
    return np.divide(c, sums, out=np.zeros_like(c), where=sums != 0)


def target_entropy(counts: np.ndarray) -> float:
    """Mean over the rows with at least one count of the entropy of the row's distribution over the wrong classes,
    divided by log(C - 1): 1 = every true class is pushed uniformly to all others, 0 = each onto one class.
    NaN when the histogram is empty."""
    counts = np.asarray(counts, dtype=float)
    c = counts.shape[0]
    rows = counts[counts.sum(axis=1) > 0]
    if c < 3 or not len(rows):
        return float("nan")
    p = rows / rows.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(h.mean() / np.log(c - 1))
