"""The dashboard's colours, one source for every chart: a colour per method (the same on every page) and a
colour per class (the same in every chart of a run). Pure; no Streamlit, no plotly figures.
"""

from __future__ import annotations

import numpy as np
from plotly.colors import hex_to_rgb, qualitative, sample_colorscale

METHOD_COLORS = {
    "ferd": "#1f77b4",            # blue
    "dfrd": "#d62728",            # red
    "real-data": "#2ca02c",       # green (the ceiling)
    "reference-code": "#9467bd",  # purple
}
"""Method -> colour on every page (Live, Compare, Samples, Ablation, Learn, Runs)."""
OTHER_METHOD_COLOR = "#7f7f7f"

CLASS_PALETTES = (qualitative.D3, qualitative.Pastel, qualitative.Dark2)
"""Class palettes of the 2-D sample map: the first method's classes use the first, the second method's the
second... so two methods never share a class colour there."""


def method_color(method: str) -> str:
    """The method's colour ('#rrggbb'); grey for an unknown method."""
    return METHOD_COLORS.get(method, OTHER_METHOD_COLOR)


def method_shades(method: str, n: int) -> list[str]:
    """`n` shades of the method's colour, from the colour itself towards white (several runs of one method)."""
    r, g, b = hex_to_rgb(method_color(method))
    out = []
    for i in range(n):
        t = 0.6 * i / max(n - 1, 1)  # at most 60 % of the way to white: the lightest stays visible
        out.append("#{:02x}{:02x}{:02x}".format(*(round(v + (255 - v) * t) for v in (r, g, b))))
    return out


def class_colors(num_classes: int, palette: int = 0) -> list[str]:
    """One colour per class: a qualitative palette (`CLASS_PALETTES[palette]`) up to its size, evenly sampled
    from Turbo beyond (shifted per palette so two palettes still differ)."""
    colours = CLASS_PALETTES[palette % len(CLASS_PALETTES)]
    if num_classes <= len(colours):
        return list(colours[:num_classes])
    offset = 0.5 / num_classes * (palette % len(CLASS_PALETTES))
    return sample_colorscale("Turbo", list(np.linspace(0.0, 1.0 - 0.5 / num_classes, num_classes) + offset))
