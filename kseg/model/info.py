"""Parameters and multiply-accumulates (MACs) per tile of each architecture.

What is counted:

* ``params_total``: every registered parameter (what the original's ``count_parameters`` prints).
* ``params_used``: parameters of the modules that run in a forward pass (the original's
  ``upconv1..3`` do not).
* ``macs``: multiply-accumulates of one forward pass on one ``tile x tile`` RGB tile, counted by
  forward hooks on ``nn.Conv2d`` (out elements x C_in/groups x k_h x k_w), ``nn.ConvTranspose2d``
  (in elements x C_out/groups x k_h x k_w) and ``nn.Linear``. Bias adds, BatchNorm, activations,
  pooling, interpolation and elementwise products are not counted.
* ``macs_conv2d``: the ``nn.Conv2d`` part only. The original's ``flops_compute.py`` hooks Conv2d
  only and reports 2 x this (+ bias adds) as FLOPs, so its transposed convs are missing there.

DiCE blocks are counted on their reference implementation (the fast one computes the same
convolutions without calling the submodules).
"""

from __future__ import annotations

import torch
from torch import nn

from kseg.model.config import ModelConfig


def _count_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    """``(all MACs, Conv2d MACs, parameters used)`` of ``model(x)`` for one sample ``x``."""
    total = {"all": 0, "conv2d": 0}
    called: set[nn.Module] = set()

    def mark(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        called.add(mod)

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
            macs = out[0].numel() * k
            total["conv2d"] += macs
        elif isinstance(mod, nn.ConvTranspose2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.out_channels // mod.groups)
            macs = inp[0][0].numel() * k
        else:  # nn.Linear
            macs = out[0].numel() * mod.in_features
        total["all"] += macs

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)
    ]
    handles += [m.register_forward_hook(mark) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    # A parameter is used when the module owning it ran (the reference DiCE calls every
    # submodule; the original's upconv1..3 never run).
    used = sum(p.numel() for m in called for p in m.parameters(recurse=False))
    return total["all"], total["conv2d"], used


def model_info(
    cfg: ModelConfig, tile_size: int | None = None, macs: bool = True
) -> dict[str, int | float | str]:
    """Parameter counts and MACs per tile for ``cfg`` (see the module docstring).

    Args:
        cfg: The model configuration.
        tile_size: Tile edge for the MAC count (default ``cfg.tile_size``). Kidney-SegNet's
            parameter count depends on ``cfg.tile_size`` (DiCE kernels per row/column), not on it.
        macs: Run the counting forward pass (MACs and ``params_used``); without it only
            ``params_total`` is filled and the others are -1.

    Returns:
        ``arch``, ``nfeat``, ``tile_size``, ``input_scale``, ``input_tile`` (the edge in the
        data's pixels that one network tile covers: ``tile_size / input_scale``), ``params_total``,
        ``params_used``, ``macs``, ``macs_conv2d``. The MACs are per network tile: with
        ``input_scale`` 0.5 a 256 tile is a whole 512 input tile.
    """
    from kseg.model import build_model

    t = tile_size or cfg.tile_size
    model = build_model(cfg.model_copy(update={"dice_impl": "reference"})).eval()
    n_macs, macs_conv, used = -1, -1, -1
    if macs:
        n_macs, macs_conv, used = _count_macs(model, torch.zeros(1, 3, t, t))
    return {
        "arch": cfg.arch,
        "nfeat": cfg.nfeat,
        "tile_size": t,
        "input_scale": cfg.input_scale,
        "input_tile": round(t / cfg.input_scale),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_used": used,
        "macs": n_macs,
        "macs_conv2d": macs_conv,
    }
