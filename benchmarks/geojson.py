"""Polygon speed: tracing masks to exact QuPath polygons and rasterizing them back (slide seams).

Usage: python benchmarks/geojson.py [--quick]

Whole-slide prediction (kseg.slide) rasterizes the polygons of every pair of overlapping border
nuclei to resolve the seams between blocks, and ``kseg predict`` traces every nucleus to polygons.
Both are timed against the implementation they replaced, in the same run, on the same shapes:

- ``rasterize``: ``kseg.geojson.rings_mask`` (one scanline fill of all rings of a nucleus) against
  skimage's ``polygon`` per ring, XOR-ed (kseg up to 2026-12-07), both checked equal;
- ``trace``: ``kseg.geojson.mask_polygons`` (holes given to their 4-connected part through a label
  image) against the same tracing with holes given to the smallest shell containing a probe point
  by a Python point-in-polygon loop (kseg up to 2026-12-07), both checked equal.

Shapes: the ground-truth nuclei of the TNBC tiles (small, few holes), and single ragged regions
in 160 x 160 boxes (long outlines, many holes: what the small random model of tests/test_slide.py
makes, and what a real model makes of dense debris).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from timing import best_of  # noqa: E402


def skimage_rings(rings: list, shape: tuple[int, int]) -> np.ndarray:
    """The replaced rasterizer: skimage's point-in-polygon fill per ring, XOR-ed."""
    from skimage.draw import polygon

    out = np.zeros(shape, bool)
    for ring in rings:
        pts = np.asarray(ring, np.float64)
        one = np.zeros(shape, bool)
        rr, cc = polygon(pts[:, 1] - 0.5, pts[:, 0] - 0.5, shape=shape)
        one[rr, cc] = True
        out ^= one
    return out


def _inside(point: tuple[float, float], ring: list) -> bool:
    x, y = point
    inside = False
    for (x0, y0), (x1, y1) in itertools.pairwise(ring):
        if (y0 > y) != (y1 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside


def probe_polygons(mask: np.ndarray) -> list:
    """The replaced tracing: holes to the smallest shell holding a probe point beside them."""
    from kseg.geojson import _closed_loops, _simplify, signed_area

    shells, holes, probes = [], [], []
    for loop in _closed_loops(mask):
        ring = _simplify(loop)
        if signed_area(ring) > 0:
            shells.append([ring])
            continue
        holes.append(ring)
        (x0, y0), (x1, y1) = loop[0], loop[1]
        probes.append(((x0 + x1) / 2 + (y1 - y0) * 0.25, (y0 + y1) / 2 - (x1 - x0) * 0.25))
    if holes and len(shells) > 1:
        shells.sort(key=lambda poly: signed_area(poly[0]))
    for hole, probe in zip(holes, probes, strict=True):
        next(p for p in shells if _inside(probe, p[0])).append(hole)
    shells.sort(key=lambda poly: (min(p[1] for p in poly[0]), min(p[0] for p in poly[0])))
    return shells


def tnbc_nuclei(limit: int) -> list[np.ndarray]:
    """Boolean crops (one pixel of margin) of the TNBC ground-truth nuclei."""
    from PIL import Image

    from tests.conftest import shared_dir

    shared = shared_dir()
    gt = sorted((shared / "data" / "TNBC_NucleiSegmentation").glob("GT_*/*.png")) if shared else []
    if not gt:
        raise SystemExit("benchmarks/geojson.py needs the TNBC tiles: set KSEG_SHARED")
    crops = []
    for path in gt:
        mask = np.asarray(Image.open(path))
        labels, _ = ndi.label(mask.reshape((*mask.shape[:2], -1))[..., 0] > 0)
        for sl in ndi.find_objects(labels):
            crops.append(np.pad(labels[sl] > 0, 1))
            if len(crops) == limit:
                return crops
    return crops


def ragged_regions(n: int) -> list[np.ndarray]:
    """Large single regions full of holes: the largest 4-connected part of opened speckle."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        labels, _ = ndi.label(ndi.binary_opening(rng.random((160, 160)) > 0.3))
        out.append(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return out


def main() -> None:
    from kseg.geojson import mask_polygons, rings_mask

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeat = 1 if args.quick else 3
    sets = {
        "TNBC ground-truth nuclei": tnbc_nuclei(300 if args.quick else 2000),
        "ragged 160 x 160 regions with holes": ragged_regions(2 if args.quick else 8),
    }
    print("\n| step | shapes | rings | baseline s | kseg s | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, masks in sets.items():
        polys = [mask_polygons(m) for m in masks]
        assert all(
            p == q for p, q in zip(polys, (probe_polygons(m) for m in masks), strict=True)
        ), "tracing differs from the baseline"
        rings = [[r for poly in ps for r in poly] for ps in polys]
        n_rings = sum(len(r) for r in rings)
        for r, m in zip(rings, masks, strict=True):
            assert (rings_mask(r, m.shape) == m).all() and (skimage_rings(r, m.shape) == m).all()
        pairs = list(zip(rings, masks, strict=True))
        times = (
            best_of(lambda: [skimage_rings(r, m.shape) for r, m in pairs], repeat)[0],  # noqa: B023
            best_of(lambda: [rings_mask(r, m.shape) for r, m in pairs], repeat)[0],  # noqa: B023
        )
        row(f"rasterize | {name} ({len(masks)}) | {n_rings}", *times)
        times = (
            best_of(lambda: [probe_polygons(m) for m in masks], repeat)[0],  # noqa: B023
            best_of(lambda: [mask_polygons(m) for m in masks], repeat)[0],  # noqa: B023
        )
        row(f"trace | {name} ({len(masks)}) | {n_rings}", *times)


def row(cells: str, base: float, new: float) -> None:
    print(f"| {cells} | {base:.3f} | {new:.3f} | {base / new:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
