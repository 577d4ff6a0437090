"""A plain U-Net baseline of the same widths as Kidney-SegNet, with the same head.

Levels nfeat, 2, 4, 8 x nfeat (three 2x poolings, like Kidney-SegNet); each level is two 3x3
conv + BN + ReLU; the decoder upsamples with a 2x2 transposed conv and concatenates the skip.
Head: 1x1 conv -> ReLU (distance-map regression), as Kidney-SegNet's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kseg.model.blocks import ConvBNReLU
from kseg.model.config import ModelConfig


def _double(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(ConvBNReLU(c_in, c_out, bias=False), ConvBNReLU(c_out, c_out, bias=False))


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with Kidney-SegNet's widths and head.

    Args:
        cfg: Uses ``nfeat``; any tile size divisible by 8 works.
        in_channels: Input channels (RGB).
    """

    def __init__(self, cfg: ModelConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.nfeat
        w = (n, 2 * n, 4 * n, 8 * n)
        self.enc = nn.ModuleList([_double(in_channels, w[0])])
        self.enc.extend(_double(w[i], w[i + 1]) for i in range(3))
        self.up = nn.ModuleList(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in range(3))
        self.dec = nn.ModuleList(_double(2 * w[i], w[i]) for i in range(3))
        self.seg_map_conv = nn.Conv2d(n, cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Head output (see KidneySegNet.forward); H and W must be divisible by 8."""
        if x.dim() != 4 or x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"UNet expects B x C x H x W with H, W divisible by 8, got {x.shape}")
        skips = []
        for i, enc in enumerate(self.enc):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(3)):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], 1))
        out = self.seg_map_conv(x)
        return F.relu(out) if self.cfg.head == "dist" else out
