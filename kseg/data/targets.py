"""Distance-map regression targets, as the original Kidney-SegNet (after DIST) defines them.

The network regresses, for every nucleus pixel, its Euclidean distance to the nucleus boundary
(Naylor et al., "Segmentation of Nuclei in Histopathology Images by Deep Regression of the
Distance Map", TMI 2019). Each instance gets its own distance transform, so touching nuclei have a
valley between them, which is what lets the watershed split them. The original loader rescales
every target per image with min-max to [0, 255] (its peak is 255 in every image with a nucleus).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi


def instance_distance(labels: NDArray[np.integer]) -> NDArray[np.float32]:
    """Per-instance Euclidean distance to the instance's boundary (background = 0).

    Args:
        labels: ``(H, W)`` instance labels, 0 = background.

    Returns:
        ``(H, W)`` float32 distances in pixels; a nucleus's border pixels are 1.
    """
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.float32)
    for lab, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        # Pad the crop by one pixel so the image border also counts as the nucleus boundary.
        crop = np.pad(labels[sl] == lab, 1)
        dist = ndi.distance_transform_edt(crop)[1:-1, 1:-1]
        region = crop[1:-1, 1:-1]
        out[sl][region] = dist[region]
    return out


def distance_target(labels: NDArray[np.integer]) -> NDArray[np.float32]:
    """The training target: :func:`instance_distance` min-max scaled per image to [0, 255].

    An image without nuclei gives all zeros (the original divides 0 by 0 there).
    """
    dist = instance_distance(labels)
    peak = float(dist.max())
    if peak <= 0.0:
        return dist
    return dist * np.float32(255.0 / peak)


def normalized_distance(labels: NDArray[np.integer]) -> NDArray[np.float32]:
    """:func:`instance_distance` over each nucleus's own largest distance (peak 1 per nucleus).

    Unlike the per-image min-max of :func:`distance_target`, every nucleus, small or large, peaks
    at 1 and its border is at ``1 / peak``, so one marker threshold fits all nuclei (the DIST and
    HoVer-Net-style normalisation). Background is 0.
    """
    labels = np.asarray(labels)
    dist = instance_distance(labels)
    if not labels.any():
        return dist
    # int(): labels.max() + 1 would wrap to 0 for a uint16 label 65535 (the largest prepare writes).
    peak = ndi.maximum(dist, labels, index=np.arange(int(labels.max()) + 1))
    peak = np.asarray(peak, np.float32)
    peak[peak <= 0] = 1.0
    return dist / peak[labels]


def fg_dist_target(labels: NDArray[np.integer]) -> NDArray[np.float32]:
    """``(2, H, W)`` target of the ``fg_dist`` head: nucleus mask, :func:`normalized_distance`."""
    return np.stack([(np.asarray(labels) > 0).astype(np.float32), normalized_distance(labels)])


def training_target(labels: NDArray[np.integer], head: str) -> NDArray[np.float32]:
    """``(C, H, W)`` target for a model head (``dist``: 1 channel, ``fg_dist``: 2 channels)."""
    if head == "fg_dist":
        return fg_dist_target(labels)
    if head == "dist":
        return distance_target(labels)[None]
    raise ValueError(f"model.head: unknown head {head!r}; expected 'dist' or 'fg_dist'")
