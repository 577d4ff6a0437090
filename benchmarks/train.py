"""Training throughput (tiles/s): the data pipeline and full optimizer steps, CPU and GPU.

Usage: python benchmarks/train.py [--quick] [--steps 3] [--recipe-only | --presets]

Rows: the kseg default network (nfeat 16, 256 tiles) with the fast and the reference (line-by-line
original) DiCE implementation, the original width (nfeat 32, 512 tiles, fast; reference only without
--quick, it takes minutes per step), and the U-Net baseline. A step is what `kseg train` does per
batch: forward, MSE loss, backward, Adam update (batch 2, the original's). The data row times
`TrainDataset` (augmentation + distance target + crop) on synthetic tiles. With CUDA, the default
network is also timed in fp32, AMP and AMP + channels_last.

The recipe table sets the architectures side by side as the TNBC recipes train them (fg_dist
head, AdamW, batch 4, 256 crops): tiles/s and the peak resident memory of a fresh process per
row (``ru_maxrss`` of the child: torch, the model, Adam state, activations and the allocator's
retained heap), for the U-Net, Kidney-SegNet at the default width and at the paper's width
(nfeat 32 / mid 256), the latter with and without ``train.recompute_levels`` (which also caps
glibc's heap, as ``kseg train`` does: ``kseg.model.cap_cpu_heap``); then the CPU speed options
``train.cpu_amp`` (bfloat16 autocast forward) and ``train.cpu_channels_last``, which pay off on
CPUs with native bfloat16 (AVX512-BF16, AMX) only.

``--presets`` prints only each shipped preset's estimated training minutes on this CPU: its own
network and batch, epochs x steps x the median step, times :data:`OVERHEAD` for data loading,
validation and the post-processing fit (the presets' epoch counts were sized on one machine; on
another the minutes differ).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import train_step


def _step_time(model, x, y, steps: int, amp: bool = False, channels_last: bool = False) -> float:
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=7e-4, weight_decay=7e-4)
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(steps + 1):  # the first step is warm-up
        start = time.perf_counter()
        train_step(model, opt, scaler, x, y, torch.float16 if amp else None)
        if i:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


RECIPE_ROWS = (
    ("U-Net nfeat 32", {"arch": "unet", "nfeat": 32}, 0),
    ("Kidney-SegNet nfeat 16, shared kernels", {"nfeat": 16, "mid_channels": 128}, 0),
    ("Kidney-SegNet nfeat 32 / mid 256", {"nfeat": 32, "mid_channels": 256}, 0),
    ("Kidney-SegNet nfeat 32 / mid 256, recompute 2", {"nfeat": 32, "mid_channels": 256}, 2),
    ("Kidney-SegNet nfeat 32 / mid 256, recompute 4", {"nfeat": 32, "mid_channels": 256}, 4),
    (
        "Kidney-SegNet nfeat 32 / mid 256, per-row kernels (original), recompute 4",
        {"nfeat": 32, "mid_channels": 256, "dice_dim_kernels": "per_position"},
        4,
    ),
)

#: CPU speed options (docs/training.md), as ``kseg train`` applies them: name, model, train keys.
CPU_OPTION_ROWS = (
    ("U-Net nfeat 32, cpu_amp + cpu_channels_last", {"arch": "unet", "nfeat": 32}, True, True),
    (
        "Kidney-SegNet nfeat 16, per-row kernels, cpu_amp",
        {"nfeat": 16, "mid_channels": 128, "dice_dim_kernels": "per_position"},
        True,
        False,
    ),
)


def recipe_child(spec: str) -> None:
    """One recipe row in this (fresh) process; prints a JSON line with s/step and peak RSS."""
    import json
    import resource

    import torch

    from kseg.config import params_from_dict
    from kseg.model import build_model, cap_cpu_heap, tune_cpu_allocator
    from kseg.train import configure_determinism, loss_fn

    raw = json.loads(spec)
    if raw["recompute"]:  # as kseg train does
        cap_cpu_heap()
    else:
        tune_cpu_allocator()
    # As kseg train does with its default train.deterministic: true (the mode's NaN fill of new
    # tensors, ~10 % of a Kidney-SegNet step, is off there, so it is here).
    configure_determinism(torch.device("cpu"), True)
    model_kw = {"tile_size": 256, "head": "fg_dist", "dice_dim_kernels": "shared", **raw["model"]}
    cfg = params_from_dict({"model": model_kw}).model
    torch.manual_seed(0)
    model = build_model(cfg).train()
    if hasattr(model, "recompute_levels"):
        model.recompute_levels = raw["recompute"]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batch, size = raw.get("batch", 4), cfg.tile_size
    x = torch.randn(batch, 3, size, size)
    y = (torch.rand(batch, 2, size, size) > 0.5).float()
    if raw.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    bf16 = bool(raw.get("bf16"))
    times = []
    for i in range(raw["steps"] + 1):  # the first step is warm-up
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = model(x)
        loss = loss_fn("mse", 1.0, pred.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    print(json.dumps({"seconds": float(np.median(times)), "peak_gb": peak_gb}))


def run_child(spec: str) -> dict:
    """Runs :func:`recipe_child` in a fresh process; its JSON line (s/step, peak memory)."""
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def recipe_table(steps: int) -> None:
    """Prints tiles/s and peak memory of each architecture, one fresh process per row."""
    import json

    print("\nRecipe training (fg_dist head, AdamW, batch 4, 256 crops), one process per row\n")
    print(
        "| network | recompute | s / step | tiles / s | peak resident memory | <= 3 GB "
        "(issue #13) | x U-Net tiles/s |"
    )
    print("|---|---|---|---|---|---|---|")
    base = None
    rows = [(name, kw, recompute, False, False) for name, kw, recompute in RECIPE_ROWS]
    rows += [(name, kw, 0, bf16, cl) for name, kw, bf16, cl in CPU_OPTION_ROWS]
    for name, model_kw, recompute, bf16, channels_last in rows:
        spec = json.dumps(
            {
                "model": model_kw,
                "recompute": recompute,
                "steps": steps,
                "bf16": bf16,
                "channels_last": channels_last,
            }
        )
        row = run_child(spec)
        rate = 4 / row["seconds"]
        base = base or rate
        print(
            f"| {name} | {recompute} | {row['seconds']:.2f} | {rate:.2f} | "
            f"{row['peak_gb']:.2f} GB | {'yes' if row['peak_gb'] <= 3.0 else 'no'} | "
            f"{rate / base:.2f}x |",
            flush=True,
        )


#: Whole ``kseg train`` over its optimizer steps alone, measured on the AVX2 development machine
#: (2026-12-07, both presets, their steps timed by this script in the same hour): Kidney-SegNet
#: 24.7 min against 20.3, U-Net 17.75 against 14.3. The rest is data loading, per-epoch
#: validation, the post-processing fit, and steps on real crops being a little slower than here.
OVERHEAD = 1.23


def preset_table(steps: int) -> None:
    """Estimated training minutes of each shipped preset on this CPU (optimizer steps alone).

    One fresh process per preset runs its exact network (``model`` section) on batches of its
    ``train.batch_size`` crops of ``model.tile_size``; the estimate is epochs x steps per epoch x
    the median step, times :data:`OVERHEAD`.
    """
    import json

    import yaml

    print(
        f"\nPreset training time on this CPU (torch's default threads; median of {steps} steps)\n"
    )
    print(
        f"| preset | network | epochs x steps | s / step | steps alone (min) | "
        f"<= 25 min, x {OVERHEAD} |"
    )
    print("|---|---|---|---|---|---|")
    for path in sorted((Path(__file__).resolve().parents[1] / "kseg" / "presets").glob("*.yaml")):
        preset = yaml.safe_load(path.read_text())
        model, train = preset["model"], preset["train"]
        per_epoch = max(train["samples_per_epoch"] // train["batch_size"], 1)
        spec = json.dumps(
            {
                "model": model,
                "recompute": train.get("recompute_levels", 0),
                "steps": steps,
                "batch": train["batch_size"],
            }
        )
        seconds = run_child(spec)["seconds"]
        minutes = train["epochs"] * per_epoch * seconds / 60
        net = f"{model['arch']} nfeat {model['nfeat']}"
        print(
            f"| {path.stem} | {net} | {train['epochs']} x {per_epoch} | {seconds:.2f} | "
            f"{minutes:.1f} | {'yes' if minutes * OVERHEAD <= 25 else 'no'} (x {OVERHEAD}: "
            f"{minutes * OVERHEAD:.1f}) |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--recipe-only", action="store_true", help="only the recipe table")
    parser.add_argument(
        "--presets", action="store_true", help="only the presets' estimated training minutes"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        recipe_child(args.child)
        return
    if args.presets:
        # steps vary by +-20 % on a shared 2-core VM: a median of at least 8
        preset_table(1 if args.quick else max(args.steps, 8))
        return
    recipe_table(1 if args.quick else args.steps)
    if args.recipe_only:
        return

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
