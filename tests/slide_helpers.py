"""Test slides built from real TNBC tiles, and a small fast model folder, for the WSI tests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection
from pathlib import Path

import numpy as np

from kseg.predict import read_image

#: Pixel size of the TNBC tiles (40x), as the shipped model card states.
TNBC_MPP = 0.25


def tnbc_pairs(tnbc_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every TNBC tile as ``(rgb uint8, binary ground-truth mask)``, in file-name order."""
    pairs = []
    for img in sorted(tnbc_dir.glob("Slide_*/*.png")):
        gt = tnbc_dir / img.parent.name.replace("Slide_", "GT_") / img.name
        pairs.append((read_image(img), read_image(gt)[..., 0] > 0))
    return pairs


def mosaic(
    pairs: list[tuple[np.ndarray, np.ndarray]],
    rows: int,
    cols: int,
    glass: Collection[tuple[int, int]] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """``rows x cols`` TNBC tiles side by side (cycled, flipped on reuse) and their masks.

    ``glass``: ``(row, col)`` cells left as glass (near-white with scanner noise).
    """
    tile = pairs[0][0].shape[0]
    rgb = np.empty((rows * tile, cols * tile, 3), np.uint8)
    mask = np.zeros((rows * tile, cols * tile), bool)
    rng = np.random.default_rng(0)
    k = 0
    for r in range(rows):
        for c in range(cols):
            sl = np.s_[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
            if (r, c) in glass:
                rgb[sl] = rng.integers(236, 250, (tile, tile, 3), dtype=np.uint8)
                continue
            img, gt = pairs[k % len(pairs)]
            if (k // len(pairs)) % 2:
                img, gt = img[:, ::-1], gt[:, ::-1]
            rgb[sl], mask[sl] = img, gt
            k += 1
    return rgb, mask


def write_pyramid(
    path: Path,
    rgb: np.ndarray,
    mpp: float | None = TNBC_MPP,
    levels: int = 3,
    factor: int = 4,
    tile: int = 256,
) -> Path:
    """A tiled, pyramidal TIFF (SubIFD levels, zlib, lossless) with the pixel size in its tags."""
    import cv2
    import tifffile

    kw = {}
    if mpp is not None:
        kw = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        tif.write(
            rgb,
            tile=(tile, tile),
            photometric="rgb",
            compression="zlib",
            subifds=levels - 1,
            metadata=None,
            **kw,
        )
        level = rgb
        for i in range(1, levels):
            h, w = level.shape[:2]
            level = cv2.resize(level, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
            lkw = {}
            if mpp is not None:
                m = mpp * factor**i
                lkw = {"resolution": (1e4 / m, 1e4 / m), "resolutionunit": "CENTIMETER"}
            tif.write(
                level,
                tile=(min(tile, 16 * (level.shape[0] // 16) or 16),) * 2,
                photometric="rgb",
                compression="zlib",
                subfiletype=1,
                metadata=None,
                **lkw,
            )
    return path


def fast_model(folder: Path, tiles: list[np.ndarray]) -> Path:
    """A small U-Net (nfeat 2, random weights of a fixed seed) as a complete kseg model folder.

    Its maps are a deterministic function of the real pixels, which is all the seam and memory
    tests need (block-wise and whole-image inference of the same model must agree); it runs
    ~50x faster than the shipped model. The output layer is rescaled on ``tiles`` so that about
    25% of the pixels are foreground and the watershed finds nucleus-sized instances (median ~35
    px). ``extra.mpp`` is 0.25 like the shipped model.
    """
    import torch

    from kseg.config import ModelConfig
    from kseg.infer import Preprocess
    from kseg.model import build_model
    from kseg.model.io import save_model_folder

    torch.manual_seed(0)
    cfg = ModelConfig(arch="unet", nfeat=2, tile_size=256, head="fg_dist")
    model = build_model(cfg).eval()
    pre = Preprocess(mean=(170.0, 130.0, 170.0), std=(50.0, 50.0, 40.0))
    seen = {}
    hook = model.seg_map_conv.register_forward_hook(lambda m, i, o: seen.setdefault("z", o))
    with torch.no_grad():
        model(pre.to_tensor(np.stack([t[:256, :256] for t in tiles[:8]])))
    hook.remove()
    conv = model.seg_map_conv
    with torch.no_grad():
        for c in range(2):
            z = seen["z"][:, c].flatten()
            scale = 4.0 / float(z.std())
            conv.weight[c] *= scale
            conv.bias[c] = (conv.bias[c] - float(z.quantile(0.75))) * scale
    save_model_folder(model, cfg, folder, extra={"mpp": TNBC_MPP})
    pre.save(folder)
    shipped = Path(__file__).resolve().parents[1] / "kseg" / "pretrained" / "tnbc_unet"
    post = json.loads((shipped / "postprocess.json").read_text())
    post["postprocess"].update(fg_threshold=0.5, marker_threshold=0.5, marker_h=0.0, min_size=30)
    (folder / "postprocess.json").write_text(json.dumps(post))
    shutil.copy(shipped / "stain.json", folder / "stain.json")
    return folder
