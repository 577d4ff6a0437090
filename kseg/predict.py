"""``kseg predict``: segment a user's own images of any size.

For every input image it writes, next to each other in the output folder:

- ``<stem>_labels.tif``: instance labels (16-bit, or 32-bit past 65535 nuclei), 0 = background;
- ``<stem>_overlay.png``: the image with the nucleus outlines drawn in yellow;
- ``<stem>_nuclei.csv``: one row per nucleus (id, centroid, area, perimeter, eccentricity, mean
  hematoxylin and eosin optical densities from colour deconvolution);
- ``<stem>.geojson``: one pixel-exact polygon per nucleus, a FeatureCollection QuPath imports as
  classified detections with measurements.

Columns, units and coordinate conventions: docs/predict.md.

A bad input (missing, unreadable, not an image) is reported with its name and skipped; the other
images are still written, and the command exits non-zero at the end if any failed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from kseg.fsutil import atomic_path, atomic_write_bytes, atomic_write_text
from kseg.safety import (
    PREDICT_MAX_PIXELS,
    check_pixels,
    image_size,
    max_pixels_from_env,
    redact,
    redact_text,
)
from kseg.slide import SLIDE_SUFFIXES, is_slide, model_mpp, output_names

if TYPE_CHECKING:
    from kseg.segmenter import Segmenter

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
MODEL_FILES = ("config.json", "model.pt", "preprocess.json")


@dataclass
class PredictReport:
    """What a predict run did."""

    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # input -> reason
    skipped: list[Path] = field(default_factory=list)  # non-image files in folders


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def iter_inputs(paths: Iterable[Path], report: PredictReport) -> Iterator[Path]:
    """Expands folders (non-recursive, image suffixes only); files are taken as given."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES | SLIDE_SUFFIXES:
                    yield child
                elif child.is_file():
                    report.skipped.append(child)
        else:
            yield path


def read_image(path: Path, max_pixels: int = PREDICT_MAX_PIXELS) -> NDArray[np.uint8]:
    """Reads any common image as ``(H, W, 3)`` uint8 RGB.

    Grayscale is replicated to RGB, alpha is composited on white (as ``kseg prepare`` does),
    16-bit images are scaled to 8 bits (value / 257), float images are clipped to [0, 1] and
    scaled. A multi-page TIFF gives its first page (as in prepare). The size is read from the
    header first: an image above ``max_pixels`` is refused before it is decoded.

    Raises:
        ValueError: If the file is missing, too large or is not a readable image (named).
    """
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    size = image_size(path)
    if size is not None:
        check_pixels(*size, max_pixels, str(path), " (--max-pixels, KSEG_MAX_PIXELS)")
    try:
        if path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile

            arr = tifffile.imread(path, key=0)
        else:
            import cv2

            arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise ValueError("not a readable image")
            if arr.ndim == 3:  # OpenCV gives BGR(A)
                arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]] if arr.shape[2] >= 3 else arr
    except Exception as err:
        raise ValueError(f"{path}: cannot read image ({err})") from err
    return to_rgb8(np.asarray(arr), path)


def to_rgb8(arr: NDArray, path: Path | str = "image") -> NDArray[np.uint8]:
    """Converts a decoded image array to ``(H, W, 3)`` uint8 (see :func:`read_image`)."""
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channel-first TIFF
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or min(arr.shape[:2]) < 1:
        raise ValueError(f"{path}: unsupported image shape {arr.shape}")
    if arr.shape[2] in (2, 4):  # alpha: composite on white (transparent = glass), as prepare
        arr = _on_white(arr)
    if arr.shape[2] == 1:  # gray
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint16:
        return np.rint(arr / 257.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        return np.rint(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        return np.clip(arr, 0, 255).astype(np.uint8)
    raise ValueError(f"{path}: unsupported pixel type {arr.dtype}")


def _on_white(arr: NDArray) -> NDArray:
    """Colour (+ alpha) over a white background, in the input's dtype and scale."""
    top = 255.0 if arr.dtype == np.uint8 else 65535.0 if arr.dtype == np.uint16 else 1.0
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype not in (np.uint8, np.uint16):
        top = 255.0
    alpha = np.clip(arr[..., -1:].astype(np.float32) / top, 0.0, 1.0)
    color = arr[..., :-1].astype(np.float32)
    out = color * alpha + top * (1.0 - alpha)
    return np.rint(out).astype(arr.dtype) if arr.dtype.kind in "iu" else out.astype(arr.dtype)


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def nucleus_table(labels: NDArray[np.integer], rgb: NDArray[np.uint8]) -> list[dict[str, float]]:
    """Per-nucleus measurements (see docs/predict.md for columns and units).

    Hematoxylin and eosin are optical densities from colour deconvolution (scikit-image's
    ``rgb2hed``, Ruifrok & Johnston's stain vectors), averaged over the nucleus' pixels.
    """
    from skimage.color import rgb2hed
    from skimage.measure import regionprops_table

    if labels.max() == 0:
        return []
    hed = rgb2hed(rgb)[..., :2]
    props = regionprops_table(
        labels.astype(np.int32),
        intensity_image=hed,
        properties=("label", "centroid", "area", "perimeter", "eccentricity", "intensity_mean"),
    )
    names = {
        "label": "id",
        "centroid-0": "centroid_y",
        "centroid-1": "centroid_x",
        "intensity_mean-0": "mean_hematoxylin",
        "intensity_mean-1": "mean_eosin",
    }
    n = len(props["label"])
    return [{names.get(k, k): float(v[i]) for k, v in props.items()} for i in range(n)]


#: GeoJSON measurement name (as QuPath lists it) -> nucleus_table column.
QUPATH_MEASUREMENTS = {
    "Area px^2": "area",
    "Perimeter px": "perimeter",
    "Eccentricity": "eccentricity",
    "Hematoxylin OD mean": "mean_hematoxylin",
    "Eosin OD mean": "mean_eosin",
}


def geojson_features(
    labels: NDArray[np.integer], rows: list[dict[str, float]] | None = None
) -> list[dict]:
    """One QuPath detection per nucleus, outlined exactly along its pixel edges.

    The geometry is a valid ``Polygon`` (``MultiPolygon`` for a nucleus in parts touching at a
    corner) of area equal to the nucleus' pixel count, exterior rings counter-clockwise in the
    RFC 7946 sense (see :mod:`kseg.geojson`); coordinates are pixel corners, QuPath's convention.
    ``rows`` (from :func:`nucleus_table`) become the feature's ``measurements``.
    """
    from scipy import ndimage as ndi

    from kseg.geojson import NUCLEUS_CLASS, label_geometry

    by_id = {int(r["id"]): r for r in rows or []}
    features = []
    for lab, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        geometry = label_geometry(labels[sl], lab, (sl[1].start, sl[0].start))
        if geometry is None:
            continue
        props: dict = {
            "objectType": "detection",
            "classification": dict(NUCLEUS_CLASS),
            "kseg_id": lab,
        }
        if lab in by_id:
            row = by_id[lab]
            props["measurements"] = {
                name: round(float(row[key]), 4) for name, key in QUPATH_MEASUREMENTS.items()
            }
        features.append({"type": "Feature", "geometry": geometry, "properties": props})
    return features


def write_outputs(
    out_dir: Path, stem: str, rgb: NDArray[np.uint8], labels: NDArray[np.integer]
) -> list[Path]:
    """Writes the four result files of one image atomically; returns their paths."""
    import cv2
    import tifffile

    from kseg.plots import overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if labels.max() < 2**16 else np.uint32
    paths = [
        out_dir / f"{stem}_labels.tif",
        out_dir / f"{stem}_overlay.png",
        out_dir / f"{stem}_nuclei.csv",
        out_dir / f"{stem}.geojson",
    ]
    with atomic_path(paths[0]) as tmp:
        tifffile.imwrite(tmp, labels.astype(dtype), compression="zlib")
    with atomic_path(paths[1]) as tmp:
        # OpenCV's PNG writer at low compression is ~10x faster than PIL's default here.
        ok = cv2.imwrite(
            str(tmp), overlay(rgb, labels)[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1]
        )
        if not ok:  # OpenCV reports a failed write (disk full...) only by its return value
            raise OSError(f"cannot write {paths[1]}: OpenCV could not write the PNG (disk full?)")
    rows = nucleus_table(labels, rgb)
    buf = io.StringIO()
    fields = [
        "id",
        "centroid_y",
        "centroid_x",
        "area",
        "perimeter",
        "eccentricity",
        "mean_hematoxylin",
        "mean_eosin",
    ]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: int(row[k]) if k == "id" else round(row[k], 4) for k in fields})
    atomic_write_bytes(paths[2], buf.getvalue().encode())
    collection = {"type": "FeatureCollection", "features": geojson_features(labels, rows)}
    atomic_write_text(paths[3], json.dumps(collection))
    return paths


# --------------------------------------------------------------------------------------------------
# Model resolution and the run
# --------------------------------------------------------------------------------------------------


#: The model folders shipped inside the package (``--model pretrained:<name>``).
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
DEFAULT_PRETRAINED = "tnbc_unet"


def pretrained_model(name: str = DEFAULT_PRETRAINED) -> Path:
    """Folder of a model shipped with kseg (see its ``MODEL_CARD.md``).

    Raises:
        ValueError: If no shipped model has that name (the known names are listed).
    """
    folder = PRETRAINED_DIR / name
    if not (folder / "model.pt").is_file():
        known = sorted(p.name for p in PRETRAINED_DIR.glob("*") if (p / "model.pt").is_file())
        raise ValueError(f"pretrained:{name}: no such shipped model (shipped: {known or 'none'})")
    return folder


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """A local model folder, a shipped model or an MLflow URI.

    ``pretrained`` / ``pretrained:<name>`` is a model folder shipped inside the package (no
    network). MLflow URIs (``models:/kseg@champion``, ``runs:/...``) are downloaded, then the kseg
    model folder inside the logged model (the folder holding ``config.json``, ``model.pt`` and
    ``preprocess.json``) is returned.
    """
    if spec == "pretrained" or spec.startswith("pretrained:"):
        return pretrained_model(spec.partition(":")[2] or DEFAULT_PRETRAINED)
    path = Path(spec)
    scheme = spec.split(":", 1)[0].lower() if ":" in spec else ""
    if scheme in ("http", "https", "ftp", "s3", "gs", "file") or (
        "://" in spec and not spec.startswith(("models:/", "runs:/"))
    ):
        raise ValueError(
            f"--model {redact(spec)}: not a model folder or an MLflow model URI; give a local "
            "folder, pretrained[:name], models:/<name>@<alias>, models:/<name>/<version> or "
            "runs:/<run_id>/<path> (the tracking server comes from MLFLOW_TRACKING_URI)"
        )
    if "://" not in spec and not spec.startswith(("models:/", "runs:/")):
        if not path.is_dir():
            raise ValueError(f"{spec}: model folder not found")
        return path
    import mlflow

    from kseg.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=spec, dst_path=str(cache_dir) if cache_dir else None
            )
        )
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(
            f"{spec}: cannot load from MLflow at {redact(tracking_uri())} ({redact_text(err)})"
        ) from err
    for cand in [local, *sorted(p for p in local.rglob("*") if p.is_dir())]:
        if all((cand / f).is_file() for f in MODEL_FILES):
            return cand
    raise ValueError(f"{spec}: no kseg model folder ({', '.join(MODEL_FILES)}) inside {local}")


def predict(
    inputs: list[Path],
    model: str,
    out_dir: Path,
    device: str = "cpu",
    progress: bool = True,
    batch_size: int = 4,
    dtype: str | None = None,
    max_pixels: int | None = None,
    mpp: float | None = None,
    slide_options: dict | None = None,
    runtime: str = "torch",
    tta: str | None = None,
) -> PredictReport:
    """Segments every input image with ``model`` and writes the results into ``out_dir``.

    ``device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``batch_size`` windows per forward
    pass; ``dtype`` ``float16``/``bfloat16`` runs the network under autocast (default float32);
    ``max_pixels`` refuses larger images (default ``KSEG_MAX_PIXELS`` or
    :data:`kseg.safety.PREDICT_MAX_PIXELS`). A failed image does not stop the others.
    Whole slides (SVS, pyramidal TIFF, ... see :func:`kseg.slide.is_slide`) are segmented block
    by block by :mod:`kseg.slide`. ``mpp`` (µm per pixel) is the pixel size of the other images
    (they are resampled to the model's, ``config.json`` ``extra.mpp``, and their labels back to
    their own grid; None: taken to be at the model's) and the level-0 pixel size of slides,
    overriding theirs. ``slide_options``: more keywords of :func:`kseg.slide.segment_slide`
    (``block``, ``margin``).
    Inputs with the same file name get distinct output names (:func:`kseg.slide.output_names`).
    ``runtime``: ``torch``, ``compiled``, ``onnx``, ``openvino`` or ``auto``
    (see :mod:`kseg.runtime`). ``tta`` overrides the model's test-time augmentation
    (``none``, ``flips``, ``dihedral``; None: the model's ``model.infer_tta``).

    Raises:
        ValueError: If ``tta`` is not one of those (before the model is loaded).
    """
    limit = max_pixels or max_pixels_from_env(PREDICT_MAX_PIXELS)
    from kseg.infer import TTA_VIEWS
    from kseg.segmenter import Segmenter
    from kseg.slide import segment_slides

    if tta is not None and tta not in TTA_VIEWS:
        raise ValueError(f"--tta {tta!r}: expected one of {', '.join(TTA_VIEWS)}")
    folder = resolve_model(model)
    segmenter = Segmenter.from_folder(folder, device, batch_size, dtype, runtime)
    if tta is not None:  # the post-processing thresholds stay those fitted with the model's own
        segmenter.model_config = segmenter.model_config.model_copy(update={"infer_tta": tta})
    report = PredictReport()
    files = list(iter_inputs(inputs, report))
    names = output_names(files)
    slides = [p for p in files if is_slide(p)]
    images = [p for p in files if p not in slides]
    # µm per pixel of the images over the model's: 2 = a 20x image for a 40x model (enlarged 2x)
    scale = 1.0 if mpp is None or not images else mpp / model_mpp(folder)
    for path in _progress(images, progress):
        try:
            rgb = read_image(path, limit)
            labels, _ = segment_at_scale(segmenter, rgb, scale, limit, path)
            report.written += write_outputs(out_dir, names[path], rgb, labels)
        except (ValueError, OSError, MemoryError) as err:
            if isinstance(err, MemoryError):
                err = MemoryError(f"out of memory ({err or 'no detail'}); lower --max-pixels")
            msg = str(err) if str(path) in str(err) else f"{path}: {err}"
            report.failed[str(path)] = msg
            log.error("%s", msg)
    if slides:
        results, failed = segment_slides(
            slides,
            segmenter,
            out_dir,
            model_folder=folder,
            mpp=mpp,
            progress=progress,
            **(slide_options or {}),
        )
        report.written += [p for r in results for p in r.written]
        report.failed.update(failed)
    return report


def segment_at_scale(
    segmenter: Segmenter,
    rgb: NDArray[np.uint8],
    scale: float,
    max_pixels: int = PREDICT_MAX_PIXELS,
    where: Path | str = "image",
) -> tuple[NDArray[np.int32], NDArray[np.float32]]:
    """Instance labels and distance map of ``rgb`` on its own grid, at the model's pixel size.

    Args:
        segmenter: The model.
        rgb: ``(H, W, 3)`` uint8 image.
        scale: The image's µm per pixel over the model's: the image is resampled by it
            (:func:`kseg.resample.resize_image`), segmented, and the labels go back to ``(H, W)``
            by nearest neighbour, so post-processing sizes fitted in the model's pixels still hold.
            Within 0.1% of 1: no resampling.
        max_pixels: Refuse a resampled image above this many pixels.
        where: Named in the error.

    Returns:
        ``(H, W)`` int32 instance labels and ``(H, W)`` float32 distance map (resampled back
        bilinearly when the image was resampled).

    Raises:
        UnsafeInput: If the resampled image is above ``max_pixels``.
    """
    from kseg.resample import resize_image, resize_labels_to, resize_maps, scaled_shape

    if abs(scale - 1.0) < 1e-3:
        return segmenter.segment(rgb)
    h, w = scaled_shape(rgb.shape[0], rgb.shape[1], scale)
    hint = " (raise --max-pixels if memory allows)"
    check_pixels(h, w, max_pixels, f"{where} resampled to the model's pixel size", hint)
    labels, distance = segmenter.segment(resize_image(rgb, scale))
    height, width = rgb.shape[:2]
    back = resize_maps(distance[None].astype(np.float32), height, width)[0]
    return resize_labels_to(labels, height, width), back


def _progress(files: list[Path], enabled: bool) -> Iterable[Path]:
    if not enabled or len(files) < 2:
        return files
    from rich.progress import track

    return track(files, description="segmenting", transient=True)
