"""The ``normalize`` stage: fit stain normalization on the training split, apply it to every tile.

Reads ``prepared/`` (``images/``, ``labels/``, ``manifest.csv``, ``split.json``) and writes, as one
atomic folder, ``normalized/``:

- ``images/<tile_id>.png``: every tile (train, val and test) normalized with the normalizer fitted
  on the training tiles only (``stain.method: none`` copies the files byte for byte);
- ``stain.json``: the fitted normalizer (the train stage copies it into the model folder);
- ``report.png``: before/after tiles of different patients, and augmented training samples with
  their mask outlines (built with numpy + PIL, no plotting library).

It also writes ``metrics/stain.json``: tiles passed through unchanged, and the spread of the
per-patient mean Macenko stain vectors before and after normalization (degrees).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from kseg.config import Params, StainConfig
from kseg.fsutil import atomic_dir, atomic_write_text
from kseg.plots import overlay
from kseg.stain import StainNormalizer, StainWarning, fit_normalizer, save_stain, stain_vectors

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
METRICS_FILE = Path("metrics") / "stain.json"
#: Tiles per patient used for the stain-spread metric (bounds the stage's extra time).
SPREAD_TILES_PER_PATIENT = 8


def read_rgb(path: Path) -> NDArray[np.uint8]:
    """``(H, W, 3)`` uint8 RGB of an image file."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _read_split(prepared: Path) -> dict[str, list[str]]:
    path = prepared / "split.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path}: cannot read the split ({err}); run `kseg prepare` first"
        ) from err
    missing = [s for s in SPLITS if not isinstance(raw.get(s), list)]
    if missing:
        raise ValueError(f"{path}: missing split list(s) {missing}; expected keys {list(SPLITS)}")
    return {s: [str(t) for t in raw[s]] for s in SPLITS}


def _read_patients(prepared: Path, ids: Sequence[str]) -> dict[str, str]:
    """Tile id -> patient from ``manifest.csv`` (the id's prefix before '_' if it is absent)."""
    patients = {t: t.rsplit("_", 1)[0] for t in ids}
    path = prepared / "manifest.csv"
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("tile_id") in patients and row.get("patient"):
                    patients[row["tile_id"]] = row["patient"]
    return patients


def patient_spread(
    vectors: dict[str, list[NDArray[np.float64]]],
) -> dict[str, float]:
    """Spread of per-patient mean stain vectors: mean angle (degrees) to the mean over patients.

    Args:
        vectors: patient -> list of ``(3, 2)`` H and E unit vectors of its tiles.

    Returns:
        ``{"h_deg": ..., "e_deg": ..., "n_patients": ...}``; NaN-free (0 with < 2 patients).
    """
    means = []
    for vs in vectors.values():
        if vs:
            m = np.mean(vs, axis=0)  # (3, 2)
            means.append(m / np.linalg.norm(m, axis=0, keepdims=True))
    out: dict[str, float] = {"n_patients": float(len(means))}
    for k, name in enumerate(("h_deg", "e_deg")):
        if len(means) < 2:
            out[name] = 0.0
            continue
        stack = np.stack([m[:, k] for m in means])  # (P, 3)
        centre = stack.mean(axis=0)
        centre /= np.linalg.norm(centre)
        cos = np.clip(stack @ centre, -1.0, 1.0)
        out[name] = float(np.degrees(np.arccos(cos)).mean())
    return out


def stain_spread(
    images: dict[str, NDArray[np.uint8]], patients: dict[str, str], cfg: StainConfig
) -> dict[str, float]:
    """:func:`patient_spread` of the Macenko stain vectors of ``images`` (tile id -> RGB)."""
    by_patient: dict[str, list[NDArray[np.float64]]] = {}
    for tile_id, img in images.items():
        he = stain_vectors(img, cfg)
        if he is not None:
            by_patient.setdefault(patients[tile_id], []).append(he)
    return patient_spread(by_patient)


# --------------------------------------------------------------------------------------------------
# Report grid
# --------------------------------------------------------------------------------------------------

CELL = 192  # pixels per tile in report.png
CAPTION = 14  # caption band height


def _cell(rgb: NDArray[np.uint8], caption: str) -> Image.Image:
    tile = Image.fromarray(rgb).resize((CELL, CELL), Image.Resampling.NEAREST)
    cell = Image.new("RGB", (CELL, CELL + CAPTION), "white")
    cell.paste(tile, (0, CAPTION))
    ImageDraw.Draw(cell).text((2, 1), caption[:30], fill="black")
    return cell


def report_grid(rows: Sequence[Sequence[tuple[NDArray[np.uint8], str]]]) -> Image.Image:
    """Lays out rows of captioned tiles on a white canvas."""
    n_cols = max((len(r) for r in rows), default=1)
    pad = 4
    width = n_cols * (CELL + pad) + pad
    height = len(rows) * (CELL + CAPTION + pad) + pad
    canvas = Image.new("RGB", (max(width, 1), max(height, 1)), "white")
    for r, row in enumerate(rows):
        for c, (rgb, caption) in enumerate(row):
            canvas.paste(
                _cell(rgb, caption), (pad + c * (CELL + pad), pad + r * (CELL + CAPTION + pad))
            )
    return canvas


def _report(
    params: Params,
    prepared: Path,
    staging: Path,
    shown: dict[str, str],
    train_ids: Sequence[str],
) -> Image.Image:
    """Before/after rows for ``shown`` (tile id -> patient), then augmented training samples."""
    from kseg.augment import build_augmentation

    before = [
        (read_rgb(prepared / "images" / f"{t}.png"), f"{p} {t} before") for t, p in shown.items()
    ]
    after = [
        (read_rgb(staging / "images" / f"{t}.png"), f"after: {params.stain.method}") for t in shown
    ]
    rows: list[list[tuple[NDArray[np.uint8], str]]] = [before, after] if shown else []
    if train_ids:
        tile = train_ids[0]
        image = read_rgb(staging / "images" / f"{tile}.png")
        with Image.open(prepared / "labels" / f"{tile}.png") as lab:
            labels = np.asarray(lab).astype(np.int32)
        aug = build_augmentation(params.augment, params.seed)
        samples = [(overlay(image, labels), f"{tile} input")]
        for k in range(max(3, len(shown) - 1)):
            img_k, lab_k = aug(image, labels, np.random.default_rng([params.seed, k]))
            samples.append((overlay(img_k, lab_k), f"augmented {k + 1}"))
        rows.append(samples)
    return report_grid(rows)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def _iter_images(folder: Path, ids: Sequence[str]) -> Iterator[NDArray[np.uint8]]:
    for tile_id in ids:
        yield read_rgb(folder / f"{tile_id}.png")


def _pick_report_tiles(
    train_ids: Sequence[str], all_ids: Sequence[str], patients: dict[str, str], n: int
) -> dict[str, str]:
    """First tile of up to ``n`` different patients, training patients first."""
    shown: dict[str, str] = {}
    seen: set[str] = set()
    for tile_id in [*train_ids, *all_ids]:
        if len(shown) >= n:
            break
        if patients[tile_id] not in seen:
            seen.add(patients[tile_id])
            shown[tile_id] = patients[tile_id]
    return shown


def run_normalize(params: Params) -> dict[str, Any]:
    """Fits the normalizer on the training tiles and writes ``params.stain.out_dir``.

    Returns:
        The metrics written to ``metrics/stain.json``.

    Raises:
        ValueError: If ``prepared/`` is missing or inconsistent, or the reference cannot be fitted.
    """
    cfg = params.stain
    prepared = Path(params.prepare.out_dir)
    image_dir = prepared / "images"
    split = _read_split(prepared)
    all_ids = sorted(p.stem for p in image_dir.glob("*.png")) if image_dir.is_dir() else []
    if not all_ids:
        raise ValueError(f"{image_dir}: no tiles; run `kseg prepare` first")
    absent = sorted(set(split["train"]) - set(all_ids))
    if absent:
        raise ValueError(f"{prepared / 'split.json'}: training tiles without image: {absent[:5]}")
    patients = _read_patients(prepared, all_ids)

    t0 = time.perf_counter()
    normalizer = fit_normalizer(
        cfg, _iter_images(image_dir, split["train"]), tile_ids=split["train"], seed=params.seed
    )
    fit_s = time.perf_counter() - t0
    log.info(
        "fitted %s stain normalization on %d training tiles in %.2f s",
        cfg.method,
        len(split["train"]),
        fit_s,
    )

    spread_ids: dict[str, int] = {}
    sample: list[str] = []
    for tile_id in all_ids:
        n = spread_ids.get(patients[tile_id], 0)
        if n < SPREAD_TILES_PER_PATIENT:
            spread_ids[patients[tile_id]] = n + 1
            sample.append(tile_id)
    before: dict[str, NDArray[np.uint8]] = {}
    after: dict[str, NDArray[np.uint8]] = {}
    skipped: dict[str, str] = {}
    out_dir = Path(cfg.out_dir)
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as staging:
        (staging / "images").mkdir()
        for tile_id in all_ids:
            src, dst = image_dir / f"{tile_id}.png", staging / "images" / f"{tile_id}.png"
            if normalizer.method == "none":
                shutil.copyfile(src, dst)  # byte for byte: "none" is the original's behaviour
                if tile_id in sample:
                    before[tile_id] = after[tile_id] = read_rgb(src)
                continue
            rgb = read_rgb(src)
            out = _transform_logged(normalizer, rgb, tile_id, skipped)
            Image.fromarray(out).save(dst, format="PNG", compress_level=6)
            if tile_id in sample:
                before[tile_id], after[tile_id] = rgb, out
        transform_s = time.perf_counter() - t0
        save_stain(normalizer, staging / "stain.json")
        shown = _pick_report_tiles(split["train"], all_ids, patients, cfg.report_tiles)
        _report(params, prepared, staging, shown, split["train"]).save(
            staging / "report.png", format="PNG"
        )

    # Numbers only (DVC compares them across commits; the method and reference are params).
    metrics: dict[str, Any] = {
        "n_fit_tiles": len(split["train"]) if cfg.reference == "pooled" else 1,
        "n_tiles": len(all_ids),
        "n_passed_through": len(skipped),
    }
    if skipped:
        log.info("passed through unchanged: %s", ", ".join(skipped))
    # Timings go to the log, not into the metrics file DVC hashes and compares.
    log.info("stain fit %.3f s, %.1f tiles/s", fit_s, len(all_ids) / max(transform_s, 1e-9))
    b = stain_spread(before, patients, cfg)
    a = b if normalizer.method == "none" else stain_spread(after, patients, cfg)
    metrics.update(
        {
            "spread_h_deg_before": round(b["h_deg"], 3),
            "spread_h_deg_after": round(a["h_deg"], 3),
            "spread_e_deg_before": round(b["e_deg"], 3),
            "spread_e_deg_after": round(a["e_deg"], 3),
        }
    )
    atomic_write_text(METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def _transform_logged(
    normalizer: StainNormalizer, rgb: NDArray[np.uint8], tile_id: str, skipped: dict[str, str]
) -> NDArray[np.uint8]:
    """Transforms one tile; records and logs it when the normalizer passes it through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StainWarning)
        out = normalizer.transform(rgb)
    for w in caught:
        if issubclass(w.category, StainWarning):
            skipped[tile_id] = str(w.message)
            log.warning("%s: %s", tile_id, w.message)
    return out
