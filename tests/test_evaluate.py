"""`kseg evaluate` on a tiny prepared project: the original's pixel scores against scikit-learn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, jaccard_score

from tests.pipeline_helpers import make_model_folder, make_prepared_project, run_stage


def test_eval_json_reports_the_original_pixel_scores_as_its_code_computes_them(
    tmp_path: Path,
) -> None:
    from kseg.config import load_params
    from kseg.data.dataset import load_split, load_tiles
    from kseg.evaluate import ORIGINAL_TEST_BATCH
    from kseg.segmenter import Segmenter

    more = {"data": {"synthetic": {"n_patients": 6, "tiles_per_patient": 3}}}
    project = make_prepared_project(tmp_path / "p", {**more, "split": {"test_fraction": 0.4}})
    model = make_model_folder(tmp_path / "model")
    run_stage("evaluate", project, "--model", str(model))
    report = json.loads((project / "metrics" / "eval.json").read_text())
    # The oracle: the original notebook's loop, with the library it used (sklearn, zero_division=0
    # on an empty pair), mean per test batch of 4, then the mean of the batch means.
    params = load_params(project / "params.yaml")
    prepared = project / params.prepare.out_dir
    ids = load_split(prepared)["test"]
    tiles = load_tiles(prepared / "images", prepared / "labels", ids)
    segmenter = Segmenter.from_folder(model)
    per = []
    for image, gt in zip(tiles.images, tiles.labels, strict=True):
        pred = segmenter.segment(image)[0] > 0
        y, p = (gt > 0).ravel(), pred.ravel()
        per.append((f1_score(y, p, zero_division=0), jaccard_score(y, p, zero_division=0)))
    assert len(per) > ORIGINAL_TEST_BATCH and len(per) % ORIGINAL_TEST_BATCH  # a short last batch
    batches = [np.mean(per[i : i + 4], axis=0) for i in range(0, len(per), 4)]
    f1, iou = np.mean(batches, axis=0)
    assert abs(report["original_pixel_f1"] - f1) < 1e-12
    assert abs(report["original_pixel_iou"] - iou) < 1e-12
    # ... and it is not the plain mean over tiles that kseg's own pixel_f1 is
    assert abs(np.mean([p[0] for p in per]) - report["pixel_f1"]) < 1e-9
