"""model.input_scale: resampling of images, labels and maps, and every inference path using it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kseg.data.dataset import Tiles, resample_tiles
from kseg.infer import predict_maps
from kseg.resample import (
    resize_image,
    resize_labels,
    resize_labels_to,
    resize_maps,
    scaled_shape,
)
from tests.test_infer import IDENTITY, FirstChannel


def test_scaled_shape_rounds_and_rejects_a_non_positive_scale() -> None:
    assert scaled_shape(512, 512, 0.5) == (256, 256)
    assert scaled_shape(101, 7, 0.5) == (50, 4)  # round half to even, as Python rounds
    assert scaled_shape(3, 3, 0.125) == (1, 1)  # never empty
    with pytest.raises(ValueError, match="scale=0"):
        scaled_shape(8, 8, 0)


def test_labels_keep_their_ids_nearest_neighbour() -> None:
    labels = np.zeros((6, 8), np.int32)
    labels[0:2, 0:4] = 3
    labels[2:6, 4:8] = 70000  # beyond uint16: OpenCV's resize would refuse int32 here
    half = resize_labels(labels, 0.5)
    expected = np.array([[3, 3, 0, 0], [0, 0, 70000, 70000], [0, 0, 70000, 70000]], np.int32)
    np.testing.assert_array_equal(half, expected)
    assert half.dtype == np.int32
    # Enlarging repeats each label pixel: exactly a Kronecker product with a 2x2 block.
    np.testing.assert_array_equal(resize_labels(expected, 2.0), np.kron(expected, np.ones((2, 2))))
    assert resize_labels(labels, 1.0) is labels


def test_images_shrink_by_the_mean_of_each_block() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    half = resize_image(image, 0.5)
    block_mean = image.reshape(4, 2, 3, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert half.shape == (4, 3, 3) and half.dtype == np.uint8
    assert np.abs(half - block_mean).max() <= 0.5 + 1e-9  # area interpolation, rounded
    assert resize_image(image, 2.0).shape == (16, 12, 3)
    assert resize_image(image, 1.0) is image


def test_maps_come_back_to_the_requested_size_and_keep_a_linear_ramp() -> None:
    # A ramp sampled at pixel centres stays a ramp under half-pixel-centred bilinear resampling.
    x = (np.arange(32) + 0.5) / 32
    small = np.stack([np.tile(x, (16, 1)), np.ones((16, 32))]).astype(np.float32)
    big = resize_maps(small, 32, 64)
    assert big.shape == (2, 32, 64) and big.dtype == np.float32
    x_big = (np.arange(64) + 0.5) / 64
    inner = slice(1, -1)  # the edge pixels are clamped, not extrapolated
    np.testing.assert_allclose(big[0, :, inner], np.tile(x_big, (32, 1))[:, inner], atol=1e-6)
    np.testing.assert_array_equal(big[1], 1.0)


def test_resample_tiles_scales_images_and_labels_together() -> None:
    labels = np.zeros((12, 10), np.int32)
    labels[2:8, 2:6] = 5
    tiles = Tiles(["a"], [np.full((12, 10, 3), 200, np.uint8)], [labels])
    half = resample_tiles(tiles, 0.5)
    assert half.ids == ["a"]
    assert half.images[0].shape == (6, 5, 3) and half.labels[0].shape == (6, 5)
    assert set(np.unique(half.labels[0])) == {0, 5}
    assert resample_tiles(tiles, 1.0) is tiles


def test_predict_maps_runs_the_network_at_the_scaled_size_and_answers_at_the_input_size() -> None:
    # An image that is smooth at half resolution: 2x2 blocks of a low-res picture.
    rng = np.random.default_rng(1)
    low = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    image = np.kron(low, np.ones((2, 2, 1), np.uint8))  # (96, 80, 3)
    net = FirstChannel()  # the map is the red channel it sees; records the window shapes
    maps = predict_maps(net, image, IDENTITY, 48, head="dist", input_scale=0.5)
    assert maps.shape == (1, 96, 80)
    # The windows were cut from the 48 x 40 image: one 48 x 48 window (padded), not six.
    assert net.calls == [(1, 3, 48, 48)]
    # The network saw the low-res picture exactly (the block means), and the map returned to
    # the input's grid agrees with the red channel there up to bilinear smoothing of edges.
    expected = resize_maps(low[None, :, :, 0].astype(np.float32), 96, 80)
    np.testing.assert_allclose(maps, expected, atol=1e-3)
    # Resampling is the only difference from running on the half-size image directly.
    direct = predict_maps(FirstChannel(), low, IDENTITY, 48, head="dist")
    np.testing.assert_allclose(maps, resize_maps(direct, 96, 80), atol=1e-4)


def test_input_scale_is_validated_and_old_config_files_mean_one() -> None:
    from kseg.config import ConfigError, params_from_dict
    from kseg.model import ModelConfig
    from kseg.model.io import config_from_dict

    assert ModelConfig().input_scale == 1.0
    assert params_from_dict({"model": {"input_scale": 1}}).model.input_scale == 1.0
    with pytest.raises(ConfigError, match=r"model\.input_scale: 0\.05 is out of range"):
        params_from_dict({"model": {"input_scale": 0.05}})
    with pytest.raises(ConfigError, match=r"model\.input_scale"):
        params_from_dict({"model": {"input_scale": "half"}})
    old = {k: v for k, v in ModelConfig().model_dump(mode="json").items() if k != "input_scale"}
    assert config_from_dict(old, "config.json").input_scale == 1.0


def test_segmenter_of_a_half_scale_folder_resamples_once(tmp_path: Path) -> None:
    from kseg.segmenter import Segmenter
    from tests.pipeline_helpers import make_model_folder

    folder = make_model_folder(tmp_path / "m", tile_size=64)
    doc = json.loads((folder / "config.json").read_text())
    full = Segmenter.from_folder(folder)
    doc["model"]["input_scale"] = 0.5
    (folder / "config.json").write_text(json.dumps(doc))
    seg = Segmenter.from_folder(folder)
    assert seg.model_config.input_scale == 0.5
    image = np.random.default_rng(2).integers(0, 256, (128, 96, 3), dtype=np.uint8)
    maps = seg.maps(image)
    assert maps.shape[1:] == (128, 96)
    # Same weights: the half-scale folder equals the full-scale one run on the shrunk image.
    np.testing.assert_allclose(maps, resize_maps(full.maps(resize_image(image, 0.5)), 128, 96))
    labels, distance = seg.segment(image)
    assert labels.shape == (128, 96) and distance.shape == (128, 96)


@pytest.mark.parametrize(("shape", "scale"), [((7, 5), 0.5), ((9, 6), 2.0), ((11, 13), 0.3)])
def test_resize_labels_to_returns_to_the_exact_original_grid(shape, scale):
    labels = np.arange(1, shape[0] * shape[1] + 1, dtype=np.int32).reshape(shape)
    there = resize_labels(labels, scale)
    back = resize_labels_to(there, *shape)
    assert back.shape == shape and back.dtype == labels.dtype
    if scale == 2.0:  # every pixel was copied into a 2 x 2 block: the round trip is exact
        np.testing.assert_array_equal(back, labels)
    assert set(np.unique(back)) <= set(np.unique(there))  # ids are never mixed


def test_resize_labels_to_same_shape_is_the_input():
    labels = np.array([[1, 2], [3, 4]], dtype=np.int32)
    assert resize_labels_to(labels, 2, 2) is labels


def test_multi_scale_tta_averages_the_maps_of_each_scale_at_the_input_size() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    net = FirstChannel()
    maps = predict_maps(net, image, IDENTITY, 48, head="dist", input_scale=0.5, scales=(1.0, 1.5))
    assert maps.shape == (1, 96, 80) and maps.dtype == np.float32
    # One 48-window pass on the 48 x 40 image (0.5), then 72 x 60 (0.75): 2 x 2 windows of 48.
    assert net.calls == [(1, 3, 48, 48), (4, 3, 48, 48)]
    # Each scale's maps are back on the input grid before the mean: the network saw the red
    # channel at 0.5 and at 0.75, so the answer is the mean of the two round trips.
    half = resize_maps(resize_image(image, 0.5)[None, :, :, 0].astype(np.float32), 96, 80)
    three_q = resize_maps(resize_image(image, 0.75)[None, :, :, 0].astype(np.float32), 96, 80)
    np.testing.assert_allclose(maps, (half + three_q) / 2, atol=1e-3)
    # A flat image stays flat whatever the scales (no seam, no border weight left over).
    flat = np.full((70, 90, 3), 137, np.uint8)
    out = predict_maps(FirstChannel(), flat, IDENTITY, 32, head="dist", scales=(0.8, 1.0, 1.25))
    np.testing.assert_allclose(out, 137.0, atol=1e-3)
    # (1.0,) is the single-scale path itself.
    single = predict_maps(FirstChannel(), image, IDENTITY, 48, head="dist", input_scale=0.5)
    one = predict_maps(
        FirstChannel(), image, IDENTITY, 48, head="dist", input_scale=0.5, scales=[1.0]
    )
    np.testing.assert_array_equal(one, single)


def test_infer_scales_is_validated_with_the_factor_named() -> None:
    from kseg.config import ConfigError, params_from_dict
    from kseg.model import ModelConfig

    assert ModelConfig().infer_scales == (1.0,)
    cfg = params_from_dict({"model": {"input_scale": 0.5, "infer_scales": [1.0, 1.25]}}).model
    assert cfg.infer_scales == (1.0, 1.25)
    with pytest.raises(ConfigError, match=r"infer_scales=\[\]: need one or more distinct"):
        params_from_dict({"model": {"infer_scales": []}})
    with pytest.raises(ConfigError, match=r"infer_scales=\[1\.0, 1\.0\]"):
        params_from_dict({"model": {"infer_scales": [1.0, 1.0]}})
    with pytest.raises(ConfigError, match=r"input_scale 0\.25 x factor must lie in \[0\.125, 4\]"):
        params_from_dict({"model": {"input_scale": 0.25, "infer_scales": [0.4, 1.0]}})
    with pytest.raises(ConfigError, match=r"infer_scales"):
        params_from_dict({"model": {"infer_scales": [0.1]}})


def test_segmenter_uses_the_folders_scales(tmp_path: Path) -> None:
    from kseg.segmenter import Segmenter
    from tests.pipeline_helpers import make_model_folder

    folder = make_model_folder(tmp_path / "m", tile_size=64)
    single = Segmenter.from_folder(folder)
    doc = json.loads((folder / "config.json").read_text())
    doc["model"]["infer_scales"] = [1.0, 0.5]
    (folder / "config.json").write_text(json.dumps(doc))
    seg = Segmenter.from_folder(folder)
    assert seg.model_config.infer_scales == (1.0, 0.5)
    image = np.random.default_rng(4).integers(0, 256, (128, 96, 3), dtype=np.uint8)
    half = resize_maps(single.maps(resize_image(image, 0.5)), 128, 96)
    np.testing.assert_allclose(seg.maps(image), (single.maps(image) + half) / 2, atol=1e-5)
