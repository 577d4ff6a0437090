"""Resampling between the data's resolution and the network's (``model.input_scale``).

A model trained at ``input_scale`` 0.5 sees every image at half its resolution: each window covers
4x the tissue for the same compute, and each nucleus is half as wide in pixels. Training tiles are
resampled once when loaded; at inference the image is resampled down, the network runs, and its
maps are resampled back to the image's own size, so post-processing, metrics, labels and outlines
are all at the input's resolution (and the post-processing fitted on validation tiles is fitted
there too).

The methods are the ones that keep each kind of array honest:

- RGB: ``cv2.INTER_AREA`` when shrinking (the mean of the pixels each output pixel covers, no
  aliasing of the chromatin texture), ``cv2.INTER_LINEAR`` when enlarging;
- instance labels: nearest neighbour (ids are never mixed; a nucleus too small for the new grid
  may vanish);
- maps (probabilities, distances): bilinear, with half-pixel centres like the images, so a map
  pixel lands back where its input pixels came from.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray


def scaled_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    """``(height, width)`` of an image resampled by ``scale`` (rounded, at least 1 pixel)."""
    if not scale > 0:
        raise ValueError(f"scale={scale!r}: must be > 0")
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(rgb: NDArray[np.uint8], scale: float) -> NDArray[np.uint8]:
    """``(H, W, 3)`` uint8 resampled by ``scale`` (area when shrinking, bilinear when enlarging)."""
    if scale == 1.0:
        return rgb
    h, w = scaled_shape(rgb.shape[0], rgb.shape[1], scale)
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(rgb), (w, h), interpolation=interp)


def resize_labels(labels: NDArray[np.integer], scale: float) -> NDArray[np.integer]:
    """``(H, W)`` instance labels resampled by ``scale``, nearest neighbour (same dtype).

    Output pixel ``i`` takes input pixel ``floor((i + 0.5) / scale)``: the one under its centre.
    Done with numpy indexing because OpenCV's resize refuses 32-bit integer labels.
    """
    if scale == 1.0:
        return labels
    h, w = scaled_shape(labels.shape[0], labels.shape[1], scale)
    return _nearest(labels, h, w, scale, scale)


def resize_labels_to(labels: NDArray[np.integer], height: int, width: int) -> NDArray[np.integer]:
    """``(H, W)`` instance labels resampled to ``(height, width)``, nearest neighbour.

    The inverse of :func:`resize_labels` up to rounding: labels made on a resampled image go back
    to the exact grid of the original (whose size ``scaled_shape`` may not round-trip).
    """
    if labels.shape == (height, width):
        return labels
    return _nearest(labels, height, width, height / labels.shape[0], width / labels.shape[1])


def _nearest(
    labels: NDArray[np.integer], height: int, width: int, scale_y: float, scale_x: float
) -> NDArray[np.integer]:
    rows = np.minimum(((np.arange(height) + 0.5) / scale_y).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) / scale_x).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def resize_maps(maps: NDArray[np.float32], height: int, width: int) -> NDArray[np.float32]:
    """``(C, h, w)`` float maps resampled bilinearly to ``(C, height, width)``."""
    if maps.shape[1:] == (height, width):
        return maps
    return np.stack(
        [
            cv2.resize(np.ascontiguousarray(c), (width, height), interpolation=cv2.INTER_LINEAR)
            for c in maps
        ]
    ).astype(np.float32, copy=False)
