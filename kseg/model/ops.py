"""Eager CPU ops for the fast path: same values and gradients as the plain PyTorch ops they replace.

Each exists because the plain op is several times slower than a memory pass on CPU for the
B x C x H x W activations of a 512x512 tile (measured at 2 x 32 x 512 x 512 float32, 64 MiB,
where one elementwise pass costs about 4 ms):

* :func:`batch_norm_act`: train-mode BatchNorm (+ ReLU or PReLU). ATen's CPU forward takes 17.7 ms;
  statistics from per-row ``sum`` and ``vector_norm`` (two fused reductions, 3.5 ms) and one
  ``addcmul`` apply take 8 ms; the activation is applied in the same autograd node, so only the
  BN input and the pre-activation are saved. Backward is ATen's ``native_batch_norm_backward``.
* :func:`prelu`: ATen's PReLU backward (45 ms) materialises a per-element weight gradient.
* :func:`grouped_conv3x3`: oneDNN's grouped kernel for 2 inputs per group is about 3x slower than
  a depthwise conv plus a pairwise sum.
* :func:`conv1x1`: a 1x1 conv with one input or one output channel is a rank-1 update or a
  matrix-vector product (oneDNN: 8.9 ms for 32 -> 1 channels; ``matmul``: 2.3 ms).

They are used only where they were measured to be faster: on CPU, in float32 (or float64), outside
autocast (:func:`cpu_kernels`). On CUDA, and under autocast on any device (reduced precision), each
falls back to the plain PyTorch op it replaces (cuDNN / cuBLAS kernels, autocast's dtype rules).

The default path stays with eager ATen ops so that it runs wherever PyTorch runs, without a
compiler (``torch.compile`` of a whole DiCE block *as written for eager mode* was slower than this
code on CPU). Inference can opt in to compiled kernels (:func:`set_fused_eval`, :func:`fused_eval`,
:func:`run_compiled`): the DiCE block rewritten as stencils (:mod:`kseg.model.stencil`), which
inductor compiles into two loops, is about twice as fast as the eager block.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Above this mean^2 / variance ratio, E[x^2] - E[x]^2 in float32 loses more than ~1e-5 of the
# variance to cancellation, and the variance is recomputed from centred values (one more pass).
_CANCELLATION_RATIO = 100.0


def cpu_kernels(x: torch.Tensor) -> bool:
    """Whether the hand-written CPU kernels of this module are used for ``x``.

    True for a float32/float64 tensor on the CPU outside autocast: the case they were written and
    measured for. Everywhere else (CUDA, half/bfloat16, autocast) the plain PyTorch ops are used,
    which also follow autocast's casting rules (the hand-written PReLU does not).
    """
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
    )


def exporting() -> bool:
    """Whether the forward is being traced for ``kseg export`` (torch.export, ONNX or jit trace).

    Some eager speed-ups (in-place ``out=`` ops, a depthwise conv whose ``groups`` is a size of
    the input) have no exportable form; the exported graph gets the plain equivalent instead.
    """
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def col(v: torch.Tensor, ndim: int = 4) -> torch.Tensor:
    """A per-channel vector as 1 x C x 1 (x 1), for broadcasting over B x C x ...."""
    return v.view(1, -1, *([1] * (ndim - 2)))


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` of an eval-mode BatchNorm: ``bn(x) = scale * x + shift``."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.weight is not None:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return scale, shift


def grouped_conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1, groups=groups)``, faster when groups narrow C.

    When each group maps r > 1 input channels to one output (a decoder block's 2C -> C
    projection), oneDNN's grouped kernel is about 3x slower than a depthwise conv over all
    C_in channels followed by a sum over the r channels of each group (same function).
    """
    c_in, c_out = x.shape[1], weight.shape[0]
    r = c_in // groups
    if r == 1 or c_out != groups or x.dim() != 4 or not cpu_kernels(x):
        return F.conv2d(x, weight, bias, 1, 1, 1, groups)
    kh, kw = weight.shape[-2:]
    if bias is not None:  # carried by the first channel of each group: the sum adds it once
        bias = torch.cat((bias.view(-1, 1), bias.new_zeros(c_out, r - 1)), 1).view(-1)
    out = F.conv2d(x, weight.reshape(c_in, 1, kh, kw), bias, 1, 1, 1, c_in)
    b, _, h, w = out.shape
    return out.view(b, c_out, r, h, w).sum(2)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 kernel; one pass when C_in or C_out is 1.

    Args:
        x: B x C_in x H x W.
        weight: C_out x C_in x 1 x 1.
        bias: C_out or None.
    """
    c_out, c_in = weight.shape[:2]
    if (
        x.dim() != 4
        or weight.shape[2:] != (1, 1)
        or (c_in != 1 and c_out != 1)
        or not cpu_kernels(x)
    ):
        return F.conv2d(x, weight, bias)
    if c_in == 1:  # rank-1: out[b, o] = w[o] * x[b, 0] + bias[o]
        if bias is None:
            return x * col(weight.view(c_out))
        return torch.addcmul(col(bias), x, col(weight.view(c_out)))
    b, _, h, w = x.shape
    # 1 x C_in times B x C_in x HW: a matrix-vector product per image.
    out = torch.matmul(weight.view(1, c_in), x.reshape(b, c_in, h * w)).view(b, 1, h, w)
    return out if bias is None else out + bias.view(1, 1, 1, 1)


def _prelu_grads(
    g: torch.Tensor, u: torch.Tensor, a: torch.Tensor, need_a: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of ``prelu(u, a)`` (per-channel ``a``, channel = dim 1) for upstream ``g``.

    ``gu = lerp(a*g, g, [u > 0])`` via ``threshold_backward`` (two passes), and
    ``ga[c] = sum g * min(u, 0)`` as a dot product per (batch, channel) row.
    """
    av = col(a, u.dim())
    pos = torch.ops.aten.threshold_backward(g, u, 0.0)  # g where u > 0, else 0
    gu = torch.lerp(g, pos, 1.0 - av)  # a*g + (1-a)*pos
    ga = None
    if need_a:
        b, ch = u.shape[0], u.shape[1]
        neg = u.clamp(max=0.0)
        ga = torch.linalg.vecdot(g.reshape(b, ch, -1), neg.reshape(b, ch, -1)).sum(0)
    return gu, ga


class _PReLUFn(torch.autograd.Function):
    """PReLU with a faster CPU backward than ATen's ``_prelu_kernel_backward`` (45 ms vs 22 ms)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a)
        return torch._prelu_kernel(x, col(a, x.dim()))

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, a = ctx.saved_tensors
        return _prelu_grads(g.contiguous(), x, a, ctx.needs_input_grad[1])


def prelu(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-channel PReLU (channel = dim 1), same values and gradients as ``F.prelu``.

    Off the CPU float32 path (:func:`cpu_kernels`) this is ``F.prelu`` with the slopes cast to
    ``x``'s dtype (autocast leaves PReLU's inputs as they are, so a half-precision activation
    would otherwise meet float32 slopes); the cast is differentiable, the slopes' gradient comes
    back in their own dtype.
    """
    if not cpu_kernels(x) or x.dtype != a.dtype:
        return F.prelu(x, a.to(x.dtype))
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad):
        return _PReLUFn.apply(x, a)
    return F.prelu(x, a)


def _batch_stats(
    x: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-channel mean, biased variance, ``1/sqrt(var + eps)`` (float64) of B x C x ....

    Per-(batch, channel) row sums and norms are float32 cascade sums, combined in float64. When
    the mean dwarfs the spread, the variance is recomputed from ``x - mean``, which is returned
    (as the fourth value, else None) so that the normalisation is applied to it as well: ``x *
    scale + shift`` would lose the small differences to rounding at the magnitude of ``x``.
    """
    b, c = x.shape[:2]
    rows = x.reshape(b, c, -1)
    n = rows.shape[0] * rows.shape[2]
    mean = rows.sum(-1).double().sum(0) / n
    var = torch.linalg.vector_norm(rows, dim=-1).double().square().sum(0) / n - mean.square()
    var = var.clamp_min(0.0)
    centred = None
    if bool((mean.square() > _CANCELLATION_RATIO * var).any()):
        # Two-pass mean: the float32 sums of large values are off by more than the spread here,
        # so the mean is refined with the (accurate) mean of x - mean.
        m32 = mean.to(x.dtype)
        centred = x - col(m32, x.dim())
        cr = centred.reshape(b, c, -1)
        corr = cr.sum(-1).double().sum(0) / n
        mean = m32.double() + corr
        centred.sub_(col(corr.to(x.dtype), x.dim()))
        var = torch.linalg.vector_norm(cr, dim=-1).double().square().sum(0) / n
    return mean, var, torch.rsqrt(var + eps), centred


class _BatchNormActFn(torch.autograd.Function):
    """Train-mode BatchNorm with batch statistics, then ``none``, ``relu`` or ``prelu``."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        a: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        eps: float,
        act: str,
    ) -> torch.Tensor:
        x = x.contiguous()
        mean, var, invstd, centred = _batch_stats(x, eps)
        n = x.numel() // x.shape[1]
        if running_mean is not None and running_var is not None:
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var * (n / max(n - 1, 1))
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        scale = invstd if weight is None else invstd * weight.double()
        shift = -mean * scale if bias is None else bias.double() - mean * scale
        if centred is None:
            u = torch.addcmul(col(shift.to(x.dtype), x.dim()), x, col(scale.to(x.dtype), x.dim()))
        else:
            shift = torch.zeros_like(mean) if bias is None else bias.double()
            u = centred.mul_(col(scale.to(x.dtype), x.dim())).add_(col(shift.to(x.dtype), x.dim()))
        mean, invstd = mean.to(x.dtype), invstd.to(x.dtype)
        ctx.act, ctx.eps = act, eps
        if act == "relu":
            out = u.relu_()
            ctx.save_for_backward(x, weight, mean, invstd, out, None)
        elif act == "prelu":
            out = torch._prelu_kernel(u, col(a, x.dim()))
            ctx.save_for_backward(x, weight, mean, invstd, u, a)
        else:
            out = u
            ctx.save_for_backward(x, weight, mean, invstd, None, None)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, mean, invstd, u, a = ctx.saved_tensors
        g = g.contiguous()
        ga = None
        if ctx.act == "relu":
            g = torch.ops.aten.threshold_backward(g, u, 0.0)  # u is the ReLU output here
        elif ctx.act == "prelu":
            g, ga = _prelu_grads(g, u, a, ctx.needs_input_grad[3])
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, None, None, mean, invstd, True, ctx.eps, mask
        )
        return gx, gw, gb, ga, None, None, None, None, None


def batch_norm_act(
    x: torch.Tensor,
    bn: nn.modules.batchnorm._BatchNorm,
    act: str = "none",
    prelu_weight: torch.Tensor | None = None,
    channels: slice | None = None,
) -> torch.Tensor:
    """``act(bn(x))`` with ``act`` in ``none``, ``relu``, ``prelu``; same values and gradients.

    Args:
        x: B x C x ... (any number of trailing dims; channel = dim 1).
        bn: The BatchNorm whose parameters, statistics and mode are used.
        act: Activation applied after the BatchNorm.
        prelu_weight: Per-channel PReLU slopes (C), for ``act="prelu"``.
        channels: Use only these channels of a wider ``bn`` (its running statistics are updated
            in place through the slice). ``num_batches_tracked`` advances once per forward, on
            the slice that starts at channel 0.
    """
    if act not in ("none", "relu", "prelu"):
        raise ValueError(f"batch_norm_act: act must be none, relu or prelu, got {act!r}")
    sl = channels if channels is not None else slice(None)
    weight = bn.weight[sl] if bn.weight is not None else None
    bias = bn.bias[sl] if bn.bias is not None else None
    rm = bn.running_mean[sl] if bn.running_mean is not None else None
    rv = bn.running_var[sl] if bn.running_var is not None else None
    use_batch_stats = bn.training or rm is None
    if not use_batch_stats:
        return _activate(
            F.batch_norm(x, rm, rv, weight, bias, False, 0.0, bn.eps), act, prelu_weight
        )
    if bn.training and x.numel() <= x.shape[1]:
        raise ValueError(
            f"BatchNorm needs more than 1 value per channel when training, got {tuple(x.shape)}"
        )
    if bn.training and bn.track_running_stats and (sl.start or 0) == 0:
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 0.0
    if bn.momentum is None and bn.training and bn.track_running_stats:
        momentum = 1.0 / float(bn.num_batches_tracked)  # cumulative average, as nn.BatchNorm
    if not bn.training:  # no running stats and eval mode: batch statistics, nothing updated
        rm = rv = None
    if cpu_kernels(x):
        return _BatchNormActFn.apply(x, weight, bias, prelu_weight, rm, rv, momentum, bn.eps, act)
    # GPU (cuDNN's fused BatchNorm is fast) and reduced precision (AMP): the plain ops.
    out = F.batch_norm(x, rm, rv, weight, bias, True, momentum, bn.eps)
    return _activate(out, act, prelu_weight)


def _activate(x: torch.Tensor, act: str, a: torch.Tensor | None) -> torch.Tensor:
    if act == "relu":
        return F.relu(x, inplace=True)
    return prelu(x, a) if act == "prelu" else x


# --------------------------------------------------------------------------------------------------
# Opt-in fused inference kernels (torch.compile)
# --------------------------------------------------------------------------------------------------
_fused = {"enabled": os.environ.get("KSEG_FUSED_EVAL", "") == "1", "fns": {}}


def set_fused_eval(enabled: bool) -> None:
    """Turns the torch.compile-fused inference kernels of the DiCE block on or off (process-wide).

    Off by default (``KSEG_FUSED_EVAL=1`` turns it on): the first call per process compiles for
    about 5 s with the system C++ compiler (cached on disk by inductor afterwards), which costs
    more than it saves for a few tiles. If compiling fails, the eager ops are used, with a warning.
    """
    _fused["enabled"] = bool(enabled)


@contextlib.contextmanager
def fused_eval(enabled: bool) -> Iterator[None]:
    """:func:`set_fused_eval` for a block of code; the previous setting is restored after it."""
    before = _fused["enabled"]
    set_fused_eval(enabled)
    try:
        yield
    finally:
        _fused["enabled"] = before


def fused_eval_active(x: torch.Tensor) -> bool:
    """Whether :func:`dice_mix` and :func:`gated_output` run compiled for ``x`` (no autograd)."""
    return _fused["enabled"] and not torch.is_grad_enabled() and cpu_kernels(x)


def _dice_mix(
    zc: torch.Tensor,
    zw: torch.Tensor,
    zh: torch.Tensor,
    sw: torch.Tensor,
    tw: torch.Tensor,
    sh: torch.Tensor,
    th: torch.Tensor,
    w: torch.Tensor,
    t_wa: torch.Tensor,
    a3: torch.Tensor,
    a_wa: torch.Tensor,
) -> torch.Tensor:
    """``prelu(t_wa + w0 prelu(zc) + w2 prelu(sw zw + tw) + w1 prelu(sh zh + th))`` (see DiCE)."""
    c = zc.shape[1]
    y = t_wa + w[0] * F.prelu(zc, a3[:c])
    y = y + w[2] * F.prelu(zw * sw + tw, a3[2 * c :])
    y = y + w[1] * F.prelu(zh * sh + th, a3[c : 2 * c])
    return F.prelu(y, a_wa)


def _gated_output(
    p: torch.Tensor, a: torch.Tensor, g: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """``relu(t + prelu(p) * g)`` with per-(image, channel) ``g``."""
    return torch.relu(t + F.prelu(p, a) * g)


def _run_fused(name: str, fn, *args: torch.Tensor) -> torch.Tensor:
    out = run_compiled(name, fn, args, dynamic=True)
    return fn(*(a.detach() for a in args)) if out is None else out


# One compiled graph per block shape: Kidney-SegNet at 512 has 16 (dynamo's default limit is 8).
_RECOMPILE_LIMIT = 256


def run_compiled(
    name: str,
    fn,
    args: tuple[torch.Tensor, ...],
    static: dict | None = None,
    dynamic: bool = False,
) -> torch.Tensor | None:
    """``fn(*args, **static)`` compiled by ``torch.compile`` (inductor), or None if that fails.

    A failure (no C++ compiler, unsupported platform) turns the compiled kernels off for the
    process with one warning; the caller then runs its eager ops.

    Args:
        name: The kernel's name (one compiled function per name).
        fn: The function.
        args: Tensors; parameters would be compiled with static shapes and guarded as module
            state, so plain (detached) tensors are passed.
        static: Keyword arguments of ``fn`` (ints, flags) that select the graph.
        dynamic: Compile with symbolic shapes (one graph for every size) instead of one graph
            per shape (constant strides, faster loops).
    """
    import torch._dynamo  # its config (torch.compile loads it anyway)

    compiled = _fused["fns"].get(name)
    if compiled is None:
        compiled = _fused["fns"][name] = torch.compile(fn, dynamic=dynamic)
    args = tuple(a.detach() for a in args)
    try:
        with torch._dynamo.config.patch(
            recompile_limit=_RECOMPILE_LIMIT, accumulated_recompile_limit=_RECOMPILE_LIMIT * 4
        ):
            return compiled(*args, **(static or {}))
    except Exception as exc:  # no compiler, unsupported platform: fall back for good
        logging.getLogger(__name__).warning(
            "fused inference kernels off (%s); using eager ops", exc
        )
        _fused["enabled"] = False
        return None


def dice_mix(*args: torch.Tensor) -> torch.Tensor:
    """The fused form of a DiCE block's eval-mode three-branch fusion (one pass instead of nine)."""
    return _run_fused("dice_mix", _dice_mix, *args)


def gated_output(*args: torch.Tensor) -> torch.Tensor:
    """The fused form of ``relu(t + prelu(p) * g)`` (one pass instead of three)."""
    return _run_fused("gated_output", _gated_output, *args)
