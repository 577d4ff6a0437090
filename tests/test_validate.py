"""The validate stage: clean data passes; each defect fails naming the expectation and the tiles."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kseg.cli import app
from kseg.config import params_from_dict
from kseg.data.prepare import prepare
from kseg.data.synthetic import generate
from kseg.validate import ValidationFailed, validate
from tests.test_prepare import SMALL


@pytest.fixture
def synth(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    generate(SMALL, tmp_path / "data")
    return tmp_path / "data"


def _params():
    return params_from_dict({"data": {"dir": "data"}})


def _run(params=None) -> dict:
    params = params or _params()
    prepare(params)
    return validate(params)


def _add_row(data: Path, tile_id: str, patient: str, image: str, mask: str) -> None:
    with (data / "index.csv").open("a", newline="") as fh:
        csv.writer(fh).writerow([tile_id, patient, image, mask])


def _failures(err: pytest.ExceptionInfo[ValidationFailed]) -> dict[str, list[str]]:
    report = json.loads(Path("metrics/validation.json").read_text())
    assert report["success"] is False and str(err.value).startswith("data validation failed")
    return {f"{f['expectation']}:{f['kwargs'].get('column', f['kwargs'].get('column_B'))}":
            f["offenders"] for f in report["failures"]}  # fmt: skip


def test_clean_synthetic_passes_and_writes_report(synth: Path) -> None:
    summary = _run()
    assert summary["success"] and summary["n_failed"] == 0 and summary["n_tiles"] == 10
    assert json.loads(Path("metrics/validation.json").read_text())["success"] is True
    page = Path("reports/validation.html").read_text()
    assert "PASSED" in page and "expect_column_values_to_be_unique" in page


def test_duplicated_tile_is_named(synth: Path) -> None:
    shutil.copy(synth / "images/P01_01.png", synth / "images/P01_99.png")
    shutil.copy(synth / "masks/P01_01.png", synth / "masks/P01_99.png")
    _add_row(synth, "P01_99", "P01", "images/P01_99.png", "masks/P01_99.png")
    with pytest.raises(ValidationFailed, match="content_hash") as err:
        _run()
    assert "P01_01, P01_99" in str(err.value)
    assert _failures(err) == {
        "expect_column_values_to_be_unique:content_hash": ["P01_01", "P01_99"]
    }
    assert "FAILED" in Path("reports/validation.html").read_text()


def test_all_white_tile_is_named(synth: Path) -> None:
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(synth / "images/P03_02.png")
    with pytest.raises(ValidationFailed, match="near-blank") as err:
        _run()
    failures = _failures(err)
    assert failures["expect_column_values_to_be_in_set:near_blank"] == ["P03_02"]
    assert failures["expect_column_values_to_be_in_set:blank"] == ["P03_02"]
    # Every failing check names only the white tile.
    assert all(v == ["P03_02"] for v in failures.values())


def test_mask_of_the_wrong_size_is_named(synth: Path) -> None:
    mask = np.asarray(Image.open(synth / "masks/P02_01.png"))
    Image.fromarray(np.ascontiguousarray(mask[:60])).save(synth / "masks/P02_01.png")
    with pytest.raises(ValidationFailed, match="mask of the wrong size") as err:
        _run()
    assert _failures(err) == {"expect_column_pair_values_to_be_equal:mask_height": ["P02_01"]}


def test_patient_in_two_splits_is_named(synth: Path) -> None:
    params = _params()
    prepare(params)
    split_path = Path("prepared/split.json")
    split = json.loads(split_path.read_text())
    patient = split["patients"]["test"][0]
    moved = split["test"].pop(0)  # one test tile of that patient now trains
    split["train"].append(moved)
    split_path.write_text(json.dumps(split))
    with pytest.raises(ValidationFailed, match="patient leakage") as err:
        validate(params)
    failures = _failures(err)
    tiles_of_patient = sorted(t for t in split["test"] + [moved] if t.startswith(patient))
    assert failures["expect_column_values_to_be_unique:patient"] == tiles_of_patient
    # The edited split also disagrees with the manifest for the moved tile.
    assert failures["expect_column_pair_values_to_be_equal:manifest_split"] == [moved]


def test_too_few_tiles_per_split_names_the_split(synth: Path) -> None:
    params = params_from_dict({"data": {"dir": "data"}, "validate": {"min_tiles_per_split": 3}})
    with pytest.raises(ValidationFailed) as err:
        _run(params)
    failures = _failures(err)
    assert set(failures["expect_column_values_to_be_between:n_tiles"]) == {"val", "test"}


def test_cli_exit_code_and_message(synth: Path) -> None:
    Path("params.yaml").write_text("data:\n  dir: data\n")
    runner = CliRunner()
    assert runner.invoke(app, ["prepare", "--params", "params.yaml"]).exit_code == 0
    ok = runner.invoke(app, ["validate", "--params", "params.yaml"])
    assert ok.exit_code == 0 and "data validation passed" in ok.output
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(synth / "images/P01_02.png")
    assert runner.invoke(app, ["prepare", "--params", "params.yaml"]).exit_code == 0
    bad = runner.invoke(app, ["validate", "--params", "params.yaml"])
    assert bad.exit_code == 1
    assert "expect_column_values_to_be_in_set(near_blank)" in bad.output
    assert "P01_02" in bad.output
