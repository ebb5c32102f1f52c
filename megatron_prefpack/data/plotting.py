"""Charts for the ``prefpack`` commands: ``bench packing --plot``, ``bench step --plot`` and
``prefpack report``. It sits in the lowest layer so that every command can use it.

matplotlib is optional (the ``plot`` extra) and imported only when a chart is drawn; when it
is missing, :func:`require_matplotlib` raises :class:`PlottingUnavailable` naming the
``pip install`` that fixes it, so a command can check before it spends minutes on the numbers.
Figures use matplotlib's object API (``matplotlib.figure.Figure``, never ``pyplot``): no
global figure registry, no GUI backend, nothing left open. PNGs are rendered by the Agg canvas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install 'megatron-prefpack[plot]'"
PANEL_WIDTH = 4.0
"""Inches per panel; each panel is 3/4 as high."""


class PlottingUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


def require_matplotlib() -> None:
    """Raise :class:`PlottingUnavailable` unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise PlottingUnavailable(f"charts need matplotlib, which is not installed: {INSTALL_HINT}") from err


def check_output(path: str | Path) -> Path:
    """``path`` as a ``Path`` once matplotlib is importable and its directory exists, so a
    command fails before its work, not after. Raises :class:`PlottingUnavailable` or
    ``ValueError`` naming the path."""
    require_matplotlib()
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"{path}: directory {path.parent} does not exist")
    return path


def new_figure(panels: int, columns: int = 3) -> tuple[Figure, list[Axes]]:
    """A figure with ``panels`` axes in rows of ``columns`` (fewer when there are fewer
    panels); the unused cells of the last row are removed."""
    require_matplotlib()
    from matplotlib.figure import Figure

    columns = max(1, min(columns, panels))
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(PANEL_WIDTH * columns, 0.75 * PANEL_WIDTH * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for unused in axes[panels:]:
        unused.remove()
    return figure, axes[:panels]


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=100)
    return Path(path)


@dataclass(frozen=True)
class BarPanel:
    """One bar per entry of ``heights`` (in order), ``notes[name]`` written over its bar."""

    title: str
    heights: Mapping[str, float]
    notes: Mapping[str, str] = field(default_factory=dict)


def bar_figure(title: str, panels: Sequence[BarPanel]) -> Figure:
    """Side-by-side bar charts, one per panel, titled ``title``. Each name keeps its colour
    across the panels (the order of its first appearance)."""
    figure, axes = new_figure(len(panels))
    names = list(dict.fromkeys(name for panel in panels for name in panel.heights))
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    for ax, panel in zip(axes, panels, strict=True):
        labels = list(panel.heights)
        bars = ax.bar(
            labels, [panel.heights[n] for n in labels], color=[colours[n] for n in labels], width=0.6
        )
        ax.bar_label(bars, labels=[panel.notes.get(n, "") for n in labels], fontsize=8, padding=2)
        ax.set_title(panel.title, fontsize=10)
        ax.margins(y=0.25)
        ax.tick_params(axis="x", labelsize=8, labelrotation=20)
    figure.suptitle(title, fontsize=11)
    return figure


def ratio_panel(title: str, heights: Mapping[str, float], fmt: str, baselines: Mapping[str, str]) -> BarPanel:
    """A panel whose bars are marked with their value (``format(value, fmt)``) and, one line
    per entry ``name: label`` of ``baselines``, the ratio to bar ``name``: ``"0.217x unp"``."""
    notes = {
        name: "\n".join(
            [
                format(value, fmt),
                *(f"{value / heights[base]:.3f}x {label}" for base, label in baselines.items()),
            ]
        )
        for name, value in heights.items()
    }
    return BarPanel(title, heights, notes)
