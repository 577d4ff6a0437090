"""Model configuration (the ``model`` block of ``params.yaml``).

Kept free of torch imports so that reading ``params.yaml`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and width of the segmentation network."""

    arch: Literal["kidney_segnet", "unet"] = "kidney_segnet"
    nfeat: int = field(default=32, metadata={"min": 1, "max": 512})
    mid_channels: int = field(default=256, metadata={"min": 1, "max": 4096})
    tile_size: int = field(default=512, metadata={"min": 16, "max": 4096})
