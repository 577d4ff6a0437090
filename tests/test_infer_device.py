"""predict_maps on the inference device: torch blending equals the former numpy blending on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kseg.config import ModelConfig
from kseg.infer import Preprocess, _windows, blend_ramp, output_to_maps, predict_maps
from kseg.model import build_model


def _numpy_blend(model, image, preprocess, tile, overlap, batch_size, head):
    """The host-side numpy blending predict_maps used before (kept here as the reference)."""
    h, w = image.shape[:2]
    ph, pw = max(0, tile - h), max(0, tile - w)
    mode = "reflect" if ph < h and pw < w else "symmetric"
    padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode) if ph or pw else image
    hh, ww = padded.shape[:2]
    acc = None
    weight_sum = np.zeros((hh, ww), np.float32)
    positions = list(_windows(hh, ww, tile, overlap))
    with torch.inference_mode():
        for i in range(0, len(positions), batch_size):
            chunk = positions[i : i + batch_size]
            crops = np.stack([padded[y : y + tile, x : x + tile] for y, x in chunk])
            out = output_to_maps(model(preprocess.to_tensor(crops)), head).float().numpy()
            if acc is None:
                acc = np.zeros((out.shape[1], hh, ww), np.float32)
            for (y, x), pred in zip(chunk, out, strict=True):
                weight = np.outer(
                    blend_ramp(tile, y == 0, y + tile >= hh),
                    blend_ramp(tile, x == 0, x + tile >= ww),
                )
                acc[:, y : y + tile, x : x + tile] += pred * weight
                weight_sum[y : y + tile, x : x + tile] += weight
    return (acc / weight_sum)[:, :h, :w]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(nfeat=4, mid_channels=8, tile_size=32, head="fg_dist")
    return build_model(cfg).eval()


@pytest.mark.parametrize("shape", [(70, 45), (20, 50), (32, 32)])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_torch_blending_equals_numpy_blending_on_cpu(model, shape, batch_size) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
    pre = Preprocess(mean=(120.0, 100.0, 140.0), std=(50.0, 40.0, 60.0))
    ours = predict_maps(model, image, pre, 32, batch_size=batch_size)
    ref = _numpy_blend(model, image, pre, 32, 8, batch_size, "fg_dist")
    assert ours.dtype == np.float32 and ours.shape == (2, *shape)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_autocast_dtype_option(model) -> None:
    image = np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    full = predict_maps(model, image, Preprocess(), 32)
    half = predict_maps(model, image, Preprocess(), 32, dtype=torch.bfloat16, batch_size=8)
    assert half.dtype == np.float32 and half.shape == full.shape
    assert np.abs(half - full).max() < 0.05  # probabilities in [0, 1]; bf16 has 2^-8 precision
