"""Phase B: robustness-guided class reweighting (METHOD.md §4).

Margins of the teacher under PGD on the synthesised batch tell which classes are weak; weak classes
(small or negative margins) get a larger share of the next epoch's synthetic samples.
"""

from __future__ import annotations

import numpy as np
import torch

from ferd.attacks import pgd


def teacher_margins(teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
                    step_size: float) -> torch.Tensor:
    """m_i = T(x_adv)_{y_i} - max_{j != y_i} T(x_adv)_j with x_adv = PGD (CE on y, random start) on the teacher."""
    x_adv = pgd(teacher, x, y, eps=eps, steps=steps, step_size=step_size) if steps > 0 else x
    with torch.no_grad():
        logits = teacher(x_adv)
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return true - other


def class_scores(margins: np.ndarray, y: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """r_c = mean of -m_i over the samples of class c; a class absent from the batch keeps previous[c]."""
    r = previous.astype(np.float64).copy()
    for c in range(len(previous)):
        sel = y == c
        if sel.any():
            r[c] = float(-margins[sel].mean())
    return r


def class_weights(scores: np.ndarray, *, c_min: float, c_max: float) -> np.ndarray:
    """pi_c proportional to c_min + (c_max - c_min) (r_c - min r) / (max r - min r + 1e-8), normalised to 1."""
    r = np.asarray(scores, dtype=np.float64)
    raw = c_min + (c_max - c_min) * (r - r.min()) / (r.max() - r.min() + 1e-8)
    return raw / raw.sum()
