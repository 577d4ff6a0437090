"""The fast DiCE implementation computes the same function as the line-by-line reference."""

from __future__ import annotations

import copy

import pytest
import torch

from kseg.model.config import ModelConfig
from kseg.model.dice import DiCE
from kseg.model.ops import prelu


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights, BN statistics and PReLU slopes (including negative slopes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.2)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    """Max abs difference relative to the tensor's largest value below ``tol``."""
    scale = max(b.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item() / scale
    assert err < tol, f"{what}: relative difference {err:.2e}"


def _compare(
    ref: torch.nn.Module,
    fast: torch.nn.Module,
    inputs: list[torch.Tensor],
    train: bool,
    grad_tol: float = 1e-5,
):
    ref.train(train)
    fast.train(train)
    results = []
    for m in (ref, fast):
        xs = [x.clone().requires_grad_() for x in inputs]
        m.zero_grad(set_to_none=True)
        out = m(*xs)
        g = torch.Generator().manual_seed(99)
        out.backward(torch.randn(out.shape, generator=g, dtype=out.dtype))
        results.append((out.detach(), [x.grad for x in xs], m))
    (o1, gx1, m1), (o2, gx2, m2) = results
    _close(o2, o1, "output")
    for a, b in zip(gx2, gx1, strict=True):
        _close(a, b, "input gradient", grad_tol)
    for (name, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert (p1.grad is None) == (p2.grad is None), name
        if train and name == "conv1a.bias":
            # A bias right before a train-mode BatchNorm has zero gradient in exact arithmetic;
            # both paths give rounding noise.
            assert p1.grad.abs().max() < 1e-9 and p2.grad.abs().max() < 1e-9
        elif p1.grad is not None:
            _close(p2.grad, p1.grad, f"gradient of {name}", grad_tol)
    for (name, b1), (_, b2) in zip(m1.named_buffers(), m2.named_buffers(), strict=True):
        if b1.is_floating_point():  # running statistics: a few float32 ulps apart at most
            _close(b2, b1, name, 1e-9 if b1.dtype == torch.float64 else 1e-6)
        else:
            assert torch.equal(b1, b2), name


CASES = [
    # c_in, c_out, built H x W, kernel, dilation, input H x W
    (8, 8, 16, 16, 3, (1, 1, 1), (16, 16)),
    (8, 16, 12, 20, 3, (1, 1, 1), (12, 20)),  # non-square, widening (gcd groups)
    (12, 8, 16, 16, 3, (2, 3, 4), (16, 16)),  # unequal dilations
    (16, 8, 16, 16, 1, (1, 1, 1), (16, 16)),  # 1x1 branch of the pyramid
    (8, 8, 16, 16, 3, (1, 1, 1), (10, 24)),  # input smaller/larger than built: resized
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_dice_fast_equals_reference(case, train, dtype):
    c_in, c_out, h, w, k, dil, (xh, xw) = case
    ref = DiCE(c_in, c_out, h, w, k, dil, impl="reference").to(dtype)
    _randomize(ref, seed=sum(case[:4]))
    fast = copy.deepcopy(ref)
    fast.impl = "fast"
    x = torch.randn(2, c_in, xh, xw, generator=torch.Generator().manual_seed(1), dtype=dtype)
    # float64 checks that the two paths are the same function (1e-5 relative, typically 1e-14).
    # In float32 the outputs agree to 1e-5 too, but in training mode the gradient of a weight in
    # front of a BatchNorm is near zero (BN is scale-invariant), i.e. rounding noise that depends
    # on summation order, so float32 gradients are held to 1e-3 of their largest value.
    _compare(ref, fast, [x], train, grad_tol=1e-5 if dtype == torch.float64 else 1e-3)


def test_prelu_matches_torch_including_gradients():
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(prelu, (x, a))
    g = torch.randn(3, 5, 7, 6, dtype=torch.float64)
    ours = torch.autograd.grad(prelu(x, a), (x, a), g)
    theirs = torch.autograd.grad(torch.nn.functional.prelu(x, a), (x, a), g)
    for o, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(o, t)


@pytest.mark.parametrize("original", [True, False])
def test_whole_network_fast_equals_reference(original):
    from kseg.model import build_model

    if original:
        cfg = ModelConfig.original_compatible(nfeat=4, mid_channels=8).with_(tile_size=32)
    else:
        cfg = ModelConfig(nfeat=4, mid_channels=8, tile_size=32)
    ref = build_model(cfg.with_(dice_impl="reference"))
    _randomize(ref, seed=5)
    fast = build_model(cfg)
    fast.load_state_dict(ref.state_dict())
    ref, fast = ref.double(), fast.double()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _compare(ref, fast, [x], train=True)
    _compare(ref, fast, [x], train=False)


@pytest.mark.parametrize(("c_in", "c_out", "groups", "bias"), [(8, 4, 4, True), (9, 3, 3, False)])
def test_grouped_conv3x3_matches_conv2d_with_gradients(c_in, c_out, groups, bias):
    from kseg.model.ops import grouped_conv3x3

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, c_in, 7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c_out, c_in // groups, 3, 3, generator=g, dtype=torch.float64)
    w.requires_grad_()
    b = torch.randn(c_out, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = [t for t in (x, w, b) if t is not None]
    ours = grouped_conv3x3(x, w, b, groups)
    theirs = torch.nn.functional.conv2d(x, w, b, 1, 1, 1, groups)
    torch.testing.assert_close(ours, theirs)
    go = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    for o, t in zip(
        torch.autograd.grad(ours, inputs, go), torch.autograd.grad(theirs, inputs, go), strict=True
    ):
        torch.testing.assert_close(o, t)


def test_bn_affine_is_eval_batchnorm():
    from kseg.model.ops import bn_affine

    bn = torch.nn.BatchNorm2d(5).double().eval()
    _randomize(bn, seed=4)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    s, t = bn_affine(bn)
    torch.testing.assert_close(x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1), bn(x))


def test_max_pool_without_grad_equals_max_pool2d():
    from kseg.model.net import _max_pool2

    x = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(6)).relu()  # many ties
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        ours, theirs = _max_pool2(x), torch.nn.functional.max_pool2d(x, 2)
    torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("c_in", [8, 16])
def test_dice_bn_relu_folded_equals_plain(c_in):
    dice = DiCE(c_in, 8, 12, 12, impl="fast").double().eval()
    bn = torch.nn.BatchNorm2d(8).double().eval()
    _randomize(dice, seed=c_in)
    _randomize(bn, seed=c_in + 1)
    x = torch.randn(2, c_in, 12, 12, dtype=torch.float64, requires_grad=True)
    folded = dice.forward_bn_relu(x, bn)
    plain = torch.relu(bn(dice._forward_reference(x)))
    _close(folded, plain, "output")
    g = torch.randn(folded.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    params = [x, *dice.parameters(), *bn.parameters()]
    for a, b in zip(
        torch.autograd.grad(folded, params, g), torch.autograd.grad(plain, params, g), strict=True
    ):
        _close(a, b, "gradient")
