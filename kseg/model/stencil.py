"""A DiCE block's eval forward as two compiled stencil kernels (opt-in, ``KSEG_FUSED_EVAL=1``).

Every convolution of a DiCE block is a small stencil: output ``(c, h, w)`` is a weighted sum of
the input at a few neighbouring positions. Written as sums of shifted slices of a zero-padded
input, ``torch.compile`` (inductor) turns the whole eval-mode block into two C++ loops:

1. the three dimension-wise convs (channel-, height- and width-wise, 3 x k^2 taps), their folded
   BatchNorms and PReLUs and the 3 -> 1 fusion, one pass over the input, writing the fused
   response ``y`` with a one-pixel zero frame (the projection's padding);
2. the grouped 3 x 3 projection, its PReLU and the SE gate (and the network's external BatchNorm
   + ReLU when given), one pass over ``y``.

Between them the gate's global mean (a reduction inside loop 1) goes through the two tiny 1 x 1
convs. The eager fast path runs oneDNN's depthwise convs (with NCHW <-> blocked reorders) and
nine-plus elementwise passes per block; this form reads each tensor once.

The padded input is made in eager mode: inside the compiled graph the padding would become a
mask computed at every tap (measured 1.5x slower). Inductor compiles one graph per block shape
(static shapes give it constant strides): about 5 s each with the system C++ compiler, 16 graphs
for Kidney-SegNet at 512, cached on disk by inductor for later processes.

Used only where the block's kernels match the input (shared kernels, or the built size); a
per-row/per-column block on another size (which resizes) keeps the eager path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kseg.model.ops import bn_affine, col, run_compiled

if TYPE_CHECKING:
    from kseg.model.dice import DiCE


def _stencil_block(
    xp: torch.Tensor,
    frame: torch.Tensor,
    wc: torch.Tensor,
    bc: torch.Tensor,
    wh: torch.Tensor,
    ww: torch.Tensor,
    s_h: torch.Tensor,
    t_h: torch.Tensor,
    s_w: torch.Tensor,
    t_w: torch.Tensor,
    wa: torch.Tensor,
    t_wa: torch.Tensor,
    a3: torch.Tensor,
    a_wa: torch.Tensor,
    w_sq: torch.Tensor,
    w_ex: torch.Tensor,
    wp: torch.Tensor,
    bp: torch.Tensor,
    a_p: torch.Tensor,
    s_o: torch.Tensor,
    t_o: torch.Tensor,
    *,
    k: int,
    dil: tuple[int, int, int],
    groups: int,
    post: bool,
) -> torch.Tensor:
    """The eval DiCE block (see :meth:`kseg.model.dice.DiCE._forward_eval`) on a padded input.

    Inputs, in order (shapes for B x C x H x W -> B x C_out x H x W):

        xp: The input, zero-padded by ``p`` channels and ``p + 1`` rows and columns on each side
            (``p = (k - 1) / 2 * max(dil)``): B x (C + 2p) x (H + 2p + 2) x (W + 2p + 2).
        frame: 1 x 1 x (H + 2) x (W + 2), ones with a zero border.
        wc, bc: Channel-wise kernels C x k x k and bias C (the branch's BN folded in).
        wh: Height-wise kernels, one per row, H x k x k (over the (C, W) plane).
        ww: Width-wise kernels, one per column, k x k x W (over the (H, C) plane).
        s_h, t_h, s_w, t_w: The height/width branches' BN scale and shift, 1 x C x 1 x 1.
        wa: The 3 -> 1 fusion weights (its BN scale folded), 3 x 1 x C x 1 x 1, branch order
            (channel, height, width); t_wa its BN shift, 1 x C x 1 x 1.
        a3: PReLU slopes of the three branches, 3C; a_wa: the fusion's PReLU, C.
        w_sq, w_ex: The SE gate's 1 x 1 convs, C/4 x C and C_out x C/4.
        wp, bp: The grouped 3 x 3 projection (BN folded), C_out x C/groups x 3 x 3, and bias.
        a_p: The projection's PReLU, C_out.
        s_o, t_o: The network's external BN after the block (``post``), 1 x C_out x 1 x 1.
        k, dil, groups, post: Kernel size, (channel, height, width) dilation, projection groups,
            whether to apply ``relu(bn(.))`` of ``s_o``, ``t_o``.
    """
    r = (k - 1) // 2
    p = r * max(dil)
    b, cp, hp, wpad = xp.shape
    c, h, w = cp - 2 * p, hp - 2 * p - 2, wpad - 2 * p - 2
    hf, wf = h + 2, w + 2  # y is computed on the frame too, then zeroed there

    def shifted(dc: int, dh: int, dw: int) -> torch.Tensor:  # B x C x (H+2) x (W+2)
        return xp[:, p + dc : p + dc + c, p + dh : p + dh + hf, p + dw : p + dw + wf]

    whf = F.pad(wh, (0, 0, 0, 0, 1, 1))  # (H+2) x k x k: the frame's rows (zeroed anyway)
    wwf = F.pad(ww, (1, 1))  # k x k x (W+2)
    d_c, d_h, d_w = dil
    zc = bc.view(1, c, 1, 1)
    zh: torch.Tensor | float = 0.0
    zw: torch.Tensor | float = 0.0
    for i in range(k):
        for j in range(k):
            oi, oj = i - r, j - r
            zc = zc + wc[:, i, j].view(1, c, 1, 1) * shifted(0, oi * d_c, oj * d_c)
            zh = zh + whf[:, i, j].view(1, 1, hf, 1) * shifted(oi * d_h, 0, oj * d_h)
            zw = zw + wwf[i, j].view(1, 1, 1, wf) * shifted(oj * d_w, oi * d_w, 0)
    y = t_wa + wa[0] * F.prelu(zc, a3[:c])
    y = y + wa[1] * F.prelu(zh * s_h + t_h, a3[c : 2 * c])
    y = y + wa[2] * F.prelu(zw * s_w + t_w, a3[2 * c :])
    y = F.prelu(y, a_wa) * frame  # B x C x (H+2) x (W+2), zero frame = the projection's padding
    gate = torch.sigmoid(torch.relu((y.sum((2, 3)) / (h * w)) @ w_sq.t()) @ w_ex.t())
    c_out = wp.shape[0]
    r_in, r_out = c // groups, c_out // groups
    yg = y.view(b, groups, r_in, hf, wf)
    out = bp.view(1, c_out, 1, 1)
    for m in range(r_in):  # input m of every group, repeated for the group's r_out outputs
        ym = yg[:, :, m : m + 1].expand(b, groups, r_out, hf, wf).reshape(b, c_out, hf, wf)
        for i in range(3):
            for j in range(3):
                out = out + wp[:, m, i, j].view(1, c_out, 1, 1) * ym[:, :, i : i + h, j : j + w]
    gate = gate.view(b, c_out, 1, 1)
    out = F.prelu(out, a_p)
    return torch.relu(t_o + out * (gate * s_o)) if post else out * gate


def _zero_padded(x: torch.Tensor, pc: int, ps: int) -> torch.Tensor:
    """``x`` with ``pc`` zero channels and ``ps`` zero rows/columns on each side.

    One write of the interior and the borders (``F.pad`` fills everything, then copies).
    """
    b, c, h, w = x.shape
    out = x.new_empty(b, c + 2 * pc, h + 2 * ps, w + 2 * ps)
    if pc:
        out[:, :pc].zero_()
        out[:, pc + c :].zero_()
    mid = out[:, pc : pc + c]
    if ps:
        mid[:, :, :ps].zero_()
        mid[:, :, ps + h :].zero_()
        mid[:, :, ps : ps + h, :ps].zero_()
        mid[:, :, ps : ps + h, ps + w :].zero_()
    mid[:, :, ps : ps + h, ps : ps + w].copy_(x)
    return out


def dice_eval_compiled(
    block: DiCE, x: torch.Tensor, post_bn: nn.BatchNorm2d | None
) -> torch.Tensor | None:
    """The eval forward of DiCE ``block`` on ``x`` as compiled stencils, or None where not used.

    None when the block would resize ``x`` (per-row/column kernels built for another size) or
    when compiling failed (then the eager ops are used from now on; see
    :func:`kseg.model.ops.run_compiled`).
    """
    _, c, h, w = x.shape
    if not block.shared and (h, w) != (block.height, block.width):
        return None
    f = block.folded_eval()
    c_out = f.wp.shape[0]
    s_o, t_o = bn_affine(post_bn) if post_bn is not None else (x.new_ones(c_out),) * 2
    se = block.linear_comb_layer
    k = block.k
    args = (
        f.wc[:, 0],
        f.t3[:c],
        block._dim_weight(block.conv_height, h)[:, 0],
        block._dim_weight(block.conv_width, w)[:, 0].permute(1, 2, 0),
        col(f.s3[c : 2 * c]),
        col(f.t3[c : 2 * c]),
        col(f.s3[2 * c :]),
        col(f.t3[2 * c :]),
        f.wa.t().reshape(3, 1, c, 1, 1),
        col(f.t_wa),
        f.a3,
        f.a_wa,
        se[1].weight[:, :, 0, 0],
        se[3].weight[:, :, 0, 0],
        f.wp,
        f.bp,
        f.a_p,
        col(s_o),
        col(t_o),
    )
    p = (k - 1) // 2 * max(block.dil)
    xp = _zero_padded(x, p, p + 1)
    frame = F.pad(x.new_ones(1, 1, h, w), (1, 1, 1, 1))
    # Parameters would be guarded as module state; plain contiguous tensors keep one graph per
    # shape (no autograd here anyway).
    args = tuple(a.detach().contiguous() for a in args)
    post = post_bn is not None
    groups = block.proj_layer.cbr[0].groups
    static = {"k": k, "dil": tuple(block.dil), "groups": groups, "post": post}
    return run_compiled("dice_block", _stencil_block, (xp, frame, *args), static)
