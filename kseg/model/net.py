"""``KidneySegNet``: the full network (Aatresh et al., CMIG 93 (2021) 101975), original wiring.

Four resolution levels of nfeat, 2, 4, 8 x nfeat channels. Every encoder/decoder conv is a DiCE
block followed by an *external* BatchNorm + ReLU (double normalisation, as in the original).
The bottleneck feeds the DiCE pyramid pooling; each decoder level takes
``cat[attention-gated skip, raw skip]`` (plus, with ``fix_decoder_concat_upsampled``, the learned
x2 upsampling of the deeper feature). Head: 1x1 conv -> ReLU, a non-negative distance map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kseg.model.blocks import AttentionGate, DiCEPyramidPooling
from kseg.model.config import ModelConfig
from kseg.model.dice import DiCE
from kseg.model.ops import batch_norm_act, bn_affine, conv1x1, exporting
from kseg.model.recompute import recompute


def _max_pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling; without autograd, the max of four strided views (2-4x faster on CPU).

    With autograd, ``F.max_pool2d`` is kept: its gradient goes to the first maximum of a
    window, while ``torch.maximum`` splits it between ties (frequent after a ReLU).
    """
    if (x.requires_grad and torch.is_grad_enabled()) or x.shape[-1] % 2 or x.shape[-2] % 2:
        return F.max_pool2d(x, 2)
    if exporting():  # `out=` has no exported form; the same maxima
        return F.max_pool2d(x, 2)
    top = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
    torch.maximum(top, x[..., 1::2, 0::2], out=top)
    return torch.maximum(top, x[..., 1::2, 1::2], out=top)


#: Resolution level (1 = full size) of the blocks ``conv<digit>a/b``: encoder 1-4, decoder 6-8.
_LEVEL_OF_BLOCK = {"1": 1, "2": 2, "3": 3, "4": 4, "6": 3, "7": 2, "8": 1}


class KidneySegNet(nn.Module):
    """Kidney-SegNet (``dist_dice``) with the named fixes of :class:`ModelConfig`.

    Args:
        cfg: Model configuration; ``ModelConfig.original_compatible()`` is the original network.
        in_channels: Input channels (RGB).

    Attributes names (``conv1a``, ``bn1a``, ..., ``aspp``, ``att1..3``, ``seg_map_conv``) are the
    original's, so its checkpoints load with the identity key mapping.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        n, t, impl = cfg.nfeat, cfg.tile_size, cfg.dice_impl
        widths = (n, 2 * n, 4 * n, 8 * n)
        sizes = (t, t // 2, t // 4, t // 8)
        self.concat_up = cfg.fix_decoder_concat_upsampled
        self.fast = impl == "fast"
        shared = cfg.dice_dim_kernels == "shared"
        # Resolution levels (1 = full size) whose blocks are recomputed in backward instead of
        # keeping their activations (train.recompute_levels; set by the train stage).
        self.recompute_levels = 0

        def dice(name: str, c_in: int, c_out: int, size: int) -> None:
            block = DiCE(c_in, c_out, size, size, impl=impl, shared_dim_kernels=shared)
            self.add_module(f"conv{name}", block)
            self.add_module(f"bn{name}", nn.BatchNorm2d(c_out))

        # Encoder. conv1a is a plain 3x3 conv (bias) + BN + ReLU.
        self.conv1a = nn.Conv2d(in_channels, n, 3, padding=1)
        self.bn1a = nn.BatchNorm2d(n)
        dice("1b", n, n, sizes[0])
        dice("2a", n, widths[1], sizes[1])
        dice("2b", widths[1], widths[1], sizes[1])
        dice("3a", widths[1], widths[2], sizes[2])
        dice("3b", widths[2], widths[2], sizes[2])
        dice("4a", widths[2], widths[3], sizes[3])
        dice("4b", widths[3], widths[3], sizes[3])
        self.aspp = DiCEPyramidPooling(
            widths[3],
            cfg.mid_channels,
            sizes[3],
            cfg.aspp_rates,
            cfg.fix_aspp_adaptive_pool,
            impl,
            shared,
        )
        # Decoder: level l gets its skip (widths[l]) gated by the deeper feature (widths[l+1]).
        build_up = self.concat_up or not cfg.fix_drop_unused_upconv
        extra = 1 if self.concat_up else 0
        for i, (lvl, name) in enumerate(((2, "6"), (1, "7"), (0, "8"))):
            c_skip, c_deep = widths[lvl], widths[lvl + 1]
            if build_up:
                up = nn.ConvTranspose2d(c_deep, c_skip, 3, stride=2, padding=1, output_padding=1)
                self.add_module(f"upconv{i + 1}", up)
            self.add_module(f"att{i + 1}", AttentionGate(c_skip, c_deep, c_skip, impl))
            dice(f"{name}a", (2 + extra) * c_skip, c_skip, sizes[lvl])
            dice(f"{name}b", c_skip, c_skip, sizes[lvl])
        self.seg_map_conv = nn.Conv2d(n, cfg.out_channels, 1)
        self.relu_head = cfg.head == "dist"

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn1a(conv1a(x)))``; the fast path folds an eval-mode ``bn1a`` into the conv."""
        conv, bn = self.conv1a, self.bn1a
        if not (self.fast and not bn.training and bn.running_mean is not None):
            return self._bn_relu(conv(x), bn)
        s, t = bn_affine(bn)
        bias = t if conv.bias is None else conv.bias * s + t
        return F.conv2d(x, conv.weight * s.view(-1, 1, 1, 1), bias, 1, 1).relu_()

    def _bn_relu(self, x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        """``relu(bn(x))``, without modifying ``x`` (it may be a returned feature)."""
        if self.fast:
            return batch_norm_act(x, bn, "relu")
        return F.relu(bn(x))

    def _block(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """DiCE block ``conv<name>`` followed by its external BatchNorm ``bn<name>`` and ReLU."""
        level = _LEVEL_OF_BLOCK[name[0]]
        fn = getattr(self, f"conv{name}").forward_bn_relu
        return self._run(level, fn, x, getattr(self, f"bn{name}"))

    def _run(self, level: int, fn, *args):
        """``fn(*args)``, recomputed in backward when ``level`` is a recomputed level."""
        if level <= self.recompute_levels and self.training and torch.is_grad_enabled():
            return recompute(self, fn, *args)
        return fn(*args)

    def _block_b(
        self, name: str, x: torch.Tensor, feats: dict[str, torch.Tensor] | None
    ) -> torch.Tensor:
        """A block whose raw DiCE output is a named feature (``conv4b``, ``conv6b``...)."""
        if feats is None and self.recompute_levels:
            return self._block(name, x)  # the same function, with the raw output not kept
        raw = getattr(self, f"conv{name}")(x)
        if feats is not None:
            feats[f"conv{name}"] = raw
        return self._bn_relu(raw, getattr(self, f"bn{name}"))

    def check_input_shape(self, x: torch.Tensor) -> None:
        """Raises ValueError unless ``x`` is B x C x H x W with H, W multiples of 8."""
        if x.dim() != 4 or x.shape[1] != self.conv1a.in_channels:
            raise ValueError(
                f"KidneySegNet expects B x {self.conv1a.in_channels} x H x W, got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % 8 or w % 8:
            raise ValueError(f"KidneySegNet needs H and W divisible by 8 (3 poolings), got {h}x{w}")
        t = self.cfg.tile_size
        if not self.cfg.fix_aspp_adaptive_pool and (h, w) != (t, t):
            raise ValueError(
                f"original-compatible KidneySegNet runs on {t}x{t} tiles only, got {h}x{w}; "
                "set model.fix_aspp_adaptive_pool: true for other sizes"
            )

    def forward(self, x: torch.Tensor, features: dict[str, torch.Tensor] | None = None):
        """Head output: B x 1 x H x W distance map (>= 0), or B x 2 x H x W logits (fg_dist).

        Args:
            x: Input B x 3 x H x W.
            features: If given, filled with intermediate outputs under the original's module
                names (``conv4b`` = raw DiCE output, ``aspp``, ``conv6b``, ``att3``, ``conv8b``).
        """
        self.check_input_shape(x)
        feats = features  # filled only when asked for (tests compare them with the original)
        pool = _max_pool2 if self.fast else (lambda t: F.max_pool2d(t, 2))
        e1 = self._stem(x)
        e1 = self._block("1b", e1)  # B x n x H x W
        e2 = self._block("2b", self._block("2a", pool(e1)))  # 2n @ H/2
        e3 = self._block("3b", self._block("3a", pool(e2)))  # 4n @ H/4
        e4 = self._block_b("4b", self._block("4a", pool(e3)), feats)  # 8n @ H/8
        d = self._run(4, self.aspp, e4)
        if feats is not None:
            feats["aspp"] = d
        for i, (skip, name) in enumerate(((e3, "6"), (e2, "7"), (e1, "8"))):
            gated = self._run(3 - i, getattr(self, f"att{i + 1}"), skip, d)
            if feats is not None:
                feats[f"att{i + 1}"] = gated
            parts = [gated, skip]
            if self.concat_up:
                parts.append(getattr(self, f"upconv{i + 1}")(d))
            d = self._block(f"{name}a", torch.cat(parts, 1))
            d = self._block_b(f"{name}b", d, feats)
        if self.fast:
            out = conv1x1(d, self.seg_map_conv.weight, self.seg_map_conv.bias)
        else:
            out = self.seg_map_conv(d)
        return F.relu(out) if self.relu_head else out
