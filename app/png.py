"""A run's charts as one static PNG (for reports and slides), drawn with matplotlib's Agg renderer.

Pure: events in, PNG bytes out; no Streamlit, no pyplot (its global figure registry), so it is safe to
call from any session thread.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from app import frames
from app.colors import class_colors
from ferd import events as ev

DPI = 110


def _rgb(color: str) -> str:
    """Plotly colours come as '#rrggbb' or 'rgb(r, g, b)'; matplotlib wants the former."""
    if color.startswith("rgb"):
        r, g, b = (int(float(v)) for v in color[color.index("(") + 1:color.index(")")].split(",")[:3])
        return f"#{r:02x}{g:02x}{b:02x}"
    return color


def _placeholder(ax: Axes, title: str, message: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _accuracy_bars(ax: Axes, events: Sequence[ev.Event], names: list[str]) -> None:
    """Per-class accuracy of the last evaluation, one bar group per class, one bar per attack."""
    acc = frames.accuracy_frame(events)
    if acc.empty:
        _placeholder(ax, "Per-class accuracy", "no evaluation yet")
        return
    last = acc[acc["epoch"] == acc["epoch"].max()]
    attacks = list(dict.fromkeys(last["attack"]))
    num_classes = max(int(last["class"].max()) + 1, len(names))
    width = 0.8 / len(attacks)
    x = np.arange(num_classes)
    for i, attack in enumerate(attacks):
        rows = last[last["attack"] == attack].sort_values("class")
        ax.bar(rows["class"].to_numpy() - 0.4 + (i + 0.5) * width, rows["accuracy"].to_numpy() * 100, width,
               label=attack)
    ax.set_xticks(x, names or [str(c) for c in x])
    ax.set_ylim(0, 100)
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Per-class accuracy, epoch {int(last['epoch'].iloc[0])}", fontsize=10)
    ax.legend(fontsize=7, ncol=len(attacks), loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)


def _weights_lines(ax: Axes, events: Sequence[ev.Event], names: list[str]) -> None:
    """Class-sampling proportions pi per epoch in %, one line per class (the dashboard's class colours)."""
    w = frames.weights_frame(events)
    if not frames.reweighting(events):
        _placeholder(ax, "Class weights π", "reweighting is off for this run")
        return
    if w.empty:
        _placeholder(ax, "Class weights π", "no class weights yet")
        return
    num_classes = max(int(w["class"].max()) + 1, len(names))
    colors = class_colors(num_classes)
    for c, rows in w.groupby("class"):
        label = names[c] if c < len(names) else str(c)
        ax.plot(rows["epoch"], rows["weight"] * 100, marker="o", markersize=3, color=_rgb(colors[int(c)]), label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("share of samples π (%)")
    ax.set_title("Class weights π", fontsize=10)
    ax.legend(fontsize=7, ncol=min(num_classes, 5), loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)


def _synthesis_lines(ax: Axes, s: pd.DataFrame) -> None:
    """Teacher accuracy and confidence on the kept synthetic batch and the robust-mask fraction, per epoch."""
    for column, label in (("teacher_acc", "teacher accuracy on x*"), ("teacher_conf", "teacher confidence"),
                          ("robust_fraction", "robust fraction")):
        values = s[column].to_numpy(dtype=float) * 100
        if np.isfinite(values).any():
            ax.plot(s["epoch"], values, marker="o", markersize=3, label=label)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Synthesis diagnostics", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False, ncol=3)


def run_png(events: Sequence[ev.Event]) -> bytes:
    """PNG bytes of a compact figure of the run: last evaluation's per-class accuracy under each attack
    (grouped bars), the class-weight trajectory and, when the run synthesised samples, the synthesis
    diagnostics. Works at any point of a run (panels without data say so)."""
    names = frames.class_names(events)
    synthesis = frames.synthesis_frame(events)
    panels = 3 if not synthesis.empty else 2
    fig = Figure(figsize=(5.2 * panels, 4.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    _accuracy_bars(axes[0], events, names)
    _weights_lines(axes[1], events, names)
    if panels == 3:
        _synthesis_lines(axes[2], synthesis)
    started = [e for e in events if isinstance(e, ev.RunStarted)]
    if started:
        cfg = started[-1].config
        fig.suptitle(f"{cfg.get('method', '?')} · {cfg.get('dataset', '?')} · seed {cfg.get('seed', '?')}",
                     fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
