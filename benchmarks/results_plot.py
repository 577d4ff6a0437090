"""Plot of TNBC test AJI against multiply-accumulates per 512 tile (docs/aji_vs_macs.png).

Usage: python benchmarks/results_plot.py [--rows docs/results.json] [--out docs/aji_vs_macs.png]

``docs/results.json`` holds the rows of the README's results table (written from the outputs of
``benchmarks/quality.py`` and ``kseg model-info``); each row has ``name``, ``gmacs_512``,
``test_aji`` and ``val_aji``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=Path, default=ROOT / "docs" / "results.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "aji_vs_macs.png")
    args = parser.parse_args()

    import matplotlib

    from kseg.plots import figure, save_figure

    rows = [r for r in json.loads(args.rows.read_text())["rows"] if r.get("test_aji") is not None]
    # kseg.plots: an off-screen Agg figure (no pyplot state) and an atomic write of the PNG.
    fig = figure((1152, 540), dpi=120)
    fig.set_layout_engine("none")  # placed by hand: the right part holds the legend
    ax = fig.add_axes((0.08, 0.11, 0.45, 0.8))
    cmap = matplotlib.colormaps["tab20"]
    markers = "osD^v<>p"
    for i, row in enumerate(rows):  # 20 colours x 8 markers: no two rows look alike
        ax.scatter(
            row["gmacs_512"],
            row["test_aji"],
            s=40,
            color=cmap(i % 20),
            marker=markers[i % len(markers)],
            label=row["name"],
        )
        if row.get("val_aji") is not None:
            ax.scatter(row["gmacs_512"], row["val_aji"], s=40, marker="x", color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("GMACs per 512 x 512 tile (log scale)")
    ax.set_ylabel("AJI (dots: test patients 02, 06, 10; x: validation)")
    ax.set_title("TNBC, 25 minutes of training on 2 CPU cores")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
