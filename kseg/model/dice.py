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
* ``fast``: no transposes. For ``x`` contiguous in B x C x H x W, ``x.permute(0, 3, 1, 2)`` is a
  *channels-last* tensor of logical shape B x W x C x H, so the width-wise conv is an ordinary
  depthwise conv (groups = W) that oneDNN runs in its vectorised NHWC kernel, on a view, with no
  copy. The height-wise conv reads a B x H x C x W copy (whole rows move, cheap) and its response
  stays in that layout: BatchNorm/PReLU treat it as the (B*H) x C x W tensor it is in memory.
  The three branches are never concatenated: the 3C-channel BatchNorm/PReLU is applied per branch
  on slices of its parameters, and the shuffle plus grouped 1x1 conv is a per-channel weighted
  sum of the three branches. Train-mode BatchNorm(+PReLU) is :func:`kseg.model.ops.batch_norm_act`;
  in eval mode the BatchNorms that follow linear maps are folded into them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kseg.model.ops import (
    batch_norm_act,
    bn_affine,
    cpu_kernels,
    dice_mix,
    exporting,
    fused_eval_active,
    gated_output,
    grouped_conv3x3,
    prelu,
)
from kseg.model.ops import col as _col
from kseg.model.stencil import dice_eval_compiled


class FoldedDiCE(NamedTuple):
    """A DiCE block's eval-mode parameters, every BatchNorm that follows a linear map folded."""

    wc: torch.Tensor  # C x 1 x k x k: channel-wise kernels, that branch's BN scale folded in
    s3: torch.Tensor  # 3C: scale of the three branches' BN (channel, height, width)
    t3: torch.Tensor  # 3C: its shift (the channel branch's is the channel conv's bias)
    wa: torch.Tensor  # C x 3: 3 -> 1 fusion weights, its BN scale folded in
    t_wa: torch.Tensor  # C: the fusion BN's shift
    a3: torch.Tensor  # 3C: PReLU slopes of the three branches
    a_wa: torch.Tensor  # C: the fusion's PReLU
    wp: torch.Tensor  # C_out x C/groups x 3 x 3: projection, its BN scale folded in
    bp: torch.Tensor  # C_out: the projection BN's shift (the conv's bias)
    a_p: torch.Tensor  # C_out: the projection's PReLU


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


class _SharedKernelConv(nn.Conv2d):
    """A 1 -> 1 channel k x k conv applied to every channel of its input (depthwise, one kernel).

    The shared height-/width-wise conv of :class:`DiCE`: its input's channels are the rows (or
    columns) of the block's input, and each of them is convolved with the same kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        w = self.weight.expand(n, 1, *self.kernel_size)
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, n)


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
        shared_dim_kernels: One height-wise and one width-wise kernel shared by every row and
            column instead of one per row / column (the original). The block is then
            translation-equivariant and size-agnostic (no resizing to H* x W*), like an ordinary
            conv; ``height`` and ``width`` are ignored (see ``model.dice_dim_kernels``).
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
        shared_dim_kernels: bool = False,
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
        self.shared = shared_dim_kernels
        conv = _SharedKernelConv if shared_dim_kernels else nn.Conv2d
        n_w, n_h = (1, 1) if shared_dim_kernels else (width, height)
        pad = (k - 1) // 2
        self.conv_channel = nn.Conv2d(
            c_in, c_in, k, padding=pad * d_c, dilation=d_c, groups=c_in, bias=False
        )
        # Registered in the original's order (width before height) so state dicts list alike.
        self.conv_width = conv(n_w, n_w, k, padding=pad * d_w, dilation=d_w, groups=n_w, bias=False)
        self.conv_height = conv(
            n_h, n_h, k, padding=pad * d_h, dilation=d_h, groups=n_h, bias=False
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
        size = "shared" if self.shared else f"({self.height}, {self.width})"
        return f"size={size}, k={self.k}, dil={self.dil}, impl={self.impl}"

    def _dim_size(self, x: torch.Tensor, dim: int) -> int:
        """Rows (dim 2) or columns (dim 3) the dimension-wise conv runs on.

        The built size, or the input's own with shared kernels (no resizing).
        """
        if self.shared:
            return x.shape[dim]
        return self.height if dim == 2 else self.width

    def _dim_weight(self, conv: nn.Conv2d, n: int) -> torch.Tensor:
        """``n x 1 x k x k`` kernels of a dimension-wise conv (a shared kernel is broadcast)."""
        w = conv.weight
        return w.expand(n, 1, self.k, self.k) if self.shared else w

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
        n_h, n_w = self._dim_size(x, 2), self._dim_size(x, 3)
        xh = resize_dim(x.clone(), n_h, 2).transpose(1, 2).contiguous()
        out_h = resize_dim(self.conv_height(xh).transpose(1, 2).contiguous(), h, 2)
        # Width-wise: B x W* x H x C, one kernel per column over the (H, C) plane.
        xw = resize_dim(x.clone(), n_w, 3).transpose(1, 3).contiguous()
        out_w = resize_dim(self.conv_width(xw).transpose(1, 3).contiguous(), w, 3)
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

    def _conv_h_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Height-wise response as a B x C x H x W *view* of a contiguous B x H x C x W tensor.

        The copy to B x H x C x W moves whole rows (4 ms at 2 x 32 x 512^2, a transpose that
        puts H innermost takes 19 ms), and elementwise ops between this view and contiguous NCHW
        tensors keep W innermost on both sides (an add through a transposed view costs ~4x).
        """
        n = self._dim_size(x, 2)
        xh, wh, d_h = resize_dim(x, n, 2), self._dim_weight(self.conv_height, n), self.dil[1]
        if self.k == 1:
            out = xh.permute(0, 2, 1, 3) * wh.reshape(1, n, 1, 1)  # B x H* x C x W
        else:
            pad = (self.k - 1) // 2 * d_h
            xp = xh.permute(0, 2, 1, 3).contiguous()  # B x H* x C x W
            if self.shared and exporting():
                out = _shared_kernel_conv(xp, self.conv_height.weight, pad, d_h)
            else:
                out = F.conv2d(xp, wh, None, 1, pad, d_h, n)
        return resize_dim(out.permute(0, 2, 1, 3), x.shape[2], 2)

    def _conv_w(self, x: torch.Tensor) -> torch.Tensor:
        """Width-wise response, B x C x H x W, without a transpose (channels-last view)."""
        n = self._dim_size(x, 3)
        xw, ww, d_w = resize_dim(x, n, 3), self._dim_weight(self.conv_width, n), self.dil[2]
        if self.k == 1:
            out_w = xw * ww.reshape(1, 1, 1, n)
        else:
            # B x W* x C x H is a channels-last *view* of contiguous NCHW. The kernel's axes are
            # (H, C) in the original; here the plane is (C, H), hence the transposed kernel.
            xv = xw.permute(0, 3, 1, 2)
            if not cpu_kernels(x):
                # The view is a oneDNN trick (its NHWC depthwise kernel); elsewhere (CUDA,
                # autocast) the conv gets an ordinary contiguous input, as the reference's.
                xv = xv.contiguous()
            pad = (self.k - 1) // 2 * d_w
            if self.shared and exporting():
                out_w = _shared_kernel_conv(xv, self.conv_width.weight.transpose(2, 3), pad, d_w)
            else:
                out_w = F.conv2d(xv, ww.transpose(2, 3), None, 1, pad, d_w, n)
            out_w = out_w.permute(0, 2, 3, 1)  # B x C x H x W*
        return resize_dim(out_w, x.shape[3], 3)

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._forward_eval(x)
        c = self.c_in
        bn3, pr3 = self.br_act.br[0], self.br_act.br[1]
        wa_conv, wa_bn, wa_pr = self.weight_avg_layer.cbr
        pj_conv, pj_bn, pj_pr = self.proj_layer.cbr
        branches = (
            self._conv_c(x, self.conv_channel.weight),
            self._conv_h_rows(x),
            self._conv_w(x),
        )
        wa = wa_conv.weight.view(c, 3)  # weight of branch j for channel i (after the shuffle)
        y = None
        for j, z in enumerate(branches):
            sl = slice(j * c, (j + 1) * c)
            z = _bn_prelu_any_layout(z, bn3, pr3.weight[sl], sl)
            wj = _col(wa[:, j]).to(z.dtype)  # keeps a half-precision (AMP) branch in its dtype
            y = z * wj if y is None else y.addcmul_(z, wj)
        y = batch_norm_act(y, wa_bn, "prelu", wa_pr.weight)
        gate = self.linear_comb_layer(y)  # B x C_out x 1 x 1
        p = grouped_conv3x3(y, pj_conv.weight, None, pj_conv.groups)
        return batch_norm_act(p, pj_bn, "prelu", pj_pr.weight) * gate

    def _forward_eval(self, x: torch.Tensor, post_bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
        """Eval-mode forward with every BatchNorm folded into a linear map or a scale/shift.

        The channel branch's BN goes into its depthwise kernel and bias; the height/width
        branches' BNs act on a spatial axis of their convs, so they become one ``addcmul`` each;
        the fusion BN scales the 3 -> 1 weights; the projection BN goes into its conv; an external
        ``post_bn`` (+ ReLU) scales the SE gate. Differentiable, so gradients in eval mode agree.
        """
        if fused_eval_active(x) and (out := dice_eval_compiled(self, x, post_bn)) is not None:
            return out  # two compiled stencil loops (opt-in, see kseg.model.stencil)
        c = self.c_in
        f = self.folded_eval()
        s3, t3, wa, t_wa, a3 = f.s3, f.t3, f.wa, f.t_wa, f.a3
        # y = t_wa + sum_j wa_j * prelu(s_j * z_j + t_j)   (B x C x H x W)
        fused = fused_eval_active(x)  # compiling may have failed above
        if fused:  # the same chain as compiled kernels (opt-in, see kseg.model.ops)
            y = dice_mix(
                self._conv_c(x, f.wc, t3[:c]),
                self._conv_w(x),
                self._conv_h_rows(x),
                _col(s3[2 * c :]),
                _col(t3[2 * c :]),
                _col(s3[c : 2 * c]),
                _col(t3[c : 2 * c]),
                wa.t().reshape(3, 1, c, 1, 1),
                _col(t_wa),
                a3,
                f.a_wa,
            )
        else:
            z = prelu(self._conv_c(x, f.wc, t3[:c]), a3[:c])
            y = torch.addcmul(_col(t_wa), z, _col(wa[:, 0]))
            z = torch.addcmul(_col(t3[2 * c :]), self._conv_w(x), _col(s3[2 * c :]))
            y.addcmul_(prelu(z, a3[2 * c :]), _col(wa[:, 2]))
            z = torch.addcmul(_col(t3[c : 2 * c]), self._conv_h_rows(x), _col(s3[c : 2 * c]))
            y.addcmul_(prelu(z, a3[c : 2 * c]), _col(wa[:, 1]))
            y = prelu(y, f.a_wa)
        gate = self.linear_comb_layer(y)  # B x C_out x 1 x 1
        p = grouped_conv3x3(y, f.wp, f.bp, self.proj_layer.cbr[0].groups)
        if post_bn is None:
            return prelu(p, f.a_p) * gate
        s, t = bn_affine(post_bn)
        if fused:
            return gated_output(p, f.a_p, gate * _col(s), _col(t))
        return torch.addcmul(_col(t), prelu(p, f.a_p), gate * _col(s)).relu_()

    def folded_eval(self) -> FoldedDiCE:
        """The block's eval-mode parameters with its BatchNorms folded (eager and compiled use)."""
        c = self.c_in
        bn3, pr3 = self.br_act.br[0], self.br_act.br[1]
        wa_conv, wa_bn, wa_pr = self.weight_avg_layer.cbr
        pj_conv, pj_bn, pj_pr = self.proj_layer.cbr
        s3, t3 = bn_affine(bn3)  # 3C
        s_wa, t_wa = bn_affine(wa_bn)
        s_pj, t_pj = bn_affine(pj_bn)
        return FoldedDiCE(
            wc=self.conv_channel.weight * s3[:c].view(c, 1, 1, 1),
            s3=s3,
            t3=t3,
            wa=wa_conv.weight.view(c, 3) * s_wa.view(c, 1),
            t_wa=t_wa,
            a3=pr3.weight,
            a_wa=wa_pr.weight,
            wp=pj_conv.weight * s_pj.view(-1, 1, 1, 1),
            bp=t_pj,
            a_p=pj_pr.weight,
        )

    def forward_bn_relu(self, x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        """``relu(bn(self(x)))``; in eval mode the fast path folds ``bn`` into the gate."""
        if self.impl == "fast" and not self.training and not bn.training:
            if x.dim() != 4 or x.shape[1] != self.c_in:
                raise ValueError(f"DiCE expects B x {self.c_in} x H x W, got {tuple(x.shape)}")
            return self._forward_eval(x, bn)
        if self.impl == "fast":
            return batch_norm_act(self(x), bn, "relu")
        return F.relu(bn(self(x)), inplace=True)


def _shared_kernel_conv(x: torch.Tensor, weight: torch.Tensor, pad: int, dil: int) -> torch.Tensor:
    """``B x N x P x Q`` convolved per channel with one shared ``1 x 1 x k x k`` kernel.

    The same function as the depthwise conv with ``groups = N`` and the kernel broadcast, but
    written with the N channels folded into the batch: an exported graph needs a constant
    ``group``, and N (rows or columns of the input) is a dynamic size there. Used only when
    exporting; eager torch keeps the depthwise form, which oneDNN runs 3x faster (0.06 s vs
    0.19 s for 512 rows of 32 x 512, 2 threads).
    """
    b, n, p, q = x.shape
    out = F.conv2d(x.reshape(b * n, 1, p, q), weight, None, 1, pad, dil)
    return out.view(b, n, out.shape[2], out.shape[3])


def _bn_prelu_any_layout(
    z: torch.Tensor, bn: nn.BatchNorm2d, a: torch.Tensor, sl: slice
) -> torch.Tensor:
    """``prelu(bn(z))`` with channels ``sl`` of ``bn``; a rows-layout ``z`` stays in its layout.

    ``z`` is B x C x H x W, either contiguous or a view of a contiguous B x H x C x W tensor
    (the height-wise branch). The latter is normalised as the (B*H) x C x W tensor it is in
    memory: same per-channel statistics, no copy.
    """
    b, c, h, w = z.shape
    rows = z.permute(0, 2, 1, 3)
    if z.is_contiguous() or not rows.is_contiguous():
        return batch_norm_act(z, bn, "prelu", a, sl)
    out = batch_norm_act(rows.view(b * h, c, w), bn, "prelu", a, sl)
    return out.view(b, h, c, w).permute(0, 2, 1, 3)
