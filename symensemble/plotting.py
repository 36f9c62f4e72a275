"""Figures without global matplotlib state: an Agg canvas per figure, saved atomically.

``matplotlib.use("Agg")`` would switch the backend for the whole process (a notebook user's
inline plots included), and pyplot keeps every figure alive until closed. A
:class:`matplotlib.figure.Figure` attached to its own ``FigureCanvasAgg`` needs neither: it
renders headless, and is freed with its last reference.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from .io import atomic_write_bytes

__all__ = ["new_figure", "figure_png", "save_figure"]


def new_figure(
    nrows: int = 1,
    ncols: int = 1,
    *,
    figsize: tuple[float, float] = (6.4, 4.8),
    dpi: int = 120,
    squeeze: bool = True,
    **subplots: Any,
) -> tuple[Any, Any]:
    """A figure on its own Agg canvas and its axes, as ``plt.subplots`` would give them.

    Args:
        nrows, ncols: the axes grid.
        figsize: (width, height) in inches.
        dpi: resolution of the canvas (and of :func:`save_figure` by default).
        squeeze: as ``plt.subplots``: a single Axes for 1 × 1, else an array.
        **subplots: more ``Figure.subplots`` arguments (``sharex="col"``, ...).

    Returns:
        (fig, axes). Draw a line plot with ``axes.plot``, a heatmap with
        ``im = axes.imshow(matrix); fig.colorbar(im, ax=axes)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, **subplots)
    return fig, axes


def figure_png(fig: Any, dpi: int | None = None) -> bytes:
    """The figure rendered as PNG bytes (tight bounding box)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi, bbox_inches="tight")
    return buf.getvalue()


def save_figure(fig: Any, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Write the figure as a PNG atomically (never a half-written file); returns the path."""
    return atomic_write_bytes(path, figure_png(fig, dpi))
