"""Whole-slide images: pyramidal TIFF, SVS and OME-TIFF segmented in streamed blocks.

``kseg predict slide.svs`` (or :func:`segment_slide`) does, without ever holding the full-resolution
slide in memory:

1. **Resolution.** The slide's pixel size (``tiffslide.mpp-x``, or ``mpp=`` when the file lacks it)
   and the model's input pixel size (``config.json`` ``extra.mpp``: the pixel size of the images
   it was trained on; the shipped model states 0.25 µm/px, 40x) give the pyramid level to read:
   the coarsest level that is not coarser than that pixel size; the small rest is resampled (area
   interpolation) to it. A model with ``input_scale`` 0.5 then resamples each block once more, to
   the network's own pixel size, and its maps back (as for tiles), so outlines and the
   post-processing stay at the input pixel size, never resampled twice by the slide code. All
   work happens on this *working grid*; outputs are in level-0 pixels and µm.
2. **Tissue.** A thumbnail (~8 µm/px, streamed from the best level) is thresholded on optical
   density (Otsu, clipped to a sane range); blocks whose core holds no tissue are never read.
3. **Blocks.** The working grid is cut into square *cores* (``block`` px); each block is read with
   a ``margin`` on every side, segmented with the model's own tiled inference
   (:meth:`kseg.segmenter.Segmenter.segment`: overlapping windows, blending, post-processing) and
   only the nuclei whose **centroid lies in the core** are kept. Cores partition the slide, so a
   nucleus is kept by exactly one block, and the margin (wider than a nucleus) means it was
   segmented whole. Where two neighbouring blocks still disagree about a nucleus that reaches
   across a core border (a clump segmented differently with different context), the merge step
   keeps the outline of the block that saw it farther from its own border and removes the overlap
   from the other (:func:`_resolve_seams`): no two output polygons overlap.
4. **Resume.** Each finished block is written atomically to ``.<name>.parts/``; an interrupted run
   restarts from the blocks already done (the parts are kept only while their plan, i.e. slide,
   model and block geometry, is unchanged).
5. **Outputs** (written atomically, the summary last so that its presence means "finished"):
   ``<name>.geojson`` (QuPath detections with measurements, level-0 pixel coordinates),
   ``<name>_nuclei.csv`` (one row per nucleus: level-0 pixels and µm), ``<name>_overlay.png``
   (downsampled slide with nucleus outlines in yellow and the tissue outline in cyan) and
   ``<name>_slide.json`` (pixel sizes, level, blocks, tissue area, nuclei, time, model).

Memory is bounded by one block with its margin (the network memory is bounded by the window batch)
plus the thumbnails; the GeoJSON and CSV are streamed block by block.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from kseg.fsutil import atomic_path, atomic_write_text
from kseg.geojson import mask_polygons, rings_mask, signed_area

if TYPE_CHECKING:
    from kseg.segmenter import Segmenter

log = logging.getLogger(__name__)

#: File suffixes always read as slides (tiffslide opens them); ``.tif``/``.tiff`` are slides when
#: tiled and pyramidal (:func:`is_slide`).
SLIDE_SUFFIXES = {".svs", ".ndpi", ".scn", ".bif", ".qptiff"}
#: Pixel size assumed for a model folder that does not state one (``config.json`` ``extra.mpp``):
#: TNBC and most nuclei datasets are 40x.
DEFAULT_MODEL_MPP = 0.25
#: Pixel size of the tissue-detection thumbnail, µm.
TISSUE_MPP = 8.0
#: Pixel size of the overlay picture, µm (coarser when the slide is large, see ``overlay_max``).
OVERLAY_MPP = 2.0
#: Version of the per-block part files; parts of another version are recomputed.
PARTS_VERSION = 2  # 2: whole pixel-exact geometry (every part, holes), not one ring
CSV_FIELDS = (
    "id",
    "x_px",
    "y_px",
    "x_um",
    "y_um",
    "area_um2",
    "perimeter_um",
    "eccentricity",
    "mean_hematoxylin",
)


class SlideError(ValueError):
    """A slide that cannot be segmented (unreadable, no pixel size, ...); the message names it."""


# --------------------------------------------------------------------------------------------------
# Opening and geometry
# --------------------------------------------------------------------------------------------------


def is_slide(path: Path) -> bool:
    """True for whole-slide files: SVS/NDPI/... suffixes, or a tiled, pyramidal TIFF."""
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if suffix not in {".tif", ".tiff"} or not path.is_file():
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            levels = len(tif.series[0].levels) if tif.series else 1
            return bool(page.is_tiled) and levels > 1
    except Exception:  # unreadable: the image reader reports it with its reason
        return False


def open_slide(path: Path) -> Any:
    """Opens ``path`` with tiffslide.

    Raises:
        SlideError: If tiffslide is not installed or cannot read the file (the file is named).
    """
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    try:
        import tiffslide
    except ImportError as err:  # pragma: no cover - the wsi extra is part of the test install
        raise SlideError(
            f"{path}: reading whole slides needs tiffslide (pip install 'kseg[wsi]')"
        ) from err
    try:
        slide = tiffslide.TiffSlide(path)
        # tiffslide opens lazily: touch the pyramid and decode one pixel so that a corrupt file
        # fails here, with its name, rather than in the middle of a block
        w, h = slide.dimensions
        if w < 1 or h < 1 or not slide.level_downsamples:
            raise ValueError(f"empty image ({w} x {h})")
        slide.read_region((0, 0), slide.level_count - 1, (1, 1), as_array=True)
        return slide
    except Exception as err:
        raise SlideError(f"{path}: cannot open as a slide ({type(err).__name__}: {err})") from err


def slide_mpp(slide: Any, path: Path, override: float | None = None) -> float:
    """Level-0 pixel size in µm: ``override`` when given, else the slide's own.

    Raises:
        SlideError: If the slide states no pixel size and none is given.
    """
    if override is not None:
        if not override > 0:
            raise SlideError(f"{path}: mpp={override}: must be > 0")
        return float(override)
    props = slide.properties
    values = [props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")]
    values = [float(v) for v in values if v not in (None, "")]
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise SlideError(
            f"{path}: the slide states no pixel size (tiffslide.mpp-x); pass --mpp "
            "(µm per level-0 pixel, e.g. 0.25 at 40x, 0.5 at 20x)"
        )
    return float(np.mean(values))


def model_mpp(folder: Path | None) -> float:
    """Pixel size of the images the model takes: ``config.json`` ``extra.mpp`` of its folder.

    This is the data's pixel size; the network itself runs at ``extra.mpp / input_scale``
    (:attr:`kseg.model.ModelConfig.input_scale`), a resampling :class:`kseg.segmenter.Segmenter`
    does itself.

    A folder without it is assumed to be 40x (:data:`DEFAULT_MODEL_MPP`), with a warning.
    """
    if folder is not None:
        from kseg.model.io import read_model_config

        _, extra = read_model_config(folder)
        mpp = extra.get("mpp") if isinstance(extra, dict) else None
        if mpp is not None:
            if not (isinstance(mpp, int | float) and mpp > 0):
                raise ValueError(f"{folder}/config.json: extra.mpp={mpp!r}: must be a number > 0")
            return float(mpp)
    log.warning(
        "model %s states no pixel size (config.json extra.mpp); assuming %.2f µm/px (40x)",
        folder,
        DEFAULT_MODEL_MPP,
    )
    return DEFAULT_MODEL_MPP


@dataclass(frozen=True)
class SlideGeometry:
    """How the working grid (at the model's pixel size) maps onto the slide.

    Working pixel ``(x, y)`` covers level-0 pixels ``[x * downsample, (x + 1) * downsample)``.
    """

    width: int  # level 0
    height: int
    mpp: float  # level 0, µm/px
    level: int  # pyramid level read
    level_downsample: float
    downsample: float  # level-0 pixels per working pixel
    work_width: int
    work_height: int

    @property
    def work_mpp(self) -> float:
        """Pixel size of the working grid, µm."""
        return self.mpp * self.downsample

    @property
    def resample(self) -> float:
        """Level pixels per working pixel (1 = the level is read as is)."""
        return self.downsample / self.level_downsample


def plan_geometry(
    slide: Any, mpp: float, target_mpp: float, tolerance: float = 0.1
) -> SlideGeometry:
    """Chooses the pyramid level for ``target_mpp`` (see the module docstring).

    A level within ``tolerance`` (relative) of the target is used as is, without resampling.
    """
    width, height = (int(v) for v in slide.dimensions)
    want = target_mpp / mpp  # level-0 pixels per working pixel
    downs = [float(d) for d in slide.level_downsamples]
    candidates = [i for i, d in enumerate(downs) if d <= want * (1 + tolerance)] or [0]
    level = max(candidates, key=lambda i: downs[i])
    level_ds = downs[level]
    downsample = level_ds if abs(want / level_ds - 1) <= tolerance else want
    return SlideGeometry(
        width=width,
        height=height,
        mpp=mpp,
        level=level,
        level_downsample=level_ds,
        downsample=downsample,
        work_width=max(1, math.floor(width / downsample)),
        work_height=max(1, math.floor(height / downsample)),
    )


def read_working_region(
    slide: Any, geom: SlideGeometry, x: int, y: int, w: int, h: int
) -> NDArray[np.uint8]:
    """``(h, w, 3)`` uint8 RGB of the working grid's region at ``(x, y)`` (clipped to the slide).

    Only this region is decoded (tiffslide reads the tiles it overlaps).
    """
    import cv2

    from kseg.predict import to_rgb8

    x0, y0 = round(x * geom.downsample), round(y * geom.downsample)
    level_w, level_h = _level_size(slide, geom.level)
    # clipped to the level: tiffslide pads reads past the edge with black, which is not glass
    lw = max(1, min(math.ceil(w * geom.resample), level_w - math.floor(x0 / geom.level_downsample)))
    lh = max(1, min(math.ceil(h * geom.resample), level_h - math.floor(y0 / geom.level_downsample)))
    arr = slide.read_region((x0, y0), geom.level, (lw, lh), as_array=True)
    rgb = _rgb_on_white(np.asarray(arr))
    if rgb.shape[:2] != (h, w):
        interp = cv2.INTER_AREA if geom.resample > 1 else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (w, h), interpolation=interp)
    return to_rgb8(rgb)


def _level_size(slide: Any, level: int) -> tuple[int, int]:
    w, h = slide.level_dimensions[level]
    return int(w), int(h)


def _rgb_on_white(arr: NDArray) -> NDArray[np.uint8]:
    """RGBA (transparent = outside the scanned area) composited on white; RGB as is."""
    from kseg.predict import to_rgb8

    if arr.ndim == 3 and arr.shape[2] == 4 and arr.dtype == np.uint8:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        rgb = arr[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.rint(rgb).astype(np.uint8)
    return to_rgb8(arr)


def thumbnail(
    slide: Any, geom: SlideGeometry, mpp: float, max_side: int = 4096
) -> NDArray[np.uint8]:
    """RGB picture of the whole slide at about ``mpp`` µm/px (at most ``max_side`` px a side).

    Read in strips from the coarsest level that is fine enough, so that a slide without a pyramid
    is never decoded whole.
    """
    import cv2

    scale = max(mpp / geom.mpp, max(geom.width, geom.height) / max_side, 1.0)  # level-0 px / px
    out_w, out_h = max(1, round(geom.width / scale)), max(1, round(geom.height / scale))
    downs = [float(d) for d in slide.level_downsamples]
    level = max((i for i, d in enumerate(downs) if d <= scale), key=lambda i: downs[i], default=0)
    lw, lh = _level_size(slide, level)
    strip = max(1, (32 * 2**20) // max(1, lw * 4))  # ~32 MB of level pixels per read
    out = np.empty((out_h, out_w, 3), np.uint8)
    y_out = 0
    for ly in range(0, lh, strip):
        rows = min(strip, lh - ly)
        y_next = round((ly + rows) * out_h / lh) if ly + rows < lh else out_h
        if y_next <= y_out:
            continue
        region = slide.read_region((0, round(ly * downs[level])), level, (lw, rows), as_array=True)
        rgb = _rgb_on_white(np.asarray(region))
        out[y_out:y_next] = cv2.resize(rgb, (out_w, y_next - y_out), interpolation=cv2.INTER_AREA)
        y_out = y_next
    return out


def tissue_mask(
    thumb: NDArray[np.uint8], min_od: float = 0.035, max_od: float = 0.06
) -> tuple[NDArray[np.bool_], float]:
    """Tissue in an RGB thumbnail: Otsu on the optical density, clipped to a sane range.

    The optical density of a pixel is that of its darkest channel (``-log10(I / 255)``): glass
    stays below ~0.03 in every channel, while even pale eosin-stained stroma absorbs green. Otsu
    finds the cut between glass and tissue; it is clipped to ``[min_od, max_od]`` so that an
    all-glass thumbnail is not split by noise and a thumbnail that is nearly all tissue (where
    Otsu would split dark from pale tissue) keeps its pale tissue. Specks are removed (opening)
    and holes filled.

    Returns:
        The mask and the threshold used.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    od = -np.log10(np.maximum(thumb.astype(np.float32), 1.0) / 255.0).max(axis=2)
    thr = float(threshold_otsu(od)) if np.ptp(od) > 0 else min_od
    thr = float(np.clip(thr, min_od, max_od))
    mask = od > thr
    mask = ndi.binary_opening(mask, iterations=1)
    mask = ndi.binary_fill_holes(mask)
    return mask, thr


@dataclass(frozen=True)
class Block:
    """One core of the working grid and the region read for it (core plus margin, clipped)."""

    row: int
    col: int
    core: tuple[int, int, int, int]  # x0, y0, x1, y1 (working px, half-open)
    region: tuple[int, int, int, int]

    @property
    def key(self) -> str:
        """File-name key of the block."""
        return f"{self.row:04d}_{self.col:04d}"


def plan_blocks(
    geom: SlideGeometry,
    block: int,
    margin: int,
    tissue: NDArray[np.bool_] | None = None,
) -> tuple[list[Block], int]:
    """Blocks whose core holds tissue, in raster order, and the number skipped as glass."""
    blocks, skipped = [], 0
    ww, wh = geom.work_width, geom.work_height
    for row, y0 in enumerate(range(0, wh, block)):
        for col, x0 in enumerate(range(0, ww, block)):
            x1, y1 = min(x0 + block, ww), min(y0 + block, wh)
            if tissue is not None and not _has_tissue(tissue, geom, (x0, y0, x1, y1)):
                skipped += 1
                continue
            region = (max(0, x0 - margin), max(0, y0 - margin), min(ww, x1 + margin))
            region = (*region, min(wh, y1 + margin))
            blocks.append(Block(row, col, (x0, y0, x1, y1), region))
    return blocks, skipped


def _has_tissue(
    tissue: NDArray[np.bool_], geom: SlideGeometry, core: tuple[int, int, int, int]
) -> bool:
    th, tw = tissue.shape
    sx, sy = tw / geom.work_width, th / geom.work_height
    x0, y0, x1, y1 = core
    tx0, ty0 = math.floor(x0 * sx), math.floor(y0 * sy)
    tx1, ty1 = max(tx0 + 1, math.ceil(x1 * sx)), max(ty0 + 1, math.ceil(y1 * sy))
    return bool(tissue[ty0:ty1, tx0:tx1].any())


# --------------------------------------------------------------------------------------------------
# One block
# --------------------------------------------------------------------------------------------------


def segment_block(slide: Any, geom: SlideGeometry, blk: Block, segmenter: Segmenter) -> dict:
    """Segments one block; keeps the nuclei whose centroid lies in its core.

    Returns:
        ``{"key", "nuclei": [{"polygons": [[exterior, hole, ...], ...] (closed rings of
        working-grid pixel corners, as :func:`kseg.geojson.mask_polygons`), measurements...,
        "context": px from the centroid to the nearest region edge that is not the slide edge}]}``
    """
    from kseg.predict import geojson_features, nucleus_table

    rx0, ry0, rx1, ry1 = blk.region
    rgb = read_working_region(slide, geom, rx0, ry0, rx1 - rx0, ry1 - ry0)
    labels, _ = segmenter.segment(rgb)
    # centroids of every instance, to keep those in the core before measuring anything
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    count = np.bincount(lab, minlength=int(labels.max()) + 1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.bincount(lab, xs, minlength=len(count)) / count + rx0
        cy = np.bincount(lab, ys, minlength=len(count)) / count + ry0
    cx0, cy0, cx1, cy1 = blk.core
    keep = (count > 0) & (cx >= cx0) & (cx < cx1) & (cy >= cy0) & (cy < cy1)
    keep[0] = False
    kept = np.where(keep[labels], labels, 0)
    rows = {int(r["id"]): r for r in nucleus_table(kept, rgb)}
    edges = [
        (rx0, rx0 > 0),
        (ry0, ry0 > 0),
        (rx1, rx1 < geom.work_width),
        (ry1, ry1 < geom.work_height),
    ]
    offset = np.array([rx0, ry0])
    nuclei = []
    for feat in geojson_features(kept):
        lab_id = int(feat["properties"]["kseg_id"])
        geometry = feat["geometry"]
        polygons = (
            geometry["coordinates"]
            if geometry["type"] == "MultiPolygon"
            else [geometry["coordinates"]]
        )
        # every part and hole: a nucleus in parts that touch at a corner is a MultiPolygon
        polys = [[np.asarray(ring, np.float64) + offset for ring in poly] for poly in polygons]
        r = rows[lab_id]
        x, y = r["centroid_x"] + rx0, r["centroid_y"] + ry0
        dists = [abs((x, y)[i % 2] - e) for i, (e, inner) in enumerate(edges) if inner]
        nuclei.append(
            {
                "polygons": polys,
                "x": x,
                "y": y,
                "area": r["area"],
                "perimeter": r["perimeter"],
                "eccentricity": r["eccentricity"],
                "mean_hematoxylin": r["mean_hematoxylin"],
                "context": min(dists) if dists else 1e9,
            }
        )
    return {"key": blk.key, "core": list(blk.core), "nuclei": nuclei}


# --------------------------------------------------------------------------------------------------
# The slide
# --------------------------------------------------------------------------------------------------


@dataclass
class SlideResult:
    """What :func:`segment_slide` did for one slide."""

    name: str
    written: list[Path] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    skipped: bool = False  # finished outputs were already there


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
    """Output name of each input: its stem, or ``<stem>-<hash of its path>`` when stems collide.

    Two inputs with the same file name in different folders never write to the same outputs.
    """
    stems: dict[str, int] = {}
    for p in paths:
        stems[_stem(p)] = stems.get(_stem(p), 0) + 1
    return {p: _stem(p) if stems[_stem(p)] == 1 else unique_name(p) for p in paths}


def unique_name(path: Path) -> str:
    """``<stem>-<first 8 hex of sha1 of the absolute path>``."""
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]
    return f"{_stem(path)}-{digest}"


def _stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def summary_path(out_dir: Path, name: str) -> Path:
    """The summary JSON whose presence marks a finished slide."""
    return Path(out_dir) / f"{name}_slide.json"


def finished(out_dir: Path, name: str, source: Path) -> bool:
    """True when ``name``'s outputs in ``out_dir`` are complete and were made from ``source``."""
    path = summary_path(out_dir, name)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return doc.get("source") == str(Path(source).resolve())


def claim_name(out_dir: Path, path: Path, name: str) -> str:
    """``name``, unless ``out_dir`` already holds another slide's outputs under it."""
    summ = summary_path(out_dir, name)
    if summ.is_file() and not finished(out_dir, name, path):
        return unique_name(path)
    return name


def segment_slide(
    path: Path,
    segmenter: Segmenter,
    out_dir: Path,
    *,
    name: str | None = None,
    mpp: float | None = None,
    target_mpp: float = DEFAULT_MODEL_MPP,
    block: int = 2048,
    margin: int = 128,
    detect_tissue: bool = True,
    progress: bool = False,
    model_id: str = "",
    on_block: Callable[[int, int], None] | None = None,
) -> SlideResult:
    """Segments one whole slide into ``out_dir`` (see the module docstring).

    Args:
        path: The slide (pyramidal TIFF, SVS, OME-TIFF, anything tiffslide opens).
        segmenter: The loaded model.
        out_dir: Output folder.
        name: Output name (default: the file's stem, see :func:`output_names`).
        mpp: Level-0 pixel size in µm; overrides the slide's own (needed when it has none).
        target_mpp: Pixel size the model expects (:func:`model_mpp`).
        block: Core edge in working pixels.
        margin: Context read around each core, working pixels (wider than the largest nucleus).
        detect_tissue: Skip blocks without tissue (thumbnail Otsu); False reads every block.
        progress: Show a progress bar with ETA.
        model_id: Identifies the model in the plan (parts of another model are recomputed).
        on_block: Called with ``(done, total)`` after each block (tests, progress reporting).

    Returns:
        The written files and the summary.

    Raises:
        SlideError: If the slide cannot be read or has no pixel size (the file is named).
    """
    path = Path(path)
    name = name or _stem(path)
    if block < 64 or margin < 0:
        raise ValueError(f"block={block}, margin={margin}: need block >= 64 and margin >= 0")
    start = time.perf_counter()
    slide = open_slide(path)
    try:
        mpp0 = slide_mpp(slide, path, mpp)
        geom = plan_geometry(slide, mpp0, target_mpp)
        tissue, thr = None, None
        if detect_tissue:
            tissue, thr = tissue_mask(thumbnail(slide, geom, TISSUE_MPP))
        blocks, n_glass = plan_blocks(geom, block, margin, tissue)
        plan = {
            "version": PARTS_VERSION,
            "source": str(path.resolve()),
            "size": [geom.width, geom.height],
            "file_bytes": path.stat().st_size,
            "geometry": asdict(geom),
            "block": block,
            "margin": margin,
            "model": model_id,
            "blocks": [b.key for b in blocks],
        }
        parts = Path(out_dir) / f".{name}.parts"
        done = _open_parts(parts, plan)
        todo = [b for b in blocks if b.key not in done]
        log.info(
            "%s: level %d (%.3f µm/px, working %.3f µm/px), %d blocks with tissue, %d glass, "
            "%d already done",
            path,
            geom.level,
            geom.mpp * geom.level_downsample,
            geom.work_mpp,
            len(blocks),
            n_glass,
            len(blocks) - len(todo),
        )
        t_blocks = time.perf_counter()
        with _block_progress(len(blocks), len(blocks) - len(todo), progress, path.name) as advance:
            for i, blk in enumerate(todo):
                try:
                    part = segment_block(slide, geom, blk, segmenter)
                except SlideError:
                    raise
                except Exception as err:
                    raise SlideError(f"{path}: block {blk.key} failed ({err})") from err
                _save_part(parts, part)
                advance()
                if on_block is not None:
                    on_block(len(blocks) - len(todo) + i + 1, len(blocks))
        seconds_blocks = time.perf_counter() - t_blocks
        overlay_base = thumbnail(slide, geom, OVERLAY_MPP)
    finally:
        slide.close()
    written, n_nuclei = _write_outputs(out_dir, name, geom, blocks, parts, overlay_base, tissue)
    tissue_mm2 = (
        float(tissue.mean()) * geom.width * geom.height * (geom.mpp / 1000) ** 2
        if tissue is not None
        else geom.width * geom.height * (geom.mpp / 1000) ** 2
    )
    summary = {
        "source": str(path.resolve()),
        "name": name,
        "model": model_id,
        "size_px": [geom.width, geom.height],
        "mpp": geom.mpp,
        "level": geom.level,
        "level_mpp": geom.mpp * geom.level_downsample,
        "working_mpp": geom.work_mpp,
        "tissue_threshold_od": thr,
        "tissue_mm2": round(tissue_mm2, 4),
        "blocks": len(blocks),
        "blocks_glass": n_glass,
        "blocks_computed": len(todo),
        "block": block,
        "margin": margin,
        "nuclei": n_nuclei,
        "seconds_blocks": round(seconds_blocks, 3),
        "seconds": round(time.perf_counter() - start, 3),
        "outputs": [p.name for p in written],
    }
    summ = summary_path(out_dir, name)
    atomic_write_text(summ, json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(parts, ignore_errors=True)
    return SlideResult(name, [*written, summ], summary)


def _open_parts(parts: Path, plan: dict) -> set[str]:
    """Keys of the blocks already done under ``plan``; a different plan starts afresh."""
    plan_file = parts / "plan.json"
    try:
        same = json.loads(plan_file.read_text()) == plan
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan_file, json.dumps(plan))
        return set()
    return {p.stem for p in parts.glob("*_*.npz") if not p.name.startswith(".")}


@contextlib.contextmanager
def _block_progress(
    total: int, done: int, enabled: bool, label: str
) -> Iterator[Callable[[], None]]:
    if not enabled or total == 0:
        yield lambda: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(f"{label} blocks", total=total, completed=done)
        yield lambda: bar.advance(task)


# --------------------------------------------------------------------------------------------------
# Merge and outputs
# --------------------------------------------------------------------------------------------------


_MEASURES = ("x", "y", "area", "perimeter", "eccentricity", "mean_hematoxylin", "context")


def _save_part(parts: Path, part: dict) -> Path:
    """One block's nuclei as arrays (``.npz``: rings concatenated with offsets), atomically.

    ``ring_offsets`` cut ``coords`` into rings, ``ring_polygon`` numbers each ring's polygon
    within its nucleus (0, 0, 1, ...: an exterior, its hole, the next part) and
    ``nucleus_offsets`` cut the rings into nuclei.
    """
    nuclei = part["nuclei"]
    rings, ring_polygon, per_nucleus = [], [], []
    for nuc in nuclei:
        count = 0
        for k, poly in enumerate(nuc["polygons"]):
            for ring in poly:
                rings.append(np.asarray(ring, np.float32).reshape(-1, 2))
                ring_polygon.append(k)
                count += 1
        per_nucleus.append(count)
    path = parts / f"{part['key']}.npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            core=np.asarray(part["core"], np.int64),
            coords=np.concatenate(rings) if rings else np.zeros((0, 2), np.float32),
            ring_offsets=np.cumsum([0] + [len(r) for r in rings]),
            ring_polygon=np.asarray(ring_polygon, np.int64),
            nucleus_offsets=np.cumsum([0, *per_nucleus]),
            measures=np.array([[n[k] for k in _MEASURES] for n in nuclei], np.float64).reshape(
                -1, len(_MEASURES)
            ),
        )
    return path


_PART_KEYS = ("core", "coords", "ring_offsets", "ring_polygon", "nucleus_offsets", "measures")


def _load_part(parts: Path, key: str) -> dict:
    path = parts / f"{key}.npz"
    try:
        with np.load(path) as z:
            core, coords, ring_off, ring_poly, nuc_off, measures = (z[k] for k in _PART_KEYS)
    except (OSError, ValueError, KeyError) as err:
        raise SlideError(f"{path}: unreadable block result ({err}); delete it and rerun") from err
    nuclei = []
    for i, row in enumerate(measures.tolist()):
        nuc: dict[str, Any] = dict(zip(_MEASURES, row, strict=True))
        polys: list[list[NDArray]] = []
        for r in range(nuc_off[i], nuc_off[i + 1]):
            if ring_poly[r] == len(polys):
                polys.append([])
            polys[-1].append(coords[ring_off[r] : ring_off[r + 1]])
        nuc["polygons"] = polys
        nuclei.append(nuc)
    return {"key": key, "core": core.tolist(), "nuclei": nuclei}


def _is_border(nucleus: dict, core: Sequence[int]) -> bool:
    x0, y0, x1, y1 = core
    bx0, by0, bx1, by1 = _bbox(nucleus["polygons"])
    return bool(bx0 < x0 or by0 < y0 or bx1 > x1 or by1 > y1)


def _seam_candidates(parts: Path, blocks: list[Block]) -> list[tuple[str, int, dict]]:
    """``(block key, index, nucleus)`` of every nucleus that may overlap another block's.

    The border nuclei (reaching outside their own core), then the nuclei inside their core that
    the box of a neighbour's border nucleus reaches into.
    """
    border: list[tuple[str, int, dict]] = []
    for blk in blocks:
        part = _load_part(parts, blk.key)
        for i, nuc in enumerate(part["nuclei"]):
            if _is_border(nuc, part["core"]):
                border.append((blk.key, i, nuc))
    if not border:
        return border
    reach_boxes = np.array([_bbox(n["polygons"]) for _, _, n in border])
    inner: list[tuple[str, int, dict]] = []
    for blk in blocks:
        others = np.array([key != blk.key for key, _, _ in border])
        reach = reach_boxes[others & _overlaps(reach_boxes, np.asarray(blk.core))]
        if not len(reach):
            continue
        part = _load_part(parts, blk.key)
        for i, nuc in enumerate(part["nuclei"]):
            if (
                not _is_border(nuc, part["core"])
                and _overlaps(reach, np.asarray(_bbox(nuc["polygons"]))).any()
            ):
                inner.append((blk.key, i, nuc))
    return border + inner


def _resolve_seams(parts: Path, blocks: list[Block]) -> dict[tuple[str, int], list | None]:
    """Overlaps between border nuclei of different blocks: ``{(block, index): polygons or None}``.

    Only nuclei that reach outside their own core (*border* nuclei) can overlap another block's
    nuclei: another border nucleus, or one lying inside its own core where a border nucleus of a
    neighbour reaches in. These candidates are compared pairwise (bounding boxes first). The
    nucleus segmented with less context (centroid nearer its block's read edge) loses: dropped
    when the overlap is at least half of the smaller nucleus (the same nucleus seen twice),
    otherwise trimmed by the overlap. Parts are read twice rather than held: memory stays bounded
    by the candidates.
    """
    border = _seam_candidates(parts, blocks)
    changes: dict[tuple[str, int], list | None] = {}
    if not border:
        return changes
    boxes = np.array([_bbox(n["polygons"]) for _, _, n in border])
    # candidate pairs: bounding boxes sharing a cell of a coarse grid (no all-pairs loop)
    cell = max(16, int(np.percentile(boxes[:, 2:] - boxes[:, :2], 95)) + 1)
    grid: dict[tuple[int, int], list[int]] = {}
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        for gy in range(y0 // cell, y1 // cell + 1):
            for gx in range(x0 // cell, x1 // cell + 1):
                grid.setdefault((gx, gy), []).append(k)
    pairs = {
        (a, b) if border[a][2]["context"] >= border[b][2]["context"] else (b, a)
        for members in grid.values()
        for i, a in enumerate(members)
        for b in members[i + 1 :]
        if border[a][0] != border[b][0]
    }
    # the nucleus with more context wins; pairs are visited winners-first
    rank = {
        k: r
        for r, k in enumerate(sorted(range(len(border)), key=lambda k: -border[k][2]["context"]))
    }
    shapes = {k: border[k][2]["polygons"] for k in range(len(border))}
    alive = set(range(len(border)))
    for a, b in sorted(pairs, key=lambda p: (rank[p[0]], rank[p[1]])):
        if a not in alive or b not in alive or not _boxes_overlap(boxes[a], boxes[b]):
            continue
        new = _subtract(shapes[b], shapes[a])
        if new is _SAME:
            continue
        key = (border[b][0], border[b][1])
        if new is None:
            alive.discard(b)
            changes[key] = None
        else:
            shapes[b] = new
            boxes[b] = _bbox(new)
            changes[key] = new
    return changes


_SAME = object()


def _bbox(polys: list) -> tuple[int, int, int, int]:
    """Integer box ``(x0, y0, x1, y1)`` around the exteriors (pixel corners, floor / ceil)."""
    arr = np.concatenate([np.asarray(poly[0]) for poly in polys])
    x0, y0 = np.floor(arr.min(0)).astype(int)
    x1, y1 = np.ceil(arr.max(0)).astype(int)
    return int(x0), int(y0), int(x1), int(y1)


def _boxes_overlap(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether two ``(x0, y0, x1, y1)`` corner boxes share a pixel (touching edges do not)."""
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def _overlaps(boxes: NDArray, box: NDArray) -> NDArray[np.bool_]:
    """:func:`_boxes_overlap` of each row of ``boxes`` (N, 4) with one ``box``."""
    return (
        (boxes[:, 2] > box[0])
        & (box[2] > boxes[:, 0])
        & (boxes[:, 3] > box[1])
        & (box[3] > boxes[:, 1])
    )


def _raster(polys: list, box: Sequence[int]) -> NDArray[np.bool_]:
    """The pixels of ``polys`` (pixel-corner coordinates) within ``box``.

    Even-odd over every ring: parts are disjoint and holes lie in their exterior, so this is the
    mask that :func:`kseg.geojson.mask_polygons` traced, exactly.
    """
    x0, y0, x1, y1 = box
    origin = np.array([x0, y0], np.float64)
    rings = [np.asarray(ring, np.float64) - origin for poly in polys for ring in poly]
    return rings_mask(rings, (y1 - y0, x1 - x0))


def _subtract(polys: list, winner: list) -> Any:
    """``polys`` minus ``winner``: ``_SAME`` (no overlap), None (duplicate) or the trimmed polygons.

    Both inputs and the result are lists of polygons in pixel-corner coordinates, like every
    nucleus of a block part.
    """
    ba, bb = _bbox(polys), _bbox(winner)
    box = (min(ba[0], bb[0]), min(ba[1], bb[1]), max(ba[2], bb[2]), max(ba[3], bb[3]))
    mine, other = _raster(polys, box), _raster(winner, box)
    overlap = int((mine & other).sum())
    if overlap == 0:
        return _SAME
    if overlap >= 0.5 * min(int(mine.sum()), int(other.sum())):
        return None
    rest = mine & ~other
    if rest.sum() < 4:
        return None
    origin = np.array([box[0], box[1]], np.float64)
    return [
        [np.asarray(ring, np.float64) + origin for ring in poly] for poly in mask_polygons(rest)
    ]


def _area(polys: list) -> float:
    """Pixel area of pixel-exact polygons (exteriors positive, holes negative)."""
    return float(sum(signed_area(np.asarray(ring)) for poly in polys for ring in poly))


def _write_outputs(
    out_dir: Path,
    name: str,
    geom: SlideGeometry,
    blocks: list[Block],
    parts: Path,
    overlay_base: NDArray[np.uint8],
    tissue: NDArray[np.bool_] | None,
) -> tuple[list[Path], int]:
    """Streams GeoJSON and CSV block by block (seams resolved); draws the overlay."""
    import cv2

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    changes = _resolve_seams(parts, blocks)
    ds, um = geom.downsample, geom.work_mpp
    oh, ow = overlay_base.shape[:2]
    over_scale = np.array([ow / geom.work_width, oh / geom.work_height])
    overlay = overlay_base.copy()
    gj_path, csv_path = out_dir / f"{name}.geojson", out_dir / f"{name}_nuclei.csv"
    png_path = out_dir / f"{name}_overlay.png"
    n = 0
    with (
        atomic_path(gj_path) as gj_tmp,
        atomic_path(csv_path) as csv_tmp,
        open(gj_tmp, "w") as gj,
        open(csv_tmp, "w", newline="") as fh,
    ):
        writer = csv.writer(fh)
        writer.writerow(CSV_FIELDS)
        gj.write('{"type": "FeatureCollection", "features": [\n')
        for blk in blocks:
            part = _load_part(parts, blk.key)
            for i, nuc in enumerate(part["nuclei"]):
                polys = changes.get((blk.key, i), nuc["polygons"])
                if polys is None:
                    continue
                n += 1
                feature = _feature(n, polys, nuc, ds, um, trimmed=(blk.key, i) in changes)
                gj.write((",\n" if n > 1 else "") + json.dumps(feature))
                writer.writerow(_csv_row(n, nuc, ds, um))
                pts = [np.rint(np.asarray(p[0]) * over_scale).astype(np.int32) for p in polys]
                cv2.polylines(overlay, pts, True, (255, 230, 0), 1)
        gj.write("\n]}\n")
    if tissue is not None:
        mask = cv2.resize(tissue.astype(np.uint8), (ow, oh), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(overlay, contours, -1, (0, 200, 255), 2)
    with atomic_path(png_path) as tmp:
        cv2.imwrite(str(tmp), overlay[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 3])
    return [gj_path, csv_path, png_path], n


def _feature(n: int, polys: list, nuc: dict, ds: float, um: float, trimmed: bool) -> dict:
    """A QuPath detection in level-0 pixel coordinates, with measurements in µm.

    ``Polygon`` for a nucleus in one piece, ``MultiPolygon`` for one whose parts touch only at
    a corner (as :func:`kseg.geojson.label_geometry` writes for tiles).
    """
    coords = [[np.round(np.asarray(r, np.float64) * ds, 2).tolist() for r in p] for p in polys]
    geometry = (
        {"type": "Polygon", "coordinates": coords[0]}
        if len(coords) == 1
        else {"type": "MultiPolygon", "coordinates": coords}
    )
    area = nuc["area"] if not trimmed else _area(polys)
    return {
        "type": "Feature",
        "id": f"kseg-{n}",
        "geometry": geometry,
        "properties": {
            "objectType": "detection",
            "classification": {"name": "Nucleus", "color": [255, 230, 0]},
            "isLocked": False,
            "measurements": {
                "kseg_id": n,
                "Area µm^2": round(area * um * um, 3),
                "Perimeter µm": round(nuc["perimeter"] * um, 3),
                "Eccentricity": round(nuc["eccentricity"], 4),
                "Hematoxylin OD mean": round(nuc["mean_hematoxylin"], 4),
                "Centroid X µm": round(nuc["x"] * um, 3),
                "Centroid Y µm": round(nuc["y"] * um, 3),
            },
        },
    }


def _csv_row(n: int, nuc: dict, ds: float, um: float) -> list:
    return [
        n,
        round(nuc["x"] * ds, 2),
        round(nuc["y"] * ds, 2),
        round(nuc["x"] * um, 3),
        round(nuc["y"] * um, 3),
        round(nuc["area"] * um * um, 3),
        round(nuc["perimeter"] * um, 3),
        round(nuc["eccentricity"], 4),
        round(nuc["mean_hematoxylin"], 4),
    ]


# --------------------------------------------------------------------------------------------------
# Many slides in one process (kseg predict); the Dask flow is flows/slides.py
# --------------------------------------------------------------------------------------------------


def segment_slides(
    paths: Iterable[Path],
    segmenter: Segmenter,
    out_dir: Path,
    *,
    model_folder: Path | None = None,
    mpp: float | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> tuple[list[SlideResult], dict[str, str]]:
    """Segments each slide in turn; a failed slide is reported and the others go on.

    Returns:
        The results and ``{slide path: error message}`` of the failed ones.
    """
    paths = list(paths)
    names = output_names(paths)
    target = model_mpp(model_folder)
    results, failed = [], {}
    for path in paths:
        name = claim_name(out_dir, path, names[path])
        if finished(out_dir, name, path):
            log.info("%s: already segmented into %s (delete %s to redo)", path, out_dir, name)
            results.append(SlideResult(name, skipped=True))
            continue
        try:
            results.append(
                segment_slide(
                    path,
                    segmenter,
                    out_dir,
                    name=name,
                    mpp=mpp,
                    target_mpp=target,
                    progress=progress,
                    model_id=str(model_folder or ""),
                    **kwargs,
                )
            )
        except (SlideError, OSError, ValueError) as err:
            msg = str(err) if str(path) in str(err) else f"{path}: {err}"
            failed[str(path)] = msg
            log.error("%s", msg)
    return results, failed


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB.

    Linux: ``VmHWM`` of ``/proc/self/status``, this process image's own peak. ``ru_maxrss`` (the
    fallback elsewhere, in KiB) also counts the parent's resident memory at the fork, which Linux
    keeps across exec: a child of a 2.5 GB process reports 2.4 GB from its first line.
    """
    try:
        with open("/proc/self/status") as fh:
            line = next(row for row in fh if row.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
