"""Pictures for people, drawn with numpy + PIL (matplotlib is not a dependency).

- :func:`overlay`: instance outlines (prediction and optionally ground truth) on an H&E tile.
- :func:`line_chart`: a small learning-curve chart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

PRED_COLOUR = (255, 230, 0)  # yellow: prediction outlines
GT_COLOUR = (0, 200, 255)  # cyan: ground-truth outlines
SERIES_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


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


def line_chart(
    series: Mapping[str, Sequence[float]],
    title: str = "",
    size: tuple[int, int] = (640, 400),
) -> NDArray[np.uint8]:
    """Draws ``{name: values per epoch}`` as lines, each scaled to its own min..max.

    Every series gets its own vertical scale (printed in the legend), so a loss in the thousands
    and a score in [0, 1] share one picture.
    """
    width, height = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 50, width - 20, 30, height - 40 - 14 * len(series)
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    draw.text((left, 8), title, fill="black")
    n = max((len(v) for v in series.values()), default=0)
    for i, (name, values) in enumerate(series.items()):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        vals = np.asarray(values, float)
        finite = vals[np.isfinite(vals)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        span = hi - lo or 1.0
        pts = [
            (
                left + (right - left) * (j / max(n - 1, 1)),
                bottom - (bottom - top) * ((v - lo) / span),
            )
            for j, v in enumerate(vals)
            if np.isfinite(v)
        ]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        legend_y = bottom + 22 + 14 * i
        draw.line([left, legend_y + 6, left + 20, legend_y + 6], fill=colour, width=2)
        draw.text((left + 26, legend_y), f"{name}  [{lo:.4g} .. {hi:.4g}]", fill="black")
    draw.text((left, bottom + 4), f"epoch 1 .. {n}", fill=(80, 80, 80))
    return np.asarray(img)
