"""Chart builders: tidy frames (app.frames) -> plotly Figures. Pure functions, no Streamlit.

Every chart colours class c the same way (`app.colors.class_colors`), so a class can be followed across charts;
accuracies, shares and fractions are drawn in % (0-100) everywhere; epoch axes show whole epochs only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from app.colors import class_colors
from app.frames import ROBUST_BAND, TEACHER_ACC_FLOOR
from ferd.metrics import row_normalise

LAYOUT = {"template": "plotly_white", "margin": {"l": 50, "r": 20, "t": 50, "b": 40}, "hovermode": "closest"}


LOSS_COLORS = qualitative.Dark24
"""Loss terms of both phases take consecutive colours from this one palette: no two terms share a colour."""
MAX_EPOCH_TICKS = 10


def epoch_axis(epochs: Sequence[int]) -> dict:
    """An x-axis over whole epochs: half an epoch of margin either side, ticks on integers only (so a single
    evaluated epoch shows as one tick, not on an axis from epoch-1 to epoch+1)."""
    values = [int(e) for e in epochs]
    if not values:
        return {"title": "epoch"}
    lo, hi = min(values), max(values)
    return {"title": "epoch", "range": [lo - 0.5, hi + 0.5], "tickmode": "linear", "tick0": lo,
            "dtick": max(1, math.ceil((hi - lo + 1) / MAX_EPOCH_TICKS))}


def _names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    return list(class_names) if class_names else [str(c) for c in range(num_classes)]


def _num_classes(frame: pd.DataFrame, class_names: Sequence[str] | None) -> int:
    n = int(frame["class"].max()) + 1 if not frame.empty else 0
    return max(n, len(class_names or ()))


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False, **LAYOUT)
    return fig


def weights_chart(frame: pd.DataFrame, class_names: Sequence[str] | None = None, *,
                  reweight: bool = True) -> go.Figure:
    """Class-weight trajectories: sampling proportion pi_c per epoch in %, one line per class (hover: score r_c).

    A run without reweighting (`reweight=False`: DFRD, real data) gets a note instead of flat lines.
    """
    title = "Class proportions π (robustness-guided reweighting)"
    if not reweight:
        return _empty(title, "Reweighting is off for this run: every class is sampled equally.")
    if frame.empty:
        return _empty(title, "No class weights yet")
    n = _num_classes(frame, class_names)
    names, colors = _names(class_names, n), class_colors(n)
    fig = go.Figure()
    for c, group in frame.sort_values("epoch").groupby("class"):
        fig.add_trace(go.Scatter(x=group["epoch"], y=group["weight"] * 100, mode="lines+markers", name=names[c],
                                 line={"color": colors[c]}, customdata=group["score"],
                                 hovertemplate=f"class {names[c]}<br>epoch %{{x}}<br>π=%{{y:.1f}}%"
                                               "<br>r=%{customdata:.3f}<extra></extra>"))
    top = float(frame["weight"].max()) * 100
    fig.update_layout(title=title, xaxis=epoch_axis(frame["epoch"]), yaxis_title="share of samples π_c (%)",
                      yaxis_range=[0, max(top * 1.1, 1.0)], legend_title="class", **LAYOUT)
    return fig


def targets_heatmap(counts: np.ndarray | None, class_names: Sequence[str] | None = None, *,
                    title: str = "Attack targets") -> go.Figure:
    """Row-normalised (true class -> adversarial prediction) counts; hover shows the raw counts."""
    if counts is None:
        return _empty(title, "No attack targets for this epoch")
    counts = np.asarray(counts)
    names = _names(class_names, counts.shape[0])
    share = row_normalise(counts)
    fig = go.Figure(go.Heatmap(
        z=share * 100, x=names, y=names, customdata=counts, colorscale="Blues", zmin=0, zmax=100,
        colorbar={"title": "% of row"},
        hovertemplate="true %{y} → predicted %{x}<br>share %{z:.1f}%<br>count %{customdata}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="predicted class (adversarial)", yaxis_title="true class", **LAYOUT)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


def accuracy_chart(frame: pd.DataFrame, attack: str, class_names: Sequence[str] | None = None, *,
                   ceiling: float | None = None, ceiling_label: str = "real-data ceiling") -> go.Figure:
    """Per-class accuracy (%) under `attack` over the evaluation epochs, the class mean dashed, optional ceiling
    line (`ceiling` is a fraction, like the frame's accuracies)."""
    title = f"Per-class accuracy under {attack}"
    sub = frame[frame["attack"] == attack].sort_values("epoch") if not frame.empty else frame
    if sub.empty:
        return _empty(title, f"No {attack} evaluation yet")
    n = _num_classes(sub, class_names)
    names, colors = _names(class_names, n), class_colors(n)
    fig = go.Figure()
    for c, group in sub.groupby("class"):
        fig.add_trace(go.Scatter(x=group["epoch"], y=group["accuracy"] * 100, mode="lines+markers", name=names[c],
                                 line={"color": colors[c]}, customdata=np.stack([group["correct"], group["total"]], -1),
                                 hovertemplate=f"class {names[c]}<br>epoch %{{x}}<br>acc %{{y:.1f}}%"
                                               "<br>%{customdata[0]}/%{customdata[1]}<extra></extra>"))
    mean = sub.groupby("epoch")["accuracy"].mean()
    fig.add_trace(go.Scatter(x=mean.index, y=mean.values * 100, mode="lines+markers", name="mean",
                             line={"color": "black", "dash": "dash", "width": 3}))
    if ceiling is not None:
        fig.add_hline(y=ceiling * 100, line_dash="dot", line_color="grey",
                      annotation_text=f"{ceiling_label} {ceiling:.1%}")
    fig.update_layout(title=title, xaxis=epoch_axis(sub["epoch"]), yaxis_title="accuracy (%)", yaxis_range=[0, 100],
                      legend_title="class", **LAYOUT)
    return fig


def losses_chart(frame: pd.DataFrame) -> go.Figure:
    """Generator and student losses per reported step (x = epoch + step fraction), one panel per phase present;
    every term has its own colour (consecutive colours of one palette across both phases)."""
    title = "Losses"
    if frame.empty:
        return _empty(title, "No losses yet")
    phases = [p for p in ("generator", "student") if (frame["phase"] == p).any()]
    fig = make_subplots(rows=1, cols=len(phases), subplot_titles=phases)
    color = 0
    for col, phase in enumerate(phases, start=1):
        sub = frame[frame["phase"] == phase]
        max_step = sub.groupby("epoch")["step"].transform("max").clip(lower=1)
        x = sub["epoch"] - 1 + sub["step"] / max_step
        for name in sorted(sub["name"].unique()):
            mask = sub["name"] == name
            fig.add_trace(go.Scatter(x=x[mask], y=sub.loc[mask, "value"], mode="lines", name=f"{phase}: {name}",
                                     line={"color": LOSS_COLORS[color % len(LOSS_COLORS)]}, legendgroup=phase,
                                     legendgrouptitle_text=phase),
                          row=1, col=col)
            color += 1
        fig.update_yaxes(title_text=f"{phase} loss", row=1, col=col)
    fig.update_layout(title=title, **LAYOUT)
    fig.update_xaxes(title_text="epoch")
    return fig


def synthesis_chart(frame: pd.DataFrame) -> go.Figure:
    """Synthesis diagnostics in %: teacher accuracy / confidence on x* (90 % guide line) and the robust-mask
    fraction with warning bands near 0 and 100 %."""
    title = "Synthesis diagnostics"
    if frame.empty:
        return _empty(title, "No synthetic samples yet")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=("teacher on synthetic batch x*", "robust-feature fraction"))
    fig.add_trace(go.Scatter(x=frame["epoch"], y=frame["teacher_acc"] * 100, mode="lines+markers",
                             name="teacher accuracy"), row=1, col=1)
    fig.add_trace(go.Scatter(x=frame["epoch"], y=frame["teacher_conf"] * 100, mode="lines+markers",
                             name="teacher confidence"), row=1, col=1)
    fig.add_hline(y=TEACHER_ACC_FLOOR * 100, line_dash="dot", line_color="firebrick", row=1, col=1,
                  annotation_text=f"{TEACHER_ACC_FLOOR:.0%}")
    fig.add_trace(go.Scatter(x=frame["epoch"], y=frame["robust_fraction"] * 100, mode="lines+markers",
                             name="robust fraction"), row=2, col=1)
    for low, high in ((0.0, ROBUST_BAND), (1.0 - ROBUST_BAND, 1.0)):
        fig.add_hrect(y0=low * 100, y1=high * 100, fillcolor="firebrick", opacity=0.15, line_width=0, row=2, col=1)
    fig.update_yaxes(range=[0, 102], title_text="%", row=1, col=1)
    fig.update_yaxes(range=[0, 100], title_text="% of features", row=2, col=1)
    fig.update_xaxes({**epoch_axis(frame["epoch"]), "title": None}, row=1, col=1)  # shared: titled below only
    fig.update_xaxes(epoch_axis(frame["epoch"]), row=2, col=1)
    fig.update_layout(title=title, **LAYOUT)
    return fig


def attack_strength_chart(frame: pd.DataFrame) -> go.Figure:
    """The training attack against the untargeted reference, per epoch in %: success rate (share of adversarial
    examples the student assigns to a class other than the attacked label) and target entropy (how evenly each
    class's successes spread over the other classes); the reference as markers on the epochs it ran."""
    title = "Training-attack strength"
    if frame.empty:
        return _empty(title, "No distillation epoch yet")
    fig = go.Figure()
    ref = frame.dropna(subset=["reference_success_rate"])
    for col, name, color in (("success_rate", "success rate", "#1f77b4"), ("target_entropy", "target entropy",
                                                                          "#ff7f0e")):
        fig.add_trace(go.Scatter(x=frame["epoch"], y=frame[col] * 100, mode="lines+markers", name=name,
                                 line={"color": color}))
        fig.add_trace(go.Scatter(x=ref["epoch"], y=ref[f"reference_{col}"] * 100, mode="markers",
                                 name=f"{name}, untargeted reference", marker={"symbol": "x", "size": 10,
                                                                               "color": color}))
    fig.update_yaxes(range=[0, 102], title_text="%")
    fig.update_xaxes(epoch_axis(frame["epoch"]))
    fig.update_layout(title=title, **LAYOUT)
    return fig
