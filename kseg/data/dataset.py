"""Prepared tiles in memory, and the training dataset that crops and augments them.

Every random choice of a sample is drawn from ``np.random.default_rng([seed, epoch, index])``, so a
sample depends only on (seed, epoch, index): a resumed run sees exactly the batches an uninterrupted
run would have seen, and DDP ranks never share a random stream by accident.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from kseg.data.targets import training_target
from kseg.infer import Preprocess

#: ``augment(image, labels, rng) -> (image, labels)``; must keep labels exact integers.
Augment = Callable[
    [NDArray[np.uint8], NDArray[np.integer], np.random.Generator],
    tuple[NDArray[np.uint8], NDArray[np.integer]],
]

SPLITS = ("train", "val", "test")


@dataclass
class Tiles:
    """Tiles of one split, loaded once (the datasets of this field fit in memory)."""

    ids: list[str]
    images: list[NDArray[np.uint8]]  # each (H, W, 3) uint8
    labels: list[NDArray[np.int32]]  # each (H, W) instance labels

    def __len__(self) -> int:
        return len(self.ids)


def load_split(prepared_dir: Path) -> dict[str, list[str]]:
    """Reads ``split.json`` of the prepare stage: tile ids per split."""
    path = Path(prepared_dir) / "split.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path}: cannot read the split ({err}); run `kseg prepare` first"
        ) from err
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        raise ValueError(f"{path}: missing split(s) {missing}; expected keys {list(SPLITS)}")
    return {s: [str(i) for i in raw[s]] for s in SPLITS}


def read_rgb(path: Path) -> NDArray[np.uint8]:
    """Reads an image file as ``(H, W, 3)`` uint8 RGB."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def load_tiles(image_dir: Path, label_dir: Path, ids: list[str]) -> Tiles:
    """Loads ``<id>.png`` images (RGB) and uint16 label PNGs for ``ids``."""
    images, labels = [], []
    for tile_id in ids:
        images.append(read_rgb(Path(image_dir) / f"{tile_id}.png"))
        with Image.open(Path(label_dir) / f"{tile_id}.png") as lab:
            labels.append(np.asarray(lab).astype(np.int32))
        if images[-1].shape[:2] != labels[-1].shape:
            raise ValueError(
                f"{tile_id}: image {images[-1].shape[:2]} and labels {labels[-1].shape} differ"
            )
    return Tiles(list(ids), images, labels)


def resample_tiles(tiles: Tiles, scale: float) -> Tiles:
    """``tiles`` at the network's resolution (``model.input_scale``; :mod:`kseg.resample`).

    Images are resampled by area (when shrinking), instance labels nearest neighbour, so every
    nucleus keeps its id and the targets computed from the labels keep touching nuclei apart.
    ``scale`` 1 returns ``tiles`` itself.
    """
    if scale == 1.0:
        return tiles
    from kseg.resample import resize_image, resize_labels

    return Tiles(
        list(tiles.ids),
        [resize_image(image, scale) for image in tiles.images],
        [resize_labels(labels, scale) for labels in tiles.labels],
    )


def random_crop(
    image: NDArray[np.uint8],
    target: NDArray[np.float32],
    size: int,
    rng: np.random.Generator,
) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """A ``size`` x ``size`` crop at a random place; smaller tiles are padded (reflect / zeros).

    Args:
        image: ``(H, W, 3)`` uint8.
        target: ``(H, W)`` or ``(C, H, W)`` float32, cropped at the same place.
        size: Crop edge.
        rng: Random stream of the sample.
    """
    h, w = target.shape[-2:]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
        target = np.pad(target, [(0, 0)] * (target.ndim - 2) + [(0, ph), (0, pw)])
        h, w = target.shape[-2:]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return image[y : y + size, x : x + size], target[..., y : y + size, x : x + size]


class TrainDataset(torch.utils.data.Dataset):
    """Random crops of the training tiles with augmentation and the head's targets.

    The whole tile is augmented first and its distance target computed from the augmented labels
    (so a nucleus cut by the crop keeps its true distances), then the crop is taken.
    """

    def __init__(
        self,
        tiles: Tiles,
        tile_size: int,
        preprocess: Preprocess,
        seed: int,
        samples_per_epoch: int = 0,
        augment: Augment | None = None,
        head: str = "dist",
    ) -> None:
        if len(tiles) == 0:
            raise ValueError("the training split is empty; check split.json")
        self.tiles = tiles
        self.tile_size = tile_size
        self.preprocess = preprocess
        self.seed = seed
        self.length = samples_per_epoch or len(tiles)
        self.augment = augment
        self.head = head
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the random stream of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        k = index % len(self.tiles)
        image, labels = self.tiles.images[k], self.tiles.labels[k]
        if self.augment is not None:
            image, labels = self.augment(image, labels, rng)
        target = training_target(labels, self.head)  # (C, H, W)
        image, target = random_crop(image, target, self.tile_size, rng)
        x = self.preprocess.to_tensor(image)[0]  # (3, T, T)
        y = torch.from_numpy(np.ascontiguousarray(target))  # (C, T, T)
        return x, y
