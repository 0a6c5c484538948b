"""A run's interactive charts as one self-contained HTML file (the Runs page's "Charts (HTML)" download).

plotly.js is embedded inline, once, so the file opens offline and nothing is fetched from a CDN.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from app import charts, frames
from ferd import events as ev


def run_figures(events: Sequence[ev.Event]) -> list[go.Figure]:
    """The Live page's charts of a run: class weights, PGD-20 per-class accuracy, synthesis and losses."""
    names = frames.class_names(events) or None
    return [charts.weights_chart(frames.weights_frame(events), names, reweight=frames.reweighting(events)),
            charts.accuracy_chart(frames.accuracy_frame(events), "pgd20", names),
            charts.synthesis_chart(frames.synthesis_frame(events)),
            charts.losses_chart(frames.losses_frame(events))]


def charts_html(figures: Sequence[go.Figure], *, title: str = "FERD Studio charts") -> str:
    """One HTML page holding `figures`; the first carries plotly.js inline (no <script src>), the rest reuse it."""
    body = "".join(fig.to_html(full_html=False, include_plotlyjs=i == 0) for i, fig in enumerate(figures))
    return f'<html><head><meta charset="utf-8"><title>{title}</title></head><body>{body}</body></html>'


def run_charts_html(events: Sequence[ev.Event]) -> str:
    """`charts_html` of `run_figures(events)`."""
    return charts_html(run_figures(events))
