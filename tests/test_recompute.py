"""train.recompute_levels: recomputed activations give the same weights and BN statistics."""

from __future__ import annotations

import copy

import pytest
import torch

from kseg.model import build_model
from kseg.model.config import ModelConfig


@pytest.mark.parametrize("levels", [1, 4])
def test_recompute_gives_bit_identical_weights_and_batchnorm_statistics(levels: int) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(nfeat=8, mid_channels=16, tile_size=64, head="fg_dist")
    plain = build_model(cfg).train()
    recomputed = copy.deepcopy(plain)
    recomputed.recompute_levels = levels
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for model in (plain, recomputed):
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for _ in range(2):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), recomputed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name  # running means/vars updated once, not twice


def test_recompute_keeps_fewer_activations() -> None:
    cfg = ModelConfig(nfeat=8, mid_channels=16, tile_size=64)
    sizes = []
    for levels in (0, 4):
        torch.manual_seed(0)
        model = build_model(cfg).train()
        model.recompute_levels = levels
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(2, 3, 64, 64))
        sizes.append(sum(saved.values()))
    assert sizes[1] < sizes[0] / 3, sizes
