"""`kseg predict`: outputs QuPath and spreadsheets read; bad inputs handled one by one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from kseg.cli import app
from kseg.predict import PredictReport, predict, read_image, write_outputs
from tests.pipeline_helpers import make_model_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("model"))


def _labels() -> np.ndarray:
    labels = np.zeros((60, 80), np.int32)
    labels[5:15, 5:25] = 1  # 10 x 20 rectangle
    yy, xx = np.mgrid[0:60, 0:80]
    labels[(yy - 40) ** 2 + (xx - 50) ** 2 <= 81] = 2  # disk r=9
    labels[30:31, 2:3] = 3  # a single pixel
    return labels


def test_outputs_are_consistent_with_the_labels(tmp_path: Path) -> None:
    labels = _labels()
    rgb = np.full((60, 80, 3), 220, np.uint8)
    rgb[labels > 0] = (80, 60, 140)  # hematoxylin-ish
    paths = write_outputs(tmp_path, "tile", rgb, labels)
    assert [p.name for p in paths] == [
        "tile_labels.tif",
        "tile_overlay.png",
        "tile_nuclei.csv",
        "tile.geojson",
    ]
    saved = tifffile.imread(paths[0])
    assert saved.dtype == np.uint16
    np.testing.assert_array_equal(saved, labels)
    assert np.asarray(Image.open(paths[1])).shape == (60, 80, 3)
    with paths[2].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["id"]) for r in rows] == [1, 2, 3]
    assert [int(float(r["area"])) for r in rows] == [200, int((labels == 2).sum()), 1]
    assert float(rows[1]["centroid_y"]) == pytest.approx(40.0)
    assert float(rows[1]["centroid_x"]) == pytest.approx(50.0)
    assert float(rows[0]["eccentricity"]) > float(rows[1]["eccentricity"])
    assert float(rows[0]["mean_hematoxylin"]) > 0
    collection = json.loads(paths[3].read_text())
    assert collection["type"] == "FeatureCollection"
    feats = collection["features"]
    assert [f["properties"]["kseg_id"] for f in feats] == [1, 2, 3]
    for feat in feats:
        ring = np.array(feat["geometry"]["coordinates"][0], float)
        assert (ring[0] == ring[-1]).all()
        assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= 80
        assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= 60
    # The rectangle's outline runs along the outer edges of its pixels (x 5..24, y 5..14): the
    # pixel-corner coordinates QuPath uses, 4 corners.
    rect = np.array(feats[0]["geometry"]["coordinates"][0])
    assert rect.tolist() == [[5, 5], [25, 5], [25, 15], [5, 15], [5, 5]]
    assert feats[0]["properties"]["measurements"]["Area px^2"] == 200


def test_read_image_converts_every_common_kind(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 255, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    cv2.imwrite(str(tmp_path / "deep.png"), (rgb[..., ::-1].astype(np.uint16) * 257))
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0))
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png"), rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tif"), rgb)
    gray = read_image(tmp_path / "gray.png")
    assert gray.shape == (20, 30, 3)
    np.testing.assert_array_equal(gray[..., 2], rgb[..., 0])


def test_bad_inputs_are_named_and_the_rest_is_written(model_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(src / "good.png")
    Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).save(src / "gray.png")
    Image.fromarray(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)).save(src / "dot.png")
    cv2.imwrite(str(src / "deep.png"), rng.integers(0, 65535, (33, 47, 3)).astype(np.uint16))
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (src / "notes.txt").write_text("not an image")
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"
    report: PredictReport = predict([src, missing], str(model_dir), out, progress=False)
    assert set(report.failed) == {str(src / "corrupt.png"), str(missing)}
    assert "corrupt.png" in report.failed[str(src / "corrupt.png")]
    assert "no such file" in report.failed[str(missing)]
    assert report.skipped == [src / "notes.txt"]
    shapes = {"good": (70, 90), "gray": (40, 50), "dot": (1, 1), "deep": (33, 47)}
    for stem, shape in shapes.items():
        assert tifffile.imread(out / f"{stem}_labels.tif").shape == shape
        assert (out / f"{stem}.geojson").is_file()
    assert not (out / "corrupt_labels.tif").exists()


def test_cli_exit_code_and_messages(model_dir: Path, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(tmp_path / "a.png"),
            str(tmp_path / "nope.png"),
            "--model",
            str(model_dir),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1
    assert "nope.png: no such file" in result.output
    assert (tmp_path / "o" / "a_labels.tif").is_file()
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "a.png"), "--model", str(tmp_path / "no_model")]
    )
    assert result.exit_code == 2
    assert "no_model: model folder not found" in result.output


def test_tta_option_overrides_the_models_and_bad_values_are_named(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kseg.infer as infer_mod

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    used: list[str] = []
    real = infer_mod._maps_with_tta

    def spy(model, x, head, tta):
        used.append(tta)
        return real(model, x, head, tta)

    monkeypatch.setattr(infer_mod, "_maps_with_tta", spy)
    model_tta = json.loads((model_dir / "config.json").read_text())["model"]["infer_tta"]
    for option, expected in ((None, model_tta), ("flips", "flips"), ("dihedral", "dihedral")):
        used.clear()
        predict(
            [tmp_path / "a.png"], str(model_dir), tmp_path / str(option), progress=False, tta=option
        )
        assert used and set(used) == {expected}
    runner = CliRunner()
    args = ["predict", str(tmp_path / "a.png"), "--model", str(model_dir), "--out"]
    result = runner.invoke(app, [*args, str(tmp_path / "cli"), "--tta", "flips"])
    assert result.exit_code == 0 and (tmp_path / "cli" / "a_labels.tif").is_file()
    result = runner.invoke(app, [*args, str(tmp_path / "bad"), "--tta", "rot45"])
    assert result.exit_code == 2
    assert "--tta 'rot45': expected one of none, flips, dihedral" in result.output
    assert not (tmp_path / "bad").exists()
