"""``model.dice_dim_kernels``: per-row / per-column kernels (original) against shared ones."""

from __future__ import annotations

import copy

import pytest
import torch

from kseg.model import build_model
from kseg.model.config import ModelConfig
from kseg.model.dice import DiCE


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for name, b in module.named_buffers():
            if "running_var" in name:
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif "running_mean" in name:
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


def _shift_error(block: torch.nn.Module, shift: int, margin: int) -> float:
    """Largest |f(roll(x)) - roll(f(x))| away from the image borders and the roll's seam."""
    x = torch.randn(1, 8, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        a = torch.roll(block(x), shifts=(shift, shift), dims=(2, 3))
        b = block(torch.roll(x, shifts=(shift, shift), dims=(2, 3)))
    keep = torch.ones(32, dtype=torch.bool)
    for edge in (0, shift, 32):  # zero padding differs near the borders and near the seam
        keep[max(0, edge - margin) : edge + margin] = False
    return float((a - b)[..., keep, :][..., keep].abs().max())


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_shared_kernels_make_dice_translation_equivariant(impl: str) -> None:
    shared = DiCE(8, 8, 32, 32, impl=impl, shared_dim_kernels=True).double().eval()
    per_row = DiCE(8, 8, 32, 32, impl=impl).double().eval()
    _randomize(shared, 1)
    _randomize(per_row, 1)
    # The SE gate pools the whole image (unchanged by a roll); the convs reach 2 px.
    assert _shift_error(shared, 5, margin=3) < 1e-10
    # One kernel per row / column: moving the content changes the response (the striping).
    assert _shift_error(per_row, 5, margin=3) > 1e-4


@pytest.mark.parametrize("train", [True, False])
def test_shared_kernels_fast_equals_reference(train: bool) -> None:
    ref = DiCE(8, 16, 16, 16, impl="reference", shared_dim_kernels=True).double()
    _randomize(ref, 2)
    fast = copy.deepcopy(ref)
    fast.impl = "fast"
    ref.train(train)
    fast.train(train)
    x = torch.randn(2, 8, 12, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x.requires_grad_(True)
    y1, y2 = ref(x), fast(x)
    torch.testing.assert_close(y2, y1, rtol=1e-9, atol=1e-9)
    if train:
        g1 = torch.autograd.grad(y1.sum(), [x, ref.conv_height.weight])
        g2 = torch.autograd.grad(y2.sum(), [x, fast.conv_height.weight])
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-8)


def test_shared_kernels_have_one_kernel_and_run_on_any_size() -> None:
    cfg = ModelConfig(nfeat=8, mid_channels=16, tile_size=64, dice_dim_kernels="shared")
    model = build_model(cfg).eval()
    assert model.conv1b.conv_height.weight.shape == (1, 1, 3, 3)
    assert model.conv1b.conv_width.weight.shape == (1, 1, 3, 3)
    per_row = build_model(cfg.with_(dice_dim_kernels="per_position"))
    assert per_row.conv1b.conv_height.weight.shape == (64, 1, 3, 3)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 96, 40)).shape == (1, 1, 96, 40)
    assert ModelConfig.original_compatible().dice_dim_kernels == "per_position"
