"""The segmentation networks: Kidney-SegNet (DiCE) and a U-Net baseline.

Public API:

* :func:`build_model` - the network a :class:`ModelConfig` describes;
* :func:`save_model_folder` / :func:`load_model_folder` - ``model.pt`` + ``config.json``;
* :func:`load_original_checkpoint` / :func:`convert_original` - the original authors' files;
* :func:`model_info` - parameters and multiply-accumulates per tile;
* :func:`tune_cpu_allocator` - keep freed tensor memory mapped (large CPU speed-up, see docs);
* :func:`cap_cpu_heap` - return freed tensor memory at once (lower peak, for recomputing runs).

Importing this package imports torch; :mod:`kseg.model.config` alone does not.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from kseg.model.config import ModelConfig

if TYPE_CHECKING:  # the real imports, for type checkers and readers
    import torch

    from kseg.model.compat import convert_original, load_original_checkpoint
    from kseg.model.info import model_info
    from kseg.model.io import load_model_folder, save_model_folder
    from kseg.model.perf import cap_cpu_heap, tune_cpu_allocator

# Lazy attributes (PEP 562): `kseg.config` imports `kseg.model.config` for the params schema, and
# that must not import torch (`kseg --help` answers at once).
_LAZY = {
    "convert_original": "kseg.model.compat",
    "load_original_checkpoint": "kseg.model.compat",
    "model_info": "kseg.model.info",
    "load_model_folder": "kseg.model.io",
    "save_model_folder": "kseg.model.io",
    "tune_cpu_allocator": "kseg.model.perf",
    "cap_cpu_heap": "kseg.model.perf",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kseg.model' has no attribute {name!r}")


__all__ = [
    "ModelConfig",
    "build_model",
    "cap_cpu_heap",
    "convert_original",
    "load_model_folder",
    "load_original_checkpoint",
    "model_info",
    "save_model_folder",
    "tune_cpu_allocator",
]


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """The network described by ``cfg`` (``kidney_segnet`` or ``unet``), in training mode.

    ``cfg`` was validated when it was made (a pydantic model), so its rules hold here.
    """
    if cfg.arch == "kidney_segnet":
        from kseg.model.net import KidneySegNet

        return KidneySegNet(cfg)
    if cfg.arch == "unet":
        from kseg.model.unet import UNet

        return UNet(cfg)
    raise ValueError(f"model.arch={cfg.arch!r}: expected 'kidney_segnet' or 'unet'")
