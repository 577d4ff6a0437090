"""Stain normalization speed: kseg vs torchstain's numpy backend, measured in the same run.

    .venv/bin/python benchmarks/stain.py [--quick] [--spread]

Tiles: the TNBC tiles (512x512) from ../shared/data when present (KSEG_SHARED overrides), else
synthetic 512x512 tiles. Prints tiles per second per method and the ratio to the library's direct
use (torchstain ``normalize``; ``stains=False`` for Macenko so both do the same work), plus HED
jitter against skimage's rgb2hed/hed2rgb round trip. ``--spread`` also prints the per-patient
stain-vector spread on all TNBC tiles before and after each method (fit on 7 of 11 patients).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from kseg.augment import hed_jitter
from kseg.config import StainConfig
from kseg.normalize import stain_spread
from kseg.stain import StainWarning, fit_normalizer

REPO = Path(__file__).resolve().parents[1]


def load_tiles(n: int) -> tuple[str, dict[str, tuple[str, np.ndarray]]]:
    shared = Path(os.environ.get("KSEG_SHARED", REPO.parent / "shared"))
    folder = shared / "data" / "TNBC_NucleiSegmentation"
    tiles = {}
    for path in sorted(folder.glob("Slide_*/*.png")):
        with Image.open(path) as img:
            tiles[path.stem] = (path.parent.name.split("_")[1], np.asarray(img.convert("RGB")))
    if tiles:
        return "TNBC 512x512", tiles
    from kseg.data.synthetic import draw_instances, patient_stain, render_tile

    for k in range(n):
        rng = np.random.default_rng(k)
        labels = draw_instances(rng, 512, 200, (5.0, 11.0))
        stain = patient_stain(np.random.default_rng(k // 2))
        tiles[f"S{k}"] = (f"P{k // 2}", render_tile(rng, labels, stain))
    return "synthetic 512x512", tiles


def rate(fn: Callable[[np.ndarray], object], images: list[np.ndarray], repeat: int) -> float:
    """Best-of-``repeat`` tiles per second over ``images``."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for img in images:
            fn(img)
        best = min(best, time.perf_counter() - t0)
    return len(images) / best


def speed(images: list[np.ndarray], repeat: int) -> None:
    import torchstain
    from skimage.color import hed2rgb, rgb2hed

    ref = images[0]
    rows = []
    for method in ("reinhard", "macenko"):
        ours = fit_normalizer(StainConfig(method=method, reference="r"), [ref], tile_ids=["r"])
        cls = (
            torchstain.normalizers.MacenkoNormalizer
            if method == "macenko"
            else torchstain.normalizers.ReinhardNormalizer
        )
        lib = cls(backend="numpy")
        lib.fit(ref)
        kw = {"stains": False} if method == "macenko" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r_lib = rate(lambda x, lib=lib, kw=kw: lib.normalize(x, **kw), images, repeat)
            r_ours = rate(ours.transform, images, repeat)
        rows.append((method, r_ours, f"torchstain {method}", r_lib))
    scale, shift = np.array([1.05, 0.95, 1.0]), np.array([0.01, -0.01, 0.0])

    def skimage_hed(x: np.ndarray) -> np.ndarray:
        hed = rgb2hed(x) * scale + shift
        return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)

    rows.append(
        (
            "hed jitter",
            rate(lambda x: hed_jitter(x, scale, shift), images, repeat),
            "skimage rgb2hed/hed2rgb",
            rate(skimage_hed, images, repeat),
        )
    )
    print(f"{'kseg':<12} {'tiles/s':>9}   {'baseline':<24} {'tiles/s':>9}   {'speed-up':>8}")
    for name, ours_r, base, base_r in rows:
        print(f"{name:<12} {ours_r:>9.1f}   {base:<24} {base_r:>9.1f}   {ours_r / base_r:>7.2f}x")


def spread(tiles: dict[str, tuple[str, np.ndarray]]) -> None:
    patients = sorted({p for p, _ in tiles.values()})
    train = set(patients[::3]) | set(patients[1::3])
    cfg = StainConfig(method="macenko")

    def measure(images: dict[str, tuple[str, np.ndarray]]) -> dict[str, float]:
        return stain_spread(
            {k: img for k, (_, img) in images.items()}, {k: p for k, (p, _) in images.items()}, cfg
        )

    print(f"\nper-patient mean stain-vector spread, {len(tiles)} tiles, {len(patients)} patients")
    print(f"{'method':<10} {'H (deg)':>8} {'E (deg)':>8}")
    base = measure(tiles)
    print(f"{'none':<10} {base['h_deg']:>8.2f} {base['e_deg']:>8.2f}")
    for method in ("reinhard", "macenko"):
        norm = fit_normalizer(
            StainConfig(method=method), [img for p, img in tiles.values() if p in train]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StainWarning)
            after = measure({k: (p, norm.transform(img)) for k, (p, img) in tiles.items()})
        print(f"{method:<10} {after['h_deg']:>8.2f} {after['e_deg']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 tiles, best of 2")
    parser.add_argument("--spread", action="store_true", help="also measure the TNBC spread")
    args = parser.parse_args()
    n, repeat = (8, 2) if args.quick else (24, 3)
    source, tiles = load_tiles(n)
    images = [img for _, img in tiles.values()][:n]
    print(f"{len(images)} {source} tiles, best of {repeat}")
    speed(images, repeat)
    if args.spread:
        spread(tiles)


if __name__ == "__main__":
    main()
