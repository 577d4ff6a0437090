"""Post-processing thresholds chosen on the validation patients, saved beside the weights.

A fixed ``h`` / threshold (the original's 7 / 28) only suits a model trained with the original's
loss and scale. After training, the train stage segments the validation tiles once, scores every
combination of a small grid of post-processing values with the selection metric, and writes the
best to ``postprocess.json`` in the model folder (as stardist optimises its probability and NMS
thresholds on validation images). :class:`kseg.segmenter.Segmenter` reads that file, so evaluate,
predict and serving all use the fitted values. The test patients are never read here.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from kseg.config import PostprocessConfig
from kseg.fsutil import atomic_write_text

POSTPROCESS_FILE = "postprocess.json"

#: Values tried per head. fg_dist: probabilities; dist: the original's 0..255 scale.
GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "fg_dist": {
        "fg_threshold": (0.4, 0.5, 0.6, 0.7),
        "marker_threshold": (0.3, 0.4, 0.5, 0.6),
        "marker_h": (0.0, 0.08, 0.16),
        "min_size": (0, 20, 50),
    },
    "dist": {
        "h": (1, 2, 3, 5, 7, 10, 14, 20),
        "foreground_threshold": (10, 20, 28, 40, 55, 70),
        "min_size": (0, 25),
    },
}


def fit_postprocess(
    maps: list[NDArray[np.float32]],
    labels: list[NDArray[np.integer]],
    base: PostprocessConfig,
    head: str,
    metric: str = "aji",
) -> tuple[PostprocessConfig, dict[str, Any]]:
    """Grid search of the head's post-processing values on validation tiles.

    Args:
        maps: ``(C, H, W)`` predicted maps of each validation tile (``predict_maps``).
        labels: Ground-truth instance labels of the same tiles.
        base: The configured values; kept where the grid does not vary them.
        head: ``dist`` or ``fg_dist``.
        metric: Mean per-tile score to maximise (a key of ``segmentation_metrics``).

    Returns:
        The best config and a report (``metric``, ``score``, ``base_score``, ``n_tiles``, the
        scores of every grid point). Ties keep the earlier grid point, so the result is
        deterministic. With no tile, ``base`` is returned unchanged.
    """
    from kseg.metrics import segmentation_metrics
    from kseg.postprocess import postprocess_maps, remove_small

    if head not in GRIDS:
        raise ValueError(f"model.head: no post-processing grid for {head!r}")
    if metric not in {"aji", "pq", "dq", "sq", "object_f1", "pixel_f1", "pixel_iou"}:
        metric = "aji"  # val_loss selection still fits thresholds on AJI

    report: dict[str, Any] = {"metric": metric, "n_tiles": len(maps), "head": head}
    if not maps:
        report.update(score=None, base_score=None, grid=[])
        return base, report
    grid = GRIDS[head]
    keys = [k for k in grid if k != "min_size"]
    sizes = grid.get("min_size", (base.min_size,))

    truth = labels

    def scores(cfg: PostprocessConfig) -> list[float]:
        """Mean score of ``cfg`` for each minimum size (one watershed per tile for all sizes)."""
        found = [postprocess_maps(m, cfg.model_copy(update={"min_size": 0})) for m in maps]
        return [
            float(
                np.mean(
                    [
                        segmentation_metrics(remove_small(lab, size), gt)[metric]
                        for lab, gt in zip(found, truth, strict=True)
                    ]
                )
            )
            for size in sizes
        ]

    best, best_score, rows = base, -np.inf, []
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        for size, value in zip(sizes, scores(base.model_copy(update=point)), strict=True):
            rows.append({**point, "min_size": size, metric: round(value, 5)})
            if value > best_score:
                best, best_score = base.model_copy(update={**point, "min_size": size}), value
    pairs = zip(maps, truth, strict=True)
    base_score = np.mean(
        [segmentation_metrics(postprocess_maps(m, base), gt)[metric] for m, gt in pairs]
    )
    report.update(score=best_score, base_score=float(base_score), grid=rows)
    return best, report


def save_postprocess(folder: Path, cfg: PostprocessConfig, report: dict[str, Any]) -> Path:
    """Writes ``postprocess.json`` (the values and how they were chosen) into a model folder."""
    payload = {
        "postprocess": cfg.model_dump(),
        "fitted": {k: v for k, v in report.items() if k != "grid"},
    }
    return atomic_write_text(Path(folder) / POSTPROCESS_FILE, json.dumps(payload, indent=2) + "\n")


def load_postprocess(folder: Path) -> PostprocessConfig | None:
    """The fitted values of a model folder, or None when it has no ``postprocess.json``.

    Raises:
        ValueError: If the file exists but is not a kseg post-processing file (named).
    """
    from kseg.config import ConfigError, params_from_dict

    path = Path(folder) / POSTPROCESS_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return params_from_dict({"postprocess": raw["postprocess"]}).postprocess
    except (OSError, KeyError, TypeError, ValueError, ConfigError) as err:
        raise ValueError(f"{path}: not a kseg post-processing file ({err})") from err
