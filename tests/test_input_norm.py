"""Network input normalization (``train.input_norm``): known answers, the invariance it exists
for, its files, tiled inference and a training run that uses it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kseg.infer import Preprocess, predict_maps
from tests.pipeline_helpers import make_prepared_project, run_stage
from tests.test_infer import FirstChannel

PERCENTILE = Preprocess(mode="percentile")


def _numpy_percentile_norm(img: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """The oracle: numpy's percentiles (linear interpolation) per channel, ``(3, H, W)``."""
    out = []
    for c in range(3):
        v = img[..., c].astype(np.float64)
        lo, hi = np.percentile(v, [low, high])
        out.append((v - lo) / max(hi - lo, 1.0))
    return np.stack(out)


def test_percentile_mode_matches_numpy_per_input_and_channel() -> None:
    rng = np.random.default_rng(0)
    # Two inputs of different contrast: each must use its own statistics, not the batch's.
    batch = np.stack(
        [rng.integers(0, 256, (48, 40, 3)), rng.integers(90, 160, (48, 40, 3))]
    ).astype(np.uint8)
    got = PERCENTILE.to_tensor(batch).numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b], _numpy_percentile_norm(batch[b]), atol=1e-5)
    assert not np.allclose(got[0], _numpy_percentile_norm(batch[0], 0.0, 100.0), atol=1e-2)


def test_percentile_input_does_not_see_stain_intensity_and_dataset_input_does() -> None:
    """A paler or darker stain (per-channel gain and offset) reaches the network unchanged."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.uniform(20, 230, (2, 3, 64, 64)))  # float64: no rounding in the check
    gain = torch.tensor([0.7, 1.3, 0.9], dtype=x.dtype).view(1, 3, 1, 1)
    offset = torch.tensor([30.0, -10.0, 5.0], dtype=x.dtype).view(1, 3, 1, 1)
    stained = x * gain + offset
    torch.testing.assert_close(PERCENTILE.normalize(stained), PERCENTILE.normalize(x))
    dataset = Preprocess(mean=(120.0, 110.0, 130.0), std=(50.0, 40.0, 45.0))
    assert (dataset.normalize(stained) - dataset.normalize(x)).abs().mean() > 0.1


def test_blank_glass_and_large_windows_stay_well_defined() -> None:
    flat = np.full((1, 32, 32, 3), 240, np.uint8)
    assert torch.equal(PERCENTILE.to_tensor(flat), torch.zeros(1, 3, 32, 32))
    # 2**20 pixels: percentiles come from a fixed stride of 2**18 (torch.quantile's size limit).
    rng = np.random.default_rng(2)
    big = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    got = PERCENTILE.to_tensor(big)[0].numpy()
    assert np.abs(got - _numpy_percentile_norm(big)).max() < 0.01  # under 3 grey levels of 255
    assert torch.equal(PERCENTILE.to_tensor(big), PERCENTILE.to_tensor(big))  # deterministic


def test_preprocess_file_round_trips_and_old_files_load_as_dataset(tmp_path: Path) -> None:
    PERCENTILE.save(tmp_path)
    assert Preprocess.load(tmp_path) == PERCENTILE
    # The dataset mode writes the file every model made before the option had: mean and std only.
    old = Preprocess(mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0))
    old.save(tmp_path)
    assert json.loads((tmp_path / "preprocess.json").read_text()) == {
        "mean": [1.0, 2.0, 3.0],
        "std": [4.0, 5.0, 6.0],
    }
    assert Preprocess.load(tmp_path) == old
    (tmp_path / "preprocess.json").write_text(
        json.dumps({"mean": [1, 2, 3], "std": [4, 5, 6], "mode": "per_pixel"})
    )
    with pytest.raises(ValueError, match=r"preprocess\.json: input normalization 'per_pixel'"):
        Preprocess.load(tmp_path)
    with pytest.raises(ValueError, match="0 <= low < high <= 100"):
        Preprocess(mode="percentile", percentiles=(99.0, 1.0))


def test_tiled_inference_normalizes_each_window_by_its_own_percentiles() -> None:
    rng = np.random.default_rng(3)
    img = rng.integers(60, 200, (64, 64, 3)).astype(np.uint8)
    one = predict_maps(FirstChannel(), img, PERCENTILE, 64, head="dist")[0]
    np.testing.assert_allclose(one, _numpy_percentile_norm(img)[0], atol=1e-5)
    # Two windows side by side, the right half at half the contrast: each window is stretched to
    # the same range, so the right half comes out like the left one, not dimmer.
    wide = np.concatenate([img, (img // 2 + 64).astype(np.uint8)], axis=1)
    maps = predict_maps(FirstChannel(), wide, PERCENTILE, 64, overlap=0, head="dist")[0]
    np.testing.assert_allclose(maps[:, 64:], maps[:, :64], atol=0.02)
    plain = Preprocess(mean=(128.0,) * 3, std=(64.0,) * 3)
    dim = predict_maps(FirstChannel(), wide, plain, 64, overlap=0, head="dist")[0]
    assert np.abs(dim[:, 64:] - dim[:, :64]).mean() > 0.2


def test_training_with_percentile_input_records_it_and_predict_uses_it(tmp_path: Path) -> None:
    project = make_prepared_project(
        tmp_path / "p",
        {"train": {"epochs": 1, "input_norm": "percentile"}, "postprocess": {"fit": False}},
    )
    run_stage("train", project)
    folder = project / "models" / "kseg"
    saved = json.loads((folder / "preprocess.json").read_text())
    assert saved["mode"] == "percentile" and saved["percentiles"] == [1.0, 99.8]

    from kseg.segmenter import Segmenter

    seg = Segmenter.from_folder(folder)
    assert seg.preprocess.mode == "percentile"
    with Image.open(next((project / "normalized" / "images").glob("*.png"))) as im:
        tile = np.asarray(im.convert("RGB"))
    # What the network receives inside `Segmenter.maps` (a hook on the model): the same input
    # whatever the tile's stain intensity (up to uint8 rounding of the dimmed tile)...
    seen: list[torch.Tensor] = []
    seg.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    dimmed = np.clip(tile * np.array([0.8, 0.9, 0.85]) + 20, 0, 255).round().astype(np.uint8)
    seg.maps(tile), seg.maps(dimmed)
    moved = (seen[0] - seen[1]).abs().mean()
    # ... where the training-set standardization passes the change on.
    fixed = dataclasses.replace(seg.preprocess, mode="dataset")
    predict_maps(seg.model, tile, fixed, seg.model_config.window)
    predict_maps(seg.model, dimmed, fixed, seg.model_config.window)
    assert moved < 0.02 < (seen[2] - seen[3]).abs().mean()
    labels, _ = seg.segment(tile)  # the whole path (watershed included) runs
    assert labels.shape == tile.shape[:2]
