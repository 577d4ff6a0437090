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
    """

    def __init__(
        self,
        c_in: int,
        mid: int,
        size: int,
        rates: Sequence[int] = (4, 6, 8),
        adaptive_pool: bool = False,
        impl: str = "fast",
    ) -> None:
        super().__init__()
        self.size, self.adaptive_pool, self.n_branches = size, adaptive_pool, len(rates) + 1
        self.branch1 = DiCE(c_in, mid, size, size, kernel_size=1, impl=impl)
        for i, r in enumerate(rates):
            self.add_module(f"branch{i + 2}", DiCE(c_in, mid, size, size, 3, (r, r, r), impl))
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
        outs.append(pooled.expand(-1, -1, h, w))
        return self.final_layer(torch.cat(outs, 1))


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
    """

    def __init__(self, c_x: int, c_g: int, mid: int) -> None:
        super().__init__()
        self.lx = nn.Conv2d(c_x, mid, 1)
        self.lg = nn.Conv2d(c_g, mid, 1)
        self.upconv = nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1)
        self.lmid = nn.Conv2d(mid, 1, 1)
        self.resamp = nn.Conv2d(1, c_x, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # noqa: D102
        gu = self.upconv(self.lg(g))  # B x mid x 2s x 2s
        if gu.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"attention gate: skip is {tuple(x.shape[-2:])} but the upsampled gating signal "
                f"is {tuple(gu.shape[-2:])}; tile sizes must be multiples of 8"
            )
        a = torch.sigmoid(self.lmid(F.relu(self.lx(x) + gu)))  # B x 1 x 2s x 2s
        return self.resamp(a) * x
