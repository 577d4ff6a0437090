"""Request params of the served model: ``tta`` and ``mpp`` as ``kseg predict --tta / --mpp``."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.pipeline_helpers import make_model_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_model_folder(tmp_path_factory.mktemp("serve") / "m", tile_size=64)
    doc = json.loads((folder / "config.json").read_text())
    doc["extra"]["mpp"] = 0.5  # the model's pixel size
    (folder / "config.json").write_text(json.dumps(doc))
    return folder


@pytest.fixture(scope="module")
def pyfunc(folder: Path):
    from kseg.serving import ARTIFACT_KEY, KsegPyfunc

    model = KsegPyfunc()
    model.load_context(
        types.SimpleNamespace(artifacts={ARTIFACT_KEY: str(folder)}, model_config={})
    )
    return model


def _image(seed: int, h: int, w: int) -> np.ndarray:
    from tests.test_registry import _tile

    return _tile(seed, h, w)[0]


def _ask(pyfunc, rgb: np.ndarray, **params) -> tuple[np.ndarray, np.ndarray, dict]:
    from kseg.serving import decode_distance, decode_labels, encode_image

    frame = pd.DataFrame({"image": [encode_image(rgb)]})
    row = pyfunc.predict(None, frame, params={"return_distance": True, **params}).iloc[0]
    return decode_labels(row["labels"]), decode_distance(row["distance"]), dict(row)


def test_tta_param_overrides_the_models_for_that_request_only(pyfunc, folder: Path) -> None:
    from kseg.segmenter import Segmenter

    rgb = _image(3, 96, 112)
    reference = Segmenter.from_folder(folder)
    plain_labels, plain_dist = reference.segment(rgb)
    reference.model_config = reference.model_config.model_copy(update={"infer_tta": "flips"})
    flips_labels, flips_dist = reference.segment(rgb)
    assert not np.allclose(plain_dist, flips_dist)  # the untrained net is not flip-symmetric

    labels, dist, _ = _ask(pyfunc, rgb, tta="flips")
    np.testing.assert_array_equal(labels, flips_labels)
    np.testing.assert_allclose(dist, flips_dist, atol=1e-5)
    # The next request without the param gets the model's own setting again.
    labels, dist, _ = _ask(pyfunc, rgb)
    np.testing.assert_array_equal(labels, plain_labels)
    np.testing.assert_allclose(dist, plain_dist, atol=1e-5)
    assert pyfunc.segmenter.model_config.infer_tta == "none"


def test_mpp_param_resamples_to_the_model_and_answers_on_the_images_grid(
    pyfunc, folder: Path
) -> None:
    from kseg.resample import resize_image, resize_labels_to, resize_maps
    from kseg.segmenter import Segmenter

    rgb = _image(5, 90, 70)
    # 0.25 µm/px images for a 0.5 µm/px model: segmented at half size, answered at 90 x 70.
    labels, dist, row = _ask(pyfunc, rgb, mpp=0.25)
    assert labels.shape == dist.shape == (90, 70) and (row["height"], row["width"]) == (90, 70)
    small_labels, small_dist = Segmenter.from_folder(folder).segment(resize_image(rgb, 0.5))
    assert small_labels.shape == (45, 35)
    np.testing.assert_array_equal(labels, resize_labels_to(small_labels, 90, 70))
    np.testing.assert_allclose(dist, resize_maps(small_dist[None], 90, 70)[0], atol=1e-5)
    # The model's own pixel size is no resampling.
    same, _, _ = _ask(pyfunc, rgb, mpp=0.5)
    np.testing.assert_array_equal(same, _ask(pyfunc, rgb)[0])


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"tta": "rot45"}, "params.tta='rot45': expected one of none, flips, dihedral"),
        ({"mpp": -0.25}, "params.mpp=-0.25: expected the images' µm per pixel, > 0"),
        ({"mpp": "20x"}, "params.mpp='20x'"),
    ],
)
def test_bad_params_are_a_clear_4xx_naming_the_param(pyfunc, params: dict, needle: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

    with pytest.raises(MlflowException) as info:
        _ask(pyfunc, _image(1, 40, 40), **params)
    assert needle in info.value.message
    assert info.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)


def test_signature_declares_the_params_with_the_models_defaults() -> None:
    from kseg.serving import signature

    specs = {p.name: (p.dtype.name, p.default) for p in signature().params.params}
    assert specs == {
        "return_distance": ("boolean", False),
        "tta": ("string", None),
        "mpp": ("double", None),
    }


def test_mpp_that_enlarges_an_image_past_the_pixel_limit_is_refused(folder: Path) -> None:
    from mlflow.exceptions import MlflowException

    from kseg.serving import ARTIFACT_KEY, KsegPyfunc

    model = KsegPyfunc()
    context = types.SimpleNamespace(
        artifacts={ARTIFACT_KEY: str(folder)}, model_config={"max_pixels": 10_000}
    )
    model.load_context(context)
    rgb = _image(2, 90, 70)  # 6,300 pixels: accepted as it is
    assert _ask(model, rgb)[0].shape == (90, 70)
    with pytest.raises(MlflowException, match=r"image\[0\] resampled to the model's pixel size"):
        _ask(model, rgb, mpp=1.0)  # 1 µm/px for a 0.5 µm/px model: 180 x 140 = 25,200 pixels
