"""The normalize stage: train-only fit, every tile written, stain.json, report, clean failures."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from kseg.cli import app
from kseg.config import SyntheticConfig
from kseg.data.synthetic import generate
from kseg.stain import load_stain
from tests.stain_oracle import angular_spread, hed_levels, region_colours, relative_spread

SPLIT = {"train": ["P01", "P02", "P03"], "val": ["P04"], "test": ["P05"]}


def write_prepared(root: Path) -> dict[str, list[str]]:
    """A prepared/ folder in the documented layout, from the synthetic generator."""
    raw = root / "raw"
    rows = generate(
        SyntheticConfig(
            seed=2,
            n_patients=5,
            tiles_per_patient=2,
            tile_size=96,
            nuclei_per_tile=(8, 12),
            nucleus_radius=(4.0, 7.0),
        ),
        raw,
    )
    prepared = root / "prepared"
    (prepared / "labels").mkdir(parents=True)
    shutil.copytree(raw / "images", prepared / "images")
    split: dict[str, list[str]] = {s: [] for s in SPLIT}
    with (prepared / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tile_id", "patient", "height", "width", "n_nuclei", "split"])
        for row in rows:
            name = next(s for s, ps in SPLIT.items() if row["patient"] in ps)
            split[name].append(row["tile_id"])
            shutil.copy(raw / row["mask"], prepared / "labels" / f"{row['tile_id']}.png")
            writer.writerow([row["tile_id"], row["patient"], 96, 96, 10, name])
    (prepared / "split.json").write_text(json.dumps({**split, "patients": SPLIT}))
    shutil.rmtree(raw)
    return split


def run(root: Path, stain: dict) -> tuple[int, str]:
    (root / "params.yaml").write_text(yaml.safe_dump({"seed": 1, "stain": stain}))
    old = Path.cwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(app, ["normalize", "--params", "params.yaml"])
    finally:
        os.chdir(old)
    return result.exit_code, result.output


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    return tmp_path, write_prepared(tmp_path)


def test_macenko_stage_fits_on_train_and_normalizes_every_tile(project: tuple) -> None:
    root, split = project
    code, out = run(root, {"method": "macenko", "report_tiles": 3})
    assert code == 0, out
    normalized = root / "normalized"
    all_ids = sorted(t for s in ("train", "val", "test") for t in split[s])
    assert sorted(p.stem for p in (normalized / "images").glob("*.png")) == all_ids
    stain = load_stain(normalized / "stain.json")
    assert stain.method == "macenko" and stain.info["fit_tiles"] == split["train"]
    for tile_id in (split["train"][0], split["test"][0]):
        with Image.open(root / "prepared" / "images" / f"{tile_id}.png") as im:
            raw = np.asarray(im.convert("RGB"))
        with Image.open(normalized / "images" / f"{tile_id}.png") as im:
            written = np.asarray(im)
        # Inference (stain.json in the model folder) reproduces the stage's output exactly.
        assert written.dtype == np.uint8 and written.shape == raw.shape
        assert np.array_equal(stain.transform(raw), written)
        assert not np.array_equal(written, raw)
    with Image.open(normalized / "report.png") as rep:
        # 3 rows (before, after, augmented) of 192 px cells with 14 px captions.
        assert rep.mode == "RGB" and rep.size[1] == 3 * (192 + 14 + 4) + 4
    metrics = json.loads((root / "metrics" / "stain.json").read_text())
    assert metrics["n_tiles"] == len(all_ids) and metrics["n_passed_through"] == 0
    assert metrics["spread_e_deg_after"] < metrics["spread_e_deg_before"]
    assert metrics["spread_h_deg_after"] < metrics["spread_h_deg_before"]
    # Those spreads come from the estimator the normalizer fits with. Measured without it, from the
    # colours of the known nuclei and of the stroma (tests/stain_oracle.py), every tile of the five
    # synthetic patients (each with its own stain vectors) moves closer to one stain.
    spread = {}
    for folder in ("prepared", "normalized"):
        colours: dict[str, list[np.ndarray]] = {}
        levels: dict[str, list[np.ndarray]] = {}
        for s, patients in SPLIT.items():
            for tile_id in split[s]:
                with Image.open(root / folder / "images" / f"{tile_id}.png") as im:
                    rgb = np.asarray(im.convert("RGB"))
                with Image.open(root / "prepared" / "labels" / f"{tile_id}.png") as im:
                    mask = np.asarray(im) > 0
                patient = next(p for p in patients if tile_id.startswith(p))
                colours.setdefault(patient, []).append(region_colours(rgb, mask))
                levels.setdefault(patient, []).append(hed_levels(rgb, mask))
        spread[folder] = (*angular_spread(colours), *relative_spread(levels)[[0, 2]])
    print("nuclei deg, stroma deg, rgb2hed H cv, E cv (before, after):", spread)
    assert all(a < 0.5 * b for a, b in zip(spread["normalized"], spread["prepared"], strict=True))


def test_fit_ignores_validation_and_test_tiles(project: tuple) -> None:
    root, split = project
    assert run(root, {"method": "reinhard"})[0] == 0
    first = json.loads((root / "normalized" / "stain.json").read_text())
    # Replace every non-training tile with a very different stain: the fit must not move.
    for tile_id in split["val"] + split["test"]:
        path = root / "prepared" / "images" / f"{tile_id}.png"
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        Image.fromarray(np.ascontiguousarray(rgb[..., ::-1])).save(path)
    assert run(root, {"method": "reinhard"})[0] == 0
    second = json.loads((root / "normalized" / "stain.json").read_text())
    assert first["params"] == second["params"]


def test_method_none_copies_tiles_byte_for_byte(project: tuple) -> None:
    root, split = project
    assert run(root, {"method": "none"})[0] == 0
    for tile_id in split["train"] + split["test"]:
        a = (root / "prepared" / "images" / f"{tile_id}.png").read_bytes()
        assert (root / "normalized" / "images" / f"{tile_id}.png").read_bytes() == a
    assert load_stain(root / "normalized" / "stain.json").method == "none"


def test_reference_outside_training_split_fails_cleanly(project: tuple) -> None:
    root, split = project
    assert run(root, {"method": "none"})[0] == 0
    before = sorted(p.name for p in (root / "normalized").rglob("*"))
    code, out = run(root, {"method": "macenko", "reference": split["test"][0]})
    assert code == 2
    assert f"stain.reference: tile '{split['test'][0]}' is not in the training split" in out
    assert sorted(p.name for p in (root / "normalized").rglob("*")) == before  # left unchanged


def test_reference_tile_id_is_used(project: tuple) -> None:
    root, split = project
    assert run(root, {"method": "macenko", "reference": split["train"][1]})[0] == 0
    info = load_stain(root / "normalized" / "stain.json").info
    assert info["fit_tiles"] == [split["train"][1]] and info["n_fit_tiles"] == 1


def test_missing_prepared_folder_is_a_clear_error(tmp_path: Path) -> None:
    code, out = run(tmp_path, {"method": "macenko"})
    assert code == 2 and "split.json" in out and "kseg prepare" in out
