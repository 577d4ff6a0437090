"""Kidney-SegNet (fast path) learns: the loss falls on a few synthetic tiles at 64x64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kseg.model import build_model
from kseg.model.config import ModelConfig


def _synthetic_tiles(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark discs on a light background; target = distance-like peak map (0..1) of the discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs, maps = [], []
    for _ in range(n):
        img = np.full((3, size, size), 0.8, np.float32)
        dist = np.zeros((size, size), np.float32)
        for _ in range(4):
            cy, cx, r = rng.integers(8, size - 8), rng.integers(8, size - 8), rng.integers(4, 8)
            d = r - np.hypot(yy - cy, xx - cx)
            img[:, d > 0] = np.array([[0.3], [0.1], [0.4]], np.float32)
            dist = np.maximum(dist, np.clip(d / r, 0, 1))
        imgs.append(img + rng.normal(0, 0.03, img.shape).astype(np.float32))
        maps.append(dist[None])
    return torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(maps))


@pytest.fixture
def one_thread():
    """Tiny tensors: OpenMP fork/join costs more than it saves on a busy 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_loss_falls_on_synthetic_tiles(one_thread):
    torch.manual_seed(0)
    cfg = ModelConfig(nfeat=8, mid_channels=16, tile_size=64)
    model = build_model(cfg).train()
    x, y = _synthetic_tiles(4, 64, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses


def test_other_tile_sizes_and_errors(one_thread):
    cfg = ModelConfig(nfeat=4, mid_channels=8, tile_size=32)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 48, 40))  # adaptive pooling: any multiple of 8
    assert out.shape == (1, 1, 48, 40)
    assert (out >= 0).all()
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(1, 3, 30, 32))
    orig = build_model(ModelConfig.original_compatible(nfeat=4, mid_channels=8).with_(tile_size=32))
    with pytest.raises(ValueError, match="fix_aspp_adaptive_pool"):
        orig(torch.rand(1, 3, 64, 64))
