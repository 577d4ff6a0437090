"""The prepare stage: exact conversions, exact labels and targets, patient-level splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kseg.config import PrepareConfig, SplitConfig, SyntheticConfig, params_from_dict
from kseg.data.prepare import discover, prepare, tile_stats, to_labels, to_rgb
from kseg.data.splits import assign_patients
from kseg.data.synthetic import generate
from kseg.data.targets import distance_target, instance_distance
from tests.distance_oracle import brute_force_target, disk, touching_squares

SMALL = SyntheticConfig(seed=3, n_patients=5, tiles_per_patient=2, tile_size=64,
                        nuclei_per_tile=(6, 10), nucleus_radius=(4.0, 7.0))  # fmt: skip


def small_params(data_dir: Path, **sections: dict) -> object:
    raw = {"data": {"dir": str(data_dir)}, **sections}
    return params_from_dict(raw)


@pytest.fixture
def synth(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    generate(SMALL, tmp_path / "data")
    return tmp_path / "data"


def test_binary_mask_becomes_8_connected_components() -> None:
    mask = np.zeros((6, 6), np.uint8)
    mask[0:2, 0:2] = 255  # blob A
    mask[2, 2] = 255  # touches A diagonally: same nucleus under 8-connectivity
    mask[4:6, 4:6] = 255  # blob B
    labels, kind = to_labels(mask)
    assert kind == "binary" and labels.dtype == np.uint16
    expected = np.zeros((6, 6), np.uint16)
    expected[0:2, 0:2] = 1
    expected[2, 2] = 1
    expected[4:6, 4:6] = 2
    np.testing.assert_array_equal(labels, expected)
    assert to_labels(mask.astype(bool))[1] == "binary"


def test_instance_mask_renumbered_in_order_and_colour_masks() -> None:
    mask = np.array([[0, 7, 7], [300, 0, 0], [300, 0, 12]], np.int32)
    labels, kind = to_labels(mask)
    assert kind == "instance"
    np.testing.assert_array_equal(labels, [[0, 1, 1], [3, 0, 0], [3, 0, 2]])
    colour = np.zeros((2, 3, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    colour[1, 2] = (0, 255, 0)
    colour[0, 2] = (255, 0, 0)
    labels, kind = to_labels(colour)
    assert kind == "instance" and int(labels.max()) == 2
    assert labels[0, 0] == labels[0, 2] != labels[1, 2] and labels[1, 0] == 0
    with pytest.raises(ValueError, match="non-integer"):
        to_labels(np.array([[0.0, 1.5], [2.0, 0.0]]))


def test_to_rgb_handles_rgba_gray_and_16_bit() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque: kept
    rgba[1, 1] = (10, 20, 30, 0)  # transparent: glass, white
    out = to_rgb(Image.fromarray(rgba, "RGBA"))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (255, 255, 255)
    gray = to_rgb(Image.fromarray(np.array([[0, 128]], np.uint8), "L"))
    assert gray.tolist() == [[[0, 0, 0], [128, 128, 128]]]
    g16 = to_rgb(Image.fromarray(np.array([[0, 65535, 257 * 100]], np.uint16)))
    assert g16[0, :, 0].tolist() == [0, 255, 100]


def test_histogram_stats_equal_per_pixel_reference() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    rgb[:10] = 250  # a near-white band: not tissue
    labels = np.zeros((40, 50), np.uint16)
    labels[5:9, 5:9] = 1
    labels[20:30, 20:25] = 2
    cfg = PrepareConfig()
    stats = tile_stats(rgb, labels, cfg)
    px = rgb.reshape(-1, 3).astype(np.float64)
    od = -np.log((px + 1) / 256)
    tissue = od.max(axis=1) > cfg.tissue_od
    hed = od[tissue] @ np.linalg.inv([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    assert stats["tissue_fraction"] == pytest.approx(tissue.mean(), abs=1e-5)
    assert stats["od_g"] == pytest.approx(od[tissue, 1].mean(), abs=1e-4)
    assert stats["h_mean"] == pytest.approx(hed[:, 0].mean(), abs=1e-4)
    assert stats["e_mean"] == pytest.approx(hed[:, 1].mean(), abs=1e-4)
    assert stats["std_b"] == pytest.approx(px[:, 2].std(), abs=1e-3)
    assert (stats["n_nuclei"], stats["area_min"], stats["area_max"]) == (2, 16, 50)
    assert stats["area_mean"] == 33.0 and not stats["blank"] and not stats["near_blank"]
    white = tile_stats(np.full((8, 8, 3), 255, np.uint8), np.zeros((8, 8), np.uint16), cfg)
    assert white["blank"] and white["near_blank"] and white["tissue_fraction"] == 0.0


def test_prepare_synthetic_exact_labels_targets_and_split(synth: Path) -> None:
    summary = prepare(small_params(synth))
    out = Path("prepared")
    man = pd.read_csv(out / "manifest.csv", dtype={"patient": str, "tile_id": str})
    assert summary["n_tiles"] == len(man) == 10 and summary["n_patients"] == 5
    for tile in discover(synth):
        labels = np.asarray(Image.open(out / "labels" / f"{tile.tile_id}.png"))
        original = np.asarray(Image.open(tile.mask))
        assert labels.dtype == np.uint16
        np.testing.assert_array_equal(labels, original)  # synthetic masks are already 1..N
        dist = np.load(out / "dist" / f"{tile.tile_id}.npy")
        assert dist.dtype == np.float32
        np.testing.assert_array_equal(dist, distance_target(original))
        # ... and that is the per-nucleus distance, scaled to 255 per tile, of the definition (the
        # synthetic nuclei touch, so one EDT of the whole foreground would differ by > 100).
        np.testing.assert_allclose(dist, brute_force_target(original), rtol=1e-5, atol=1e-3)
        assert dist.max() == pytest.approx(255.0)
        image = np.asarray(Image.open(out / "images" / f"{tile.tile_id}.png"))
        np.testing.assert_array_equal(image, np.asarray(Image.open(tile.image).convert("RGB")))
    assert (man["n_nuclei"] == man["max_label"]).all() and (man["mask_kind"] == "instance").all()
    split = json.loads((out / "split.json").read_text())
    sets = {s: set(split["patients"][s]) for s in ("train", "val", "test")}
    assert not (
        sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"]
    )
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(man["tile_id"])
    for s in ("train", "val", "test"):
        assert set(man.loc[man["tile_id"].isin(split[s]), "patient"]) == sets[s]
        assert (man.loc[man["tile_id"].isin(split[s]), "split"] == s).all()
    assert all(split[s] for s in ("train", "val", "test"))
    # Deterministic: the same inputs give byte-identical manifest and split.
    before = (out / "manifest.csv").read_bytes(), (out / "split.json").read_bytes()
    prepare(small_params(synth))
    assert ((out / "manifest.csv").read_bytes(), (out / "split.json").read_bytes()) == before


@pytest.mark.parametrize("radius", [1, 4, 10])
def test_distance_target_of_a_disk_is_known(radius: int) -> None:
    labels, row = disk(radius)
    c = labels.shape[0] // 2
    dist = instance_distance(labels)
    np.testing.assert_allclose(dist[c, c : c + radius + 1], row, rtol=1e-6)
    np.testing.assert_allclose(dist[c, c - radius : c + 1], row[::-1], rtol=1e-6)
    assert dist[labels == 0].max() == 0.0
    # Per-tile min-max to 0..255: the centre is 255 whatever the radius.
    target = distance_target(labels)
    np.testing.assert_allclose(target[c, c : c + radius + 1], 255 * row / row[0], rtol=1e-6)


def test_distance_target_touching_nuclei_keep_a_valley() -> None:
    labels, known = touching_squares()
    np.testing.assert_allclose(distance_target(labels), known, rtol=1e-6)
    # The valley: both sides of the contact are border pixels (85), not the interior 170 or 255.
    assert distance_target(labels)[4, 8] == distance_target(labels)[4, 9] == pytest.approx(85.0)


def test_distance_target_border_nucleus_and_empty_tile() -> None:
    # The image border counts as the nucleus boundary: a 3-pixel column along the left edge has
    # 1, 2, 1 across it (not 3, 2, 1 as if the nucleus went on beyond the image).
    labels = np.zeros((9, 7), np.uint16)
    labels[1:8, 0:3] = 5
    np.testing.assert_allclose(instance_distance(labels)[4, :4], [1.0, 2.0, 1.0, 0.0])
    np.testing.assert_allclose(distance_target(labels), brute_force_target(labels), rtol=1e-6)
    empty = distance_target(np.zeros((5, 5), np.uint16))
    assert empty.dtype == np.float32 and not empty.any()


def test_explicit_test_patients_and_unknown_patient(synth: Path) -> None:
    summary = prepare(small_params(synth, split={"test_patients": ["P02", "P05"]}))
    assert summary["patients"]["test"] == ["P02", "P05"]
    with pytest.raises(ValueError, match=r"split.test_patients: unknown patient\(s\) \['P09'\]"):
        prepare(small_params(synth, split={"test_patients": ["P09"]}))


@pytest.mark.parametrize("seed", range(6))
def test_assign_patients_is_a_partition_near_the_fractions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = {f"p{i}": int(rng.integers(1, 9)) for i in range(int(rng.integers(3, 15)))}
    cfg = SplitConfig(seed=seed)
    got = assign_patients(counts, cfg, "folder")
    allp = got["train"] + got["val"] + got["test"]
    assert sorted(allp) == sorted(counts) and len(set(allp)) == len(allp)
    assert got["train"] and got["test"]
    total = sum(counts.values())
    n_test = sum(counts[p] for p in got["test"])
    # Greedy: no single remaining patient would bring the test share closer to the target.
    gap = abs(n_test - 0.2 * total)
    assert all(abs(n_test + counts[p] - 0.2 * total) >= gap for p in got["train"] + got["val"])
    assert assign_patients(counts, cfg, "folder") == got  # seeded


def test_tnbc_default_test_patients_and_override() -> None:
    counts = dict(zip([f"{i:02d}" for i in range(1, 12)], [7, 3, 5, 8, 4, 3, 3, 4, 6, 4, 3],
                      strict=True))  # fmt: skip
    got = assign_patients(counts, SplitConfig(), "tnbc")
    assert got["test"] == ["02", "06", "10"]
    assert sum(counts[p] for p in got["test"]) == 10
    assert assign_patients(counts, SplitConfig(test_patients=("01",)), "tnbc")["test"] == ["01"]
    with pytest.raises(ValueError, match="no patient left for training"):
        assign_patients({"a": 1}, SplitConfig(test_patients=("a",)), "folder")
