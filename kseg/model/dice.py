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
    def _conv_c(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """Channel-wise depthwise conv, B x C x H x W (``weight`` may carry a folded BN)."""
        c, (d_c, _, _) = self.c_in, self.dil
        if self.k == 1:  # a 1x1 depthwise conv is a per-channel scaling
            out = x * weight.view(1, c, 1, 1)
            return out if bias is None else out.add_(bias.view(1, c, 1, 1))
        return F.conv2d(x, weight, bias, 1, (self.k - 1) // 2 * d_c, d_c, c)

    def _conv_h_t(self, x: torch.Tensor) -> torch.Tensor:
        """Height-wise response *transposed*: B x C x W x H (contiguous, the conv's own layout).

        BatchNorm/PReLU are much faster on it than on a transposed view; the caller transposes
        it once, when it adds it into the sum.
        """
        xh, wh, d_h = resize_dim(x, self.height, 2), self.conv_height.weight, self.dil[1]
        if self.k == 1:
            out_ht = xh.transpose(2, 3) * wh.view(1, 1, 1, self.height)  # B x C x W x H*
        else:
            # Make H innermost (one copy); B x H* x C x W is then channels-last.
            xt = xh.transpose(2, 3).contiguous().permute(0, 3, 1, 2)  # B x H* x C x W
            pad = (self.k - 1) // 2 * d_h
            out_ht = F.conv2d(xt, wh, None, 1, pad, d_h, self.height).permute(0, 2, 3, 1)
        return resize_dim(out_ht, x.shape[2], 3)

    def _conv_h_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Height-wise response as a B x C x H x W *view* of a contiguous B x H x C x W tensor.

        For eval: the copy to B x H x C x W moves whole rows (fast), and elementwise ops between
        this view and contiguous NCHW tensors keep W innermost on both sides, unlike the
        transposed layout of :meth:`_conv_h_t`.
        """
        xh, wh, d_h = resize_dim(x, self.height, 2), self.conv_height.weight, self.dil[1]
        if self.k == 1:
            out = xh.permute(0, 2, 1, 3) * wh.view(1, self.height, 1, 1)  # B x H* x C x W
        else:
            pad = (self.k - 1) // 2 * d_h
            xp = xh.permute(0, 2, 1, 3).contiguous()  # B x H* x C x W
            out = F.conv2d(xp, wh, None, 1, pad, d_h, self.height)
        return resize_dim(out.permute(0, 2, 1, 3), x.shape[2], 2)

    def _conv_w(self, x: torch.Tensor) -> torch.Tensor:
        """Width-wise response, B x C x H x W, without a transpose (channels-last view)."""
        xw, ww, d_w = resize_dim(x, self.width, 3), self.conv_width.weight, self.dil[2]
        if self.k == 1:
            out_w = xw * ww.view(1, 1, 1, self.width)
        else:
            # B x W* x C x H is a channels-last *view* of contiguous NCHW. The kernel's axes are
            # (H, C) in the original; here the plane is (C, H), hence the transposed kernel.
            xv = xw.permute(0, 3, 1, 2)
            pad = (self.k - 1) // 2 * d_w
            out_w = F.conv2d(xv, ww.transpose(2, 3), None, 1, pad, d_w, self.width)
            out_w = out_w.permute(0, 2, 3, 1)  # B x C x H x W*
        return resize_dim(out_w, x.shape[3], 3)

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._forward_eval(x)
        c = self.c_in
        bn3, pr3 = self.br_act.br[0], self.br_act.br[1]
        wa_conv, wa_bn, wa_pr = self.weight_avg_layer.cbr
        pj_conv, pj_bn, pj_pr = self.proj_layer.cbr
        branches = (self._conv_c(x, self.conv_channel.weight), self._conv_h_t(x), self._conv_w(x))
        wa = wa_conv.weight.view(c, 3)  # weight of branch j for channel i (after the shuffle)
        y = None
        for j, z in enumerate(branches):
            sl = slice(j * c, (j + 1) * c)
            z = prelu(_batch_norm_slice(z, bn3, sl, True), pr3.weight[sl])
            if j == 1:
                z = z.transpose(2, 3)  # back to B x C x H x W (the one strided pass)
            wj = wa[:, j].view(1, c, 1, 1)
            y = z * wj if y is None else y.addcmul_(z, wj)
        y = prelu(wa_bn(y), wa_pr.weight)
        gate = self.linear_comb_layer(y)  # B x C_out x 1 x 1
        p = pj_bn(grouped_conv3x3(y, pj_conv.weight, None, pj_conv.groups))
        return prelu(p, pj_pr.weight) * gate

    def _forward_eval(self, x: torch.Tensor, post_bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
        """Eval-mode forward with every BatchNorm folded into a linear map or a scale/shift.

        The channel branch's BN goes into its depthwise kernel and bias; the height/width
        branches' BNs act on a spatial axis of their convs, so they become one ``addcmul`` each;
        the fusion BN scales the 3 -> 1 weights; the projection BN goes into its conv; an external
        ``post_bn`` (+ ReLU) scales the SE gate. Differentiable, so gradients in eval mode agree.
        """
        c = self.c_in
        bn3, pr3 = self.br_act.br[0], self.br_act.br[1]
        wa_conv, wa_bn, wa_pr = self.weight_avg_layer.cbr
        pj_conv, pj_bn, pj_pr = self.proj_layer.cbr
        s3, t3 = bn_affine(bn3)  # 3C
        s_wa, t_wa = bn_affine(wa_bn)
        wa = wa_conv.weight.view(c, 3) * s_wa.view(c, 1)
        a3 = pr3.weight
        wc = self.conv_channel.weight * s3[:c].view(c, 1, 1, 1)
        # y = t_wa + sum_j wa_j * prelu(s_j * z_j + t_j)   (B x C x H x W)
        z = prelu(self._conv_c(x, wc, t3[:c]), a3[:c])
        y = torch.addcmul(_col(t_wa), z, _col(wa[:, 0]))
        z = prelu(torch.addcmul(_col(t3[2 * c :]), self._conv_w(x), _col(s3[2 * c :])), a3[2 * c :])
        y.addcmul_(z, _col(wa[:, 2]))
        z = torch.addcmul(_col(t3[c : 2 * c]), self._conv_h_rows(x), _col(s3[c : 2 * c]))
        y.addcmul_(prelu(z, a3[c : 2 * c]), _col(wa[:, 1]))
        y = prelu(y, wa_pr.weight)
        gate = self.linear_comb_layer(y)  # B x C_out x 1 x 1
        s_pj, t_pj = bn_affine(pj_bn)
        p = grouped_conv3x3(y, pj_conv.weight * s_pj.view(-1, 1, 1, 1), t_pj, pj_conv.groups)
        if post_bn is None:
            return prelu(p, pj_pr.weight) * gate
        s, t = bn_affine(post_bn)
        return torch.addcmul(_col(t), prelu(p, pj_pr.weight), gate * _col(s)).relu_()

    def forward_bn_relu(self, x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        """``relu(bn(self(x)))``; in eval mode the fast path folds ``bn`` into the gate."""
        if self.impl == "fast" and not self.training and not bn.training:
            if x.dim() != 4 or x.shape[1] != self.c_in:
                raise ValueError(f"DiCE expects B x {self.c_in} x H x W, got {tuple(x.shape)}")
            return self._forward_eval(x, bn)
        return F.relu(bn(self(x)), inplace=True)


def _col(v: torch.Tensor) -> torch.Tensor:
    """A per-channel vector as a 1 x C x 1 x 1 tensor, for broadcasting over B x C x H x W."""
    return v.view(1, -1, 1, 1)


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
    if r == 1 or c_out != groups or x.dim() != 4:
        return F.conv2d(x, weight, bias, 1, 1, 1, groups)
    kh, kw = weight.shape[-2:]
    if bias is not None:  # carried by the first channel of each group: the sum adds it once
        bias = torch.cat((bias.view(-1, 1), bias.new_zeros(c_out, r - 1)), 1).view(-1)
    out = F.conv2d(x, weight.reshape(c_in, 1, kh, kw), bias, 1, 1, 1, c_in)
    b, _, h, w = out.shape
    return out.view(b, c_out, r, h, w).sum(2)


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
