"""Frames and chart builders on fake event streams (no Streamlit)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from app import charts, frames
from ferd import events as ev
from ferd.config import Config
from tests.fakes import NUM_CLASSES, fake_run

CFG = Config(epochs=4, eval_every=2, warmup_epochs=0)


@pytest.fixture(scope="module")
def events():
    return list(fake_run(CFG))


def test_weights_frame_has_one_row_per_epoch_and_class(events):
    df = frames.weights_frame(events)
    assert len(df) == CFG.epochs * NUM_CLASSES
    assert np.allclose(df.groupby("epoch")["weight"].sum(), 1.0)


def test_accuracy_frame_matches_evaluations(events):
    df = frames.accuracy_frame(events)
    assert sorted(df["epoch"].unique()) == [2, 4]
    assert set(df[df["epoch"] == 2]["attack"]) == set(CFG.eval_attacks)
    assert "aa" in set(df[df["epoch"] == 4]["attack"])
    assert np.allclose(df["accuracy"], df["correct"] / df["total"])


def test_losses_and_synthesis_frames(events):
    losses = frames.losses_frame(events)
    assert set(losses["phase"]) == {"generator", "student"}
    assert {"bn", "uni", "total"} <= set(losses[losses["phase"] == "generator"]["name"])
    synth = frames.synthesis_frame(events)
    assert list(synth["epoch"]) == list(range(1, CFG.epochs + 1))


def test_targets_matrix_by_epoch_and_source(events):
    assert frames.target_epochs(events, "train") == [1, 2, 3, 4]
    assert frames.target_epochs(events, "eval") == [2, 4]
    assert frames.targets_matrix(events, 2, "eval").shape == (NUM_CLASSES, NUM_CLASSES)
    assert frames.targets_matrix(events, 1, "eval") is None


def test_progress_and_eta(events):
    cut = [i for i, e in enumerate(events) if isinstance(e, ev.EpochFinished)][1]  # after epoch 2
    epoch, total, eta = frames.progress(events[: cut + 1])
    assert (epoch, total) == (2, CFG.epochs) and eta is not None and eta >= 0
    assert frames.progress(events)[2] is None  # finished: no ETA
    assert frames.progress([]) == (0, 0, None)


def test_progress_eta_uses_mean_epoch_time():
    started = next(iter(fake_run(CFG)))
    stream = [started, ev.EpochStarted(epoch=1, total_epochs=5), ev.EpochFinished(epoch=1, wall_s=10.0, phase_s={}),
              ev.EpochStarted(epoch=2, total_epochs=5), ev.EpochFinished(epoch=2, wall_s=30.0, phase_s={})]
    assert frames.progress(stream) == (2, 5, pytest.approx(45.0))  # 15 s per epoch, 3 epochs left


def test_warnings_and_synthesis_warnings(events):
    assert frames.warnings(events) == []
    assert frames.synthesis_warnings(events) == []  # the fake teacher is ~90 % sure and the split is balanced
    last = [e for e in events if isinstance(e, ev.SamplesSynthesised)][-1]
    bad = dataclasses.replace(last, robust_fraction=0.995, teacher_acc=0.5)
    out = frames.synthesis_warnings([*events, bad])
    assert len(out) == 2 and "50%" in out[0] and "99.5% of features robust" in out[1]
    assert all(m.startswith(f"Latest batch (epoch {bad.epoch})") for m in out)
    # a later sound batch clears them: the warnings describe the latest batch
    assert frames.synthesis_warnings([*events, bad, last]) == []
    # RunWarnings about synthesis mark the first bad batch (shown above as the current state); others show as is
    stream = [*events, ev.RunWarning(epoch=1, message="low", key="teacher_acc"),
              ev.RunWarning(epoch=4, message="loss is large")]
    assert frames.warnings(stream) == ["loss is large"]


def test_synthesis_warnings_skip_the_split_when_the_uniformity_term_is_off(events):
    started = [e for e in events if isinstance(e, ev.RunStarted)][-1]
    last = [e for e in events if isinstance(e, ev.SamplesSynthesised)][-1]
    no_fae = dataclasses.replace(started, config={**started.config, "w_uni": 0.0})
    out = frames.synthesis_warnings([no_fae, dataclasses.replace(last, robust_fraction=0.0)])
    assert out == []


def test_headline_from_last_evaluation(events):
    h = frames.headline(events)
    last = [e for e in events if isinstance(e, ev.Evaluated)][-1]
    acc = last.correct["pgd20"] / last.totals
    assert h["pgd20_mean"] == pytest.approx(acc.mean())
    assert h["pgd20_worst"] == pytest.approx(acc.min())
    assert h["pgd20_nsd"] == pytest.approx(acc.std(ddof=1) / acc.mean())
    assert "aa_mean" in h and frames.headline([]) == {}


def test_weights_chart_has_one_trace_per_class_with_consistent_colours(events):
    fig = charts.weights_chart(frames.weights_frame(events), frames.class_names(events))
    assert len(fig.data) == NUM_CLASSES
    assert [t.line.color for t in fig.data] == charts.class_colors(NUM_CLASSES)
    acc = charts.accuracy_chart(frames.accuracy_frame(events), "pgd20")
    assert [t.line.color for t in acc.data[:NUM_CLASSES]] == charts.class_colors(NUM_CLASSES)


def test_class_colors_are_distinct_for_many_classes():
    assert len(set(charts.class_colors(100))) == 100


def test_heatmap_rows_sum_to_one_or_zero_and_hover_shows_counts():
    counts = np.array([[0, 3, 1], [0, 0, 0], [2, 2, 0]])
    fig = charts.targets_heatmap(counts, ["a", "b", "c"])
    z = np.asarray(fig.data[0].z)
    assert np.allclose(z.sum(axis=1), [1.0, 0.0, 1.0])
    assert np.array_equal(np.asarray(fig.data[0].customdata), counts)
    assert "customdata" in fig.data[0].hovertemplate
    assert charts.targets_heatmap(None).layout.annotations  # placeholder message


def test_accuracy_chart_mean_trace_and_ceiling(events):
    df = frames.accuracy_frame(events)
    fig = charts.accuracy_chart(df, "pgd20", ceiling=0.42)
    assert len(fig.data) == NUM_CLASSES + 1 and fig.data[-1].name == "mean"
    assert any(s.y0 == pytest.approx(0.42) for s in fig.layout.shapes)
    assert not charts.accuracy_chart(df, "pgd20").layout.shapes
    assert charts.accuracy_chart(df, "no-such-attack").layout.annotations


def test_losses_and_synthesis_charts(events):
    losses = charts.losses_chart(frames.losses_frame(events))
    assert {t.name for t in losses.data} >= {"generator: uni", "student: rob"}
    synth = charts.synthesis_chart(frames.synthesis_frame(events))
    assert len(synth.data) == 3
    rects = [s for s in synth.layout.shapes if s.type == "rect"]
    assert sorted((r.y0, r.y1) for r in rects) == [(0.0, frames.ROBUST_BAND), (1 - frames.ROBUST_BAND, 1.0)]
    assert any(s.type == "line" and s.y0 == frames.TEACHER_ACC_FLOOR for s in synth.layout.shapes)


def test_empty_frames_give_placeholder_figures():
    for fig in (charts.weights_chart(frames.weights_frame([])), charts.losses_chart(frames.losses_frame([])),
                charts.synthesis_chart(frames.synthesis_frame([]))):
        assert not fig.data and fig.layout.annotations
