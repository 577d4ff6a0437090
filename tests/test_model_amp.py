"""Mixed precision: each architecture runs forward and backward under autocast, close to float32.

CPU bfloat16 autocast stands in for CUDA AMP here: it takes the same code paths (the convolutions
return reduced precision, so the hand-written CPU float32 kernels must step aside; see
:func:`kseg.model.ops.cpu_kernels`). Before that gate, the fast DiCE path crashed with
``RuntimeError: Found dtype Float but expected BFloat16`` (its PReLU met float32 slopes).

Tolerances, measured at nfeat 8 / tile 64 and set at about 2-3x the measured values:

* one DiCE block (fast and reference, train and eval mode): mean |bf16 - fp32| below 2% of the
  output's standard deviation (measured 0.2-0.5%), gradient cosine similarity above 0.99 (0.998);
* whole networks at initialisation: the error grows block by block (a freshly initialised deep
  net with train-mode BatchNorm amplifies rounding: the same nets in float32 against float64 differ
  by 4e-5 of the std, bfloat16 has 2^-8 precision). Kidney-SegNet (16 DiCE blocks): mean error
  below 15% of the std (measured 5-6.5%), gradient cosine above 0.2 (0.32-0.37); the U-Net: 5%
  (1.2%) and 0.9 (0.97). A wrong function or dtype path gives a cosine near 0 and errors of order 1.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kseg.config import ModelConfig
from kseg.model import build_model
from kseg.model.dice import DiCE
from kseg.model.ops import batch_norm_act, cpu_kernels, prelu

BF16 = torch.bfloat16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad.double().flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat(grads)


def _compare(model: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    """Forward + backward in float32 and under CPU bf16 autocast, on copies of ``model``."""
    res = {}
    for amp in (False, True):
        m = copy.deepcopy(model)
        with torch.autocast("cpu", dtype=BF16, enabled=amp):
            out = m(x)
        assert out.dtype == (BF16 if amp else torch.float32)
        (out.double() * g.double()).sum().backward()
        grads = _flat_grad(m)
        assert torch.isfinite(out).all() and torch.isfinite(grads).all()
        assert all(p.grad is None or p.grad.dtype == p.dtype for p in m.parameters())
        res[amp] = (out.detach().double(), grads)
    (o32, g32), (o16, g16) = res[False], res[True]
    return {
        "out": ((o16 - o32).abs().mean() / o32.std()).item(),
        "grad_cos": F.cosine_similarity(g16, g32, 0).item(),
    }


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("train", [True, False])
def test_dice_block_bf16_autocast_matches_float32(impl: str, train: bool) -> None:
    torch.manual_seed(0)
    block = DiCE(16, 16, 32, 32, impl=impl).train(train)
    x = torch.randn(2, 16, 32, 32, generator=_gen(1)).relu()
    g = torch.randn(2, 16, 32, 32, generator=_gen(2))
    diff = _compare(block, x, g)
    assert diff["out"] < 0.02, diff
    assert diff["grad_cos"] > 0.99, diff


@pytest.mark.parametrize(
    ("arch", "impl", "out_tol", "cos_min"),
    [
        ("kidney_segnet", "fast", 0.15, 0.2),
        ("kidney_segnet", "reference", 0.15, 0.2),
        ("unet", "fast", 0.05, 0.9),
    ],
)
@pytest.mark.parametrize("head", ["dist", "fg_dist"])
def test_network_bf16_autocast_forward_backward(arch, impl, out_tol, cos_min, head) -> None:
    cfg = ModelConfig(arch=arch, nfeat=8, mid_channels=16, tile_size=64, dice_impl=impl, head=head)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.randn(2, 3, 64, 64, generator=_gen(1))
    g = torch.randn(2, cfg.out_channels, 64, 64, generator=_gen(2))
    diff = _compare(model, x, g)
    if head == "fg_dist":  # the dist head's ReLU zeroes most of an untrained output: no scale
        assert diff["out"] < out_tol, diff
    assert diff["grad_cos"] > cos_min, diff
    # Inference (folded BatchNorms in the fast path) under autocast too.
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        out = model(x)
    assert out.dtype == BF16 and torch.isfinite(out).all()


def test_cpu_kernels_gate() -> None:
    x = torch.zeros(2, 4, 3, 3)
    assert cpu_kernels(x) and cpu_kernels(x.double())
    assert not cpu_kernels(x.to(BF16)) and not cpu_kernels(x.half())
    assert not cpu_kernels(x.to("meta"))  # any other device
    with torch.autocast("cpu", dtype=BF16):
        assert not cpu_kernels(x)


def test_prelu_and_batch_norm_act_under_autocast_match_plain_ops() -> None:
    x = torch.randn(2, 4, 5, 5, generator=_gen(3)).to(BF16).requires_grad_()
    a = torch.rand(4, generator=_gen(4)).requires_grad_()  # float32 slopes, as nn.PReLU's
    with torch.autocast("cpu", dtype=BF16):
        out = prelu(x, a)
    ref = F.prelu(x.detach().float(), a.detach()).to(BF16)
    assert out.dtype == BF16
    torch.testing.assert_close(out, ref)
    out.float().sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32
    bn = torch.nn.BatchNorm2d(4).train()
    with torch.autocast("cpu", dtype=BF16):
        y = batch_norm_act(x, bn, "prelu", a)
    assert y.dtype == BF16 and torch.isfinite(y).all()
