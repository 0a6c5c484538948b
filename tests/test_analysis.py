"""Comparison / ablation analysis on hand-made run records (no Streamlit, no engine)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from app.analysis import (
    ablation_figure,
    compare_figure,
    compare_frame,
    counterpart_config,
    default_selection,
    format_summary,
    group_labels,
    missing_counterparts,
    summary_table,
    teacher_figure,
)
from ferd.config import Config, load_preset, preset_names, to_dict
from ferd.experiments import error_bars


def record(run_id: str, method: str, seed: int, pgd: list[float], *, clean: list[float] | None = None,
           **config: object) -> dict:
    cfg = to_dict(Config(seed=seed, **config).for_method(method))
    evals = {}
    for attack, acc in (("pgd20", pgd), ("clean", clean or [0.9] * len(pgd))):
        a = np.asarray(acc)
        evals[attack] = {"per_class": list(acc), "mean": float(a.mean()), "worst": float(a.min()),
                         "worst_class": int(a.argmin()), "nsd": float(a.std(ddof=1) / a.mean())}
    return {"run_id": run_id, "method": method, "seed": seed, "config": cfg, "eval": evals}


@pytest.fixture
def records() -> list[dict]:
    return [record("ferd0", "ferd", 0, [0.5, 0.4, 0.6]),
            record("ferd1", "ferd", 1, [0.7, 0.2, 0.6]),
            record("dfrd0", "dfrd", 0, [0.6, 0.1, 0.5])]


def test_compare_frame_deltas_against_baseline(records):
    f = compare_frame(records, "dfrd0")
    row = f[(f.run_id == "ferd0") & (f.attack == "pgd20") & (f.cls == 1)].iloc[0]
    assert row.acc == pytest.approx(0.4)
    assert row.delta == pytest.approx(0.3)
    base = f[f.run_id == "dfrd0"]
    assert np.allclose(base["delta"], 0.0)
    assert base["is_baseline"].all() and not f[f.run_id != "dfrd0"]["is_baseline"].any()


def test_compare_frame_worst_class_per_run_and_attack(records):
    f = compare_frame(records, "dfrd0")
    worst = f[(f.attack == "pgd20") & f.is_worst].set_index("run_id")["cls"].to_dict()
    assert worst == {"ferd0": 1, "ferd1": 1, "dfrd0": 1}
    assert f.groupby(["run_id", "attack"])["is_worst"].sum().eq(1).all()


def test_compare_frame_mean_std_over_seeds(records):
    f = compare_frame(records, "dfrd0")
    ferd = f[(f.method == "ferd") & (f.attack == "pgd20") & (f.cls == 0)]
    assert ferd["group_mean"].iloc[0] == pytest.approx(0.6)
    assert ferd["group_std"].iloc[0] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert (ferd["group_n"] == 2).all()
    dfrd = f[(f.method == "dfrd") & (f.attack == "pgd20")]
    assert dfrd["group_std"].isna().all()


def test_compare_frame_rejects_unknown_baseline(records):
    with pytest.raises(ValueError, match="baseline"):
        compare_frame(records, "nope")


def test_group_labels_split_configs_that_differ_beyond_seed():
    recs = [record("a", "ferd", 0, [0.5, 0.5], w_uni=2.0), record("b", "ferd", 1, [0.5, 0.5], w_uni=2.0),
            record("c", "ferd", 0, [0.5, 0.5], w_uni=5.0), record("d", "dfrd", 0, [0.5, 0.5])]
    labels = group_labels(recs)
    assert labels["a"] == labels["b"] == "ferd (w_uni=2.0)"
    assert labels["c"] == "ferd (w_uni=5.0)"
    assert labels["d"] == "dfrd"


def test_compare_figure_highlights_worst_and_shows_deltas(records):
    fig = compare_figure(compare_frame(records, "dfrd0"), "pgd20")
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 3
    for bar in bars:
        widths = list(bar.marker.line.width)
        assert widths[1] == 3 and widths[0] == 0 and widths[2] == 0
    assert sum(a.text == "worst" for a in fig.layout.annotations) == 3
    assert any("+30.0 pp" in h for h in bars[0].hovertext)


def test_compare_figure_by_group_has_error_bars(records):
    fig = compare_figure(compare_frame(records, "dfrd0"), "pgd20", by_group=True)
    names = [t.name for t in fig.data]
    assert names == ["ferd", "dfrd"]
    ferd = fig.data[0]
    assert ferd.y[0] == pytest.approx(60.0)
    assert ferd.error_y.array[0] == pytest.approx(100 * np.std([0.5, 0.7], ddof=1))


def test_compare_figure_draws_real_data_as_ceiling(records):
    recs = [*records, record("real", "real-data", 0, [0.9, 0.8, 0.9])]
    fig = compare_figure(compare_frame(recs, "dfrd0"), "pgd20")
    ceiling = [t for t in fig.data if t.type == "scatter"]
    assert len(ceiling) == 1 and "ceiling" in ceiling[0].name


def test_compare_figure_unknown_attack(records):
    with pytest.raises(ValueError, match="aa"):
        compare_figure(compare_frame(records, "dfrd0"), "aa")


def test_summary_table_per_run_and_per_group(records):
    per_run = summary_table(records)
    assert len(per_run) == 6 and per_run["n"].eq(1).all()
    grouped = summary_table(records, by_group=True)
    ferd = grouped[(grouped.label == "ferd") & (grouped.attack == "pgd20")].iloc[0]
    assert ferd.n == 2
    assert ferd.worst == pytest.approx(0.3)
    assert ferd.worst_std == pytest.approx(np.std([0.4, 0.2], ddof=1))
    shown = format_summary(grouped)
    assert "±" in shown.loc[("ferd", "pgd20"), "worst class"]
    assert "±" not in shown.loc[("dfrd", "pgd20"), "worst class"]
    assert shown.loc[("dfrd", "pgd20"), "worst class"] == "10.0%"
    assert list(shown.columns) == ["method", "runs", "mean", "worst class", "NSD"]  # narrow: fits the page


def test_ablation_figure_plots_worst_and_nsd_with_error_bars():
    table = pd.DataFrame({"value": [5.0, 0.0], "n": [2, 1], "pgd20_worst": [0.3, 0.1], "pgd20_worst_std": [0.05, None],
                          "pgd20_nsd": [0.2, 0.4], "pgd20_nsd_std": [0.01, None]})
    fig = ablation_figure(table, "w_uni")
    worst, nsd = fig.data
    assert list(worst.x) == [0.0, 5.0]
    assert list(worst.y) == pytest.approx([10.0, 30.0])
    assert list(worst.error_y.array) == pytest.approx([0.0, 5.0])
    assert list(worst.error_y.arrayminus) == pytest.approx([0.0, 5.0])
    assert list(nsd.y) == pytest.approx([0.4, 0.2])
    with pytest.raises(ValueError):
        ablation_figure(table.iloc[0:0], "w_uni")


def test_counterpart_config_keeps_teacher_and_seed():
    ferd = Config(seed=3, teacher_epochs=7, w_uni=2.0)
    dfrd = counterpart_config(to_dict(ferd), "dfrd")
    assert (dfrd.method, dfrd.seed, dfrd.teacher_epochs, dfrd.dataset) == ("dfrd", 3, 7, ferd.dataset)
    assert dfrd.w_uni == 0.0 and not dfrd.reweight
    back = counterpart_config(to_dict(dfrd), "ferd")
    assert back.method == "ferd" and back.w_uni > 0 and back.reweight and back.utae_mode != "untargeted"
    assert back.seed == 3


@pytest.mark.skipif("reference-code" not in preset_names(), reason="reference-code preset not written yet")
def test_counterpart_reference_code_uses_preset_with_same_seed():
    cfg = counterpart_config(to_dict(Config(seed=4)), "reference-code")
    assert cfg == load_preset("reference-code", seed=4)


class Info:
    """A RunInfo stand-in: what the run-choosing helpers read."""

    def __init__(self, run_id: str, method: str, seed: int, status: str = "finished", **config: object) -> None:
        self.run_id, self.method, self.seed, self.status = run_id, method, seed, status
        self.config = to_dict(Config(seed=seed, **config).for_method(method))


def test_default_selection_pairs_newest_ferd_with_dfrd_on_same_teacher_and_seed():
    runs = [Info("f-new", "ferd", 5, w_uni=1.0), Info("f-old", "ferd", 1), Info("d-other", "dfrd", 1, teacher_epochs=3),
            Info("d1", "dfrd", 1), Info("f1b", "ferd", 2), Info("r1", "real-data", 1), Info("q", "dfrd", 1, "queued")]
    # f-new (another experiment) has no DFRD partner; f-old pairs with d1 (d-other has another teacher);
    # f1b is another seed of f-old's experiment; r1 is the ceiling; the queued run has no results.
    assert default_selection(runs) == ["f-old", "d1", "f1b", "r1"]


def test_default_selection_falls_back_to_two_newest():
    assert default_selection([Info("a", "ferd", 0), Info("b", "ferd", 1), Info("c", "ferd", 2)]) == ["a", "b"]
    assert default_selection([]) == []


def test_missing_counterparts():
    ferd, dfrd = Info("f", "ferd", 0), Info("d", "dfrd", 0)
    lone = Info("g", "ferd", 7)
    failed = Info("x", "dfrd", 7, "failed")
    runs = [ferd, dfrd, lone, failed, Info("r", "real-data", 7)]
    assert missing_counterparts([ferd, dfrd], runs) == []
    assert [(src.run_id, m) for src, m in missing_counterparts([ferd, lone, runs[4]], runs)] == [("g", "dfrd")]


def test_teacher_figure_outlines_worst_class():
    fig = teacher_figure({"clean_per_class": [0.9, 0.95, 0.8], "pgd_per_class": [0.5, 0.2, 0.6]}, ["a", "b", "c"])
    clean, pgd = fig.data
    assert list(pgd.y) == pytest.approx([50, 20, 60])
    assert list(pgd.marker.line.width) == [0, 3, 0]
    with pytest.raises(ValueError):
        teacher_figure({})


def test_error_bars_are_mean_plus_minus_std_with_the_lower_bar_stopping_at_zero():
    mean = pd.Series([0.013, 0.30, 0.50])
    std = pd.Series([0.044, 0.05, float("nan")])  # worst class 1.3 ± 4.4 %: the bar would reach -3.1 %
    lower, upper = error_bars(mean, std)
    assert list(upper) == pytest.approx([0.044, 0.05, 0.0])
    assert list(lower) == pytest.approx([0.013, 0.05, 0.0])
    table = pd.DataFrame({"value": [1.0], "n": [3], "pgd20_worst": [0.013], "pgd20_worst_std": [0.044],
                          "pgd20_nsd": [0.6], "pgd20_nsd_std": [0.02]})
    worst, _nsd = ablation_figure(table, "w_uni").data
    assert list(worst.error_y.arrayminus) == pytest.approx([1.3])
    assert list(worst.error_y.array) == pytest.approx([4.4])


def test_default_selection_prefers_a_full_preset_pair_to_a_newer_smoke_pair():
    smoke = {"preset": "smoke", "teacher_epochs": 2, "epochs": 3, "warmup_epochs": 1}
    runs = [Info("f-smoke", "ferd", 0, **smoke), Info("d-smoke", "dfrd", 0, **smoke),
            Info("f-full", "ferd", 0, preset="digits"), Info("d-full", "dfrd", 0, preset="digits")]
    assert default_selection(runs) == ["f-full", "d-full"]
    # With smoke runs only, the smoke pair is still the answer.
    assert default_selection(runs[:2]) == ["f-smoke", "d-smoke"]
