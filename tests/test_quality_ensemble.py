"""benchmarks/quality.py --ensemble: the mean of the members' maps, then post-processing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kseg.postprocess import postprocess_maps
from kseg.predict import pretrained_model
from kseg.segmenter import Segmenter
from tests.bench_helpers import load_benchmark


@pytest.fixture(scope="module")
def quality():
    """benchmarks/quality.py, loaded once for the module."""
    return load_benchmark("quality")


def _image() -> np.ndarray:
    """A 96 x 120 H&E-like image: pink background with purple discs (not a network's tile size)."""
    yy, xx = np.mgrid[:96, :120]
    image = np.empty((96, 120, 3), np.uint8)
    image[:] = (230, 170, 200)
    for cy, cx in ((30, 30), (60, 80), (35, 90)):
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 120] = (110, 60, 150)
    return image


def test_ensemble_maps_are_the_members_mean_and_its_labels_come_from_them(quality) -> None:
    plain = Segmenter.from_folder(pretrained_model())
    plain.model_config = plain.model_config.model_copy(update={"infer_tta": "none"})
    flips = Segmenter.from_folder(pretrained_model())  # the shipped model's own flips TTA
    assert flips.model_config.infer_tta == "flips"
    image = _image()
    a, b = plain.maps(image), flips.maps(image)
    assert not np.allclose(a, b)  # two different members, else the mean proves nothing

    ensemble = quality.EnsembleSegmenter([plain, flips])
    mean = ensemble.maps(image)
    np.testing.assert_allclose(mean, (a + b) / 2, rtol=0, atol=1e-6)
    labels, distance = ensemble.segment(image)
    np.testing.assert_array_equal(labels, postprocess_maps(mean, plain.postprocess))
    np.testing.assert_allclose(distance, mean[-1], atol=1e-6)
    assert ensemble.postprocess == plain.postprocess  # the first member's, unless refitted


def test_ensemble_refuses_members_with_different_heads(quality) -> None:
    members = [
        SimpleNamespace(model_config=SimpleNamespace(head=h), postprocess=None)
        for h in ("fg_dist", "dist")
    ]
    with pytest.raises(ValueError, match="--ensemble: members have different heads"):
        quality.EnsembleSegmenter(members)


def test_stain_tta_maps_are_the_mean_over_the_five_stain_views(quality) -> None:
    from kseg.augment import hed_jitter

    seg = Segmenter.from_folder(pretrained_model())
    seg.model_config = seg.model_config.model_copy(update={"infer_tta": "none"})
    image = _image()
    views = [
        seg.maps(hed_jitter(image, np.array([h, e, 1.0]), np.zeros(3)))
        for h, e in ((1, 1), (0.8, 1), (1.25, 1), (1, 0.8), (1, 1.25))
    ]
    assert not np.allclose(views[0], views[2])  # the views differ, else the mean proves nothing
    np.testing.assert_array_equal(views[0], seg.maps(image))  # the first view is the image
    stain = quality.StainTTASegmenter(seg)
    mean = stain.maps(image)
    np.testing.assert_allclose(mean, np.mean(views, axis=0), rtol=0, atol=1e-6)
    labels, distance = stain.segment(image)
    np.testing.assert_array_equal(labels, postprocess_maps(mean, seg.postprocess))
    np.testing.assert_allclose(distance, mean[-1], atol=1e-6)
