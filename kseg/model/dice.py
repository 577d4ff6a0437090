"""DiCE: dimension-wise convolution (Mehta et al., "DiCENet", TPAMI 2021), as Kidney-SegNet uses it.

A DiCE block convolves its input along the three dimensions of the C x H x W volume:

* channel-wise: a depthwise k x k conv over (H, W), one kernel per channel;
* height-wise: one k x k kernel per row h, sliding over the (C, W) plane;
* width-wise: one k x k kernel per column w, sliding over the (H, C) plane;

then fuses the three responses (BN + PReLU, channel shuffle, grouped 1x1 conv "weight_avg"),
projects them with a grouped 3x3 conv and gates the projection with an SE-style channel gate.

Two implementations of the same function share the parameters (and the original's state-dict
names, see :mod:`kseg.model.compat`):

* ``reference``: the original code line by line. The height- and width-wise convs transpose the
  tensor so that rows (columns) become channels, run a grouped conv and transpose back; the three
  responses are concatenated and shuffled. Slow: four full copies, a 3C-channel concat and grouped
  convs with hundreds of groups on a layout oneDNN has no fast kernel for.
* ``fast``: no transposes for the width-wise conv and one for the height-wise conv. For
  ``x`` contiguous in B x C x H x W, ``x.permute(0, 3, 1, 2)`` is a *channels-last* tensor of
  logical shape B x W x C x H, so the width-wise conv is an ordinary depthwise conv (groups = W)
  that oneDNN runs in its vectorised NHWC kernel, on a view, with no copy. The height-wise conv
  needs H innermost, which costs one transpose. The three branches are never concatenated: the
  3C-channel BatchNorm/PReLU is applied per branch on slices of its parameters, and the shuffle
  plus grouped 1x1 conv is a per-channel weighted sum of the three branches. In eval mode the
  BatchNorms that follow linear maps are folded into them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class _BR(nn.Module):
    """BatchNorm + PReLU (original ``BR``; state-dict names ``br.0``, ``br.1``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.br = nn.Sequential(nn.BatchNorm2d(channels), nn.PReLU(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.br(x)


class _CBR(nn.Module):
    """Conv (no bias) + BatchNorm + PReLU (original ``CBR``; names ``cbr.0/1/2``)."""

    def __init__(self, c_in: int, c_out: int, k: int, groups: int = 1) -> None:
        super().__init__()
        self.cbr = nn.Sequential(
            nn.Conv2d(c_in, c_out, k, padding=(k - 1) // 2, bias=False, groups=groups),
            nn.BatchNorm2d(c_out),
            nn.PReLU(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cbr(x)


def resize_dim(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Resizes dim 2 (rows) or 3 (columns) of ``x`` to ``size`` as the original DiCE does.

    Bilinear with ``align_corners=True`` when growing, adaptive average pooling when shrinking.
    """
    if x.shape[dim] == size:
        return x
    out_hw = (size, x.shape[3]) if dim == 2 else (x.shape[2], size)
    if x.shape[dim] < size:
        return F.interpolate(x, size=out_hw, mode="bilinear", align_corners=True)
    return F.adaptive_avg_pool2d(x, out_hw)


class DiCE(nn.Module):
    """Dimension-wise convolution block, C_in -> C_out, built for an H* x W* input.

    Args:
        c_in: Input channels C.
        c_out: Output channels.
        height: Rows H* the height-wise conv has kernels for (other sizes are resized to it).
        width: Columns W* the width-wise conv has kernels for.
        kernel_size: k of the three dimension-wise convs (1 or an odd number).
        dilation: (channel, height, width) dilation. The original's list is ordered
            [channel, width-conv, height-conv]; every Kidney-SegNet block uses equal values.
        impl: ``fast`` or ``reference`` (same parameters, same function).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        height: int,
        width: int,
        kernel_size: int = 3,
        dilation: Sequence[int] = (1, 1, 1),
        impl: str = "fast",
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"DiCE kernel_size must be odd, got {kernel_size}")
        if c_in < 4:
            raise ValueError(f"DiCE needs c_in >= 4 (its gate squeezes C -> C//4), got {c_in}")
        if impl not in ("fast", "reference"):
            raise ValueError(f"DiCE impl must be 'fast' or 'reference', got {impl!r}")
        k, (d_c, d_h, d_w) = kernel_size, tuple(dilation)
        self.c_in, self.c_out, self.height, self.width = c_in, c_out, height, width
        self.k, self.dil, self.impl = k, (d_c, d_h, d_w), impl
        pad = (k - 1) // 2
        self.conv_channel = nn.Conv2d(
            c_in, c_in, k, padding=pad * d_c, dilation=d_c, groups=c_in, bias=False
        )
        # Registered in the original's order (width before height) so state dicts list alike.
        self.conv_width = nn.Conv2d(
            width, width, k, padding=pad * d_w, dilation=d_w, groups=width, bias=False
        )
        self.conv_height = nn.Conv2d(
            height, height, k, padding=pad * d_h, dilation=d_h, groups=height, bias=False
        )
        self.br_act = _BR(3 * c_in)
        self.weight_avg_layer = _CBR(3 * c_in, c_in, 1, groups=c_in)
        self.proj_layer = _CBR(c_in, c_out, 3, groups=math.gcd(c_in, c_out))
        self.linear_comb_layer = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(c_in, c_in // 4, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_in // 4, c_out, 1, bias=False),
            nn.Sigmoid(),
        )

    def extra_repr(self) -> str:  # noqa: D102
        return f"size=({self.height}, {self.width}), k={self.k}, dil={self.dil}, impl={self.impl}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dim() != 4 or x.shape[1] != self.c_in:
            raise ValueError(f"DiCE expects B x {self.c_in} x H x W, got {tuple(x.shape)}")
        if self.impl == "reference":
            return self._forward_reference(x)
        return self._forward_fast(x)

    # ------------------------------------------------------------------------------------------
    # Reference: the original forward, line by line.
    # ------------------------------------------------------------------------------------------
    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        out_c = self.conv_channel(x)
        # Height-wise: B x H* x C x W, one kernel per row over the (C, W) plane.
        xh = resize_dim(x.clone(), self.height, 2).transpose(1, 2).contiguous()
        out_h = self.conv_height(xh).transpose(1, 2).contiguous()
        out_h = resize_dim(out_h, h, 2)
        # Width-wise: B x W* x H x C, one kernel per column over the (H, C) plane.
        xw = resize_dim(x.clone(), self.width, 3).transpose(1, 3).contiguous()
        out_w = self.conv_width(xw).transpose(1, 3).contiguous()
        out_w = resize_dim(out_w, w, 3)
        y = self.br_act(torch.cat((out_c, out_h, out_w), 1))  # B x 3C x H x W
        b = y.shape[0]
        # Channel shuffle with 3 groups: [c0, h0, w0, c1, h1, w1, ...].
        y = y.view(b, 3, c, h, w).transpose(1, 2).contiguous().view(b, 3 * c, h, w)
        y = self.weight_avg_layer(y)  # B x C x H x W
        return self.proj_layer(y) * self.linear_comb_layer(y)

    # ------------------------------------------------------------------------------------------
    # Fast: same function, no concat/shuffle, transpose-free width conv, folded eval BNs.
    # ------------------------------------------------------------------------------------------
    def _dimwise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three dimension-wise responses.

        Returns:
            ``(out_c, out_h_t, out_w)``: ``out_c`` and ``out_w`` are B x C x H x W; the height-wise
            response is returned *transposed*, B x C x W x H (contiguous), because that is the
            layout the conv produces it in, and BatchNorm/PReLU are much faster on it than on
            a transposed view. The caller transposes it once, when it adds it into the sum.
        """
        _, c, h, w = x.shape
        k, (d_c, d_h, d_w) = self.k, self.dil
        pad = (k - 1) // 2
        wc, wh, ww = self.conv_channel.weight, self.conv_height.weight, self.conv_width.weight
        xh, xw = resize_dim(x, self.height, 2), resize_dim(x, self.width, 3)
        if k == 1:
            # 1x1 "convs" are per-channel / per-row / per-column scalings.
            out_c = x * wc.view(1, c, 1, 1)
            out_ht = xh.transpose(2, 3) * wh.view(1, 1, 1, self.height)  # B x C x W x H*
            out_w = xw * ww.view(1, 1, 1, self.width)
        else:
            out_c = F.conv2d(x, wc, None, 1, pad * d_c, d_c, c)
            # Height-wise: make H innermost (one copy); B x H* x C x W is then channels-last.
            xt = xh.transpose(2, 3).contiguous().permute(0, 3, 1, 2)  # B x H* x C x W
            out_ht = F.conv2d(xt, wh, None, 1, pad * d_h, d_h, self.height)
            out_ht = out_ht.permute(0, 2, 3, 1)  # B x C x W x H*
            # Width-wise: B x W* x C x H is a channels-last *view* of contiguous NCHW.
            # The kernel's axes are (H, C) in the original; here the plane is (C, H).
            xv = xw.permute(0, 3, 1, 2)  # B x W* x C x H
            out_w = F.conv2d(xv, ww.transpose(2, 3), None, 1, pad * d_w, d_w, self.width)
            out_w = out_w.permute(0, 2, 3, 1)  # B x C x H x W*
        return out_c, resize_dim(out_ht, h, 3), resize_dim(out_w, w, 3)

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        c = self.c_in
        bn3, pr3 = self.br_act.br[0], self.br_act.br[1]
        wa_conv, wa_bn, wa_pr = self.weight_avg_layer.cbr
        pj_conv, pj_bn, pj_pr = self.proj_layer.cbr
        out_c, out_ht, out_w = self._dimwise(x)
        wa = wa_conv.weight.view(c, 3)  # weight of branch j for channel i (after the shuffle)
        y = None
        for j, z in enumerate((out_c, out_ht, out_w)):
            sl = slice(j * c, (j + 1) * c)
            z = prelu(_batch_norm_slice(z, bn3, sl, self.training), pr3.weight[sl])
            if j == 1:
                z = z.transpose(2, 3)  # back to B x C x H x W (the one strided pass)
            y = (
                z * wa[:, j].view(1, c, 1, 1)
                if y is None
                else y.addcmul_(z, wa[:, j].view(1, c, 1, 1))
            )
        y = prelu(_bn(y, wa_bn, self.training), wa_pr.weight)
        gate = self.linear_comb_layer(y)  # B x C_out x 1 x 1
        if self.training:
            p = pj_bn(F.conv2d(y, pj_conv.weight, None, 1, 1, 1, pj_conv.groups))
        else:
            # Fold the eval BatchNorm into the projection conv: one pass instead of two.
            scale = pj_bn.weight * torch.rsqrt(pj_bn.running_var + pj_bn.eps)
            bias = pj_bn.bias - pj_bn.running_mean * scale
            wt = pj_conv.weight * scale.view(-1, 1, 1, 1)
            p = F.conv2d(y, wt, bias, 1, 1, 1, pj_conv.groups)
        return prelu(p, pj_pr.weight) * gate


class _PReLUFn(torch.autograd.Function):
    """PReLU with a faster CPU backward than ATen's ``_prelu_kernel_backward``.

    ATen's backward of a per-channel PReLU materialises a per-element weight gradient and is the
    single most expensive op of a DiCE block's backward (about 5x a plain elementwise pass). Here:
    ``gx = lerp(a*g, g, 1-a)`` restricted to x > 0 via ``threshold_backward`` (two passes), and
    ``ga[c] = sum g * min(x, 0)`` as a dot product per (batch, channel) row.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a)
        return torch._prelu_kernel(x, a.view(1, -1, *([1] * (x.dim() - 2))))

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, a = ctx.saved_tensors
        av = a.view(1, -1, *([1] * (x.dim() - 2)))
        pos = torch.ops.aten.threshold_backward(g, x, 0.0)  # g where x > 0, else 0
        gx = torch.lerp(g, pos, 1.0 - av)  # a*g + (1-a)*pos
        neg = x.clamp(max=0.0)
        b, ch = x.shape[0], x.shape[1]
        ga = torch.linalg.vecdot(g.reshape(b, ch, -1), neg.reshape(b, ch, -1)).sum(0)
        return gx, ga


def prelu(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Per-channel PReLU (channel = dim 1), same values and gradients as ``F.prelu``."""
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad):
        return _PReLUFn.apply(x, a)
    return F.prelu(x, a)


def _bn(x: torch.Tensor, bn: nn.BatchNorm2d, training: bool) -> torch.Tensor:
    """``bn(x)`` for a 4-D tensor, through the module so that its bookkeeping is kept."""
    return (
        bn(x)
        if training
        else F.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
    )


def _batch_norm_slice(
    x: torch.Tensor, bn: nn.BatchNorm2d, sl: slice, training: bool
) -> torch.Tensor:
    """Applies channels ``sl`` of a wider BatchNorm to ``x`` (running stats updated in place).

    The original normalises the concatenated 3C-channel tensor; BatchNorm is per channel, so
    normalising each C-channel branch with its slice of the parameters is the same function.
    ``num_batches_tracked`` is advanced once per forward by the caller's first slice.
    """
    rm = bn.running_mean[sl] if bn.running_mean is not None else None
    rv = bn.running_var[sl] if bn.running_var is not None else None
    use_batch = training or rm is None
    if training and bn.track_running_stats and sl.start == 0:
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 0.0
    return F.batch_norm(
        x, rm, rv, bn.weight[sl], bn.bias[sl], use_batch, momentum if training else 0.0, bn.eps
    )
