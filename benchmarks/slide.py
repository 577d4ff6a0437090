"""Whole-slide throughput: the segment-slides flow on 1 and 2 Dask workers, against tile-by-tile
``kseg predict`` of the same region, in the same run.

Usage: python benchmarks/slide.py [--quick] [--model pretrained|FOLDER] [--slides 2] [--size 2048]

Builds ``--slides`` pyramidal TIFFs (``--size`` px a side at 0.25 µm/px) from the TNBC tiles of
the shared data, then times:

- ``flow, N workers``: ``flows.slides.segment_slides`` on a Dask LocalCluster of N worker processes
  (one torch thread each), all slides; megapixels and tissue mm^2 per second, peak memory (the
  flow's process plus its workers, sampled with psutil);
- ``tiles``: the same region as 512 x 512 PNG tiles segmented by ``kseg.predict.predict`` in one
  process with the same thread count as one worker (what a user without slide support would do:
  no tissue detection, no seam merging, nuclei on tile borders cut in two).

The ratio of the 2- and 1-worker rates is the parallel speed-up; on the 2-core development machine
it is bounded by 2 and by whatever else runs there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class PeakMemory:
    """Samples the RSS of this process and its children (Dask workers) every 50 ms."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_tiles() -> list[np.ndarray]:
    """The TNBC tiles of the shared data (set KSEG_SHARED when it is not at ../shared)."""
    from tests.conftest import shared_dir
    from tests.slide_helpers import tnbc_pairs

    shared = shared_dir()
    tnbc = shared / "data" / "TNBC_NucleiSegmentation" if shared else None
    if tnbc is None or not tnbc.is_dir():
        raise SystemExit("benchmarks/slide.py needs the TNBC tiles: set KSEG_SHARED")
    return [p[0] for p in tnbc_pairs(tnbc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1024 px slides")
    parser.add_argument("--model", default="pretrained")
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    size = 1024 if args.quick else args.size
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    import cv2
    from prefect.testing.utilities import prefect_test_harness

    from flows.slides import segment_slides
    from kseg.predict import predict
    from tests.slide_helpers import mosaic, write_pyramid

    cells = size // 512
    tiles = make_tiles()
    pairs = [(t, np.zeros(t.shape[:2], bool)) for t in tiles]
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=180):
        root = Path(tmp)
        (root / "slides").mkdir()
        (root / "tiles").mkdir()
        for s in range(args.slides):
            rgb, _ = mosaic(pairs[s * cells * cells :] + pairs, cells, cells)
            write_pyramid(root / "slides" / f"slide{s}.tif", rgb, levels=2)
            for r in range(cells):
                for c in range(cells):
                    tile = rgb[r * 512 : (r + 1) * 512, c * 512 : (c + 1) * 512]
                    cv2.imwrite(str(root / "tiles" / f"s{s}_{r}_{c}.png"), tile[..., ::-1])
        mpx = args.slides * size * size / 1e6
        rows = []
        import torch

        torch.set_num_threads(1)
        with PeakMemory() as mem:
            t = time.perf_counter()
            predict([root / "tiles"], args.model, root / "tiles_out", progress=False)
            dt = time.perf_counter() - t
        rows.append(("tiles (kseg predict, 1 thread)", dt, mpx / dt, None, mem.peak))
        rates = {}
        for workers in (1, 2):
            out = root / f"out{workers}"
            with PeakMemory() as mem:
                t = time.perf_counter()
                report = segment_slides(
                    str(root / "slides"),
                    out_dir=str(out),
                    model=args.model,
                    n_workers=workers,
                    processes=True,
                    torch_threads=1,
                )
                dt = time.perf_counter() - t
            tissue = sum(d["tissue_mm2"] for d in report["done"])
            rates[workers] = mpx / dt
            rows.append((f"flow, {workers} Dask worker(s)", dt, mpx / dt, tissue / dt, mem.peak))
    print(f"\n{args.slides} slide(s) of {size} x {size} px at 0.25 µm/px, model {args.model}\n")
    print("| run | seconds | Mpx/s | tissue mm²/s | peak RSS (all processes) |")
    print("|---|---|---|---|---|")
    for name, dt, rate, mm2, peak in rows:
        mm2s = f"{mm2:.4f}" if mm2 is not None else ""
        print(f"| {name} | {dt:.1f} | {rate:.3f} | {mm2s} | {peak / 2**20:.0f} MB |")
    print(f"\n2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")
    print(f"1 worker / tile-by-tile predict: {rates[1] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
