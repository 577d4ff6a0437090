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
