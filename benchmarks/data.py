"""Prepare + validate time on TNBC (50 tiles of 512x512), per step, with in-run baselines.

Usage: .venv/bin/python benchmarks/data.py [--quick] [--tnbc PATH]

Baselines measured in the same run (the machine is shared, so only ratios are comparable):
- ``decode only``: reading the PNG pair of each tile (the floor any prepare pays);
- ``per-pixel stats``: the straightforward float64 per-pixel statistics that prepare's
  histogram-based :func:`kseg.data.prepare.tile_stats` replaces (same numbers, tested).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from timing import best_of  # noqa: E402  (benchmarks/timing.py)

from kseg.config import PrepareConfig, params_from_dict  # noqa: E402
from kseg.data.prepare import discover, prepare, tile_stats, to_labels, to_rgb  # noqa: E402
from kseg.data.targets import distance_target  # noqa: E402


def per_pixel_stats(rgb: np.ndarray, cfg: PrepareConfig) -> dict[str, float]:
    """The direct float64 version of the colour / OD / H&E statistics (baseline)."""
    px = rgb.reshape(-1, 3).astype(np.float64)
    od = -np.log((px + 1.0) / 256.0)
    tissue = od.max(axis=1) > cfg.tissue_od
    hed = od[tissue] @ np.linalg.inv([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    return {"tissue": float(tissue.mean()), "mean": px.mean(0), "std": px.std(0),
            "od": od[tissue].mean(0), "h": hed[:, 0].mean(), "e": hed[:, 1].mean()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, 10 tiles for the steps")
    ap.add_argument(
        "--tnbc",
        type=Path,
        default=Path(os.environ.get("KSEG_SHARED", REPO.parent / "shared")) / "data",
    )
    args = ap.parse_args()
    data_dir = args.tnbc
    if not (data_dir / "TNBC_NucleiSegmentation").is_dir():
        sys.exit(f"{data_dir}/TNBC_NucleiSegmentation not found (use --tnbc)")
    repeat = 1 if args.quick else 3
    tiles = discover(data_dir)
    steps_tiles = tiles[:10] if args.quick else tiles
    cfg = PrepareConfig()
    decoded = []

    def decode() -> None:
        decoded.clear()
        for t in steps_tiles:
            with Image.open(t.image) as im, Image.open(t.mask) as m:
                decoded.append((to_rgb(im), np.asarray(m)))

    rows = [("decode only (baseline)", best_of(decode, repeat)[0])]
    labels = [to_labels(m)[0] for _, m in decoded]
    rows.append(
        (
            "binary -> instance labels",
            best_of(lambda: [to_labels(m) for _, m in decoded], repeat)[0],
        )
    )
    rows.append(
        ("distance targets", best_of(lambda: [distance_target(lab) for lab in labels], repeat)[0])
    )
    rows.append(
        (
            "per-pixel stats (baseline)",
            best_of(lambda: [per_pixel_stats(r, cfg) for r, _ in decoded], repeat)[0],
        )
    )
    rows.append(
        (
            "histogram stats (prepare)",
            best_of(
                lambda: [
                    tile_stats(r, lab, cfg) for (r, _), lab in zip(decoded, labels, strict=True)
                ],
                repeat,
            )[0],
        )
    )

    def encode() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for i, ((r, _), lab) in enumerate(zip(decoded, labels, strict=True)):
                Image.fromarray(r).save(f"{tmp}/{i}.png", compress_level=1)
                Image.fromarray(lab).save(f"{tmp}/{i}_l.png", compress_level=1)

    rows.append(("PNG writes (level 1)", best_of(encode, repeat)[0]))

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        params = params_from_dict({"data": {"source": "tnbc", "dir": str(data_dir)}})
        t0 = time.perf_counter()
        prepare(params)
        t_prepare = time.perf_counter() - t0
        from kseg.validate import validate

        t0 = time.perf_counter()
        import great_expectations  # noqa: F401

        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        validate(params)
        t_validate = time.perf_counter() - t0
    base = rows[0][1]
    n = len(steps_tiles)
    print(f"\nper-step timings on {n} TNBC tiles (best of {repeat}); ratio vs decode only")
    print(f"{'step':<30}{'s':>8}{'ms/tile':>10}{'x decode':>10}")
    for name, sec in rows:
        print(f"{name:<30}{sec:8.3f}{1000 * sec / n:10.1f}{sec / base:10.2f}")
    stats_speedup = rows[3][1] / rows[4][1]
    print(f"\nhistogram stats vs per-pixel baseline: {stats_speedup:.1f}x faster")
    print(f"\nwhole stages on all {len(tiles)} tiles")
    print(f"{'stage':<30}{'s':>8}{'tiles/s':>10}")
    print(f"{'prepare':<30}{t_prepare:8.2f}{len(tiles) / t_prepare:10.1f}")
    print(f"{'import great_expectations':<30}{t_import:8.2f}{'':>10}")
    print(f"{'validate (GX suite + report)':<30}{t_validate:8.2f}{len(tiles) / t_validate:10.1f}")


if __name__ == "__main__":
    main()
