"""Where the instance errors of an ``fg_dist`` model come from: foreground or splitting.

AJI mixes two kinds of error: pixels assigned to the wrong class (missed or false nucleus pixels)
and nuclei split or merged wrongly. :func:`error_sources` separates them by replacing one input of
the post-processing with the truth and keeping the others as predicted:

* ``predicted``: the model's foreground and markers (what evaluate and predict do);
* ``true_markers``: the predicted foreground, with one marker per true nucleus (its core, where
  the true per-nucleus normalised distance is >= 0.5): what perfect splitting would give;
* ``true_foreground``: the true nucleus mask, with the predicted markers and distance: what a
  perfect pixel classifier would give with this model's splitting;
* ``true_both``: true mask and true markers, the predicted distance only drawing the lines
  between touching nuclei (close to 1 unless those lines are badly placed).

The gap between ``predicted`` and each oracle row says how much AJI that part of the model costs.
The same marker watershed as :func:`kseg.postprocess.fg_dist_watershed` is used for every row, so
``predicted`` equals the pipeline's own result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from kseg.data.targets import normalized_distance
from kseg.metrics import segmentation_metrics
from kseg.postprocess import fg_dist_cores, marker_watershed

if TYPE_CHECKING:
    from kseg.config import PostprocessConfig

#: Rows of :func:`error_sources`, in the order they are reported.
SOURCES = ("predicted", "true_markers", "true_foreground", "true_both")
#: A true nucleus's core: its pixels at least this far (per-nucleus normalised) from its border.
TRUE_CORE = 0.5


def tile_error_sources(
    maps: NDArray[np.floating], labels: NDArray[np.integer], cfg: PostprocessConfig
) -> dict[str, dict[str, float]]:
    """Metrics of one tile for each row of :data:`SOURCES`.

    Args:
        maps: ``(2, H, W)`` maps of an ``fg_dist`` model (foreground probability, normalised
            distance), as :meth:`kseg.segmenter.Segmenter.maps` returns them.
        labels: ``(H, W)`` true instance labels, 0 = background.
        cfg: The post-processing values (thresholds, marker dynamic, size filter).

    Returns:
        ``{source: segmentation_metrics(...)}`` for every source.

    Raises:
        ValueError: If ``maps`` is not ``(2, H, W)`` or its shape differs from ``labels``.
    """
    maps, labels = np.asarray(maps), np.asarray(labels)
    if maps.ndim != 3 or maps.shape[0] != 2:
        raise ValueError(
            f"maps: expected the (2, H, W) output of an fg_dist model, got shape {maps.shape} "
            "(the dist head has no separate foreground to replace)"
        )
    if maps.shape[1:] != labels.shape:
        raise ValueError(f"maps {maps.shape[1:]} and labels {labels.shape}: shapes differ")
    prob, dist = maps[0], np.asarray(maps[1], np.float32)
    fg = prob >= cfg.fg_threshold
    true_fg = labels > 0
    true_core = normalized_distance(labels) >= TRUE_CORE

    def cores(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
        return fg_dist_cores(dist, mask, cfg.marker_threshold, cfg.marker_h)

    # The size filter belongs to the predicted foreground; true nuclei are kept whatever their size.
    predictions = {
        "predicted": marker_watershed(fg, cores(fg), dist, cfg.min_size),
        "true_markers": marker_watershed(fg, true_core, dist, cfg.min_size),
        "true_foreground": marker_watershed(true_fg, cores(true_fg), dist),
        "true_both": marker_watershed(true_fg, true_core, dist),
    }
    return {name: segmentation_metrics(pred, labels) for name, pred in predictions.items()}


def error_sources(
    maps: Sequence[NDArray[np.floating]],
    labels: Sequence[NDArray[np.integer]],
    cfg: PostprocessConfig,
    keys: Sequence[str] = ("aji", "pq", "object_f1", "pixel_f1"),
) -> dict[str, dict[str, float]]:
    """Mean over tiles of :func:`tile_error_sources` (the evaluate stage's averaging).

    Raises:
        ValueError: If no tiles are given or the two sequences differ in length.
    """
    if not maps or len(maps) != len(labels):
        raise ValueError(
            f"error_sources: expected as many maps as label images (> 0), got {len(maps)} and "
            f"{len(labels)}"
        )
    rows = [tile_error_sources(m, g, cfg) for m, g in zip(maps, labels, strict=True)]
    return {s: {k: float(np.mean([r[s][k] for r in rows])) for k in keys} for s in SOURCES}
