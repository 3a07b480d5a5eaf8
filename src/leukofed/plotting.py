"""Figures without pyplot's global state: an Agg-backed figure and an atomic PNG write."""

from __future__ import annotations

import textwrap
from pathlib import Path

from leukofed.io import atomic_path


def new_figure(width: float, height: float):
    """A matplotlib Figure (constrained layout) on its own Agg canvas: no display and no global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, path: str | Path) -> None:
    """Write ``figure`` to ``path`` as PNG, atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png")


TITLE_CHARS_PER_INCH = 10  # titles wrap at about this many characters per inch of figure width


def wrap_title(title: str, width_inches: float) -> str:
    """``title`` broken into lines that fit a figure ``width_inches`` wide."""
    return textwrap.fill(title, width=int(TITLE_CHARS_PER_INCH * width_inches))
