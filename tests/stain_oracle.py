"""Stain spread measured without kseg's Macenko estimator (which the normalizer itself uses).

Ground-truth nuclei tell where hematoxylin is: the mean optical-density (OD) colour of the pixels
inside the nuclei is the hematoxylin colour of the tile, the mean OD colour of the tissue well away
from them is the eosin (stroma) colour. The spread of these colours over patients, and of
scikit-image's fixed-vector colour deconvolution (``rgb2hed``, Ruifrok & Johnston) of the same
regions, measures how different the patients' stains look, independently of the angle percentiles
that Macenko normalisation fits. A normalizer that only satisfied its own estimator (for example
one that swapped the two stains) would not pass.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed


def _regions(mask: np.ndarray, od_sum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus interiors (2 px in from the outline) and stained tissue >= 5 px from any nucleus."""
    nuclei = ndi.binary_erosion(mask, iterations=2)
    stroma = ~ndi.binary_dilation(mask, iterations=4) & (od_sum > 0.3)
    return nuclei, stroma


def region_colours(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(3, 2)`` unit mean OD colours of the nuclei (column 0) and of the stroma (column 1)."""
    od = -np.log((rgb.astype(np.float64) + 1.0) / 256.0)
    cols = []
    for sel in _regions(mask, od.sum(-1)):
        mean = od[sel].mean(0)
        cols.append(mean / np.linalg.norm(mean))
    return np.stack(cols, axis=1)


def hed_levels(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``rgb2hed`` hematoxylin in the nuclei, hematoxylin in the stroma, eosin in the stroma."""
    hed = rgb2hed(rgb)
    od_sum = -np.log((rgb.astype(np.float64) + 1.0) / 256.0).sum(-1)
    nuclei, stroma = _regions(mask, od_sum)
    return np.array(
        [hed[..., 0][nuclei].mean(), hed[..., 0][stroma].mean(), hed[..., 1][stroma].mean()]
    )


def angular_spread(per_patient: dict[str, list[np.ndarray]]) -> tuple[float, float]:
    """Mean angle (deg) of each patient's mean nucleus / stroma colour to the mean over patients."""
    means = [np.mean(v, axis=0) for v in per_patient.values()]
    out = []
    for k in range(2):
        stack = np.stack([m[:, k] / np.linalg.norm(m[:, k]) for m in means])
        centre = stack.mean(0) / np.linalg.norm(stack.mean(0))
        out.append(float(np.degrees(np.arccos(np.clip(stack @ centre, -1.0, 1.0))).mean()))
    return out[0], out[1]


def relative_spread(per_patient: dict[str, list[np.ndarray]]) -> np.ndarray:
    """Coefficient of variation over patients of each patient's mean of a vector of levels."""
    stack = np.stack([np.mean(v, axis=0) for v in per_patient.values()])
    return stack.std(0) / np.abs(stack.mean(0))
