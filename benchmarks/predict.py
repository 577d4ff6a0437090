"""End-to-end `kseg predict` throughput on a 2048x2048 image: model, post-processing and I/O.

Usage: python benchmarks/predict.py [--quick] [--size 2048] [--device cpu|cuda]

The model is untrained (speed does not depend on the weights, except through how many nuclei the
post-processing sees), so post-processing is also timed on a realistic distance map made from the
synthetic ground truth. Baselines measured in the same run: the reference (line-by-line original)
DiCE implementation for the model, and the plain port of the original watershed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import best_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1024x1024 and fewer configs")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    size = 1024 if args.quick else args.size

    import torch
    from PIL import Image

    from kseg.config import SyntheticConfig, params_from_dict, save_config
    from kseg.data.synthetic import draw_instances, patient_stain, render_tile
    from kseg.data.targets import distance_target
    from kseg.infer import Preprocess
    from kseg.model import build_model, save_model_folder
    from kseg.postprocess import dist_watershed, dist_watershed_reference
    from kseg.predict import read_image, write_outputs
    from kseg.segmenter import Segmenter

    rng = np.random.default_rng(0)
    cfg = SyntheticConfig()
    n_nuclei = int(35 * (size / 256) ** 2)
    labels = draw_instances(rng, size, n_nuclei, cfg.nucleus_radius)
    rgb = render_tile(rng, labels, patient_stain(np.random.default_rng(1)))
    realistic = distance_target(labels)
    megapixels = size * size / 1e6

    configs = [
        ("kseg default (nfeat 16, tile 256)", {"nfeat": 16, "mid_channels": 128, "tile_size": 256})
    ]
    if not args.quick:
        configs.append(
            (
                "original width (nfeat 32, tile 512)",
                {"nfeat": 32, "mid_channels": 256, "tile_size": 512},
            )
        )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        Image.fromarray(rgb).save(tmp / "input.png")
        for name, model_kw in configs:
            for impl in ("fast", "reference"):
                if impl == "reference" and args.quick:
                    continue
                params = params_from_dict({"model": {**model_kw, "dice_impl": impl}})
                folder = tmp / f"model_{impl}_{model_kw['nfeat']}"
                torch.manual_seed(0)
                save_model_folder(build_model(params.model).eval(), params.model, folder)
                Preprocess().save(folder)
                save_config(params, folder / "params.json")
                seg = Segmenter.from_folder(folder, device=args.device)
                read_s, image = best_of(partial(read_image, tmp / "input.png"))
                seg.distance(image[:256, :256])  # warm-up
                model_s, dist = best_of(partial(seg.distance, image))
                post_s, pred = best_of(partial(dist_watershed, dist))
                write_s, _ = best_of(partial(write_outputs, tmp / "out", "input", image, pred))
                rows.append((name, impl, read_s, model_s, post_s, write_s))
        post_fast, _ = best_of(lambda: dist_watershed(realistic), repeat=2)
        post_ref, _ = best_of(lambda: dist_watershed_reference(realistic))
        inst = dist_watershed(realistic)
        write_real, _ = best_of(lambda: write_outputs(tmp / "out", "real", rgb, inst))

    print(
        f"\nkseg predict on one {size}x{size} image ({megapixels:.2f} MP), device {args.device}, "
        f"torch threads {torch.get_num_threads()}\n"
    )
    print(
        "| model | DiCE path | read s | model s | post s | write s | total s | MP/s | "
        "model vs reference |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ref_model = {r[0]: r[3] for r in rows if r[1] == "reference"}
    for name, impl, read_s, model_s, post_s, write_s in rows:
        total = read_s + model_s + post_s + write_s
        ratio = f"{ref_model[name] / model_s:.1f}x" if name in ref_model else "n/a"
        print(
            f"| {name} | {impl} | {read_s:.2f} | {model_s:.2f} | {post_s:.2f} | {write_s:.2f} "
            f"| {total:.2f} | {megapixels / total:.2f} | {ratio} |"
        )
    print(
        f"\nPost-processing of a realistic map ({int(inst.max())} nuclei): fast {post_fast:.3f} s, "
        f"plain port of the original {post_ref:.3f} s ({post_ref / post_fast:.1f}x); "
        f"writing labels/overlay/CSV/GeoJSON {write_real:.3f} s."
    )


if __name__ == "__main__":
    main()
