"""Training throughput (tiles/s): the data pipeline and full optimizer steps, CPU and GPU.

Usage: python benchmarks/train.py [--quick] [--steps 3]

Rows: the kseg default network (nfeat 16, 256 tiles) with the fast and the reference (line-by-line
original) DiCE implementation, the original width (nfeat 32, 512 tiles, fast; reference only without
--quick, it takes minutes per step), and the U-Net baseline. A step is what `kseg train` does per
batch: forward, MSE loss, backward, Adam update (batch 2, the original's). The data row times
`TrainDataset` (augmentation + distance target + crop) on synthetic tiles. With CUDA, the default
network is also timed in fp32, AMP and AMP + channels_last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _step_time(model, x, y, steps: int, amp: bool = False, channels_last: bool = False) -> float:
    import torch

    from kseg.train import loss_fn

    opt = torch.optim.Adam(model.parameters(), lr=7e-4, weight_decay=7e-4)
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(steps + 1):  # the first step is warm-up
        start = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
            pred = model(x)
        loss = loss_fn("mse", 1.0, pred.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import torch

    from kseg.augment import build_augmentation
    from kseg.config import AugmentConfig, SyntheticConfig, params_from_dict
    from kseg.data.dataset import Tiles, TrainDataset
    from kseg.data.synthetic import draw_instances, patient_stain, render_tile
    from kseg.infer import Preprocess
    from kseg.model import build_model, tune_cpu_allocator

    tune_cpu_allocator()
    batch = 2
    steps = 1 if args.quick else args.steps
    configs = [
        (
            "kseg default (nfeat 16, 256)",
            {"nfeat": 16, "mid_channels": 128, "tile_size": 256},
            True,
        ),
        (
            "original width (nfeat 32, 512)",
            {"nfeat": 32, "mid_channels": 256, "tile_size": 512},
            not args.quick,
        ),
    ]
    rows = []
    for name, kw, with_reference in configs:
        for impl in ("fast", "reference") if with_reference else ("fast",):
            cfg = params_from_dict({"model": {**kw, "dice_impl": impl}}).model
            torch.manual_seed(0)
            model = build_model(cfg)
            x = torch.randn(batch, 3, cfg.tile_size, cfg.tile_size)
            y = torch.rand(batch, 1, cfg.tile_size, cfg.tile_size) * 255
            seconds = _step_time(model, x, y, steps)
            rows.append((name, impl, "cpu fp32", seconds))
    unet = params_from_dict({"model": {"arch": "unet", "nfeat": 16, "tile_size": 256}}).model
    x = torch.randn(batch, 3, 256, 256)
    y = torch.rand(batch, 1, 256, 256) * 255
    rows.append(
        (
            "U-Net baseline (nfeat 16, 256)",
            "-",
            "cpu fp32",
            _step_time(build_model(unet), x, y, steps),
        )
    )
    if torch.cuda.is_available():
        cfg = params_from_dict({"model": configs[0][1]}).model
        for label, amp, cl in (
            ("cuda fp32", False, False),
            ("cuda AMP", True, False),
            ("cuda AMP + channels_last", True, True),
        ):
            model = build_model(cfg).cuda()
            xg, yg = x.cuda(), y.cuda()
            rows.append((configs[0][0], "fast", label, _step_time(model, xg, yg, 10, amp, cl)))

    # Data pipeline: augmentation + distance target + crop per sample.
    rng = np.random.default_rng(0)
    syn = SyntheticConfig()
    labels = [draw_instances(rng, 256, 35, syn.nucleus_radius) for _ in range(8)]
    stain = patient_stain(np.random.default_rng(1))
    images = [render_tile(rng, lab, stain) for lab in labels]
    tiles = Tiles([f"t{i}" for i in range(8)], images, [lab.astype(np.int32) for lab in labels])
    dataset = TrainDataset(tiles, 256, Preprocess(), 0, 64, build_augmentation(AugmentConfig(), 0))
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    data_rate = len(dataset) / (time.perf_counter() - start)

    print(f"\nTraining step throughput, batch {batch}, torch threads {torch.get_num_threads()}\n")
    print("| network | DiCE path | device | s / step | tiles / s | fast vs reference |")
    print("|---|---|---|---|---|---|")
    ref = {r[0]: r[3] for r in rows if r[1] == "reference"}
    for name, impl, device, seconds in rows:
        ratio = f"{ref[name] / seconds:.1f}x" if impl == "fast" and name in ref else ""
        print(f"| {name} | {impl} | {device} | {seconds:.2f} | {batch / seconds:.2f} | {ratio} |")
    print(f"\nData pipeline (augment + distance target + crop, 256x256): {data_rate:.0f} samples/s")


if __name__ == "__main__":
    main()
