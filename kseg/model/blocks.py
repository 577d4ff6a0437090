"""Building blocks of Kidney-SegNet: DiCE pyramid pooling, attention gate, conv helpers.

Module and parameter names follow the original ``dist_dice`` code so that its state dicts load
with an identity key mapping (see :mod:`kseg.model.compat`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kseg.model.dice import DiCE
from kseg.model.ops import conv1x1, cpu_kernels


class ConvBNReLU(nn.Sequential):
    """3x3 conv (with bias, as the original's ``conv1a``) + BatchNorm + ReLU."""

    def __init__(self, c_in: int, c_out: int, bias: bool = True) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class DiCEPyramidPooling(nn.Module):
    """Atrous spatial pyramid pooling built from DiCE blocks (Kidney-SegNet's ``aspp``).

    Branches: a DiCE with 1x1 dimension-wise kernels (``branch1``), one dilated 3x3 DiCE per rate
    (``branch2..``), and image pooling (global average of the input, *no* conv, broadcast back).
    Their concatenation, ``len(rates) * mid + c_in`` channels, goes through a plain 1x1 conv
    with bias back to ``c_in`` channels, without BatchNorm or activation.

    Args:
        c_in: Input (and output) channels, 8 x nfeat.
        mid: Channels of each DiCE branch.
        size: Spatial size of the input the branches are built for (tile_size / 8).
        rates: Dilation of the dilated branches (original: 4, 6, 8).
        adaptive_pool: ``False`` reproduces the original ``AvgPool2d(size)`` and the fixed
            ``size x size`` upsampling (only inputs of exactly ``size`` work); ``True`` pools
            globally and broadcasts to whatever size the input has.
        impl: DiCE implementation, ``fast`` or ``reference``.
        shared_dim_kernels: Shared height-/width-wise DiCE kernels (``model.dice_dim_kernels``).
    """

    def __init__(
        self,
        c_in: int,
        mid: int,
        size: int,
        rates: Sequence[int] = (4, 6, 8),
        adaptive_pool: bool = False,
        impl: str = "fast",
        shared_dim_kernels: bool = False,
    ) -> None:
        super().__init__()
        self.size, self.adaptive_pool, self.n_branches = size, adaptive_pool, len(rates) + 1
        self.impl = impl
        shared = shared_dim_kernels
        self.branch1 = DiCE(c_in, mid, size, size, 1, impl=impl, shared_dim_kernels=shared)
        for i, r in enumerate(rates):
            branch = DiCE(c_in, mid, size, size, 3, (r, r, r), impl, shared_dim_kernels=shared)
            self.add_module(f"branch{i + 2}", branch)
        self.final_layer = nn.Conv2d(self.n_branches * mid + c_in, c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        h, w = x.shape[-2:]
        if not self.adaptive_pool and (h, w) != (self.size, self.size):
            raise ValueError(
                f"original-compatible pyramid pooling needs a {self.size}x{self.size} input "
                f"(tile {self.size * 8}x{self.size * 8}), got {h}x{w}; "
                "set model.fix_aspp_adaptive_pool: true to accept other sizes"
            )
        outs = [getattr(self, f"branch{i + 1}")(x) for i in range(self.n_branches)]
        # Image pooling: B x C x 1 x 1, broadcast back. Bilinear upsampling of a 1x1 map with
        # align_corners=True (the original's UpsamplingBilinear2d) is exactly this broadcast.
        pooled = x.mean((2, 3), keepdim=True)
        if self.impl != "fast":
            outs.append(pooled.expand(-1, -1, h, w))
            return self.final_layer(torch.cat(outs, 1))
        # Fast: the 1x1 conv's columns for the broadcast pooled channels act on a constant
        # image, so they are a per-image bias; the rest is one GEMM over the branch outputs.
        b, c = x.shape[:2]
        branches = torch.cat(outs, 1)  # B x n*mid x h x w
        k = branches.shape[1]
        weight = self.final_layer.weight.view(c, k + c)
        bias = torch.addmm(self.final_layer.bias, pooled.view(b, c), weight[:, k:].t())  # B x C
        out = torch.baddbmm(
            bias.unsqueeze(-1), weight[:, :k].expand(b, c, k), branches.view(b, k, h * w)
        )
        return out.view(b, c, h, w)


class AttentionGate(nn.Module):
    """Kidney-SegNet's attention gate (``att_block``) on a skip connection.

    ``x`` is the encoder skip (C_x at 2s), ``g`` the deeper feature (C_g at s). The gating signal
    is upsampled x2 with a learned transposed conv, the 1-channel attention map goes through a
    1 -> C_x conv *with bias* (``resamp``, so the per-channel weight ``w_c * a + b_c`` is not
    bounded to [0, 1]) and multiplies ``x``.

    Args:
        c_x: Channels of the skip.
        c_g: Channels of the gating signal.
        mid: Intermediate channels (the original uses ``c_x``).
        impl: ``fast`` (1x1 convs as matrix products, same function; CPU float32 only, see
            :func:`kseg.model.ops.cpu_kernels`) or ``reference``.
    """

    def __init__(self, c_x: int, c_g: int, mid: int, impl: str = "fast") -> None:
        super().__init__()
        self.impl = impl
        self.lx = nn.Conv2d(c_x, mid, 1)
        self.lg = nn.Conv2d(c_g, mid, 1)
        self.upconv = nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1)
        self.lmid = nn.Conv2d(mid, 1, 1)
        self.resamp = nn.Conv2d(1, c_x, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.impl == "fast" and x.dim() == 4 and cpu_kernels(x):
            return self._forward_fast(x, g)
        gu = self.upconv(self.lg(g))  # B x mid x 2s x 2s
        self._check(x, gu)
        a = torch.sigmoid(self.lmid(F.relu(self.lx(x) + gu)))  # B x 1 x 2s x 2s
        return self.resamp(a) * x

    def _check(self, x: torch.Tensor, gu: torch.Tensor) -> None:
        if gu.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"attention gate: skip is {tuple(x.shape[-2:])} but the upsampled gating signal "
                f"is {tuple(gu.shape[-2:])}; tile sizes must be multiples of 8"
            )

    def _forward_fast(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Same function, computed channels-last up to the 1-channel attention map.

        oneDNN's transposed conv is about 4x faster on channels-last tensors (6.4 ms vs 27 ms,
        32 channels, 256^2 -> 512^2), and the 1x1 convs are matrix products that read NCHW
        tensors as transposed matrices and write channels-last ones, so no layout copy is made:
        ``lg(g)`` -> B x s^2 x mid, the transposed conv -> B x (2s)^2 x mid, ``lx(x) + gu`` is
        one GEMM accumulating into it (``lx``'s bias rides on the transposed conv's bias).
        """
        up = self.upconv
        b, c, h, w = x.shape
        _, c_g, hg, wg = g.shape
        mid = self.lx.out_channels
        # B x hg*wg x mid (channels-last) = g^T W_lg^T + b_lg
        g_t = torch.baddbmm(
            self.lg.bias.view(1, 1, mid),
            g.reshape(b, c_g, hg * wg).transpose(1, 2),
            self.lg.weight.view(mid, c_g).t().expand(b, c_g, mid),
        )
        g_cl = g_t.view(b, hg, wg, mid).permute(0, 3, 1, 2)  # B x mid x hg x wg, channels-last
        gu = F.conv_transpose2d(
            g_cl, up.weight, up.bias + self.lx.bias, up.stride, up.padding, up.output_padding
        )  # B x mid x h x w, channels-last
        self._check(x, gu)
        gu_t = gu.permute(0, 2, 3, 1).reshape(b, h * w, mid)  # a view when channels-last
        wx = self.lx.weight.view(mid, c).t().expand(b, c, mid)
        s_t = torch.baddbmm(gu_t, x.reshape(b, c, h * w).transpose(1, 2), wx)  # lx(x) + gu
        s_t = F.relu(s_t, inplace=not torch.is_grad_enabled())
        # B x hw x 1: the attention logits, then the 1 -> C_x conv with bias and the product.
        a = torch.sigmoid(torch.matmul(s_t, self.lmid.weight.view(1, mid).t()) + self.lmid.bias)
        r = conv1x1(a.view(b, 1, h, w), self.resamp.weight, self.resamp.bias)  # B x C_x x h x w
        return r.mul_(x) if not torch.is_grad_enabled() else r * x
