"""Checks on a synthesised batch: does the teacher recognise it, and does the feature split mean anything?

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
