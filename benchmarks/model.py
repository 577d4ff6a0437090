"""Forward and forward+backward time of KidneySegNet (fast vs reference DiCE) and the U-Net.

Run: ``.venv/bin/python benchmarks/model.py [--quick] [--sizes 512:32] [--no-tune-allocator]``.

Every row is measured in this run; ratios are against the reference path of the same size.
``infer`` = one tile, eval mode, no grad; ``train`` = forward+backward, batch 2, train mode; each
figure is the best of ``--reps`` runs (inference: at least 5) after a warm-up, each path in its own
process, over ``--rounds`` rounds that interleave the paths (default 2). The load average is
printed before and after: the figures are only meaningful on an otherwise idle machine.
Rows use the original wiring (fixes off except the adaptive pooling, mid_channels = 8 x nfeat); with
``--kseg-default`` each size also gets rows for the kseg default configuration (all fixes on), which
is ``ModelConfig()`` itself at 256:16.

* ``reference (as it runs)``: the line-by-line port with the default glibc allocator, i.e. the
  original code as it runs (the baseline of the ratios);
* ``reference, tuned malloc``: the same with ``kseg.model.tune_cpu_allocator`` (second ratio);
* ``fast``: kseg's path, with the allocator tuning (the way kseg trains and predicts) unless
  ``--no-tune-allocator``;
* ``floor``: what a fully fused implementation could reach on this machine now: the bytes it must
  move (see :func:`traffic_floor`) at the measured copy bandwidth, and the MACs at the measured
  GEMM rate.

With ``--runtimes`` (alone: ``--runtimes --quick`` takes about a minute), the inference runtimes
of ``kseg predict --runtime`` get rows instead (:func:`runtime_table`): the network on one 512 tile
and the whole segment of a 512 TNBC tile (network + watershed), for torch (kseg's fast path), torch
with the compiled DiCE stencil kernels (``--runtime compiled``, Kidney-SegNet only: the U-Net has no
DiCE block), ONNX Runtime and OpenVINO (where installed), against the original code path measured
in the same run.

With ``--fused``, a row runs the fast path with the opt-in compiled inference kernels
(``KSEG_FUSED_EVAL=1``, :func:`kseg.model.ops.set_fused_eval`); its first call (compilation) is
printed separately. GPU columns (fp32, AMP, channels_last) are added when CUDA is available.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import best_of


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def measure(
    arch: str,
    impl: str,
    nfeat: int,
    tile: int,
    reps: int,
    device: str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    preset: str = "original",
) -> dict[str, float]:
    import torch

    from kseg.model import build_model
    from kseg.model.config import ModelConfig

    if preset == "default":
        cfg = ModelConfig(nfeat=nfeat, mid_channels=8 * nfeat, tile_size=tile, dice_impl=impl)
    else:  # "original" or "fused" (original wiring, opt-in compiled inference kernels)
        cfg = ModelConfig.original_compatible(nfeat=nfeat, mid_channels=8 * nfeat, dice_impl=impl)
        cfg = cfg.with_(tile_size=tile, fix_aspp_adaptive_pool=True)
    cfg = cfg.with_(arch=arch)
    model = build_model(cfg).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x1 = torch.randn(1, 3, tile, tile, device=device).to(memory_format=fmt)
    x2 = torch.randn(2, 3, tile, tile, device=device).to(memory_format=fmt)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def infer():
        model.eval()
        with torch.no_grad(), torch.autocast(device, enabled=amp):
            model(x1)
        sync()

    def train():
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, enabled=amp):
            out = model(x2)
        out.float().mean().backward()
        sync()

    first = 0.0
    if preset == "fused":
        from kseg.model.ops import set_fused_eval

        set_fused_eval(True)
        t0 = time.perf_counter()
        infer()  # compiles (or loads inductor's on-disk cache)
        first = time.perf_counter() - t0
    # Inference is short, so it gets more repetitions: best of at least 5.
    return {
        "infer": best_of(infer, max(reps, 5), warmup=True)[0],
        "train": best_of(train, reps, warmup=True)[0],
        "first": first,
    }


def machine_rates() -> dict[str, float]:
    """Copy bandwidth (bytes/s, read + write) and float32 GEMM throughput (MAC/s), measured now."""
    import torch

    x = torch.randn(64 << 20)  # 256 MiB: far beyond the caches
    y = torch.empty_like(x)
    t_copy = best_of(lambda: y.copy_(x), 5, warmup=True)[0]
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t_mm = best_of(lambda: a @ b, 5, warmup=True)[0]
    return {"bandwidth": 2 * x.numel() * 4 / t_copy, "macs_per_s": 2048**3 / t_mm}


def traffic_floor(nfeat: int, tile: int) -> dict[str, float]:
    """Bytes a fully fused implementation must move for one tile's forward pass, and its MACs.

    Model (float32): every DiCE block reads its input twice (the SE gate needs the global mean
    of the fused response before the projection can be finished, so the response is recomputed
    or stored and re-read) and writes its output once; every other stage (first conv, pooling,
    attention gate, pyramid pooling's 1x1 conv, head) reads its inputs and writes its output
    once. A training step (forward + backward) is taken as 3x the forward traffic: the forward
    writes what the backward reads, and the backward reads activations and gradients and writes
    input gradients. Compute: 2 FLOPs per MAC of the convolutions (kseg.model.model_info).
    """
    import torch

    from kseg.model import build_model, model_info
    from kseg.model.blocks import AttentionGate
    from kseg.model.config import ModelConfig
    from kseg.model.dice import DiCE

    cfg = ModelConfig.original_compatible(nfeat=nfeat, mid_channels=8 * nfeat)
    cfg = cfg.with_(tile_size=tile, fix_aspp_adaptive_pool=True, dice_impl="reference")
    model = build_model(cfg).eval()
    total = {"bytes": 0}

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

    def hook(mod, inp, out) -> None:
        reads = 2 if isinstance(mod, DiCE) else 1
        total["bytes"] += reads * nbytes(inp) + nbytes([out])

    stages = [m for m in model.modules() if isinstance(m, DiCE | AttentionGate)]
    stages += [model.conv1a, model.seg_map_conv, model.aspp.final_layer]
    handles = [m.register_forward_hook(hook) for m in stages]
    # Max pooling of the three encoder levels: read the level, write a quarter of it.
    total["bytes"] += sum(4 * (nfeat << i) * (tile >> i) ** 2 * 5 // 4 for i in range(3))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, tile, tile))
    finally:
        for h in handles:
            h.remove()
    return {"bytes": float(total["bytes"]), "macs": float(model_info(cfg, tile)["macs"])}


def child(args: argparse.Namespace) -> None:
    if args.tune:
        from kseg.model import tune_cpu_allocator

        tune_cpu_allocator()
    res = measure(args.arch, args.impl, args.nfeat, args.tile, args.reps, preset=args.preset)
    print(json.dumps(res))


def run_child(
    arch: str, impl: str, nfeat: int, tile: int, reps: int, tune: bool, preset: str = "original"
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--arch",
        arch,
        "--impl",
        impl,
        "--nfeat",
        str(nfeat),
        "--tile",
        str(tile),
        "--reps",
        str(reps),
        "--preset",
        preset,
    ]
    cmd += ["--tune"] if tune else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_size(
    args: argparse.Namespace, tile: int, nfeat: int, reps: int
) -> dict[str, dict[str, float]]:
    """Best time of every path at one size, over ``args.rounds`` interleaved rounds."""
    jobs = {
        "reference (as it runs)": ("kidney_segnet", "reference", False, "original"),
        "reference, tuned malloc": ("kidney_segnet", "reference", True, "original"),
        "fast": ("kidney_segnet", "fast", args.tune_fast, "original"),
        "U-Net (same widths)": ("unet", "fast", args.tune_fast, "original"),
    }
    if args.kseg_default:
        jobs["reference, kseg default"] = ("kidney_segnet", "reference", False, "default")
        jobs["fast, kseg default"] = ("kidney_segnet", "fast", args.tune_fast, "default")
    if args.fused:
        jobs["fast + fused eval (opt-in)"] = ("kidney_segnet", "fast", args.tune_fast, "fused")
    # Rounds interleave the paths, so a slow minute on a shared machine hits all of them.
    rows: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for name, (arch, impl, tune, preset) in jobs.items():
            r = run_child(arch, impl, nfeat, tile, reps, tune, preset)
            best = rows.setdefault(name, r)
            rows[name] = {k: min(best[k], r[k]) for k in r}
    return rows


def report(tile: int, nfeat: int, rows: dict[str, dict[str, float]], rates: dict) -> None:
    """Prints the rows of one size with their ratios, the floors and the fast path's distance."""
    floor = traffic_floor(nfeat, tile)
    t_mem = floor["bytes"] / rates["bandwidth"]
    t_mac = floor["macs"] / rates["macs_per_s"]
    rows["floor: memory traffic"] = {"infer": t_mem, "train": 3 * 2 * t_mem}
    rows["floor: compute (GEMM)"] = {"infer": t_mac, "train": 3 * 2 * t_mac}
    for name, r in rows.items():
        dflt = name.endswith("kseg default")
        ref0 = rows["reference, kseg default" if dflt else "reference (as it runs)"]
        ref = rows["reference, kseg default" if dflt else "reference, tuned malloc"]
        print(
            f"{tile:4d} {nfeat:5d} | {name:26s} | {r['infer']:16.3f} | {r['train']:21.3f} "
            f"| {ref0['infer'] / r['infer']:6.1f}x {ref0['train'] / r['train']:6.1f}x"
            f"{'':14s}| {ref['infer'] / r['infer']:6.1f}x {ref['train'] / r['train']:6.1f}x"
        )
    fused = rows.get("fast + fused eval (opt-in)")
    if fused:
        print(
            f"{tile:4d} {nfeat:5d} | fused eval: first call {fused['first']:.1f} s (torch.compile, "
            "or inductor's cache); its train column is the plain fast path"
        )
    fast = rows["fast"]
    print(
        f"{tile:4d} {nfeat:5d} | fast / memory floor: infer {fast['infer'] / t_mem:.1f}x, "
        f"train {fast['train'] / (6 * t_mem):.1f}x "
        f"({floor['bytes'] / 2**20:.0f} MiB per tile forward, {floor['macs'] / 1e9:.2f} GMACs)"
    )
    sys.stdout.flush()


#: TNBC tile of the segment rows (512 x 512) and its ground truth (binary mask).
RUNTIME_TILE = ("Slide_02/02_1.png", "GT_02/02_1.png")


def _tnbc_dir() -> Path:
    env = os.environ.get("KSEG_SHARED")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
    path = root / "data" / "TNBC_NucleiSegmentation"
    if not path.is_dir():
        raise SystemExit(f"{path}: TNBC data not found (set KSEG_SHARED to the shared folder)")
    return path


def _realistic_distance(tnbc: Path) -> Any:
    """The tile's training target (per-nucleus distance, 0..255) from its ground truth.

    The Kidney-SegNet rows use random weights (speed does not depend on them), so their own output
    would give the watershed a meaningless map; the watershed is timed on this one instead.
    """
    import numpy as np
    from PIL import Image
    from scipy import ndimage

    from kseg.data.targets import distance_target

    gt = np.asarray(Image.open(tnbc / RUNTIME_TILE[1]).convert("L")) > 0
    labels, _ = ndimage.label(gt)
    return distance_target(labels)


def runtime_child(args: argparse.Namespace) -> None:
    """One row of :func:`runtime_table`, in its own process: prints ``{network, segment}`` s."""
    import numpy as np
    import torch
    from PIL import Image

    from kseg.infer import Preprocess
    from kseg.postprocess import dist_watershed, dist_watershed_reference

    if args.runtime != "original":
        from kseg.model import tune_cpu_allocator

        tune_cpu_allocator()  # as kseg predicts; the original row runs as it ran
    folder, tnbc = Path(args.folder), _tnbc_dir()
    rgb = np.asarray(Image.open(tnbc / RUNTIME_TILE[0]).convert("RGB"))
    reps = max(args.reps, 3)
    if args.folder_kind == "unet":
        # The shipped U-Net, end to end as `kseg predict` runs it (standardize, window, blend,
        # fg_dist watershed with its fitted values): network and whole segment.
        from kseg.segmenter import Segmenter

        seg = Segmenter.from_folder(folder, runtime=args.runtime)
        x = Preprocess.load(folder).to_tensor(rgb)
        with torch.inference_mode():
            net_s = best_of(lambda: seg.model(x), reps, warmup=True)[0]
        seg_s = best_of(lambda: seg.segment(rgb), reps, warmup=True)[0]
        print(json.dumps({"network": net_s, "segment": seg_s}))
        return
    # Kidney-SegNet, original wiring, random weights: network on the standardized tile, then the
    # watershed of a realistic map of that tile (original: the plain port of the original's).
    dist = _realistic_distance(tnbc)
    x = Preprocess.load(folder).to_tensor(rgb)
    if args.runtime == "original":
        from kseg.model import load_model_folder

        net, _ = load_model_folder(folder, dice_impl="reference")
        watershed = dist_watershed_reference
    else:
        from kseg.segmenter import Segmenter

        net = Segmenter.from_folder(folder, runtime=args.runtime).model
        watershed = dist_watershed
    with torch.inference_mode():
        net_s = best_of(lambda: net(x), reps, warmup=True)[0]
    post_s = best_of(lambda: watershed(dist), reps, warmup=True)[0]
    print(json.dumps({"network": net_s, "segment": net_s + post_s}))


_RUNTIME_LABELS = {
    "original": "original (reference DiCE + watershed)",
    "torch": "torch (kseg fast path)",
    "compiled": "torch + compiled DiCE stencils",
    "onnx": "ONNX Runtime (kseg export)",
    "openvino": "OpenVINO (kseg export)",
}


def runtime_table(args: argparse.Namespace, nfeat: int) -> None:
    """Rows for every installed runtime, against the original code path, this run."""
    import tempfile

    import torch

    from kseg.infer import Preprocess
    from kseg.model import build_model, save_model_folder
    from kseg.model.config import ModelConfig
    from kseg.predict import pretrained_model
    from kseg.runtime import installed_runtimes

    runtimes = installed_runtimes()
    print(
        f"load average before: {_load()}  (best of {max(args.reps or 3, 3)} x {args.rounds or 1} "
        f"interleaved rounds, torch threads: {_threads()}, runtimes: {', '.join(runtimes)})"
    )
    print(
        f"{'model':32s} | {'path':38s} | network 1 tile (s) | segment 512 tile (s) "
        "| x vs first row (network, segment)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ModelConfig.original_compatible(nfeat=nfeat, mid_channels=8 * nfeat)
        cfg = cfg.with_(tile_size=512, fix_aspp_adaptive_pool=True, dice_impl="fast")
        folder = Path(tmp) / "ks"
        torch.manual_seed(0)
        save_model_folder(build_model(cfg).eval(), cfg, folder)
        Preprocess().save(folder)
        cache = Path(tmp) / "cache"  # exports made for this run, not the user's cache
        groups = {
            # `compiled` changes only DiCE blocks: a row for Kidney-SegNet, not for the U-Net.
            f"Kidney-SegNet nfeat {nfeat}, 512": (
                folder,
                "ks",
                ["original", "torch", "compiled", *runtimes[1:]],
            ),
            "shipped TNBC U-Net (nfeat 32)": (pretrained_model(), "unet", runtimes),
        }
        env = {**os.environ, "KSEG_CACHE_DIR": str(cache)}
        jobs = [(m, path, kind, rt) for m, (path, kind, rts) in groups.items() for rt in rts]
        best: dict[tuple[str, str], dict[str, float]] = {}
        # Rounds interleave the rows, so a slow minute on a shared machine hits all of them.
        for _ in range(args.rounds or 1):
            for model_name, path, kind, runtime in jobs:
                cmd = [sys.executable, __file__, "--runtime-child", "--runtime", runtime]
                cmd += ["--folder", str(path), "--folder-kind", kind, "--reps", str(args.reps or 3)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                old = best.setdefault((model_name, runtime), r)
                best[(model_name, runtime)] = {k: min(old[k], r[k]) for k in r}
        for model_name, _, _, runtime in jobs:
            r = best[(model_name, runtime)]
            # Ratios against the model's first row: the original code where there is one (the
            # original has no U-Net: there, torch).
            base = best[(model_name, groups[model_name][2][0])]
            ratio = f"{base['network'] / r['network']:6.1f}x {base['segment'] / r['segment']:6.1f}x"
            print(
                f"{model_name:32s} | {_RUNTIME_LABELS[runtime]:38s} | {r['network']:18.3f} | "
                f"{r['segment']:20.3f} | {ratio}"
            )
    print(f"load average after: {_load()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 tiles, nfeat 8 and 32, 1 rep")
    ap.add_argument("--no-tune-allocator", dest="tune_fast", action="store_false")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="kidney_segnet", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="fast", help=argparse.SUPPRESS)
    ap.add_argument("--nfeat", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--tile", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=None, help="best of N (default 3, --quick 1)")
    ap.add_argument("--preset", default="original", help=argparse.SUPPRESS)
    ap.add_argument("--kseg-default", action="store_true", help="add kseg default-config rows")
    ap.add_argument(
        "--fused", action="store_true", help="add a row with KSEG_FUSED_EVAL (torch.compile) on"
    )
    ap.add_argument("--tune", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--runtimes",
        action="store_true",
        help="rows for torch / ONNX Runtime / OpenVINO vs the original path (--quick: nfeat 8)",
    )
    ap.add_argument("--runtime-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--runtime", default="torch", help=argparse.SUPPRESS)
    ap.add_argument("--folder", default="", help=argparse.SUPPRESS)
    ap.add_argument("--folder-kind", default="ks", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default=None, help="comma list of tile:nfeat, e.g. 512:32")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds per path (default 2, --quick 1)",
    )
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.runtime_child:
        runtime_child(args)
        return
    if args.runtimes:
        runtime_table(args, 8 if args.quick else 32)
        return
    if args.sizes:
        grid = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    elif args.quick:
        grid = [(256, 8), (256, 32)]
    else:
        grid = [(t, n) for t in (256, 512) for n in (8, 16, 32)]
    reps = args.reps or (1 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 2)
    print(
        f"load average before: {_load()}  (best of {reps} x {args.rounds} interleaved rounds, "
        f"torch threads: {_threads()})"
    )
    rates = machine_rates()
    print(
        f"machine now: copy bandwidth {rates['bandwidth'] / 1e9:.1f} GB/s (read + write), "
        f"float32 GEMM {rates['macs_per_s'] / 1e9:.0f} GMAC/s"
    )
    print(
        "tile nfeat | path                       | infer 1 tile (s) | train b=2 fwd+bwd (s) "
        "| x vs reference (infer, train) | x vs reference, tuned malloc"
    )
    for tile, nfeat in grid:
        rows = measure_size(args, tile, nfeat, reps)
        report(tile, nfeat, rows, rates)
    print(f"load average after: {_load()}")
    try:
        import torch

        if torch.cuda.is_available():
            print("\nGPU (fast path): fp32 / AMP / AMP+channels_last, seconds")
            for tile, nfeat in grid:
                cols = [
                    measure("kidney_segnet", "fast", nfeat, tile, 5, "cuda", amp, cl)
                    for amp, cl in ((False, False), (True, False), (True, True))
                ]
                print(
                    f"{tile:4d} {nfeat:5d} | "
                    + " | ".join(f"infer {c['infer']:.4f} train {c['train']:.4f}" for c in cols)
                )
    except ImportError:
        pass


if __name__ == "__main__":
    main()
