"""Checks on a run: does the teacher recognise a synthesised batch, does the feature split mean anything, and is
the training attack still an attack?

One definition serves the engine (a RunWarning the first time a problem appears), the CLI and the
dashboard (a warning while the latest batch has the problem, and the bands drawn on its chart).
"""

from __future__ import annotations

LOW_TEACHER_ACC = 0.9
"""Teacher accuracy on x* below this: the synthetic samples do not look like their sampled classes."""
ROBUST_FRACTION_BAND = (0.02, 0.98)
"""A robust-mask fraction outside this band: the split marks (almost) nothing or everything robust."""


def synthesis_problems(teacher_acc: float, robust_fraction: float, *, w_uni: float, mask_rule: str) -> dict[str, str]:
    """{problem key: message} for a synthesised batch; empty when it looks sound. NaN values are not flagged.

    The robust-fraction check applies only when the uniformity (FAE) term is on (w_uni > 0): it is what reads
    the mask."""
    out: dict[str, str] = {}
    if teacher_acc < LOW_TEACHER_ACC:
        floor = f"{LOW_TEACHER_ACC:.0%}"
        out["teacher_acc"] = (f"teacher accuracy on the synthetic batch is {teacher_acc:.0%} (< {floor}): "
                              "the samples do not yet look like their classes to the teacher")
    low, high = ROBUST_FRACTION_BAND
    if w_uni > 0 and (robust_fraction < low or robust_fraction > high):
        sees = "sees all features" if robust_fraction < 0.5 else "sees no features"
        out["robust_fraction"] = (f"the feature split marks {robust_fraction:.1%} of features robust: the uniformity "
                                  f"(FAE) term {sees} (mask_rule={mask_rule})")
    return out


WEAK_ATTACK_RATIO = 0.5
"""A training attack whose success rate is below this fraction of the untargeted reference's is disarmed."""


def attack_problems(success_rate: float, reference_success_rate: float) -> dict[str, str]:
    """{"attack_strength": message} when the training attack succeeds on fewer than WEAK_ATTACK_RATIO times as many
    examples as the untargeted reference on the same batches; empty otherwise (and when either is NaN)."""
    if not success_rate < WEAK_ATTACK_RATIO * reference_success_rate:
        return {}
    return {"attack_strength": (f"the training attack changes the student's prediction on {success_rate:.0%} of its "
                                f"examples, under half of the untargeted reference ({reference_success_rate:.0%}): "
                                "the student trains on nearly clean inputs (lower utae_weight or change utae_mode)")}
