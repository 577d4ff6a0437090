"""kseg.diagnose: the oracle rows isolate foreground errors from splitting errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from kseg.config import PostprocessConfig
from kseg.data.targets import normalized_distance
from kseg.diagnose import SOURCES, error_sources, tile_error_sources
from kseg.metrics import segmentation_metrics
from kseg.postprocess import fg_dist_watershed

CFG = PostprocessConfig(fg_threshold=0.5, marker_threshold=0.5, marker_h=0.0, min_size=0)


def disks(shape: tuple[int, int], centres: list[tuple[int, int]], radius: int) -> np.ndarray:
    """Instance labels of disks (later ones win where they overlap)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return labels


def test_perfect_maps_score_one_in_every_row() -> None:
    labels = disks((64, 64), [(16, 16), (16, 46), (46, 30)], 8)
    maps = np.stack([(labels > 0).astype(np.float32), normalized_distance(labels)])
    rows = tile_error_sources(maps, labels, CFG)
    assert set(rows) == set(SOURCES)
    for source in SOURCES:
        assert rows[source]["aji"] == pytest.approx(1.0), source


def test_a_foreground_error_is_removed_by_the_true_foreground_only() -> None:
    labels = disks((64, 64), [(16, 16), (16, 46), (46, 30)], 8)
    # Every nucleus predicted 2 px too large (still apart): a pixel error, not a splitting error.
    fat = ndi.binary_dilation(labels > 0, iterations=2)
    maps = np.stack([fat.astype(np.float32), normalized_distance(labels)])
    rows = tile_error_sources(maps, labels, CFG)
    assert rows["predicted"]["aji"] < 0.8
    assert rows["true_markers"]["aji"] == pytest.approx(rows["predicted"]["aji"])
    assert rows["true_foreground"]["aji"] == pytest.approx(1.0)
    assert rows["true_both"]["aji"] == pytest.approx(1.0)


def test_a_splitting_error_is_removed_by_the_true_markers_only() -> None:
    # Two touching nuclei whose predicted distance is flat: one core, so they are merged.
    labels = disks((48, 64), [(24, 22), (24, 40)], 10)
    flat = (labels > 0).astype(np.float32)
    maps = np.stack([flat, flat])
    rows = tile_error_sources(maps, labels, CFG)
    assert rows["predicted"]["aji"] < 0.6  # one instance for two nuclei
    assert rows["true_foreground"]["aji"] == pytest.approx(rows["predicted"]["aji"])
    assert rows["true_markers"]["aji"] > 0.9
    assert rows["true_both"]["aji"] > 0.9


def test_predicted_row_is_the_pipelines_own_post_processing() -> None:
    rng = np.random.default_rng(3)
    labels = disks((96, 96), [(20, 20), (20, 38), (60, 60), (75, 25)], 9)
    prob = ndi.gaussian_filter(rng.random((96, 96)), 3) * 0.4 + 0.6 * (labels > 0)
    dist = np.clip(normalized_distance(labels) + rng.normal(0, 0.15, labels.shape), 0, 1)
    cfg = PostprocessConfig(fg_threshold=0.5, marker_threshold=0.4, marker_h=0.08, min_size=20)
    rows = tile_error_sources(np.stack([prob, dist]), labels, cfg)
    own = fg_dist_watershed(prob, dist, 0.5, 0.4, 20, 0.08)
    assert rows["predicted"] == segmentation_metrics(own, labels)


def test_error_sources_averages_tiles() -> None:
    a = disks((64, 64), [(16, 16), (46, 30)], 8)
    b = disks((64, 64), [(30, 30)], 12)
    maps_a = np.stack([(a > 0).astype(np.float32), normalized_distance(a)])
    maps_b = np.stack(
        [ndi.binary_dilation(b > 0, iterations=3).astype(np.float32), normalized_distance(b)]
    )
    mean = error_sources([maps_a, maps_b], [a, b], CFG)
    one = tile_error_sources(maps_b, b, CFG)["predicted"]["aji"]
    assert mean["predicted"]["aji"] == pytest.approx((1.0 + one) / 2)
    assert mean["true_foreground"]["aji"] == pytest.approx(1.0)


def test_bad_input_is_named() -> None:
    labels = disks((32, 32), [(16, 16)], 6)
    with pytest.raises(ValueError, match="fg_dist"):
        tile_error_sources(np.zeros((1, 32, 32), np.float32), labels, CFG)
    with pytest.raises(ValueError, match="shapes differ"):
        tile_error_sources(np.zeros((2, 32, 30), np.float32), labels, CFG)
    with pytest.raises(ValueError, match="as many maps"):
        error_sources([], [], CFG)
