"""The fg_dist head: targets with known answers, marker watershed, fitted post-processing, loss."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from kseg.config import PostprocessConfig
from kseg.data.targets import fg_dist_target, normalized_distance, training_target
from kseg.postprocess import fg_dist_watershed, postprocess_maps, remove_small
from kseg.postprocess_fit import fit_postprocess, load_postprocess, save_postprocess


def _disk(shape: tuple[int, int], center: tuple[int, int], r: int) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= r * r


def _two_touching_squares() -> np.ndarray:
    labels = np.zeros((24, 40), np.int32)
    labels[4:20, 4:20] = 1  # 16 x 16
    labels[6:14, 20:28] = 2  # 8 x 8, touching square 1 along column 19|20
    return labels


def test_normalized_distance_of_a_disk_peaks_at_one_in_its_centre() -> None:
    labels = _disk((41, 41), (20, 20), 9).astype(np.int32)
    nd = normalized_distance(labels)
    edt = ndi.distance_transform_edt(labels)
    np.testing.assert_allclose(nd, edt / edt.max(), rtol=1e-6)
    assert nd[20, 20] == pytest.approx(1.0)
    assert nd[20, 20 + 9] == pytest.approx(1.0 / edt.max())  # a border pixel: 1 / peak
    assert (nd[labels == 0] == 0).all()


def test_normalized_distance_gives_each_touching_nucleus_its_own_peak_and_a_valley() -> None:
    labels = _two_touching_squares()
    nd = normalized_distance(labels)
    for lab in (1, 2):  # per-instance EDT computed here, then divided by its own maximum
        inst = labels == lab
        edt = ndi.distance_transform_edt(np.pad(inst, 1))[1:-1, 1:-1]
        np.testing.assert_allclose(nd[inst], (edt / edt[inst].max())[inst], rtol=1e-6)
        assert nd[inst].max() == pytest.approx(1.0)
    # The contact columns are borders of both squares: the valley between the two peaks.
    assert nd[10, 19] == pytest.approx(1 / 8) and nd[10, 20] == pytest.approx(1 / 4)
    target = fg_dist_target(labels)
    assert target.shape == (2, 24, 40)
    np.testing.assert_array_equal(target[0], labels > 0)
    np.testing.assert_array_equal(training_target(labels, "fg_dist"), target)
    assert training_target(labels, "dist").shape == (1, 24, 40)
    with pytest.raises(ValueError, match=r"model\.head"):
        training_target(labels, "hv")


def test_normalized_distance_of_the_largest_uint16_label() -> None:
    # Prepared labels are uint16: label 65535 must not overflow the per-label peak table.
    labels = np.zeros((5, 5), np.uint16)
    labels[1:4, 1:4] = 65535
    nd = normalized_distance(labels)
    assert nd[2, 2] == pytest.approx(1.0) and nd[1, 1] == pytest.approx(0.5)


def test_fg_dist_watershed_recovers_touching_nuclei_exactly() -> None:
    labels = np.zeros((64, 64), np.int32)
    for i, (c, r) in enumerate((((20, 18), 9), ((20, 34), 8), ((46, 40), 10)), start=1):
        labels[_disk(labels.shape, c, r) & (labels == 0)] = i
    fg, nd = fg_dist_target(labels)
    out = fg_dist_watershed(fg, nd, 0.5, 0.5)
    np.testing.assert_array_equal(out, labels)  # same numbering: raster order of the markers
    np.testing.assert_array_equal(postprocess_maps(np.stack([fg, nd]), PostprocessConfig()), labels)


def test_fg_dist_watershed_keeps_markerless_components_and_drops_small_ones() -> None:
    fg = np.zeros((32, 32), np.float32)
    nd = np.zeros_like(fg)
    fg[2:12, 2:12] = 0.9
    nd[5:9, 5:9] = 0.8  # a marker
    fg[20:26, 20:26] = 0.9  # foreground, but no core above the marker threshold
    fg[28:30, 2:4] = 0.9  # 4 pixels
    out = fg_dist_watershed(fg, nd, 0.5, 0.5)
    assert out.max() == 3 and (out[20:26, 20:26] == out[22, 22]).all() and out[22, 22] > 0
    out = fg_dist_watershed(fg, nd, 0.5, 0.5, min_size=5)
    assert out.max() == 2 and out[28, 2] == 0
    assert not fg_dist_watershed(fg, nd, 0.95, 0.5).any()
    with pytest.raises(ValueError, match="fg_dist maps"):
        fg_dist_watershed(fg, nd[:10], 0.5, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        fg_dist_watershed(np.full_like(fg, np.nan), nd)


def test_remove_small_renumbers_in_order() -> None:
    lab = np.array([[1, 1, 0, 2], [1, 1, 0, 3], [0, 0, 0, 3]], np.int32)
    np.testing.assert_array_equal(
        remove_small(lab, 2), np.array([[1, 1, 0, 0], [1, 1, 0, 2], [0, 0, 0, 2]])
    )
    assert remove_small(lab, 0) is lab


def _fuzzy_maps(labels: np.ndarray, fg_level: float) -> np.ndarray:
    """Maps a model might give: a weak foreground (fg_level) and a blurred distance."""
    fg, nd = fg_dist_target(labels)
    return np.stack([fg * fg_level, cv2.GaussianBlur(nd, (0, 0), 1.0)])


def test_fit_postprocess_finds_thresholds_the_defaults_miss() -> None:
    rng = np.random.default_rng(0)
    tiles = []
    for _ in range(3):
        labels = np.zeros((64, 64), np.int32)
        for i in range(1, 6):
            c = (int(rng.integers(10, 54)), int(rng.integers(10, 54)))
            labels[_disk(labels.shape, c, int(rng.integers(5, 9))) & (labels == 0)] = i
        tiles.append(labels)
    maps = [_fuzzy_maps(lab, 0.45) for lab in tiles]  # foreground below the default 0.5
    base = PostprocessConfig()
    best, report = fit_postprocess(maps, tiles, base, "fg_dist", "aji")
    assert report["base_score"] == 0.0  # nothing passes fg >= 0.5
    assert best.fg_threshold <= 0.4 and report["score"] > 0.9
    assert report["n_tiles"] == 3 and len(report["grid"]) == 144
    # Unvaried fields are kept; the dist head varies its own keys only.
    assert best.h == base.h and best.watershed_line == base.watershed_line
    same, rep = fit_postprocess([], [], base, "fg_dist")
    assert same is base and rep["score"] is None


def test_fit_postprocess_for_the_dist_head_varies_h_and_threshold() -> None:
    labels = _two_touching_squares()
    dist = (
        ndi.distance_transform_edt(np.pad(labels == 1, 1))[1:-1, 1:-1]
        + ndi.distance_transform_edt(np.pad(labels == 2, 1))[1:-1, 1:-1]
    )
    best, report = fit_postprocess(
        [dist[None].astype(np.float32)], [labels], PostprocessConfig(), "dist"
    )
    assert report["score"] >= report["base_score"]
    assert {"h", "foreground_threshold", "min_size"} <= set(report["grid"][0])
    assert best.fg_threshold == PostprocessConfig().fg_threshold


def test_postprocess_json_round_trip_and_bad_file(tmp_path) -> None:
    cfg = PostprocessConfig(fg_threshold=0.3, marker_threshold=0.6, min_size=10)
    save_postprocess(tmp_path, cfg, {"metric": "aji", "score": 0.7, "grid": [1, 2]})
    assert load_postprocess(tmp_path) == cfg
    raw = json.loads((tmp_path / "postprocess.json").read_text())
    assert raw["fitted"] == {"metric": "aji", "score": 0.7}  # the grid stays out of the file
    (tmp_path / "postprocess.json").write_text('{"postprocess": {"fg_threshold": 3}}')
    with pytest.raises(ValueError, match=r"postprocess.json.*fg_threshold"):
        load_postprocess(tmp_path)
    assert load_postprocess(tmp_path / "missing") is None


def test_fg_dist_loss_is_lowest_at_the_target_and_has_gradients() -> None:
    from kseg.train import loss_fn

    labels = _two_touching_squares()
    target = torch.from_numpy(fg_dist_target(labels))[None]
    eps = 1e-4
    perfect = torch.logit(target.clamp(eps, 1 - eps))
    wrong = -perfect
    assert loss_fn("mse", 1.0, perfect, target) < loss_fn("mse", 1.0, wrong, target)
    pred = torch.zeros_like(target, requires_grad=True)
    loss_fn("mse", 1.0, pred, target).backward()
    assert pred.grad[:, 0].abs().sum() > 0 and pred.grad[:, 1].abs().sum() > 0


def test_flip_tta_makes_predictions_flip_equivariant() -> None:
    from kseg.infer import Preprocess, predict_maps
    from kseg.model import build_model
    from kseg.model.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="unet", nfeat=4, tile_size=64, head="fg_dist")).eval()
    img = np.random.default_rng(0).integers(0, 255, (100, 90, 3), dtype=np.uint8)
    plain = predict_maps(model, img, Preprocess(), 64)
    tta = predict_maps(model, img, Preprocess(), 64, tta="flips")
    flipped = predict_maps(model, img[:, ::-1], Preprocess(), 64, tta="flips")[:, :, ::-1]
    assert tta.shape == (2, 100, 90) and ((tta >= 0) & (tta <= 1)).all()
    np.testing.assert_allclose(flipped, tta, atol=1e-6)  # the mean over flips is flip-invariant
    assert (
        np.abs(predict_maps(model, img[:, ::-1], Preprocess(), 64)[:, :, ::-1] - plain).max() > 1e-4
    )
    with pytest.raises(ValueError, match="infer_tta"):
        predict_maps(model, img, Preprocess(), 64, tta="rot")


def test_dihedral_tta_makes_predictions_equivariant_to_transpose_and_quarter_turns() -> None:
    from kseg.infer import Preprocess, predict_maps
    from kseg.model import build_model
    from kseg.model.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="unet", nfeat=4, tile_size=64, head="fg_dist")).eval()
    img = np.random.default_rng(1).integers(0, 255, (100, 90, 3), dtype=np.uint8)
    tta = predict_maps(model, img, Preprocess(), 64, tta="dihedral")
    transposed = predict_maps(model, img.transpose(1, 0, 2), Preprocess(), 64, tta="dihedral")
    turned = predict_maps(model, np.rot90(img, 1), Preprocess(), 64, tta="dihedral")
    assert tta.shape == (2, 100, 90) and ((tta >= 0) & (tta <= 1)).all()
    # the mean over the 8 symmetries of each window does not depend on the image's orientation
    np.testing.assert_allclose(transposed.transpose(0, 2, 1), tta, atol=1e-6)
    np.testing.assert_allclose(np.rot90(turned, -1, axes=(1, 2)), tta, atol=1e-6)
    # flips alone are not transpose-invariant (so the check above can fail)
    flips = predict_maps(model, img, Preprocess(), 64, tta="flips")
    flips_t = predict_maps(model, img.transpose(1, 0, 2), Preprocess(), 64, tta="flips")
    assert np.abs(flips_t.transpose(0, 2, 1) - flips).max() > 1e-4
