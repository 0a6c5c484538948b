"""Per-class metrics on hand-computed cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ferd.metrics import (
    ClassMetrics,
    class_metrics,
    class_totals,
    correct_counts,
    row_normalise,
    target_counts,
    wilson_interval,
)


def test_class_metrics_hand_computed():
    m = class_metrics(np.array([5, 2, 0]), np.array([5, 4, 2]))
    np.testing.assert_allclose(m.per_class, [1.0, 0.5, 0.0])
    assert m.counts.tolist() == [5, 2, 0] and m.totals.tolist() == [5, 4, 2]
    assert m.mean == pytest.approx(0.5)
    assert m.worst == 0.0 and m.worst_class == 2
    # sample std of (1, .5, 0) is 0.5, mean 0.5
    assert m.nsd == pytest.approx(1.0)


def test_wilson_interval_known_values():
    low, high = wilson_interval(np.array([5, 0, 50]), np.array([5, 5, 100]))
    assert low[0] == pytest.approx(0.5655, abs=1e-3) and high[0] == pytest.approx(1.0)
    assert low[1] == pytest.approx(0.0) and high[1] == pytest.approx(0.4345, abs=1e-3)
    # 50/100: centre 0.5, half-width 1.96/(1 + 0.0384) * sqrt(0.0025 + 0.000096) = 0.0963
    assert low[2] == pytest.approx(0.4038, abs=1e-3) and high[2] == pytest.approx(0.5962, abs=1e-3)


def test_wilson_interval_contains_estimate_and_narrows_with_more_samples():
    m_small = class_metrics(np.array([3]), np.array([10]))
    m_large = class_metrics(np.array([300]), np.array([1000]))
    for m in (m_small, m_large):
        assert m.ci_low[0] < m.per_class[0] < m.ci_high[0]
    assert m_large.ci_high[0] - m_large.ci_low[0] < m_small.ci_high[0] - m_small.ci_low[0]


def test_empty_class_is_nan_and_excluded():
    m = class_metrics(np.array([4, 0, 1]), np.array([4, 0, 2]))
    assert math.isnan(m.per_class[1]) and math.isnan(m.ci_low[1]) and math.isnan(m.ci_high[1])
    assert m.mean == pytest.approx(0.75)
    assert m.worst == pytest.approx(0.5) and m.worst_class == 2
    assert m.nsd == pytest.approx(np.std([1.0, 0.5], ddof=1) / 0.75)


def test_zero_mean_and_single_class_give_nan_nsd():
    assert math.isnan(class_metrics(np.array([0, 0]), np.array([3, 4])).nsd)
    single = class_metrics(np.array([2]), np.array([4]))
    assert single.mean == 0.5 and math.isnan(single.nsd)
    none = class_metrics(np.array([0, 0]), np.array([0, 0]))
    assert math.isnan(none.mean) and math.isnan(none.worst) and none.worst_class == -1


def test_equal_accuracies_have_zero_nsd():
    assert class_metrics(np.array([3, 6, 9]), np.array([4, 8, 12])).nsd == pytest.approx(0.0)


def test_invalid_counts_raise():
    with pytest.raises(ValueError, match="correct <= totals"):
        class_metrics(np.array([3]), np.array([2]))
    with pytest.raises(ValueError, match="equal length"):
        class_metrics(np.array([1, 2]), np.array([3]))


def test_to_dict_is_json_safe():
    m = class_metrics(np.array([1, 0]), np.array([2, 0]))
    d = m.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["per_class"] == [0.5, None]
    assert back["counts"] == [1, 0] and back["totals"] == [2, 0]
    assert back["nsd"] is None and back["worst_class"] == 0
    assert isinstance(m, ClassMetrics)


def test_counts_from_predictions():
    y = np.array([0, 0, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 0, 1, 2])
    assert class_totals(y, 4).tolist() == [2, 1, 3, 0]
    assert correct_counts(pred, y, 4).tolist() == [1, 1, 1, 0]
    t = target_counts(y, pred, 4)
    assert t.shape == (4, 4) and t.dtype.kind == "i"
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 1] = 1
    expected[2, 0] = 1
    expected[2, 1] = 1
    np.testing.assert_array_equal(t, expected)
    assert np.trace(t) == 0


def test_labels_out_of_range_raise():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        class_totals(np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="pred"):
        correct_counts(np.array([-1]), np.array([0]), 3)


def test_row_normalise_keeps_zero_rows():
    r = row_normalise(np.array([[0, 2, 2], [0, 0, 0], [1, 0, 3]]))
    assert r.dtype == float
    np.testing.assert_allclose(r, [[0, 0.5, 0.5], [0, 0, 0], [0.25, 0, 0.75]])
