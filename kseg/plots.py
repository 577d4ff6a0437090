"""Pictures for people: instance outlines with numpy, charts with matplotlib.

- :func:`overlay`: instance outlines (prediction and optionally ground truth) on an H&E tile.
- :func:`line_chart` (pixels) / :func:`line_chart_figure`: a learning-curve chart (axes, labels,
  legend, title).
- :func:`figure`, :func:`render`, :func:`save_figure`: a matplotlib figure that draws off-screen,
  its pixels, and an atomic PNG (or SVG, PDF) write of it.

Charts use ``matplotlib.figure.Figure`` with its own ``FigureCanvasAgg``, never ``pyplot``: pyplot
keeps global state (the current figure, the backend chosen on first use, a GUI backend where a
display exists) that is not thread-safe, and a training run or a server thread may draw a chart.
A bare ``Figure`` renders with Agg, whatever backend the process has, and is freed with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from kseg.fsutil import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PRED_COLOUR = (255, 230, 0)  # yellow: prediction outlines
GT_COLOUR = (0, 200, 255)  # cyan: ground-truth outlines


def outlines(labels: NDArray[np.integer]) -> NDArray[np.bool_]:
    """Inner boundary pixels of every instance (a pixel whose 4-neighbour has another label)."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    diff_v = lab[1:, :] != lab[:-1, :]
    diff_h = lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= diff_v
    edge[:-1, :] |= diff_v
    edge[:, 1:] |= diff_h
    edge[:, :-1] |= diff_h
    return edge & (lab > 0)


def overlay(
    image: NDArray[np.uint8],
    pred: NDArray[np.integer] | None = None,
    gt: NDArray[np.integer] | None = None,
) -> NDArray[np.uint8]:
    """RGB tile with ground-truth (cyan) and predicted (yellow) instance outlines drawn on it."""
    out = np.array(image[..., :3], dtype=np.uint8, copy=True)
    if gt is not None:
        out[outlines(gt)] = GT_COLOUR
    if pred is not None:
        out[outlines(pred)] = PRED_COLOUR
    return out


def figure(size: tuple[int, int] = (640, 400), dpi: int = 100) -> Figure:
    """An empty figure of ``size`` pixels (width, height) that draws with Agg, off-screen.

    Its layout is "constrained": labels, titles and an ``outside`` legend get room automatically.

    Args:
        size: Width and height in pixels of the rendered or saved picture.
        dpi: Pixels per inch; font sizes (points) scale with it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = size
    # Agg truncates the pixel size to an int and inches x dpi can land a hair below it
    # (201 / 100 * 100 = 200.99999999999997): the nudge keeps the requested size.
    fig = Figure(
        figsize=((width + 1e-3) / dpi, (height + 1e-3) / dpi), dpi=dpi, layout="constrained"
    )
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def render(fig: Figure) -> NDArray[np.uint8]:
    """The pixels of ``fig``: an ``(H, W, 3)`` uint8 RGB array (figure from :func:`figure`)."""
    canvas = fig.canvas
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())  # type: ignore[attr-defined]
    return np.ascontiguousarray(rgba[..., :3], dtype=np.uint8)  # a copy: the buffer is reused


def save_figure(fig: Figure, path: Path | str) -> Path:
    """Writes ``fig`` to ``path`` atomically (the format follows the suffix: .png, .svg, .pdf).

    Raises:
        OSError: naming ``path`` and the cause; ``path`` keeps its previous content.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png")
    return path


def _is_loss(name: str) -> bool:
    return "loss" in name.lower()


def line_chart_figure(
    series: Mapping[str, Sequence[float]],
    title: str = "",
    size: tuple[int, int] = (640, 400),
) -> Figure:
    """The figure :func:`line_chart` renders (to save with :func:`save_figure`, or to inspect).

    Series whose name contains "loss" share the left axis; the others (scores such as AJI, PQ,
    pixel F1) share a second axis on the right, so a loss in the thousands and a score in [0, 1]
    are both readable and every axis is in the series' own units. With only one kind, one axis.
    Non-finite values (an epoch without validation) leave a gap.

    Args:
        series: ``{name: values per epoch}``, first value = epoch 1.
        title: Chart title.
        size: Width and height of the picture in pixels.
    """
    from matplotlib.ticker import MaxNLocator

    fig = figure(size)
    ax = fig.add_subplot()
    losses = {k: v for k, v in series.items() if _is_loss(k)}
    scores = {k: v for k, v in series.items() if not _is_loss(k)}
    groups = [(ax, losses, "loss")] if losses else []
    if scores:
        groups.append((ax.twinx() if losses else ax, scores, "score"))
    colours = iter(f"C{i}" for i in range(len(series)))  # one colour cycle over both axes
    handles = []
    for axis, group, label in groups:
        for name, values in group.items():
            vals = np.asarray(values, float)
            epochs = np.arange(1, len(vals) + 1)
            (line,) = axis.plot(epochs, vals, marker="o", markersize=3, color=next(colours))
            line.set_label(name)
            handles.append(line)
        axis.set_ylabel(label)
    ax.set_xlabel("epoch")
    # Whole epochs only; without a fixed range one epoch would get ticks at 0.96, 0.98...
    ax.set_xlim(0.5, max((len(v) for v in series.values()), default=1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if handles:
        # Below the axes: inside, it would hide the lines of one of the two axes.
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5))
    return fig


def line_chart(
    series: Mapping[str, Sequence[float]],
    title: str = "",
    size: tuple[int, int] = (640, 400),
) -> NDArray[np.uint8]:
    """Draws ``{name: values per epoch}`` as lines over epochs 1..N and returns the pixels.

    The chart is :func:`line_chart_figure`'s (losses on the left axis, scores on the right).

    Args:
        series: Values per epoch, first value = epoch 1.
        title: Chart title.
        size: Width and height of the picture in pixels.

    Returns:
        ``(height, width, 3)`` uint8 RGB.
    """
    return render(line_chart_figure(series, title, size))
