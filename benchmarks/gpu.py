"""GPU throughput of training and inference in fp32, fp16 AMP and bf16, and a short TNBC run.

Usage: python benchmarks/gpu.py [--steps 10] [--batch 4] [--no-tnbc] [--tnbc-epochs 2]

Needs one CUDA GPU; without one it prints ``no CUDA device: skipped`` and exits 0. Meant to finish
in under 5 minutes on one GPU. Every figure is measured in this run and set against fp32 of the same
run:

* training tiles/s (forward, loss, backward, Adam step as ``kseg train`` does it) for Kidney-SegNet
  (nfeat 32, 512x512 tiles, kseg's fixes on, fast DiCE) and the U-Net of the same widths, in fp32,
  fp16 autocast + GradScaler, and bf16 autocast; the best of ``--steps`` steps after two warm-ups;
* inference tiles/s (eval mode, no grad, batch 8) in the same three precisions;
* peak GPU memory of each row (``torch.cuda.max_memory_allocated``, reset per row);
* the wall time of a short real ``kseg train`` on TNBC (``../shared/data/TNBC_NucleiSegmentation``,
  or ``KSEG_SHARED``; fetch/prepare/normalize once, then the train stage with ``train.amp`` off,
  fp16 and bf16), skipped when the data is not there.

``--allow-cpu`` runs the same code on the CPU with a tiny network (a smoke test of this script,
not a benchmark).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import best_of, train_step

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "fp16", "bf16")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device) -> float:
    import torch

    return (
        torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    )


def _dtype(precision: str):
    import torch

    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def train_row(cfg, precision: str, batch: int, steps: int, device) -> dict[str, float]:
    """Training tiles/s and peak memory of one network in one precision."""
    import torch

    from kseg.model import build_model

    torch.manual_seed(0)
    _reset_peak(device)
    model = build_model(cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=7e-4, weight_decay=7e-4)
    dtype = _dtype(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    t = cfg.tile_size
    x = torch.randn(batch, 3, t, t, device=device)
    y = torch.rand(batch, cfg.out_channels, t, t, device=device)
    if cfg.head == "dist":
        y = y * 255

    def step() -> None:
        train_step(model, opt, scaler, x, y, dtype)

    step()  # warm-up: cuDNN plans, allocator
    seconds, _ = best_of(step, repeat=steps, warmup=True)
    return {"tiles_per_s": batch / seconds, "peak_mib": _peak_mib(device)}


def infer_row(cfg, precision: str, batch: int, steps: int, device) -> dict[str, float]:
    """Inference tiles/s (eval, no grad) and peak memory."""
    import torch

    from kseg.model import build_model

    torch.manual_seed(0)
    _reset_peak(device)
    model = build_model(cfg).to(device).eval()
    dtype = _dtype(precision)
    x = torch.randn(batch, 3, cfg.tile_size, cfg.tile_size, device=device)

    @torch.inference_mode()
    def run() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x)
        _sync(device)

    seconds, _ = best_of(run, repeat=steps, warmup=True)
    return {"tiles_per_s": batch / seconds, "peak_mib": _peak_mib(device)}


def _print_rows(title: str, rows: dict[str, dict[str, float]]) -> None:
    base = rows["fp32"]["tiles_per_s"]
    print(f"  {title}")
    for precision, row in rows.items():
        rate = row["tiles_per_s"]
        print(
            f"    {precision:5s} {rate:9.2f} tiles/s  x{rate / base:5.2f} vs fp32"
            f"  peak {row['peak_mib']:8.0f} MiB"
        )


def _shared_dir() -> Path | None:
    env = os.environ.get("KSEG_SHARED")
    for cand in [Path(env)] if env else [REPO.parent / "shared", REPO.parents[1] / "shared"]:
        if (cand / "data" / "TNBC_NucleiSegmentation").is_dir():
            return cand
    return None


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def _kseg(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kseg", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/m.db"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kseg {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def tnbc_runs(epochs: int, samples: int, device: str, tiny: bool) -> dict[str, float] | None:
    """Wall time of ``kseg train`` on TNBC in each precision (after one shared data preparation)."""
    import yaml

    shared = _shared_dir()
    if shared is None:
        print("  TNBC data not found (../shared/data/TNBC_NucleiSegmentation): skipped")
        return None
    tnbc = shared / "data" / "TNBC_NucleiSegmentation"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        archive = root / "TNBC_NucleiSegmentation.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(tnbc.rglob("*.png")):
                zf.write(path, f"TNBC_NucleiSegmentation/{path.relative_to(tnbc)}")
        sha = hashlib.sha256(archive.read_bytes()).hexdigest()
        model = {"nfeat": 4, "mid_channels": 8, "tile_size": 64} if tiny else {}
        base = _merge(
            yaml.safe_load((REPO / "params.yaml").read_text()),
            {
                "data": {"source": "tnbc", "url": str(archive), "sha256": sha},
                "model": model,
                "train": {"epochs": epochs, "samples_per_epoch": samples, "device": device},
            },
        )
        project = root / "project"
        project.mkdir()
        (project / "params.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
        for stage in ("fetch", "prepare", "normalize"):
            _kseg([stage, "--params", "params.yaml"], project)
        times = {}
        for precision in PRECISIONS:
            amp = {"amp": precision != "fp32", "amp_dtype": "bfloat16"}
            if precision == "fp16":
                amp["amp_dtype"] = "float16"
            params = _merge(base, {"train": amp})
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            times[precision] = _kseg(["train", "--params", "params.yaml", "--fresh"], project)
            shutil.rmtree(project / ".checkpoints", ignore_errors=True)
            summary = json.loads((project / "models/kseg/train_summary.json").read_text())
            speedup = times["fp32"] / times[precision]
            print(
                f"    {precision:5s} {times[precision]:7.1f} s  x{speedup:5.2f}"
                f" vs fp32  best epoch {summary['best_epoch']} {summary['select_metric']} "
                f"{summary['best_score']:.4f}"
            )
        return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (best of)")
    parser.add_argument("--batch", type=int, default=4, help="training batch")
    parser.add_argument("--no-tnbc", action="store_true", help="skip the TNBC training runs")
    parser.add_argument("--tnbc-epochs", type=int, default=2)
    parser.add_argument("--tnbc-samples", type=int, default=64, help="crops per epoch")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-test on CPU (tiny net)")
    args = parser.parse_args()

    import torch

    from kseg.config import ModelConfig

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA device: skipped")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = device.type == "cpu"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test)"
    print(f"device {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    size = {"nfeat": 4, "mid_channels": 8, "tile_size": 64} if tiny else {}
    full = {"nfeat": 32, "mid_channels": 256, "tile_size": 512}
    nets = {
        "Kidney-SegNet nfeat 32, 512": ModelConfig(**{**full, **size}),
        "U-Net nfeat 32, 512": ModelConfig(arch="unet", **{**full, **size}),
    }
    precisions = PRECISIONS if device.type == "cuda" else ("fp32", "bf16")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        precisions = ("fp32", "fp16")
    start = time.perf_counter()
    for title, cfg in nets.items():
        print(title)
        train = {p: train_row(cfg, p, args.batch, args.steps, device) for p in precisions}
        _print_rows(f"train, batch {args.batch}", train)
        infer = {p: infer_row(cfg, p, 8, args.steps, device) for p in precisions}
        _print_rows("inference, batch 8", infer)
    if not args.no_tnbc:
        print(f"kseg train on TNBC ({args.tnbc_epochs} epochs x {args.tnbc_samples} crops)")
        tnbc_runs(args.tnbc_epochs, args.tnbc_samples, device.type, tiny)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
