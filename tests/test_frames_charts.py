"""Frames and chart builders on fake event streams (no Streamlit)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from app import charts, colors, export, frames
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


def test_progress_times_a_resumed_run_from_its_run_resumed_marker():
    started = next(iter(fake_run(CFG)))
    stream = [started, ev.EpochStarted(epoch=1, total_epochs=5), ev.EpochFinished(epoch=1, wall_s=10.0, phase_s={}),
              ev.EpochFinished(epoch=2, wall_s=20.0, phase_s={}), ev.RunResumed(epoch=2, time=0.0, device="cpu"),
              ev.EpochFinished(epoch=3, wall_s=25.0, phase_s={})]
    assert frames.progress(stream) == (3, 5, pytest.approx(50.0))  # epochs after the resume only: 25 s for 1


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
    assert [t.line.color for t in fig.data] == colors.class_colors(NUM_CLASSES)
    acc = charts.accuracy_chart(frames.accuracy_frame(events), "pgd20")
    assert [t.line.color for t in acc.data[:NUM_CLASSES]] == colors.class_colors(NUM_CLASSES)


def test_class_colors_are_distinct_for_many_classes():
    assert len(set(colors.class_colors(100))) == 100


def test_heatmap_rows_sum_to_one_or_zero_and_hover_shows_counts():
    counts = np.array([[0, 3, 1], [0, 0, 0], [2, 2, 0]])
    fig = charts.targets_heatmap(counts, ["a", "b", "c"])
    z = np.asarray(fig.data[0].z)
    assert np.allclose(z.sum(axis=1), [100.0, 0.0, 100.0])  # % of the row
    assert np.array_equal(np.asarray(fig.data[0].customdata), counts)
    assert "customdata" in fig.data[0].hovertemplate
    assert charts.targets_heatmap(None).layout.annotations  # placeholder message


def test_accuracy_chart_mean_trace_and_ceiling(events):
    df = frames.accuracy_frame(events)
    fig = charts.accuracy_chart(df, "pgd20", ceiling=0.42)
    assert len(fig.data) == NUM_CLASSES + 1 and fig.data[-1].name == "mean"
    assert any(s.y0 == pytest.approx(42.0) for s in fig.layout.shapes)  # %, like the accuracies
    assert not charts.accuracy_chart(df, "pgd20").layout.shapes
    assert charts.accuracy_chart(df, "no-such-attack").layout.annotations


def test_losses_and_synthesis_charts(events):
    losses = charts.losses_chart(frames.losses_frame(events))
    assert {t.name for t in losses.data} >= {"generator: uni", "student: rob"}
    synth = charts.synthesis_chart(frames.synthesis_frame(events))
    assert len(synth.data) == 3
    rects = [s for s in synth.layout.shapes if s.type == "rect"]
    band = frames.ROBUST_BAND * 100
    assert sorted((r.y0, r.y1) for r in rects) == [(0.0, pytest.approx(band)), (pytest.approx(100 - band), 100.0)]
    assert any(s.type == "line" and s.y0 == pytest.approx(frames.TEACHER_ACC_FLOOR * 100)
               for s in synth.layout.shapes)
    assert max(max(t.y) for t in synth.data) > 1.0  # % not fractions


def test_empty_frames_give_placeholder_figures():
    for fig in (charts.weights_chart(frames.weights_frame([])), charts.losses_chart(frames.losses_frame([])),
                charts.synthesis_chart(frames.synthesis_frame([]))):
        assert not fig.data and fig.layout.annotations


def _eval_only_at(events, epoch: int):
    """The stream with only the evaluation of `epoch` kept (a run evaluated once)."""
    return [e for e in events if not isinstance(e, ev.Evaluated) or e.epoch == epoch]


def test_accuracy_chart_in_percent_on_whole_epochs(events):
    one = frames.accuracy_frame(_eval_only_at(events, 4))
    assert sorted(one["epoch"].unique()) == [4]
    fig = charts.accuracy_chart(one, "pgd20")
    lo, hi = fig.layout.xaxis.range
    assert lo == pytest.approx(3.5) and hi == pytest.approx(4.5)  # one evaluated epoch: one tick, at 4
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tick0 == 4
    assert tuple(fig.layout.yaxis.range) == (0, 100) and "%" in fig.layout.yaxis.title.text
    ys = np.concatenate([np.asarray(t.y, dtype=float) for t in fig.data])
    assert ys.max() > 1.0 and np.allclose(ys, np.clip(ys, 0, 100))
    many = charts.epoch_axis(range(1, 61))
    assert many["dtick"] == 6 and many["range"] == [0.5, 60.5]  # at most about ten ticks


def test_weights_chart_in_percent_and_says_when_reweighting_is_off(events):
    fig = charts.weights_chart(frames.weights_frame(events), reweight=True)
    assert sum(t.y[0] for t in fig.data) == pytest.approx(100.0)  # proportions of one epoch add up to 100 %
    assert fig.layout.yaxis.range[0] == 0 and "%" in fig.layout.yaxis.title.text
    off = charts.weights_chart(frames.weights_frame(events), reweight=False)
    assert not off.data and "Reweighting is off" in off.layout.annotations[0].text
    dfrd = list(fake_run(dataclasses.replace(CFG, reweight=False)))
    assert frames.reweighting(dfrd) is False and frames.reweighting(events) is True


def test_loss_terms_have_distinct_colours_and_labelled_axes(events):
    fig = charts.losses_chart(frames.losses_frame(events))
    colours = [t.line.color for t in fig.data]
    assert len(colours) == len(set(colours)) >= 4
    assert fig.layout.yaxis.title.text == "generator loss" and fig.layout.yaxis2.title.text == "student loss"
    losses = frames.losses_frame(events)
    uni = charts.losses_chart(losses[losses.name == "uni"])  # one phase: one panel, no empty one beside it
    assert {t.xaxis for t in uni.data} == {"x"} and "xaxis2" not in uni.layout


def test_method_colours_are_one_per_method_and_shades_stay_in_the_family():
    assert len({colors.method_color(m) for m in ("ferd", "dfrd", "real-data", "reference-code")}) == 4
    shades = colors.method_shades("dfrd", 3)
    assert shades[0] == colors.method_color("dfrd") and len(set(shades)) == 3
    assert len(set(colors.class_colors(10, palette=0)) & set(colors.class_colors(10, palette=1))) == 0
    assert len(set(colors.class_colors(30, palette=0)) & set(colors.class_colors(30, palette=1))) == 0


def test_exported_html_embeds_plotly_and_loads_no_script_from_the_network(events):
    import re

    html = export.run_charts_html(events)
    assert not re.search(r"<script[^>]+src=[\"']?https?:", html, re.I)
    assert html.count("Plotly.newPlot(") >= 4  # the four figures
    assert len(html) > 1_000_000  # plotly.js itself is inside
