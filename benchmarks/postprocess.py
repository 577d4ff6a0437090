"""Post-processing and metrics speed: fast exact DIST watershed vs. a plain port of the original.

Both are measured in the same run (the machine is shared, so only ratios are comparable):

* the 10 reference maps of the original (``shared/reference/original_dist_postprocess_io.npz``),
  checking that both give the reference label images;
* TNBC-like synthetic 512x512 maps (distance transforms of random touching ellipses, blurred, noisy)
  and one 2048x2048 map, checking that fast == port;
* metrics on a 512x512 tile with thousands of nuclei: ``segmentation_metrics`` vs. a per-object
  loop in the style of HoVer-Net's ``get_fast_pq`` / ``get_fast_aji``.

Run: ``.venv/bin/python benchmarks/postprocess.py [--quick] [--shared PATH]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from kseg.metrics import segmentation_metrics
from kseg.postprocess import dist_watershed, dist_watershed_reference


def synthetic_map(shape: tuple[int, int], n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        center = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        axes = (int(rng.integers(4, 14)), int(rng.integers(4, 14)))
        cv2.ellipse(labels, center, axes, float(rng.uniform(0, 180)), 0, 360, i, -1)
    # Per-instance distance: cut the foreground along instance borders first.
    border = cv2.morphologyEx(labels.astype(np.float32), cv2.MORPH_GRADIENT, np.ones((3, 3))) > 0
    dist = cv2.distanceTransform(((labels > 0) & ~border).astype(np.uint8), cv2.DIST_L2, 3)
    dist = cv2.GaussianBlur(dist, (0, 0), 1.0)
    return np.maximum(dist + rng.normal(0, 0.3, shape).astype(np.float32), 0)


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Median wall time in ms over ``repeat`` calls, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), out


def bench_maps(name: str, maps: list[np.ndarray], expected: list[np.ndarray] | None, rep: int):
    port_ms, fast_ms, exact = [], [], True
    for i, m in enumerate(maps):
        tp, ref = timed(lambda m=m: dist_watershed_reference(m), rep)
        tf, got = timed(lambda m=m: dist_watershed(m, numbering="original", background="zero"), rep)
        port_ms.append(tp)
        fast_ms.append(tf)
        exact &= np.array_equal(got, ref)
        if expected is not None:
            exact &= np.array_equal(got, expected[i])
    p, f = statistics.mean(port_ms), statistics.mean(fast_ms)
    h, w = maps[0].shape
    print(f"{name:<28} {len(maps):>3} {h:>5}x{w:<5} {p:>10.1f} {f:>9.1f} {p / f:>7.1f}x  {exact}")


def loop_metrics(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Per-object loop (HoVer-Net style): one mask comparison per overlapping pair."""
    t_ids, p_ids = np.unique(gt)[1:], np.unique(pred)[1:]
    p_index = {int(p): j for j, p in enumerate(p_ids)}
    iou = np.zeros((len(t_ids), len(p_ids)))
    inter = np.zeros_like(iou)
    union = np.zeros_like(iou)
    for i, t in enumerate(t_ids):
        t_mask = gt == t
        for p in np.unique(pred[t_mask]):
            if p == 0:
                continue
            p_mask = pred == p
            j = p_index[int(p)]
            inter[i, j] = np.sum(t_mask & p_mask)
            union[i, j] = np.sum(t_mask | p_mask)
            iou[i, j] = inter[i, j] / union[i, j]
    tp = int(np.sum(iou > 0.5))
    dq = tp / (tp + 0.5 * (len(p_ids) - tp) + 0.5 * (len(t_ids) - tp))
    best = (inter / (union + 1.0e-6)).argmax(axis=1)  # HoVer-Net's ranking (ties: larger pair)
    rows = np.nonzero(iou.max(axis=1) > 0)[0]
    c = inter[rows, best[rows]].sum()
    u = union[rows, best[rows]].sum()
    u += sum(np.sum(gt == t) for k, t in enumerate(t_ids) if k not in set(rows))
    used = set(best[rows].tolist())
    u += sum(np.sum(pred == p) for j, p in enumerate(p_ids) if j not in used)
    return dq * iou[iou > 0.5].mean(), c / u


def bench_metrics(n_nuclei: int, rep: int) -> None:
    rng = np.random.default_rng(0)
    gt = np.zeros((512, 512), np.int32)
    for i in range(1, n_nuclei + 1):
        center = (int(rng.integers(0, 512)), int(rng.integers(0, 512)))
        cv2.ellipse(
            gt, center, (int(rng.integers(2, 6)), int(rng.integers(2, 6))), 0, 0, 360, i, -1
        )
    pred = np.roll(gt, 1, axis=1)
    t_fast, m = timed(lambda: segmentation_metrics(pred, gt), rep)
    t_loop, (pq, aji) = timed(lambda: loop_metrics(pred, gt), 1)
    same = abs(pq - m["pq"]) < 1e-9 and abs(aji - m["aji"]) < 1e-9
    n = len(np.unique(gt)) - 1
    print(
        f"{'metrics, 512x512':<28} {n:>5} nuclei {t_loop:>10.1f} {t_fast:>9.1f} "
        f"{t_loop / t_fast:>7.1f}x  {same}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer maps and repeats")
    default_shared = os.environ.get("KSEG_SHARED") or Path(__file__).resolve().parents[2] / "shared"
    ap.add_argument("--shared", type=Path, default=Path(default_shared))
    args = ap.parse_args()
    rep = 1 if args.quick else 3
    cv2.setNumThreads(1)  # one core, as the original's timing
    print(f"{'case':<28} {'n':>3} {'size':^11} {'port ms':>10} {'fast ms':>9} {'ratio':>8}  exact")
    ref = args.shared / "reference" / "original_dist_postprocess_io.npz"
    if ref.is_file():
        with np.load(ref) as data:
            k = 3 if args.quick else 10
            maps, labels = list(data["maps"][:k]), list(data["labels"][:k])
        dist_watershed(maps[0])  # warm-up (imports, OpenCV kernels)
        bench_maps("reference maps (original)", maps, labels, rep)
    else:
        print(f"(no reference maps at {ref})")
    k = 3 if args.quick else 10
    synth = [synthetic_map((512, 512), 120, seed) for seed in range(k)]
    bench_maps("synthetic TNBC-like", synth, None, rep)
    if not args.quick:
        bench_maps("synthetic 2048x2048", [synthetic_map((2048, 2048), 1900, 99)], None, 1)
    bench_metrics(800 if args.quick else 3000, rep)


if __name__ == "__main__":
    main()
