"""kseg.model.ops: each fast op has the values and gradients of the PyTorch ops it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kseg.model.blocks import AttentionGate
from kseg.model.ops import batch_norm_act, conv1x1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plain(x: torch.Tensor, bn: torch.nn.BatchNorm2d, act: str, a: torch.Tensor | None, sl):
    """The same computation with F.batch_norm and F.prelu / F.relu."""
    sl = sl if sl is not None else slice(None)
    rm = bn.running_mean[sl] if bn.running_mean is not None else None
    rv = bn.running_var[sl] if bn.running_var is not None else None
    w = bn.weight[sl] if bn.weight is not None else None
    b = bn.bias[sl] if bn.bias is not None else None
    if bn.training and bn.track_running_stats and (sl.start or 0) == 0:
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    out = F.batch_norm(x, rm, rv, w, b, bn.training or rm is None, momentum, bn.eps)
    if act == "relu":
        return F.relu(out)
    return F.prelu(out, a) if act == "prelu" else out


@pytest.mark.parametrize("act", ["none", "relu", "prelu"])
@pytest.mark.parametrize("shape", [(3, 6, 5, 7), (4, 6, 9)])  # 4-D, and 3-D as the row layout
@pytest.mark.parametrize("channels", [None, slice(0, 6), slice(6, 12)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_act_matches_torch_in_training(act, shape, channels, momentum):
    width = 12 if channels is not None else 6
    bn = torch.nn.BatchNorm2d(width, momentum=momentum).double().train()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(width, generator=_gen(1), dtype=torch.float64))
        bn.bias.copy_(torch.randn(width, generator=_gen(2), dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(width, generator=_gen(3), dtype=torch.float64))
        bn.num_batches_tracked.fill_(3)
    ref_bn = copy.deepcopy(bn)
    x = torch.randn(shape, generator=_gen(4), dtype=torch.float64) * 3 + 1
    a = torch.randn(6, generator=_gen(5), dtype=torch.float64)  # negative slopes too
    g = torch.randn(shape, generator=_gen(6), dtype=torch.float64)
    xs, as_ = (
        [x.clone().requires_grad_() for _ in range(2)],
        [a.clone().requires_grad_() for _ in range(2)],
    )
    ours = batch_norm_act(xs[0], bn, act, as_[0] if act == "prelu" else None, channels)
    theirs = _plain(xs[1], ref_bn, act, as_[1] if act == "prelu" else None, channels)
    torch.testing.assert_close(ours, theirs)
    params = lambda m, i: [xs[i], m.weight, m.bias] + ([as_[i]] if act == "prelu" else [])  # noqa: E731
    for o, t in zip(
        torch.autograd.grad(ours, params(bn, 0), g),
        torch.autograd.grad(theirs, params(ref_bn, 1), g),
        strict=True,
    ):
        torch.testing.assert_close(o, t)
    for (name, b1), (_, b2) in zip(bn.named_buffers(), ref_bn.named_buffers(), strict=True):
        torch.testing.assert_close(b1, b2, msg=name)


def test_batch_norm_act_eval_and_untracked_modes():
    x = torch.randn(2, 4, 5, 5, generator=_gen(7), dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4, generator=_gen(8), dtype=torch.float64))
        bn.running_var.uniform_(0.5, 2.0)
    torch.testing.assert_close(batch_norm_act(x, bn, "relu"), F.relu(bn(x)))
    untracked = torch.nn.BatchNorm2d(4, track_running_stats=False, affine=False).double().eval()
    torch.testing.assert_close(batch_norm_act(x, untracked, "none"), untracked(x))
    assert untracked.running_mean is None


def test_batch_norm_act_keeps_float32_accuracy_under_a_large_mean():
    # E[x^2] - E[x]^2 and float32 sums of x cancel catastrophically here (mean 1e5 x the spread);
    # the centred two-pass fallback must kick in. ATen's own float32 BatchNorm is off by 1.5e-3.
    x = torch.randn(2, 3, 64, 64, generator=_gen(9)) * 0.01 + 1000.0
    bn = torch.nn.BatchNorm2d(3).train()
    out = batch_norm_act(x, bn, "none")
    expected = F.batch_norm(x.double(), None, None, training=True).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    var = x.double().var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * var, atol=1e-9, rtol=1e-6)


def test_batch_norm_act_errors_name_the_problem():
    bn = torch.nn.BatchNorm2d(3).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_act(torch.randn(1, 3, 1, 1), bn, "relu")
    with pytest.raises(ValueError, match="act must be none, relu or prelu"):
        batch_norm_act(torch.randn(2, 3, 4, 4), bn, "gelu")


@pytest.mark.parametrize(
    ("c_in", "c_out", "bias"),
    [(1, 5, True), (5, 1, True), (1, 4, False), (6, 1, False), (4, 3, True)],
)
def test_conv1x1_matches_conv2d_with_gradients(c_in, c_out, bias):
    x = torch.randn(2, c_in, 6, 7, generator=_gen(10), dtype=torch.float64, requires_grad=True)
    w = torch.randn(c_out, c_in, 1, 1, generator=_gen(11), dtype=torch.float64, requires_grad=True)
    b = (
        torch.randn(c_out, generator=_gen(12), dtype=torch.float64, requires_grad=True)
        if bias
        else None
    )
    inputs = [t for t in (x, w, b) if t is not None]
    ours, theirs = conv1x1(x, w, b), F.conv2d(x, w, b)
    torch.testing.assert_close(ours, theirs)
    g = torch.randn(ours.shape, generator=_gen(13), dtype=torch.float64)
    for o, t in zip(
        torch.autograd.grad(ours, inputs, g), torch.autograd.grad(theirs, inputs, g), strict=True
    ):
        torch.testing.assert_close(o, t)


@pytest.mark.parametrize("grad", [True, False])
def test_attention_gate_fast_equals_reference(grad):
    ref = AttentionGate(6, 10, 6, impl="reference").double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=_gen(p.numel()), dtype=torch.float64) * 0.5)
    fast = copy.deepcopy(ref)
    fast.impl = "fast"
    x = torch.randn(2, 6, 12, 16, generator=_gen(14), dtype=torch.float64)
    gate = torch.randn(2, 10, 6, 8, generator=_gen(15), dtype=torch.float64)
    if not grad:
        with torch.no_grad():
            torch.testing.assert_close(fast(x, gate), ref(x, gate))
        return
    outs = []
    for m in (ref, fast):
        xs = [x.clone().requires_grad_(), gate.clone().requires_grad_()]
        out = m(*xs)
        go = torch.randn(out.shape, generator=_gen(16), dtype=torch.float64)
        outs.append((out, torch.autograd.grad(out, [*xs, *m.parameters()], go)))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    for o, t in zip(outs[1][1], outs[0][1], strict=True):
        torch.testing.assert_close(o, t)


def test_attention_gate_rejects_mismatched_sizes():
    gate = AttentionGate(4, 8, 4)
    with pytest.raises(ValueError, match="attention gate: skip is"):
        gate(torch.randn(1, 4, 10, 10), torch.randn(1, 8, 4, 4))


@pytest.mark.parametrize("act", ["none", "relu", "prelu"])  # every activation the models use
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("autocast", [False, True])  # a bfloat16 tensor, or float32 under autocast
@pytest.mark.parametrize("channels", [None, slice(4, 8)])  # the DiCE block's 3C BatchNorm slices
def test_batch_norm_act_reduced_precision_uses_the_plain_ops(act, train, autocast, channels):
    # CPU bfloat16 stands in for CUDA AMP (CI has no GPU): the hand-written kernels are bypassed
    # and the plain ops run, with the float32 PReLU slopes cast to the activation's dtype.
    x32 = torch.randn(2, 4, 6, 6, generator=_gen(17))
    x = x32 if autocast else x32.bfloat16()
    width = 12 if channels is not None else 4
    bn = torch.nn.BatchNorm2d(width).train(train)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        bn.running_mean.copy_(torch.randn(width, generator=_gen(18)))
        bn.running_var.copy_(torch.rand(width, generator=_gen(19)) + 0.5)
        bn.weight.copy_(torch.rand(width, generator=_gen(20)) + 0.5)
        bn.bias.copy_(torch.randn(width, generator=_gen(21)))
    ref_bn, f32_bn = copy.deepcopy(bn), copy.deepcopy(bn)
    a = (torch.rand(4, generator=_gen(22)) * 0.5).requires_grad_()  # nn.PReLU slopes are float32
    slopes = a if act == "prelu" else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = batch_norm_act(x, bn, act, slopes, channels)
        ref = _plain(x, ref_bn, act, a.detach().to(x.dtype) if act == "prelu" else None, channels)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    # The same computation in float32: equal up to bfloat16 rounding, so the activation really is
    # applied (negative values scaled by the slopes for prelu, zeroed for relu, kept for none).
    expect = _plain(x32, f32_bn, act, a.detach() if act == "prelu" else None, channels)
    torch.testing.assert_close(out.float(), expect, rtol=0.02, atol=0.05)
    if act == "prelu":  # the slopes learn in reduced precision too, with a float32 gradient
        out.float().square().sum().backward()
        assert a.grad is not None and a.grad.dtype == torch.float32 and a.grad.abs().sum() > 0


def test_fused_eval_kernels_equal_the_eager_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    from kseg.model import build_model, ops
    from kseg.model.config import ModelConfig

    model = build_model(ModelConfig(nfeat=4, mid_channels=8, tile_size=32)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=_gen(p.numel()), dtype=torch.float64) * 0.5)
    x = torch.randn(2, 3, 32, 48, generator=_gen(18), dtype=torch.float64)
    monkeypatch.setitem(ops._fused, "fns", {})
    with torch.no_grad():
        ops.set_fused_eval(False)
        eager = model(x)
        ops.set_fused_eval(True)
        try:
            fused = model(x)
            assert ops._fused["enabled"], "compiling failed; the eager fallback ran"
            assert set(ops._fused["fns"]) == {"dice_mix", "gated_output"}
        finally:
            ops.set_fused_eval(False)
    torch.testing.assert_close(fused, eager, rtol=1e-12, atol=1e-12)


def test_fused_eval_falls_back_to_eager_when_compiling_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from kseg.model import ops

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(ops._fused, "fns", {"gated_output": broken})
    ops.set_fused_eval(True)
    p, t = torch.randn(2, 3, 4, 4), torch.randn(1, 3, 1, 1)
    a, g = torch.rand(3), torch.rand(2, 3, 1, 1)
    try:
        with torch.no_grad():
            out = ops.gated_output(p, a, g, t)
        assert not ops._fused["enabled"]
    finally:
        ops.set_fused_eval(False)
    torch.testing.assert_close(out, torch.relu(t + F.prelu(p, a) * g))
    assert "fused inference kernels off (no C++ compiler)" in caplog.text
