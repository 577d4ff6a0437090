"""The real data sources of ``kseg fetch``: TNBC (Zenodo), the Irshad kidney set, a user's folder.

:func:`fetch_source` writes one source into the empty staging folder that
:func:`kseg.data.fetch.fetch` swaps in for ``data/`` only on success, so every error here leaves
the previous ``data/`` untouched. Layouts written (the contract with ``kseg prepare``):

- ``tnbc``: the archive's own layout, ``TNBC_NucleiSegmentation/Slide_XX/XX_N.png`` (RGBA H&E) and
  ``TNBC_NucleiSegmentation/GT_XX/XX_N.png`` (binary), ``__MACOSX`` dropped.
- ``kidney`` and ``folder``: ``images/<tile_id>.<ext>``, ``masks/<tile_id>.<ext>`` (files copied
  byte for byte, any of the extensions in :data:`IMAGE_EXTS`) and ``index.csv`` with columns
  ``tile_id,patient,image,mask``. ``kseg prepare`` does every conversion.

Accepted input layouts and the patient rule are described in ``docs/data.md``.
"""

from __future__ import annotations

import csv
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kseg.config import DataConfig
from kseg.data.download import is_remote, local_path, obtain_archive, safe_extract
from kseg.safety import check_tile_id, member_path

log = logging.getLogger(__name__)

TNBC_URL = "https://zenodo.org/records/1175282/files/TNBC_NucleiSegmentation.zip"
TNBC_SHA256 = "da708c3a988f4ad4b9bbb9283b387faf703f0bc0e5e689927306bd27ea13a57f"
TNBC_ROOT = "TNBC_NucleiSegmentation"
IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MASK_EXTS = (".png", ".tif", ".tiff", ".bmp")
#: Folder names accepted for images and masks (data/ + gts/ is the original Kidney-SegNet layout).
IMAGE_DIRS = ("images", "data")
MASK_DIRS = ("masks", "gts")
_TCGA = re.compile(r"TCGA-[A-Za-z0-9]{2}-[A-Za-z0-9]{4}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")

KIDNEY_HELP = (
    "data.source 'kidney' needs data.path: a local zip or folder of the kidney dataset of "
    "Irshad et al. (PSB 2015, 'Crowdsourcing image annotation for nucleus detection and "
    "segmentation in computational pathology': 10 TCGA kidney renal clear cell carcinoma "
    "patients, 400x400 tiles at 40x). Its host now asks for a login: download it there (or ask "
    "the authors), then lay it out as images/ + masks/ (or the original Kidney-SegNet data/ + "
    "gts/) with TCGA barcodes in the file names or one subfolder per patient; see docs/data.md"
)


@dataclass(frozen=True)
class Pair:
    """One tile of a paired layout: ids and the source files."""

    tile_id: str
    patient: str
    image: Path
    mask: Path


def fetch_source(cfg: DataConfig, staging: Path) -> None:
    """Writes the dataset named by ``cfg.source`` into ``staging`` (empty, swapped in on success).

    Raises:
        ValueError: bad layout, checksum mismatch, unsafe or corrupt archive, missing setting.
        OSError: download failure after retries, missing local file.
    """
    staging = Path(staging)
    if cfg.source == "tnbc":
        _fetch_tnbc(cfg, staging)
    elif cfg.source in ("kidney", "folder"):
        _fetch_paired(cfg, staging)
    else:
        raise ValueError(f"data.source: {cfg.source!r} is not a downloadable source")


def materialize(
    location: str,
    sha256: str | None,
    cfg: DataConfig,
    into: Path,
    layout: Callable[[list[str]], None] | None = None,
) -> None:
    """Puts the content of an archive (URL, file:// or path) or of a local folder into ``into``.

    ``layout(names)`` checks an archive's entry names before anything is extracted.
    """
    if not is_remote(location) and local_path(location).is_dir():
        src = local_path(location)
        log.info("%s is a folder: copying it (there is no archive checksum to check)", src)
        if cfg.sha256:
            log.warning("data.sha256 is ignored for a folder (%s)", src)
        shutil.copytree(src, into, symlinks=True, ignore=_ignore_metadata, dirs_exist_ok=True)
        return
    archive = obtain_archive(location, sha256, retries=cfg.retries, timeout=cfg.timeout_s)
    n = safe_extract(
        archive,
        into,
        max_bytes=cfg.max_extract_bytes,
        max_ratio=cfg.max_entry_ratio,
        max_entries=cfg.max_entries,
        layout=layout,
    )
    log.info("extracted %d files from %s", n, archive)


def _ignore_metadata(_folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__MACOSX" or n.startswith("._") or n == ".DS_Store"]


# --------------------------------------------------------------------------------------------------
# TNBC
# --------------------------------------------------------------------------------------------------


def _folders(names: list[str]) -> set[str]:
    """Folder names at the top two levels of an archive's entry names."""
    out: set[str] = set()
    for name in names:
        parts = name.split("/")
        out.update(parts[: min(len(parts) - 1, 2)])
    return out


def _tnbc_names(names: list[str]) -> None:
    """Archive layout check of TNBC, before extraction (Slide_XX/ and GT_XX/ folders)."""
    folders = _folders(names)
    if not any(f.startswith("Slide_") for f in folders) or not any(
        f.startswith("GT_") for f in folders
    ):
        raise ValueError(
            f"not the TNBC layout: no Slide_XX/ and GT_XX/ folders in the archive (found "
            f"{sorted(folders)[:10]}); nothing was extracted"
        )


def _paired_names(names: list[str]) -> None:
    """Archive layout check of kidney/folder, before extraction (images/ and masks/)."""
    folders = _folders(names)
    if not folders & set(IMAGE_DIRS) or not folders & set(MASK_DIRS):
        raise ValueError(
            "expected an images/ and a masks/ folder (or data/ and gts/) in the archive, found "
            f"{sorted(folders)[:10]}; nothing was extracted"
        )


def _find_tnbc_root(raw: Path) -> Path:
    """The folder holding ``Slide_XX`` / ``GT_XX`` (the archive root or one level below it)."""
    for cand in [raw, *sorted(p for p in raw.iterdir() if p.is_dir())]:
        if any(cand.glob("Slide_*")) and any(cand.glob("GT_*")):
            return cand
    found = sorted(p.name for p in raw.iterdir())[:10]
    raise ValueError(
        f"not the TNBC layout: no folder with Slide_XX/ and GT_XX/ subfolders (found {found})"
    )


def check_tnbc(root: Path) -> tuple[int, int]:
    """Checks that each ``Slide_XX/XX_N.png`` has its ``GT_XX/XX_N.png``; returns (tiles, patients).

    Raises:
        ValueError: naming the images without ground truth (and the reverse), or no tiles.
    """
    slides = sorted(p for p in root.glob("Slide_*") if p.is_dir())
    n_tiles, missing = 0, []
    for slide in slides:
        gt = root / ("GT_" + slide.name.removeprefix("Slide_"))
        for img in sorted(slide.glob("*.png")):
            member_path(root, img.relative_to(root).as_posix(), "TNBC dataset file")
            n_tiles += 1
            if not (gt / img.name).is_file():
                missing.append(f"{gt.name}/{img.name}")
            else:
                member_path(root, f"{gt.name}/{img.name}", "TNBC dataset file")
    if missing:
        raise ValueError(
            f"TNBC layout: ground truth missing for {len(missing)} tile(s): {missing[:5]}"
        )
    if n_tiles == 0:
        raise ValueError(f"TNBC layout: no Slide_XX/*.png image under {root}")
    return n_tiles, len(slides)


def _fetch_tnbc(cfg: DataConfig, staging: Path) -> None:
    location = cfg.url or cfg.path or TNBC_URL
    # A mirror of the official archive has the official checksum, so it stays the default.
    sha = cfg.sha256 or TNBC_SHA256
    raw = staging / ".raw"
    materialize(location, sha, cfg, raw, layout=_tnbc_names)
    root = _find_tnbc_root(raw)
    root.rename(staging / TNBC_ROOT)
    shutil.rmtree(raw, ignore_errors=True)
    n_tiles, n_patients = check_tnbc(staging / TNBC_ROOT)
    log.info("TNBC: %d tiles of %d patients from %s", n_tiles, n_patients, location)


# --------------------------------------------------------------------------------------------------
# kidney and folder: images/ + masks/
# --------------------------------------------------------------------------------------------------


def _paired_root(raw: Path) -> tuple[Path, Path, Path]:
    """(root, image folder, mask folder) of a paired layout at ``raw`` or one level below."""
    for cand in [raw, *sorted(p for p in raw.iterdir() if p.is_dir())]:
        images = next((cand / d for d in IMAGE_DIRS if (cand / d).is_dir()), None)
        masks = next((cand / d for d in MASK_DIRS if (cand / d).is_dir()), None)
        if images is not None and masks is not None:
            return cand, images, masks
    found = sorted(p.name for p in raw.iterdir())[:10]
    raise ValueError(f"expected an images/ and a masks/ folder (or data/ and gts/), found {found}")


def patient_of(rel: Path) -> str | None:
    """The patient of an image path relative to ``images/`` (rule order in docs/data.md).

    1. a subfolder: ``images/<patient>/<tile>.png``;
    2. a TCGA case barcode in the name: ``TCGA-B0-5711-01Z..._3.png`` -> ``TCGA-B0-5711``;
    3. the name up to its last underscore: ``P01_03.png`` -> ``P01``, ``01_3.png`` -> ``01``.

    Returns None when no rule applies (the tile is then its own patient).
    """
    if len(rel.parts) > 1:
        return rel.parts[0]
    match = _TCGA.search(rel.stem)
    if match:
        return match.group(0).upper()
    if "_" in rel.stem.strip("_"):
        return rel.stem.rsplit("_", 1)[0]
    return None


def _find_mask(mask_dir: Path, rel: Path) -> Path | None:
    stem = rel.with_suffix("")
    for suffix in ("", "_mask", "_gt", "_label"):
        for ext in MASK_EXTS:
            cand = mask_dir / f"{stem}{suffix}{ext}"
            if cand.is_file():
                return cand
    return None


def _tile_id(rel: Path) -> str:
    return _UNSAFE.sub("-", "_".join(rel.with_suffix("").parts)).strip("-") or "tile"


def discover_pairs(raw: Path) -> list[Pair]:
    """Finds (image, mask) pairs and their patients in a paired layout (see docs/data.md).

    ``index.csv`` next to ``images/`` (columns ``image, mask`` and optionally ``tile_id``,
    ``patient``; paths relative to it) takes precedence over file-name rules.

    Raises:
        ValueError: no images, images without masks, or duplicate tile ids.
    """
    root, image_dir, mask_dir = _paired_root(raw)
    index = root / "index.csv"
    if index.is_file():
        return _pairs_from_index(root, index)
    images = sorted(
        p
        for p in image_dir.rglob("*")
        if p.suffix.lower() in IMAGE_EXTS and p.is_file() and not p.name.startswith("._")
    )
    if not images:
        raise ValueError(f"{image_dir}: no image files ({', '.join(IMAGE_EXTS)})")
    pairs, missing, lonely = [], [], 0
    for img in images:
        rel = img.relative_to(image_dir)
        # A link out of the dataset would copy any readable file into data/.
        member_path(raw, img.relative_to(raw).as_posix(), "dataset file")
        mask = _find_mask(mask_dir, rel)
        if mask is None:
            missing.append(str(rel))
            continue
        member_path(raw, mask.relative_to(raw).as_posix(), "dataset file")
        patient = patient_of(rel)
        if patient is None:
            lonely += 1
            patient = rel.stem
        pairs.append(Pair(_tile_id(rel), patient, img, mask))
    if missing:
        raise ValueError(
            f"{mask_dir}: no mask for {len(missing)} image(s), e.g. {missing[:5]} "
            f"(expected the same name, optionally with _mask, and one of {', '.join(MASK_EXTS)})"
        )
    if lonely:
        log.warning("%d tile(s) have no patient in their name: each is its own patient", lonely)
    _check_unique([p.tile_id for p in pairs], image_dir)
    return pairs


def _pairs_from_index(root: Path, index: Path) -> list[Pair]:
    """Pairs listed by ``index.csv``; every name must stay inside the dataset folder."""
    try:
        with index.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"index.csv of the dataset: not a UTF-8 CSV file ({err})") from err
    if not rows or not {"image", "mask"} <= set(rows[0]):
        raise ValueError("index.csv of the dataset: expected columns image, mask (and optionally "
                         "tile_id, patient)")  # fmt: skip
    pairs = []
    for i, row in enumerate(rows, start=2):
        where = f"index.csv line {i}"
        files = []
        for col in ("image", "mask"):
            path = member_path(root, row.get(col) or "", f"{where}, column {col}")
            if not path.is_file():
                raise ValueError(f"{where}: {col} {row[col]!r} not found in the dataset")
            files.append(path)
        parts = Path(row["image"]).parts
        rel = Path(*parts[1:]) if len(parts) > 1 else Path(row["image"])  # drop "images/"
        tile_id = check_tile_id(row.get("tile_id") or _tile_id(rel), where)
        patient = row.get("patient") or patient_of(rel) or rel.stem
        pairs.append(Pair(tile_id, patient, files[0], files[1]))
    _check_unique([p.tile_id for p in pairs], Path("index.csv"))
    return pairs


def _check_unique(ids: list[str], where: Path) -> None:
    seen: set[str] = set()
    dups = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
    if dups:
        raise ValueError(f"{where}: duplicate tile ids {dups[:5]}")


def write_paired(pairs: list[Pair], out: Path) -> None:
    """Copies pairs into ``out/images``, ``out/masks`` and writes ``out/index.csv``."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in pairs:
        check_tile_id(p.tile_id, f"tile {p.tile_id!r} of {p.image.name}")
        image = f"images/{p.tile_id}{p.image.suffix.lower()}"
        mask = f"masks/{p.tile_id}{p.mask.suffix.lower()}"
        shutil.copyfile(p.image, out / image)
        shutil.copyfile(p.mask, out / mask)
        rows.append({"tile_id": p.tile_id, "patient": p.patient, "image": image, "mask": mask})
    with (out / "index.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["tile_id", "patient", "image", "mask"])
        writer.writeheader()
        writer.writerows(rows)


def _fetch_paired(cfg: DataConfig, staging: Path) -> None:
    location = cfg.path or cfg.url
    if not location:
        if cfg.source == "kidney":
            raise ValueError(KIDNEY_HELP)
        raise ValueError(
            "data.source 'folder' needs data.path: a folder (or zip) with images/ and masks/ "
            "(matching names; binary or instance masks); see docs/data.md"
        )
    raw = staging / ".raw"
    materialize(location, cfg.sha256, cfg, raw, layout=_paired_names)
    pairs = discover_pairs(raw)
    write_paired(pairs, staging)
    shutil.rmtree(raw, ignore_errors=True)
    n_patients = len({p.patient for p in pairs})
    log.info("%s: %d tiles of %d patients from %s", cfg.source, len(pairs), n_patients, location)
