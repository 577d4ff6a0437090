"""The model shipped in the package: `kseg predict` with no --model segments real TNBC tiles.

The shipped folder (kseg/pretrained/tnbc_unet) holds a model card and `metrics.json` with the
test-patient scores its training run measured; the README states the same AJI. Here `kseg predict`
runs, with its default model and no network, on the raw TNBC test tiles of the shared data set,
and the AJI of its label images must be within 0.02 of the stated value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from kseg.cli import app
from kseg.data.prepare import to_labels
from kseg.metrics import segmentation_metrics
from kseg.predict import pretrained_model, resolve_model
from tests.conftest import REPO

TEST_PATIENTS = ("02", "06", "10")


def _card() -> dict:
    return json.loads((pretrained_model() / "metrics.json").read_text())


def test_shipped_model_folder_is_complete_and_documented() -> None:
    folder = pretrained_model()
    for name in ("model.pt", "config.json", "preprocess.json", "postprocess.json", "params.json"):
        assert (folder / name).is_file(), name
    card = (folder / "MODEL_CARD.md").read_text()
    for words in ("CC BY 4.0", "Naylor", "µm", "kseg/presets/tnbc-unet.yaml", "TNBC"):
        assert words in card, words
    assert resolve_model("pretrained") == folder == resolve_model("pretrained:tnbc_unet")
    # The card's resolution claims match the folder: 0.25 µm/px input, network at 0.4 of it.
    config = json.loads((folder / "config.json").read_text())
    params = json.loads((folder / "params.json").read_text())
    assert config["extra"]["mpp"] == 0.25
    assert config["model"]["input_scale"] == params["model"]["input_scale"] == 0.4
    assert _card()["input_scale"] == 0.4 and "0.625 µm/px" in card
    with pytest.raises(ValueError, match="no such shipped model"):
        resolve_model("pretrained:nope")
    # The README states the shipped model's test AJI (the number this test holds predict to).
    aji = _card()["test"]["aji"]
    assert f"{aji:.3f}" in (REPO / "README.md").read_text()


def test_predict_without_model_option_segments_tnbc_as_stated(
    tnbc_dir: Path, tmp_path: Path
) -> None:
    tiles = sorted(p for pat in TEST_PATIENTS for p in (tnbc_dir / f"Slide_{pat}").glob("*.png"))
    assert len(tiles) == 10
    result = CliRunner().invoke(app, ["predict", *map(str, tiles), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    scores = []
    for tile in tiles:
        gt, _ = to_labels(
            np.asarray(Image.open(tnbc_dir / f"GT_{tile.parent.name[-2:]}" / tile.name))
        )
        pred = tifffile.imread(tmp_path / f"{tile.stem}_labels.tif")
        assert pred.shape == gt.shape and pred.max() > 5
        scores.append(segmentation_metrics(pred, gt)["aji"])
    stated = _card()["test"]["aji"]
    assert abs(float(np.mean(scores)) - stated) <= 0.02, (np.mean(scores), stated)
    assert re.fullmatch(r"\d+\.\d+", f"{stated}")


def test_predict_mpp_segments_20x_tiles_at_the_models_pixel_size(
    tnbc_dir: Path, tmp_path: Path
) -> None:
    """A TNBC tile shrunk to 0.5 µm/px (20x) and given as such scores like the 40x original.

    Without ``--mpp`` the model takes the 20x tile for a 40x one: nuclei half the size it learned
    (measured: AJI 0.25-0.43 against 0.60-0.69 at 40x on these tiles); with ``--mpp 0.5`` the tile
    is enlarged to 0.25 µm/px, segmented, and the labels come back on the tile's own 256 grid.
    """
    from kseg.predict import segment_at_scale
    from kseg.resample import resize_image, resize_labels
    from kseg.segmenter import Segmenter

    segmenter = Segmenter.from_folder(pretrained_model())
    names, small_gts, full_aji = [], [], []
    for pat in TEST_PATIENTS:
        tile = sorted((tnbc_dir / f"Slide_{pat}").glob("*.png"))[0]
        rgb = np.asarray(Image.open(tile).convert("RGB"))
        gt, _ = to_labels(np.asarray(Image.open(tnbc_dir / f"GT_{pat}" / tile.name)))
        full_aji.append(segmentation_metrics(segmenter.segment(rgb)[0], gt)["aji"])
        Image.fromarray(resize_image(rgb, 0.5)).save(tmp_path / tile.name)  # 256 x 256 at 20x
        names.append(tile.stem)
        small_gts.append(resize_labels(gt, 0.5))
    scores = {}
    for label, extra in (("with", ["--mpp", "0.5"]), ("without", [])):
        out = tmp_path / label
        inputs = [str(tmp_path / f"{n}.png") for n in names]
        result = CliRunner().invoke(app, ["predict", *inputs, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        preds = [tifffile.imread(out / f"{n}_labels.tif") for n in names]
        assert all(p.shape == (256, 256) for p in preds)
        scores[label] = np.mean(
            [segmentation_metrics(p, g)["aji"] for p, g in zip(preds, small_gts, strict=True)]
        )
    assert abs(scores["with"] - np.mean(full_aji)) <= 0.04, (scores, full_aji)
    assert scores["with"] >= scores["without"] + 0.15, scores
    # An 80x tile (0.125 µm/px) is shrunk instead, and scores like the 40x tile on the 80x grid.
    pat, name = TEST_PATIENTS[0], names[0]
    rgb = np.asarray(Image.open(tnbc_dir / f"Slide_{pat}" / f"{name}.png").convert("RGB"))
    gt, _ = to_labels(np.asarray(Image.open(tnbc_dir / f"GT_{pat}" / f"{name}.png")))
    labels, _ = segment_at_scale(segmenter, resize_image(rgb, 2.0), 0.125 / 0.25)
    assert labels.shape == (1024, 1024)
    big_aji = segmentation_metrics(labels, resize_labels(gt, 2.0))["aji"]
    assert abs(big_aji - full_aji[0]) <= 0.04, (big_aji, full_aji[0])
