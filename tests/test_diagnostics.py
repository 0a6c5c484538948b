"""Synthesis checks: thresholds on hand-picked values, and the uniformity term's switch."""

from __future__ import annotations

import math

import pytest

from ferd.diagnostics import LOW_TEACHER_ACC, ROBUST_FRACTION_BAND, synthesis_problems


def test_a_sound_batch_has_no_problems():
    assert synthesis_problems(0.97, 0.45, w_uni=5.0, mask_rule="per-channel") == {}


@pytest.mark.parametrize("acc, flagged", [(LOW_TEACHER_ACC, False), (LOW_TEACHER_ACC - 1e-6, True), (0.12, True)])
def test_teacher_accuracy_floor(acc, flagged):
    assert ("teacher_acc" in synthesis_problems(acc, 0.5, w_uni=5.0, mask_rule="per-channel")) is flagged


@pytest.mark.parametrize("fraction, flagged", [(0.0, True), (ROBUST_FRACTION_BAND[0], False), (0.5, False),
                                               (ROBUST_FRACTION_BAND[1], False), (0.99, True), (1.0, True)])
def test_robust_fraction_band(fraction, flagged):
    problems = synthesis_problems(0.95, fraction, w_uni=5.0, mask_rule="batch-max")
    assert ("robust_fraction" in problems) is flagged
    if flagged:
        assert "mask_rule=batch-max" in problems["robust_fraction"]


def test_split_is_not_checked_without_the_uniformity_term():
    assert synthesis_problems(0.95, 0.0, w_uni=0.0, mask_rule="batch-max") == {}


def test_nan_is_not_a_problem():
    assert synthesis_problems(math.nan, math.nan, w_uni=5.0, mask_rule="per-channel") == {}
