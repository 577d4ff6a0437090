"""Loading checkpoints of the original Kidney-SegNet code (``dist_dice``) into ``KidneySegNet``.

Key mapping
-----------
``KidneySegNet`` keeps the original's module names, so the mapping from an original state-dict key
to a kseg key is the identity, after two normalisations:

==========================================  =================================================
original key                                kseg key
==========================================  =================================================
``module.<key>`` (saved from DataParallel)  ``<key>``
``conv1a.*``, ``bn1a.*``                    the plain first conv and its BatchNorm
``conv<L>.*`` (L in 1b..4b, 6a..8b)         DiCE block ``conv<L>``: ``conv_channel``,
                                            ``conv_width``, ``conv_height``, ``br_act.br.0/1``
                                            (3C BN + PReLU), ``weight_avg_layer.cbr.0/1/2``,
                                            ``proj_layer.cbr.0/1/2``, ``linear_comb_layer.1/3``
``bn<L>.*``                                 the external BatchNorm after DiCE block ``conv<L>``
``aspp.branch1..4.*``, ``aspp.final_layer`` the DiCE pyramid pooling
``att1..3.{lx,lg,upconv,lmid,resamp}.*``    the attention gates (level 3, 2, 1)
``upconv1..3.*``                            unused in the original forward; kept so the
                                            original-compatible model loads strictly
``seg_map_conv.*``                          the 1x1 head (followed by ReLU)
==========================================  =================================================

The nfeat and mid_channels of the checkpoint are read from the shapes of ``conv1a.weight`` and
``aspp.branch1.proj_layer.cbr.0.weight``; the tile size from ``conv1b.conv_height.weight``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from kseg.model.config import ModelConfig

_PREFIXES = ("module.",)


def map_original_key(key: str) -> str:
    """Maps one original state-dict key to the kseg key (see the module docstring)."""
    for p in _PREFIXES:
        if key.startswith(p):
            key = key[len(p) :]
    return key


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``obj``: a bare dict or the ``[state_dict, hparams, scores]`` list."""
    if isinstance(obj, list | tuple) and obj and isinstance(obj[0], dict):
        obj = obj[0]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(
            f"{path}: expected an original Kidney-SegNet checkpoint (a state dict, or the "
            f"notebook's [state_dict, hyper_params, scores] list), got {type(obj).__name__}"
        )
    return {map_original_key(k): v for k, v in obj.items()}


def infer_original_config(sd: dict[str, torch.Tensor], dice_impl: str = "fast") -> ModelConfig:
    """The original-compatible config whose shapes match the (mapped) state dict ``sd``."""
    try:
        nfeat = int(sd["conv1a.weight"].shape[0])
        mid = int(sd["aspp.branch1.proj_layer.cbr.0.weight"].shape[0])
        tile = int(sd["conv1b.conv_height.weight"].shape[0])
    except KeyError as err:
        raise ValueError(f"not a Kidney-SegNet state dict: key {err} is missing") from err
    cfg = ModelConfig.original_compatible(nfeat=nfeat, mid_channels=mid, dice_impl=dice_impl)
    if tile != cfg.tile_size:
        cfg = cfg.with_(tile_size=tile)
    return cfg


def load_original_checkpoint(
    path: str | Path, dice_impl: str = "fast"
) -> tuple[torch.nn.Module, ModelConfig]:
    """Loads an original checkpoint into an original-compatible ``KidneySegNet``.

    Args:
        path: A ``torch.save`` file holding a state dict or ``[state_dict, hyper_params, scores]``.
        dice_impl: DiCE implementation of the returned model.

    Returns:
        ``(model, cfg)`` with the model in eval mode.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not a loadable checkpoint or its keys/shapes do not match.
    """
    from kseg.model.net import KidneySegNet

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"original checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        from kseg.model.io import load_error

        raise ValueError(
            f"{path}: cannot be read as a torch checkpoint ({load_error(err)})"
        ) from err
    sd = _extract_state_dict(obj, path)
    cfg = infer_original_config(sd, dice_impl)
    model = KidneySegNet(cfg)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", bad))
            if keys
        )
        raise ValueError(f"{path}: does not match KidneySegNet({cfg}): {detail}")
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg


def convert_original(
    src: str | Path, out_dir: str | Path, dice_impl: str = "fast", extra: dict | None = None
) -> Path:
    """Converts an original checkpoint into a kseg model folder (``model.pt`` + ``config.json``).

    Args:
        src: The original checkpoint.
        out_dir: The model folder to write (files written atomically).
        dice_impl: DiCE implementation recorded in the config.
        extra: Extra JSON-able metadata stored in ``config.json`` under ``extra``.

    Returns:
        ``out_dir``.
    """
    from kseg.model.io import save_model_folder

    model, cfg = load_original_checkpoint(src, dice_impl)
    meta = {"converted_from": str(src), **(extra or {})}
    return save_model_folder(model, cfg, out_dir, meta)


def original_input_mean(images: Iterable[NDArray[np.uint8]]) -> tuple[float, float, float]:
    """Per-channel RGB mean of training images as the original's input sees them.

    The original scales each image to [0, 255] (per-image min-max), then subtracts a per-pixel
    mean image of the training set, which its checkpoints do not store. kseg's preprocessing is
    per channel (any tile size), so a converted model gets the per-channel mean of those scaled
    images and a std of 1 (the original divides by nothing).

    Raises:
        ValueError: If there is no image.
    """
    total, count = np.zeros(3), 0
    for img in images:
        arr = np.asarray(img, np.float64)[..., :3]
        lo, hi = arr.min(), arr.max()
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        total += scaled.reshape(-1, 3).mean(0)
        count += 1
    if count == 0:
        raise ValueError("no training image to compute the input mean from")
    r, g, b = (float(v) for v in total / count)
    return r, g, b
