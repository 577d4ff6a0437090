"""Known answers for the distance-map targets, computed without kseg (or scipy's EDT).

The target of the original (DIST / Kidney-SegNet) is, for every pixel of a nucleus, its Euclidean
distance to the nearest pixel that is not that nucleus (another nucleus, background, or outside the
image), min-max scaled per tile so that the tile's peak is 255. Computed here by brute force from
that definition, so a shortcut in kseg (one EDT of the whole foreground, which loses the valley
between touching nuclei, or a scale other than the per-tile 0..255) cannot agree with it.
"""

from __future__ import annotations

import numpy as np


def brute_force_instance_distance(labels: np.ndarray) -> np.ndarray:
    """Per-instance distance to the nearest pixel outside the instance (image border included)."""
    labels = np.asarray(labels)
    # Pad by one pixel of "not a nucleus": the image border is a boundary of the nucleus.
    padded = np.pad(labels.astype(np.int64), 1, constant_values=-1)
    out = np.zeros(labels.shape, np.float64)
    for lab in np.unique(labels[labels > 0]):
        inside = np.argwhere(padded == lab)
        outside = np.argwhere(padded != lab)
        d2 = ((inside[:, None, :] - outside[None, :, :]) ** 2).sum(-1).min(1)
        out[tuple((inside - 1).T)] = np.sqrt(d2)
    return out


def brute_force_target(labels: np.ndarray) -> np.ndarray:
    """:func:`brute_force_instance_distance` scaled per tile to a peak of 255 (0 without nuclei)."""
    dist = brute_force_instance_distance(labels)
    return dist * (255.0 / dist.max()) if dist.max() > 0 else dist


def disk(radius: int, margin: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A disk ``|p - c| <= radius`` (integer radius) and its known per-instance distance.

    The pixel nearest outside the disk on the ray from the centre along an axis through ``(0, k)``
    is ``(1, radius)`` (norm^2 = radius^2 + 1, the least lattice norm above radius^2), so the
    distance at ``(0, k)`` is ``sqrt(1 + (radius - k)^2)``: 1 on the rim, ``sqrt(1 + radius^2)``
    in the centre. Returns the labels and the distances along the row through the centre, from the
    centre to the rim.
    """
    size = 2 * (radius + margin) + 1
    c = radius + margin
    yy, xx = np.mgrid[:size, :size]
    labels = (((yy - c) ** 2 + (xx - c) ** 2) <= radius**2).astype(np.uint16)
    k = np.arange(radius + 1)
    return labels, np.sqrt(1.0 + (radius - k) ** 2)


def square_distance(side: int) -> np.ndarray:
    """Known distance of a lone ``side x side`` square: the nearest outside pixel is straight out
    through the nearest side (a diagonal step is never shorter), ``min(i + 1, side - i, ...)``."""
    i = np.arange(side)
    edge = np.minimum(i + 1, side - i)
    return np.minimum.outer(edge, edge).astype(np.float64)


def touching_squares() -> tuple[np.ndarray, np.ndarray]:
    """A 6x6 nucleus (label 1) and a 4x4 one (label 2) sharing an edge, in a 12 x 17 tile.

    Returns the labels and the known target: each square keeps its own distances (peak 3 for the
    6x6 one, so the scale is 255 / 3 = 85 per pixel), and the pixels on either side of the contact
    are 85, a valley; one EDT of the whole foreground would put up to 255 there. The layout has no
    symmetry, so each of the 8 flips and rotations gives a different label image.
    """
    labels = np.zeros((12, 17), np.uint16)
    dist = np.zeros((12, 17), np.float64)
    labels[2:8, 3:9] = 1
    dist[2:8, 3:9] = square_distance(6)
    labels[3:7, 9:13] = 2
    dist[3:7, 9:13] = square_distance(4)
    return labels, dist * 85.0
