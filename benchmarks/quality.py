"""Segmentation quality of trained model folders, validation and test patients reported apart.

Usage:
    python benchmarks/quality.py MODEL_DIR [MODEL_DIR ...] [--prepared prepared] [--post fitted]
        [--tta flips|dihedral] [--scales 1.0 1.25] [--window 256] [--refit] [--ensemble]
        [--stain-tta] [--json out.json]

For each model folder: segment the validation and the test tiles of ``prepared/split.json`` (raw
tiles; the model applies its own stain normalization) and print the mean AJI, PQ, object F1,
pixel F1 and pixel IoU per split, with the network + post-processing seconds per tile.
``--post`` chooses the post-processing: ``fitted`` (the model folder's ``postprocess.json``, as
evaluate/predict/serving use it; else params.json), ``params`` (the configured values), or
``original`` (h 7 / threshold 28, no size filter; dist-head models only). Validation tiles chose
the checkpoint and the fitted thresholds, so only the test columns are an unbiased estimate.

``--ensemble`` scores the model folders as one ensemble instead of one row each: every member
predicts its maps (foreground probability and distance, with its own stain normalization, input
normalization and TTA), the maps are averaged, and the first member's post-processing (or, with
``--refit``, values fitted on the validation tiles to the averaged maps) makes the instances.

``--stain-tta`` averages the maps of five stain views of each tile (identity, H x 0.8, H x 1.25,
E x 0.8, E x 1.25 with ``kseg.augment.hed_jitter``; each with the model's own TTA); use it with
``--refit`` (docs/results.md, twenty-second round: no gain, so it is not a kseg option).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEYS = ("aji", "pq", "object_f1", "pixel_f1", "pixel_iou")


def score_split(segmenter, tiles) -> tuple[dict[str, float], float]:
    """Mean metrics over ``tiles`` and seconds per tile."""
    from kseg.metrics import segmentation_metrics

    rows, start = [], time.perf_counter()
    for image, gt in zip(tiles.images, tiles.labels, strict=True):
        pred, _ = segmenter.segment(image)
        rows.append(segmentation_metrics(pred, gt))
    seconds = (time.perf_counter() - start) / max(len(rows), 1)
    return {k: float(np.mean([r[k] for r in rows])) for k in KEYS}, seconds


class MeanMapsSegmenter:
    """Instances from a subclass's mean maps (``maps``), as kseg.segmenter.Segmenter makes them."""

    postprocess: object

    def maps(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Instance labels of the mean maps, and the mean distance map."""
        from kseg.postprocess import postprocess_maps

        maps = self.maps(image)
        return postprocess_maps(maps, self.postprocess), maps[-1]


class EnsembleSegmenter(MeanMapsSegmenter):
    """Several segmenters as one: the mean of their ``(C, H, W)`` maps, then post-processing.

    Args:
        members: Segmenters of networks with the same head (same map channels).
    """

    def __init__(self, members: list) -> None:
        heads = {m.model_config.head for m in members}
        if len(heads) != 1:
            raise ValueError(f"--ensemble: members have different heads {sorted(heads)}")
        self.members = members
        self.model_config = members[0].model_config
        self.postprocess = members[0].postprocess

    def maps(self, image: np.ndarray) -> np.ndarray:
        """Mean ``(C, H, W)`` maps of the members (probabilities for ``fg_dist``)."""
        return np.mean([m.maps(image) for m in self.members], axis=0)


#: (H, E) concentration scales of the ``--stain-tta`` views (D unchanged, no shift).
STAIN_VIEWS = ((1.0, 1.0), (0.8, 1.0), (1.25, 1.0), (1.0, 0.8), (1.0, 1.25))


class StainTTASegmenter(MeanMapsSegmenter):
    """A segmenter whose maps are the mean over :data:`STAIN_VIEWS` of the image."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.model_config = inner.model_config
        self.postprocess = inner.postprocess

    def maps(self, image: np.ndarray) -> np.ndarray:
        """Mean ``(C, H, W)`` maps over the stain views of ``image``."""
        from kseg.augment import hed_jitter

        views = [hed_jitter(image, np.array([h, e, 1.0]), np.zeros(3)) for h, e in STAIN_VIEWS]
        return np.mean([self.inner.maps(view) for view in views], axis=0)


def main() -> None:
    from kseg.infer import TTA_VIEWS

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--prepared", type=Path, default=Path("prepared"))
    parser.add_argument("--post", choices=("fitted", "params", "original"), default="fitted")
    parser.add_argument("--tta", choices=tuple(TTA_VIEWS), help="override model.infer_tta")
    parser.add_argument(
        "--scales", type=float, nargs="+", help="override model.infer_scales (factors)"
    )
    parser.add_argument(
        "--window", type=int, help="override model.infer_window (size-agnostic networks only)"
    )
    parser.add_argument(
        "--refit", action="store_true", help="fit the post-processing on the validation tiles again"
    )
    parser.add_argument(
        "--ensemble", action="store_true", help="score the model folders as one ensemble"
    )
    parser.add_argument(
        "--stain-tta", action="store_true", help="average the maps of 5 stain views of each tile"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    from kseg.config import PostprocessConfig, params_from_dict
    from kseg.data.dataset import load_split, load_tiles
    from kseg.segmenter import Segmenter

    split = load_split(args.prepared)
    img, lab = args.prepared / "images", args.prepared / "labels"
    tiles = {s: load_tiles(img, lab, split[s]) for s in ("val", "test")}
    out = []
    header = f"{'model':<28} {'split':<5} " + " ".join(f"{k:>9}" for k in KEYS) + "  s/tile"
    print(header)
    groups = [args.models] if args.ensemble else [[folder] for folder in args.models]
    for group in groups:
        folder = group[0]
        members = [Segmenter.from_folder(f) for f in group]
        for member in members:  # the overrides apply to every member's network and TTA
            if args.tta:
                member.model_config = member.model_config.model_copy(update={"infer_tta": args.tta})
            if args.scales:
                member.model_config = member.model_config.model_validate(
                    {**member.model_config.model_dump(), "infer_scales": tuple(args.scales)}
                )
            if args.window is not None:
                member.model_config = member.model_config.model_copy(
                    update={"infer_window": args.window}
                )
        seg = EnsembleSegmenter(members) if len(members) > 1 else members[0]
        if args.stain_tta:
            seg = StainTTASegmenter(seg)
        if args.post == "params":
            raw = json.loads((folder / "params.json").read_text())
            seg.postprocess = params_from_dict(raw).postprocess
        elif args.post == "original":
            seg.postprocess = PostprocessConfig(min_size=0)
        if args.refit:  # on the validation tiles only, as the train stage does
            from kseg.postprocess_fit import fit_postprocess

            maps = [seg.maps(image) for image in tiles["val"].images]
            seg.postprocess, _ = fit_postprocess(
                maps, tiles["val"].labels, seg.postprocess, seg.model_config.head
            )
            print(f"refitted on val: {seg.postprocess}")
        for name, t in tiles.items():
            scores, seconds = score_split(seg, t)
            out.append(
                {
                    "model": " + ".join(str(f) for f in group),
                    "split": name,
                    "post": args.post,
                    "tta": seg.model_config.infer_tta,
                    "scales": list(seg.model_config.infer_scales),
                    "window": seg.model_config.window,
                    "stain_tta": args.stain_tta,
                    "seconds_per_tile": seconds,
                    **scores,
                }
            )
            cells = " ".join(f"{scores[k]:>9.4f}" for k in KEYS)
            print(f"{str(folder)[-28:]:<28} {name:<5} {cells}  {seconds:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
