"""Tiled inference: no seams, no lost nuclei at window borders, memory bounded by the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kseg.infer import Preprocess, blend_weight, predict_distance, window_starts
from kseg.postprocess import dist_watershed

IDENTITY = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class FirstChannel(torch.nn.Module):
    """An oracle 'network' that returns its first input channel: tiling must not change it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return x[:, :1]


class BorderBlind(torch.nn.Module):
    """Mean of the first channel over a ``k x k`` box with zero padding (receptive field ``k``).

    Inside a window it reproduces a smooth map; within ``k // 2`` of the window's edge it averages
    in zeros, so the same pixel gets a lower value from a window whose border is near it.
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(
            x[:, :1], self.k, stride=1, padding=self.k // 2, count_include_pad=True
        )


class SmallConvNet(torch.nn.Module):
    """Two 3x3 convolutions: receptive field 5 px, fully convolutional (untiled is possible)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(100, 64, 16), (64, 64, 16), (30, 64, 16), (2000, 256, 64), (1500, 256, 64)],
)
def test_windows_cover_everything_with_overlap(length: int, tile: int, overlap: int) -> None:
    starts = window_starts(length, tile, overlap)
    covered = np.zeros(max(length, tile), bool)
    for s in starts:
        covered[s : s + tile] = True
        assert s + tile <= max(length, tile)
    assert covered[:length].all()
    gaps = np.diff(starts)
    assert (gaps <= tile - overlap).all()


def test_blend_weight_is_positive_and_peaks_in_the_centre() -> None:
    w = blend_weight(64)
    assert w.min() > 0
    assert w[32, 32] == pytest.approx(w.max())


def test_identity_model_is_reproduced_exactly_at_any_size() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 170, 3), dtype=np.uint8)
    model = FirstChannel()
    out = predict_distance(model, image, IDENTITY, tile=64, batch_size=3)
    np.testing.assert_allclose(out, image[..., 0].astype(np.float32), rtol=1e-5, atol=1e-3)
    assert all(c[0] <= 3 and c[2:] == (64, 64) for c in model.calls)  # memory bound: 3 windows


def test_tiny_image_is_padded_and_cropped_back() -> None:
    image = np.full((1, 1, 3), 200, np.uint8)
    out = predict_distance(FirstChannel(), image, IDENTITY, tile=32)
    assert out.shape == (1, 1)
    assert out[0, 0] == pytest.approx(200.0)


def test_tiled_equals_untiled_for_a_convolutional_net() -> None:
    rng = np.random.default_rng(1)
    image = (rng.random((1500, 2000, 3)) * 255).astype(np.uint8)
    net = SmallConvNet().eval()
    pre = Preprocess()
    tiled = predict_distance(net, image, pre, tile=256, overlap=64, batch_size=4)
    with torch.inference_mode():
        full = net(pre.to_tensor(image))[0, 0].numpy()
    # Only pixels within the receptive field of a window edge see the window's zero padding, and
    # they carry little blending weight there; everywhere the maps agree closely.
    err = np.abs(tiled - full)
    assert np.median(err) < 1e-5
    assert err.max() < 0.002 * (full.max() - full.min())


def test_nucleus_cut_by_a_window_border_is_one_instance() -> None:
    # A distance map with one big round nucleus (radius 20) centred at (y=64, x=60). Tile 64:
    # without overlap the window borders are at x=64 and y=64, right through the nucleus; with
    # kseg's overlap of 16 the windows start at x = 0, 48, 96 and y = 0, 48, 64.
    yy, xx = np.mgrid[0:128, 0:160]
    r = np.hypot(yy - 64, xx - 60)
    dist = np.clip(20 - r, 0, None) * 12.0  # peak 240
    image = np.repeat(dist[..., None], 3, axis=2).astype(np.uint8)
    # The stand-in must predict worse near its own window's border, like a real network that sees
    # zero padding there: an 11 x 11 mean with zero padding halves the map on the window edge. An
    # identity stand-in would predict the same in every window and pass with any tiling.
    net = BorderBlind(11)
    with torch.inference_mode():
        untiled = net(IDENTITY.to_tensor(image))[0, 0].numpy()
    assert dist_watershed(untiled).max() == 1  # the network, seeing the whole image: one nucleus

    # Windows side by side (no overlap) cut valleys along x=64 and y=64: four "nuclei".
    no_overlap = dist_watershed(predict_distance(net, image, IDENTITY, tile=64, overlap=0))
    assert no_overlap.max() == 4

    pred = predict_distance(net, image, IDENTITY, tile=64, overlap=16)
    labels = dist_watershed(pred)
    assert labels.max() == 1
    assert (labels == 1).sum() > 0.8 * np.pi * 20**2 * 0.85
    # The blend hands each border pixel to the window that sees it from afar: the map is close to
    # the untiled one (peak 240) and the instance is the untiled network's instance.
    assert np.abs(pred - untiled).max() < 10
    ref = dist_watershed(untiled) == 1
    assert (ref & (labels == 1)).sum() / (ref | (labels == 1)).sum() > 0.95
