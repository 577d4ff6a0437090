"""DIST dynamic watershed: exact against the original's label images, any size, edge cases."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.segmentation import relabel_sequential

from kseg.config import PostprocessConfig
from kseg.postprocess import (
    dist_watershed,
    dist_watershed_reference,
    h_maxima_transform,
    minmax_uint8,
    postprocess_from_config,
    reconstruct_by_dilation,
    regional_maxima,
)


def synthetic_map(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    """TNBC-like prediction: distance transforms of random touching ellipses, blurred, noisy."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        center = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        axes = (int(rng.integers(4, 14)), int(rng.integers(4, 14)))
        cv2.ellipse(labels, center, axes, float(rng.uniform(0, 180)), 0, 360, i, -1)
    dist = np.zeros(shape, np.float32)
    for i in np.unique(labels)[1:]:
        inst = (labels == i).astype(np.uint8)
        dist = np.maximum(dist, cv2.distanceTransform(inst, cv2.DIST_L2, 3))
    dist = cv2.GaussianBlur(dist, (0, 0), 1.0)
    return dist + rng.normal(0, 0.3, shape).astype(np.float32)


@pytest.fixture(scope="module")
def reference(shared: Path) -> dict[str, np.ndarray]:
    path = shared / "reference" / "original_dist_postprocess_io.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with np.load(path) as data:
        return {k: data[k] for k in ("names", "maps", "labels")}


def test_fast_reproduces_all_reference_label_images(reference: dict[str, np.ndarray]) -> None:
    assert reference["maps"].shape == (10, 512, 512)
    for name, dist, expected in zip(
        reference["names"], reference["maps"], reference["labels"], strict=True
    ):
        got = dist_watershed(dist, h=7, foreground_threshold=28, numbering="original")
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected, err_msg=str(name))
        # Default numbering: the same partition and order, renumbered 1..N without gaps.
        seq = dist_watershed(dist)
        np.testing.assert_array_equal(seq, relabel_sequential(expected)[0], err_msg=str(name))
        assert np.array_equal(np.unique(seq), np.arange(seq.max() + 1))


def test_plain_port_reproduces_reference(reference: dict[str, np.ndarray]) -> None:
    """The benchmark's baseline is a faithful port, not a strawman."""
    for i in (0, 3, 9):
        np.testing.assert_array_equal(
            dist_watershed_reference(reference["maps"][i]), reference["labels"][i]
        )


@pytest.mark.parametrize(
    ("shape", "h", "threshold", "seed"),
    [
        ((200, 311), 7, 28, 0),
        ((311, 200), 7, 28, 1),
        ((256, 256), 1, 28, 2),
        ((256, 256), 20, 10, 3),
        ((160, 240), 9, 3, 4),  # threshold below h
        ((160, 240), 5, 0, 5),  # no threshold: foreground is every non-zero value
    ],
)
def test_fast_equals_plain_port_on_any_size(
    shape: tuple[int, int], h: int, threshold: int, seed: int
) -> None:
    dist = synthetic_map(shape, n=shape[0] * shape[1] // 700, seed=seed)
    expected = dist_watershed_reference(dist, h=h, foreground_threshold=threshold)
    # Low thresholds make noisy maps mostly foreground, where the original's ArrangeLabel takes
    # the largest region as background: compare with that rule switched on.
    got = dist_watershed(
        dist, h=h, foreground_threshold=threshold, numbering="original", background="most_frequent"
    )
    assert expected.max() > 3  # the case has several instances
    np.testing.assert_array_equal(got, expected)


def test_reconstruction_matches_skimage() -> None:
    from skimage.morphology import reconstruction

    rng = np.random.default_rng(0)
    mask = cv2.GaussianBlur(rng.integers(0, 256, (97, 131), dtype=np.uint8), (0, 0), 3)
    seed = cv2.subtract(mask, np.full_like(mask, 9))
    expected = reconstruction(seed, mask).astype(np.uint8)
    np.testing.assert_array_equal(reconstruct_by_dilation(seed, mask), expected)
    np.testing.assert_array_equal(h_maxima_transform(mask, 9), expected)
    minima = reconstruction(expected - 1, expected) < expected  # not at value 0 (wraps)
    np.testing.assert_array_equal(regional_maxima(expected), minima & (expected > 0))


@pytest.mark.parametrize("value", [0.0, 3.5])
def test_constant_map_gives_no_instances_without_nan(value: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 RuntimeWarning
        labels = dist_watershed(np.full((64, 48), value, np.float32))
    assert labels.shape == (64, 48)
    assert not labels.any()


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (40, 1), (2, 2)])
def test_degenerate_sizes(shape: tuple[int, int]) -> None:
    dist = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    labels = dist_watershed(dist, foreground_threshold=1)
    assert labels.shape == shape
    if dist.size > 1:  # a ramp is one instance: its top is the only maximum
        assert labels.max() == 1


def _touching_pair(line: bool) -> np.ndarray:
    yy, xx = np.mgrid[:80, :120]
    cone_a = 22.0 - np.hypot(yy - 40, xx - 42)
    cone_b = 22.0 - np.hypot(yy - 40, xx - 78)  # centres 36 px apart, radii 22: they overlap
    return dist_watershed(np.maximum(np.maximum(cone_a, cone_b), 0), watershed_line=line)


def test_watershed_lines_separate_touching_nuclei() -> None:
    def touches(labels: np.ndarray) -> bool:
        grown = cv2.dilate((labels == 1).astype(np.uint8), np.ones((3, 3), np.uint8))
        return bool(np.any(grown.astype(bool) & (labels == 2)))

    with_line, without = _touching_pair(True), _touching_pair(False)
    assert with_line.max() == without.max() == 2
    assert touches(without)
    assert not touches(with_line)  # not even diagonally: the original's line is 8-connected
    cleared = (without > 0) & (with_line == 0)
    assert cleared.any()
    assert np.all(np.abs(np.nonzero(cleared)[1] - 60) <= 1)  # only along the bisector x = 60


def test_background_option_reproduces_arrange_label() -> None:
    """One nucleus bigger than the background: the original swaps them; the fix does not."""
    yy, xx = np.mgrid[:64, :64]
    dist = np.maximum(40.0 - np.hypot(yy - 32, xx - 32), 0)
    fixed = dist_watershed(dist)
    original = dist_watershed(dist, background="most_frequent", numbering="original")
    np.testing.assert_array_equal(original, dist_watershed_reference(dist))
    assert fixed.max() == 1
    assert fixed[32, 32] == 1
    assert original[32, 32] == 0  # the nucleus became background
    assert original[0, 0] > 0  # and the corners became instances


def test_original_h_shift_saturates() -> None:
    """Why no wrap-around option exists: the original's np.vectorize shift never wraps."""
    for h in (1, 7):

        def making_top_mask(x: int, lamb: int = h) -> int:
            return min(255, x + lamb)

        img = np.arange(255, -1, -1, dtype=np.uint8).reshape(16, 16)  # first pixel 255
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the type probe overflows
            shifted = np.vectorize(making_top_mask)(img)
        np.testing.assert_array_equal(shifted, np.minimum(img.astype(int) + h, 255))


def test_minmax_is_the_originals_float32_truncation() -> None:
    dist = np.array([[0.0, 1.0, 2.0], [3.0, 0.5, 2.999]], np.float32)
    expected = np.uint8(((dist - dist.min()) / (dist.max() - dist.min())) * 255)
    expected[expected < 28] = 0
    np.testing.assert_array_equal(minmax_uint8(dist, 28), expected)
    assert minmax_uint8(dist, 28)[1, 2] == 254  # truncated, not rounded


def test_postprocess_from_config_uses_its_values() -> None:
    dist = synthetic_map((128, 128), n=25, seed=7)
    cfg = PostprocessConfig(h=3, foreground_threshold=40, watershed_line=False)
    np.testing.assert_array_equal(
        postprocess_from_config(dist, cfg),
        dist_watershed(dist, h=3, foreground_threshold=40, watershed_line=False),
    )
    assert not np.array_equal(postprocess_from_config(dist, cfg), dist_watershed(dist))


@pytest.mark.parametrize(
    ("dist", "match"),
    [
        (np.zeros((2, 8, 8)), "2-D"),
        (np.full((8, 8), np.nan), "NaN"),
    ],
)
def test_bad_maps_raise_clear_errors(dist: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dist_watershed(dist)
