"""benchmarks/cv.py --seeds: fold scores averaged over seeds, spread over seeds reported apart."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from tests.bench_helpers import ROOT, load_benchmark

PRESET = ROOT / "kseg" / "presets" / "tnbc-unet.yaml"


@pytest.fixture(scope="module")
def cv():
    """benchmarks/cv.py, loaded once for the module (tests monkeypatch it, pytest undoes that)."""
    return load_benchmark("cv")


def _run(cv, fold: int, aji: float) -> dict:
    return {"fold": fold, "held_out": {m: aji for m in cv.METRICS}}


def test_summary_averages_seeds_within_folds_then_folds(cv) -> None:
    runs = [_run(cv, 0, 0.577), _run(cv, 0, 0.621), _run(cv, 1, 0.664), _run(cv, 1, 0.700)]
    aji = cv.summarize(runs)["aji"]
    # fold means 0.599 and 0.682; within-fold variances 0.044^2 / 2 and 0.036^2 / 2, pooled
    assert aji["mean"] == pytest.approx(0.6405)
    assert aji["sd"] == pytest.approx(math.sqrt((0.0415**2) * 2))
    assert aji["seed_sd"] == pytest.approx(math.sqrt((0.044**2 / 2 + 0.036**2 / 2) / 2))
    # one run per fold: the plain mean and sd over folds, no seed spread
    single = cv.summarize([_run(cv, 0, 0.6), _run(cv, 1, 0.7), _run(cv, 2, 0.8)])["aji"]
    assert single["mean"] == pytest.approx(0.7) and single["sd"] == pytest.approx(0.1)
    assert single["seed_sd"] is None


def test_fold_params_take_the_seed_and_keep_the_preset_otherwise(cv, tmp_path: Path) -> None:
    cv._write_params(PRESET, tmp_path / "data", tmp_path / "a", ["04", "07"], seed=43)
    cv._write_params(PRESET, tmp_path / "data", tmp_path / "b", ["04", "07"])
    a = yaml.safe_load((tmp_path / "a" / "params.yaml").read_text())
    b = yaml.safe_load((tmp_path / "b" / "params.yaml").read_text())
    original = yaml.safe_load(PRESET.read_text())
    assert a["seed"] == 43 and b["seed"] == original["seed"]
    assert a["split"]["test_patients"] == ["04", "07"] and a["train"] == b["train"]


def test_main_trains_each_fold_once_per_seed_and_writes_the_summary(
    cv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The CLI with the training replaced: folders, seeds in their params, rows and cv.json."""
    import json
    import sys

    tiles = [f"{p}_{k}" for p in ("01", "03", "04", "05") for k in range(2)]
    monkeypatch.setattr(cv, "_patients", lambda *a: (tiles, [t[:2] for t in tiles]))
    trained = []

    def fake_fold(fold: Path, env: dict) -> dict:
        params = yaml.safe_load((fold / "params.yaml").read_text())
        trained.append((fold.name, params["seed"]))
        aji = 0.5 + params["seed"] / 1000
        return {
            "held_out_patients": params["split"]["test_patients"],
            "val_patients": [],
            "held_out": {m: aji for m in cv.METRICS},
        }

    monkeypatch.setattr(cv, "_run_fold", fake_fold)
    argv = ["cv.py", str(PRESET), "--data", str(tmp_path), "--folds", "2", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*argv, "--seeds", "1", "3"])
    cv.main()
    assert sorted(trained) == [
        ("fold0_seed1", 1),
        ("fold0_seed3", 3),
        ("fold1_seed1", 1),
        ("fold1_seed3", 3),
    ]
    summary = json.loads((tmp_path / "cv.json").read_text())["held_out_mean_sd"]["aji"]
    assert summary["mean"] == pytest.approx(0.502) and summary["sd"] == pytest.approx(0.0)
    assert summary["seed_sd"] == pytest.approx(math.sqrt(0.002**2 / 2))
    assert "sd (seeds, within folds)" in capsys.readouterr().out
