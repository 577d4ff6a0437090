"""Training-time augmentation with albumentations, safe for instance masks.

The pipeline (each step configured in ``params.yaml`` under ``augment:``, seeded):

1. geometry, applied to the image and the label image together: horizontal and vertical flips and
   random multiples of 90 degrees (the original Kidney-SegNet's augmentation), then an optional
   affine warp (scale, rotation, shear) and an optional elastic warp;
2. colour, applied to the image only: stain jitter in HED (hematoxylin, eosin, DAB) space
   (Tellez et al. 2019), brightness/contrast, Gaussian blur.

Instance labels stay exact: masks are resampled with nearest-neighbour interpolation only (never
averaged), so every output label is one of the input labels. Warps use reflected borders (no black
corners unlike any real tile); a label that a warp cuts into several pieces, or that the reflection
mirrors into a second place, is split so that every label is again one 8-connected region (new ids
above the old maximum).

Distance targets are *recomputed* from the augmented labels (``kseg.data.targets.distance_target``,
done by the training dataset), never warped: a warped distance map is not the distance map of the
warped nuclei, and after a flip or a 90-degree rotation the two coincide exactly (tested).

Random crops to ``model.tile_size`` are not part of this module: the training dataset
(``kseg.data.dataset.TrainDataset``) augments the whole tile, computes the target, then crops, so
nuclei cut by the crop keep their true distances.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from kseg.config import AugmentConfig

# skimage.color's HED stain matrix (Ruifrok & Johnston 2001): rows are the H, E, D OD vectors.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
#: OD of each grey level, ``-ln((I + 1) / 256)``: 255 is exactly 0 and 0 stays finite.
_OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


def hed_jitter(
    rgb: NDArray[np.uint8], scale: NDArray[np.floating], shift: NDArray[np.floating]
) -> NDArray[np.uint8]:
    """Scales and shifts the H, E and D concentrations of an RGB image.

    ``hed = od @ HED_FROM_RGB``; ``hed' = hed * scale + shift``; ``od' = hed' @ RGB_FROM_HED``.
    The map is linear in optical density, so it folds into one 3x3 matrix and an offset (a few
    milliseconds for 512x512, against ~60 ms for skimage's rgb2hed/hed2rgb round trip), and
    ``scale = 1, shift = 0`` is the identity exactly.

    Args:
        rgb: ``(H, W, 3)`` uint8.
        scale: ``(3,)`` multipliers of H, E, D.
        shift: ``(3,)`` offsets of H, E, D in optical-density units (natural log).

    Returns:
        ``(H, W, 3)`` uint8.
    """
    mat = (HED_FROM_RGB * np.asarray(scale, np.float64)[None, :]) @ RGB_FROM_HED  # (3, 3)
    off = np.asarray(shift, np.float64) @ RGB_FROM_HED  # (3,)
    od = _OD_LUT[rgb] @ mat.astype(np.float32) + off.astype(np.float32)  # (H, W, 3)
    out = np.float32(256.0) * np.exp(-od) - np.float32(1.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _albumentations() -> Any:
    """Imports albumentations without its update check (an HTTP call to PyPI on every import)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def _hed_transform_class() -> type:
    """Builds the albumentations transform class (albumentations is imported lazily).

    Not albumentations' own ``HEStain``: that one projects onto two stains (not the identity at
    zero magnitude), parameterises differently and is 2.5-17x slower here (docs/stain.md).
    """
    A = _albumentations()

    class HEDJitter(A.ImageOnlyTransform):
        """Random stain jitter in HED space: ``hed * U(1-sigma, 1+sigma) + U(-bias, bias)``."""

        class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
            sigma: float
            bias: float

        def __init__(self, sigma: float = 0.05, bias: float = 0.02, p: float = 0.5) -> None:
            super().__init__(p=p)
            self.sigma = sigma
            self.bias = bias

        def get_params(self) -> dict[str, Any]:
            rng = self.random_generator
            return {
                "scale": rng.uniform(1.0 - self.sigma, 1.0 + self.sigma, 3),
                "shift": rng.uniform(-self.bias, self.bias, 3),
            }

        def apply(
            self,
            img: NDArray[np.uint8],
            scale: NDArray[np.floating],
            shift: NDArray[np.floating],
            **params: Any,
        ) -> NDArray[np.uint8]:
            return hed_jitter(img, scale, shift)

        def get_transform_init_args_names(self) -> tuple[str, ...]:
            return ("sigma", "bias")

    return HEDJitter


def split_fragments(labels: NDArray[np.integer]) -> NDArray[np.integer]:
    """Gives every extra 8-connected piece of a label a new id (above the current maximum).

    Args:
        labels: ``(H, W)`` instance labels.

    Returns:
        Labels of the same shape (int32 if the new ids would not fit the input dtype) in which every
        id is one connected region; ids that were already one region are unchanged.
    """
    out = labels.copy()
    next_id = int(labels.max(initial=0)) + 1
    structure = np.ones((3, 3), bool)
    for lab, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        pieces, n = ndi.label(labels[sl] == lab, structure=structure)
        for k in range(2, n + 1):
            if next_id > np.iinfo(out.dtype).max:
                out = out.astype(np.int32)
            out[sl][pieces == k] = next_id
            next_id += 1
    return out


class Augmenter:
    """``augmenter(image, labels, rng=None) -> (image, labels)``: one seeded augmentation.

    With ``rng`` (a numpy Generator, e.g. the training dataset's per-sample stream) the draw
    depends only on that generator; without it, on the seed and the number of calls so far.
    """

    def __init__(self, cfg: AugmentConfig, seed: int) -> None:
        import cv2

        A = _albumentations()

        self.cfg = cfg
        warp = {
            "interpolation": cv2.INTER_LINEAR,
            "mask_interpolation": cv2.INTER_NEAREST,  # labels stay exact
            "border_mode": cv2.BORDER_REFLECT_101,
        }
        steps: list[Any] = []
        if cfg.flips:
            steps += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
        if cfg.rotate90:
            steps.append(A.RandomRotate90(p=1.0))  # k uniform in {0, 1, 2, 3}
        if cfg.affine_p > 0:
            rot, shear = cfg.affine_rotate, cfg.affine_shear
            steps.append(
                A.Affine(
                    scale=cfg.affine_scale,
                    rotate=(-rot, rot),
                    shear=(-shear, shear),
                    p=cfg.affine_p,
                    **warp,
                )
            )
        if cfg.elastic_p > 0:
            steps.append(
                A.ElasticTransform(
                    alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma, p=cfg.elastic_p, **warp
                )
            )
        if cfg.hed_p > 0:
            steps.append(_hed_transform_class()(cfg.hed_sigma, cfg.hed_bias, p=cfg.hed_p))
        if cfg.brightness_contrast_p > 0:
            steps.append(
                A.RandomBrightnessContrast(
                    brightness_limit=(-cfg.brightness, cfg.brightness),
                    contrast_limit=(-cfg.contrast, cfg.contrast),
                    p=cfg.brightness_contrast_p,
                )
            )
        if cfg.blur_p > 0:
            steps.append(A.GaussianBlur(blur_limit=0, sigma_limit=cfg.blur_sigma, p=cfg.blur_p))
        self.warps = cfg.affine_p > 0 or cfg.elastic_p > 0
        self.compose = A.Compose(steps, p=1.0, seed=seed)

    def __call__(
        self,
        image: NDArray[np.uint8],
        labels: NDArray[np.integer],
        rng: np.random.Generator | None = None,
    ) -> tuple[NDArray[np.uint8], NDArray[np.integer]]:
        """Augments one tile and its instance labels.

        Args:
            image: ``(H, W, 3)`` uint8 RGB.
            labels: ``(H, W)`` integer instance labels, 0 = background.
            rng: Optional generator the draw is taken from.

        Returns:
            The augmented image (uint8) and labels (the input's integer dtype, or int32 if new
            fragment ids needed more room). A 90-degree rotation of a non-square tile swaps H, W.

        Raises:
            ValueError: If the shapes or dtypes do not match this contract.
        """
        image, labels = np.asarray(image), np.asarray(labels)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"augment: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}"
            )
        if labels.shape != image.shape[:2] or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"augment: labels must be integer {image.shape[:2]}, got "
                f"{labels.shape} {labels.dtype}"
            )
        if rng is not None:
            self.compose.set_random_state(
                np.random.default_rng(rng.integers(2**63)), random.Random(int(rng.integers(2**63)))
            )
        # OpenCV resamples uint16 and int32 masks exactly; other integer types go through int32.
        work = labels if labels.dtype in (np.uint16, np.int32) else labels.astype(np.int32)
        out = self.compose(image=np.ascontiguousarray(image), mask=np.ascontiguousarray(work))
        new_labels = out["mask"]
        if self.warps:
            new_labels = split_fragments(new_labels)
        if (
            new_labels.dtype != labels.dtype
            and int(new_labels.max(initial=0)) <= np.iinfo(labels.dtype).max
        ):
            new_labels = new_labels.astype(labels.dtype)
        return out["image"], new_labels


def build_augmentation(cfg: AugmentConfig, seed: int) -> Augmenter:
    """The training augmentation described by ``cfg``, seeded with ``seed``."""
    return Augmenter(cfg, seed)
