"""Which part of an fg_dist model costs AJI: its foreground or its splitting of touching nuclei.

Usage:
    python benchmarks/error_sources.py MODEL_DIR [MODEL_DIR ...] [--prepared prepared]
        [--split val|test|train] [--json out.json]

For each model folder: segment the tiles of one split of ``prepared/split.json`` with the
folder's own post-processing (``postprocess.json`` when fitted) and print the mean AJI, PQ,
object F1 and pixel F1 of four rows (:mod:`kseg.diagnose`): the model as it is, the same with one
marker per true nucleus (perfect splitting), with the true nucleus mask (perfect foreground),
and with both. A large gap to ``true_foreground`` and a small one to ``true_markers`` means the
pixels, not the watershed, limit the score (docs/results.md, seventh round).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEYS = ("aji", "pq", "object_f1", "pixel_f1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--prepared", type=Path, default=Path("prepared"))
    parser.add_argument("--split", choices=("val", "test", "train"), default="val")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    from kseg.data.dataset import load_split, load_tiles
    from kseg.diagnose import SOURCES, error_sources
    from kseg.segmenter import Segmenter

    split = load_split(args.prepared)
    tiles = load_tiles(args.prepared / "images", args.prepared / "labels", split[args.split])
    out = []
    print(f"{'model':<28} {'split':<5} {'source':<16} " + " ".join(f"{k:>9}" for k in KEYS))
    for folder in args.models:
        seg = Segmenter.from_folder(folder)
        maps = [seg.maps(image) for image in tiles.images]
        rows = error_sources(maps, tiles.labels, seg.postprocess, KEYS)
        for source in SOURCES:
            out.append(
                {"model": str(folder), "split": args.split, "source": source, **rows[source]}
            )
            cells = " ".join(f"{rows[source][k]:>9.4f}" for k in KEYS)
            print(f"{str(folder)[-28:]:<28} {args.split:<5} {source:<16} {cells}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
