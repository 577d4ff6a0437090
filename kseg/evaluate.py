"""The ``evaluate`` stage: segment the held-out test patients and report instance metrics.

The test split is never seen in training or model selection. Outputs:

- ``metrics/eval.json``: means over test tiles of ``pixel_f1``, ``pixel_iou``, ``dice``,
  ``object_f1``, ``aji``, ``pq``, ``dq``, ``sq`` (plus precision/recall and the tile count);
- ``metrics/eval_tiles.csv``: one row per test tile (a DVC plot source);
- ``reports/eval/<tile_id>.png``: prediction (yellow) and ground-truth (cyan) outlines on the tile;
- the same numbers (prefixed ``test_``) and pictures logged to the training run in MLflow.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from kseg.config import Params
from kseg.data.dataset import load_split, load_tiles
from kseg.fsutil import atomic_dir, atomic_write_bytes, atomic_write_text
from kseg.registry import model_digest

log = logging.getLogger(__name__)

EVAL_KEYS = ("pixel_f1", "pixel_iou", "dice", "object_f1", "aji", "pq", "dq", "sq")
EXTRA_KEYS = ("object_precision", "object_recall")
#: The original notebook's test DataLoader batch size (its pixel scores average per batch).
ORIGINAL_TEST_BATCH = 4


def evaluate(
    params: Params, model_dir: Path | None = None, device: str | None = None
) -> dict[str, Any]:
    """Runs the evaluate stage and returns the contents of ``metrics/eval.json``.

    ``device`` (default: ``train.device``) is where the network runs (kseg.device).
    """
    from PIL import Image

    from kseg.metrics import original_pixel_scores, segmentation_metrics
    from kseg.plots import overlay
    from kseg.segmenter import Segmenter

    model_dir = Path(model_dir or params.train.out_dir)
    segmenter = Segmenter.from_folder(
        model_dir, device or params.train.device, params.train.infer_batch_size
    )
    prepared = Path(params.prepare.out_dir)
    split = load_split(prepared)
    if not split["test"]:
        raise ValueError(f"{prepared / 'split.json'}: the test split is empty")
    # Raw prepared tiles: the segmenter applies the trained stain normalization itself.
    tiles = load_tiles(prepared / "images", prepared / "labels", split["test"])
    rows: list[dict[str, Any]] = []
    binary: tuple[list, list] = ([], [])  # (pred > 0, gt > 0) per tile, for the original's scores
    start = time.perf_counter()
    with atomic_dir(Path("reports") / "eval", owned_only=False) as overlays:
        for tile_id, image, gt in zip(tiles.ids, tiles.images, tiles.labels, strict=True):
            pred, _ = segmenter.segment(image)
            scores = segmentation_metrics(pred, gt)
            binary[0].append(pred > 0)
            binary[1].append(gt > 0)
            rows.append(
                {
                    "tile_id": tile_id,
                    "n_pred": int(pred.max()),
                    "n_gt": int(gt.max()),
                    **{k: scores[k] for k in (*EVAL_KEYS, *EXTRA_KEYS)},
                }
            )
            Image.fromarray(overlay(image, pred, gt)).save(overlays / f"{tile_id}.png")
    seconds = time.perf_counter() - start
    summary: dict[str, Any] = {k: _mean(rows, k) for k in (*EVAL_KEYS, *EXTRA_KEYS)}
    # The paper's pixel scores as its code computes them (mean of batch means, test batches of
    # ORIGINAL_TEST_BATCH in split order): comparable with published numbers, not with ours.
    orig_f1, orig_iou = original_pixel_scores(*binary, batch_size=ORIGINAL_TEST_BATCH)
    summary.update(original_pixel_f1=orig_f1, original_pixel_iou=orig_iou, n_tiles=len(rows))
    # A timing, not a score: logged, kept out of the metrics file DVC hashes and compares.
    log.info("evaluated %d test tiles, %.3f s per tile", len(rows), seconds / len(rows))
    # Ties these numbers to these weights: register refuses metrics of another model.
    summary["model_sha256"] = model_digest(model_dir)
    _write_metrics(summary, rows)
    _log_to_training_run(model_dir, summary)
    return summary


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if np.isfinite(r[key])]
    return float(np.mean(values)) if values else float("nan")


def _write_metrics(summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    atomic_write_text(Path("metrics") / "eval.json", json.dumps(summary, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(Path("metrics") / "eval_tiles.csv", buf.getvalue().encode())


def _log_to_training_run(model_dir: Path, summary: dict[str, Any]) -> None:
    """Adds the test metrics and overlays to the MLflow run that trained the model."""
    from kseg.tracking import run_pointer, tracking_uri, training_run_id

    run_id = training_run_id(model_dir)
    if run_id is None:
        log.warning("%s missing: test metrics not logged to MLflow", run_pointer(model_dir))
        return
    import mlflow

    from kseg.safety import redact, redact_text
    from kseg.tracking import check_tracking

    # An unreachable server is an error with its cause (metrics/eval.json is written already);
    # a reachable one without the run (a model trained elsewhere) is only worth a warning.
    check_tracking()
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise OSError(
                f"MLflow at {redact(tracking_uri())}: cannot read run {run_id} ({redact_text(err)})"
            ) from err
        log.warning(
            "MLflow run %s not found at %s: test metrics not logged",
            run_id,
            redact(tracking_uri()),
        )
        return
    for key in (*EVAL_KEYS, *EXTRA_KEYS):
        if np.isfinite(summary[key]):
            client.log_metric(run_id, f"test_{key}", float(summary[key]))
    client.log_artifact(run_id, str(Path("metrics") / "eval.json"), "evaluation")
    client.log_artifact(run_id, str(Path("metrics") / "eval_tiles.csv"), "evaluation")
    client.log_artifacts(run_id, str(Path("reports") / "eval"), "evaluation/overlays")
