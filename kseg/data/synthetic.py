"""The embedded synthetic H&E dataset: procedurally generated tiles with exact instance masks.

Every command of kseg works on a fresh clone with no network because of this module. The tiles are
made to exercise what the real data exercises:

- nuclei are textured ellipses of varied size and orientation, partly in clusters, so that touching
  and overlapping neighbours need the watershed to be separated;
- colour comes from a Beer-Lambert model: optical density ``OD = c_H * v_H + c_E * v_E`` with
  hematoxylin and eosin stain vectors (Ruifrok & Johnston 2001), intensity ``I = I0 * exp(-OD)``;
- each patient has its own stain vectors and stain strengths, so stain normalization has a spread
  to remove and patient-level splits matter;
- stroma texture (eosin), blur and sensor noise.

Masks are uint16 instance labels (0 = background). Later nuclei occlude earlier ones; a nucleus
split in two by occlusion keeps only its largest piece, and fragments below ``MIN_AREA`` pixels are
dropped, so every label is one 8-connected region. The output is a pure function of the config:
the same seed writes byte-identical PNG files.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage as ndi

from kseg.config import SyntheticConfig

#: Ruifrok & Johnston (2001) optical-density stain vectors (R, G, B), unit length.
HEMATOXYLIN = np.array([0.650, 0.704, 0.286])
EOSIN = np.array([0.072, 0.990, 0.105])
#: Smallest nucleus fragment kept, in pixels.
MIN_AREA = 12


@dataclass(frozen=True)
class PatientStain:
    """Per-patient stain appearance."""

    v_h: NDArray[np.float64]  # (3,) unit OD vector of hematoxylin
    v_e: NDArray[np.float64]  # (3,) unit OD vector of eosin
    h_strength: float  # multiplies nuclear hematoxylin concentration
    e_strength: float  # multiplies stromal eosin concentration
    background: float  # I0, the brightness of glass


def _unit(v: NDArray[np.float64]) -> NDArray[np.float64]:
    return v / np.linalg.norm(v)


def patient_stain(rng: np.random.Generator) -> PatientStain:
    """Draws one patient's stain: vectors tilted by a few degrees, strengths scaled by +-30%."""
    v_h = _unit(np.clip(HEMATOXYLIN + rng.normal(0.0, 0.06, 3), 0.02, None))
    v_e = _unit(np.clip(EOSIN + rng.normal(0.0, 0.06, 3), 0.02, None))
    return PatientStain(
        v_h=v_h,
        v_e=v_e,
        h_strength=float(rng.uniform(0.75, 1.3)),
        e_strength=float(rng.uniform(0.7, 1.3)),
        background=float(rng.uniform(232.0, 250.0)),
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to [0, 1]."""
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    lo, hi = field.min(), field.max()
    return (field - lo) / (hi - lo + 1e-12)


def _nucleus_centres(rng: np.random.Generator, n: int, size: int, r_max: float) -> np.ndarray:
    """Centres of ``n`` nuclei: about half in tight clusters (touching), the rest scattered."""
    n_clustered = n // 2
    n_clusters = max(1, n_clustered // 4)
    margin = r_max
    cluster_centres = rng.uniform(margin, size - margin, (n_clusters, 2))
    members = cluster_centres[rng.integers(0, n_clusters, n_clustered)]
    clustered = members + rng.normal(0.0, 1.3 * r_max, (n_clustered, 2))
    scattered = rng.uniform(0, size, (n - n_clustered, 2))
    return np.clip(np.concatenate([clustered, scattered]), 0, size - 1)


def draw_instances(
    rng: np.random.Generator, size: int, n_nuclei: int, radius: tuple[float, float]
) -> np.ndarray:
    """Paints ``n_nuclei`` random ellipses into a uint16 label image (later ones on top).

    Returns:
        ``(size, size)`` uint16 labels numbered 1..N in drawing order, each one connected region.
    """
    labels = np.zeros((size, size), np.uint16)
    yy, xx = np.mgrid[0:size, 0:size]
    centres = _nucleus_centres(rng, n_nuclei, size, radius[1])
    for idx, (cy, cx) in enumerate(centres, start=1):
        a = rng.uniform(*radius)
        b = a * rng.uniform(0.55, 1.0)  # aspect ratio: round to elongated
        theta = rng.uniform(0.0, np.pi)
        # Only evaluate the ellipse inside its bounding box (speed; shapes (h, w)).
        r = int(np.ceil(a)) + 1
        y0, y1 = max(0, int(cy) - r), min(size, int(cy) + r + 1)
        x0, x1 = max(0, int(cx) - r), min(size, int(cx) + r + 1)
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        # A wobbly boundary: real nuclei are not perfect ellipses.
        wobble = 1.0 + 0.08 * np.sin(3 * np.arctan2(v, u) + rng.uniform(0, 2 * np.pi))
        inside = (u / a) ** 2 + (v / b) ** 2 <= wobble**2
        labels[y0:y1, x0:x1][inside] = idx
    return _clean_labels(labels)


def _clean_labels(labels: np.ndarray) -> np.ndarray:
    """Keeps the largest 8-connected piece of each label, drops tiny ones, renumbers 1..N."""
    out = np.zeros_like(labels)
    next_id = 1
    structure = np.ones((3, 3), bool)
    for lab, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        region = labels[sl] == lab
        pieces, n = ndi.label(region, structure=structure)
        if n > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            region = pieces == (int(np.argmax(sizes)) + 1)
        if region.sum() < MIN_AREA:
            continue
        out[sl][region] = next_id
        next_id += 1
    return out


def render_tile(
    rng: np.random.Generator, labels: np.ndarray, stain: PatientStain
) -> NDArray[np.uint8]:
    """Stains a label image into an RGB H&E-like tile through Beer-Lambert.

    Args:
        rng: Random generator (texture and noise).
        labels: ``(H, W)`` instance labels.
        stain: The patient's stain appearance.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.
    """
    shape = labels.shape
    nuclei = labels > 0
    # Stroma: fibrous eosin texture with a few empty (lumen / fat) regions.
    fibres = _smooth_noise(rng, shape, 2.0) * 0.6 + _smooth_noise(rng, shape, 8.0) * 0.4
    lumen = _smooth_noise(rng, shape, 20.0) > 0.78
    c_e = stain.e_strength * (0.15 + 0.55 * fibres) * np.where(lumen, 0.1, 1.0)
    c_h = 0.04 + 0.05 * _smooth_noise(rng, shape, 3.0)
    # Nuclei: strong hematoxylin with chromatin granules; each nucleus its own darkness.
    darkness = rng.uniform(1.0, 1.8, int(labels.max()) + 1)
    chromatin = 0.75 + 0.5 * _smooth_noise(rng, shape, 1.0)
    c_h = np.where(nuclei, stain.h_strength * darkness[labels] * chromatin, c_h)
    c_e = np.where(nuclei, 0.3 * c_e, c_e)
    # Soft nucleus edges: blur concentrations a little, then OD -> intensity.
    c_h = ndi.gaussian_filter(c_h, 0.7)
    od = c_h[..., None] * stain.v_h + c_e[..., None] * stain.v_e  # (H, W, 3)
    rgb = stain.background * np.exp(-od)
    rgb = ndi.gaussian_filter(rgb, sigma=(0.6, 0.6, 0))  # optics blur
    rgb = rgb + rng.normal(0.0, 2.5, rgb.shape)  # sensor noise
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def generate(cfg: SyntheticConfig, out_dir: Path) -> list[dict[str, str]]:
    """Writes the synthetic dataset in the ``folder`` layout.

    Layout: ``images/<tile_id>.png`` (RGB uint8), ``masks/<tile_id>.png`` (uint16 instance labels)
    and ``index.csv`` (``tile_id, patient, image, mask``). ``out_dir`` should be a fresh staging
    folder; the caller moves it into place.

    Args:
        cfg: Size and seed of the dataset.
        out_dir: Folder to write into (created if missing).

    Returns:
        The index rows.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    lo_n, hi_n = cfg.nuclei_per_tile
    rows: list[dict[str, str]] = []
    for p in range(cfg.n_patients):
        patient = f"P{p + 1:02d}"
        # Independent streams per patient and tile: adding tiles never changes existing ones.
        stain = patient_stain(np.random.default_rng([cfg.seed, p]))
        for t in range(cfg.tiles_per_patient):
            rng = np.random.default_rng([cfg.seed, p, t + 1])
            labels = draw_instances(
                rng, cfg.tile_size, int(rng.integers(lo_n, hi_n + 1)), cfg.nucleus_radius
            )
            rgb = render_tile(rng, labels, stain)
            tile_id = f"{patient}_{t + 1:02d}"
            (out_dir / "images" / f"{tile_id}.png").write_bytes(_png_bytes(rgb))
            (out_dir / "masks" / f"{tile_id}.png").write_bytes(_png_bytes(labels))
            rows.append(
                {
                    "tile_id": tile_id,
                    "patient": patient,
                    "image": f"images/{tile_id}.png",
                    "mask": f"masks/{tile_id}.png",
                }
            )
    with (out_dir / "index.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["tile_id", "patient", "image", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
