"""The kseg model as an MLflow pyfunc: base64 image in, base64 instance labels out.

The pyfunc does the whole job of :class:`kseg.segmenter.Segmenter` (stain normalization as
trained, tiled inference at any image size, DIST post-processing). Its only artifact is the kseg
model folder (``model_folder``), so ``kseg predict --model models:/kseg@champion`` finds the same
files inside the logged model.

Request (``mlflow models serve``, ``POST /invocations``)::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG/TIFF/JPEG bytes>"]]},
     "params": {"return_distance": false, "tta": null, "mpp": null}}

Response: ``{"predictions": [{"labels": "<base64 PNG>", "labels_format": "png", "n_nuclei": 12,
"height": 700, "width": 900}]}``. ``labels`` is a 16-bit grayscale PNG (0 = background, 1..n the
nuclei); past 65535 nuclei it is a 32-bit TIFF (``labels_format: "tiff"``). With
``return_distance`` a ``distance`` column holds the float32 distance map as a base64 TIFF.
``tta`` (``none``, ``flips``, ``dihedral``) overrides the model's test-time augmentation for the
request, as ``kseg predict --tta`` does; ``mpp`` is the images' pixel size in µm: they are
resampled to the model's (``config.json`` ``extra.mpp``) and the labels and distance map come back
on the image's own grid, as ``kseg predict --mpp`` does. Null (the default) keeps the model's.

The model is logged as code (MLflow's models-from-code: :data:`PYFUNC_CODE` builds the object),
never as a cloudpickled object, so whoever can write to the registry cannot make the serving host
unpickle code; the logged model bundles the ``kseg`` package (``code_paths``) so a fresh process
can import it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import io
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from numpy.typing import NDArray

from kseg.safety import (
    SERVING_MAX_BYTES,
    SERVING_MAX_PIXELS,
    UnsafeInput,
    check_pixels,
    image_size,
    max_pixels_from_env,
)

ARTIFACT_KEY = "model_folder"
# Distributions the pyfunc imports at prediction time (kseg's runtime dependencies).
RUNTIME_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "numpy",
    "scipy",
    "pandas",
    "pillow",
    "tifffile",
    "pyyaml",
    "scikit-image",
    "opencv-python-headless",
    # kseg[onnx], pinned only when installed where the model is logged (kseg.runtime)
    "onnx",
    "onnxscript",
    "onnxruntime",
    "openvino",
)


# --------------------------------------------------------------------------------------------------
# Encoding (shared by the model, the tests and any Python client)
# --------------------------------------------------------------------------------------------------


def encode_image(rgb: NDArray[np.uint8]) -> str:
    """``(H, W, 3)`` uint8 RGB -> base64 PNG text, the ``image`` column of a request."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(
    value: str | bytes, row: int = 0, max_pixels: int = SERVING_MAX_PIXELS
) -> NDArray[np.uint8]:
    """Base64 text (or raw bytes) of a PNG/TIFF/JPEG/BMP -> ``(H, W, 3)`` uint8 RGB.

    The size is read from the image header first: more than ``max_pixels`` pixels (or more
    than :data:`kseg.safety.SERVING_MAX_BYTES` bytes) is refused before decoding, so a small
    file of a huge, uniform image cannot exhaust the server's memory.

    Raises:
        ValueError: If the value is not base64, too large or not a readable image (the row is
            named).
    """
    from kseg.predict import to_rgb8

    where = f"image[{row}]"
    if isinstance(value, str):
        if len(value) > SERVING_MAX_BYTES * 4 // 3 + 4:
            raise ValueError(f"{where}: {len(value)} characters, above {SERVING_MAX_BYTES} bytes")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"{where}: not base64 text ({err})") from err
    elif isinstance(value, bytes | bytearray):
        data = bytes(value)
    else:
        raise ValueError(f"{where}: expected base64 text, got {type(value).__name__}")
    if len(data) > SERVING_MAX_BYTES:
        raise ValueError(f"{where}: {len(data)} bytes, above the limit of {SERVING_MAX_BYTES}")
    size = image_size(io.BytesIO(data))
    if size is not None:
        check_pixels(*size, max_pixels, where, " (model_config max_pixels, KSEG_MAX_PIXELS)")
    try:
        if data[:4] in (b"II*\x00", b"MM\x00*"):  # TIFF: tifffile reads any bit depth
            import tifffile

            arr = tifffile.imread(io.BytesIO(data), key=0)
        else:
            import cv2

            arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise ValueError("not a PNG, JPEG, BMP or TIFF image")
            if arr.ndim == 3 and arr.shape[2] >= 3:  # OpenCV gives BGR(A)
                arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]]
    except Exception as err:
        raise ValueError(f"{where}: cannot decode image ({err})") from err
    return to_rgb8(np.asarray(arr), where)


def encode_labels(labels: NDArray[np.integer]) -> tuple[str, str]:
    """Instance labels -> (base64 text, format): 16-bit PNG, or 32-bit TIFF past 65535 nuclei."""
    if int(labels.max(initial=0)) < 2**16:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(labels.astype(np.uint16)).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii"), "png"
    return _tiff_b64(labels.astype(np.uint32)), "tiff"


def decode_labels(value: str) -> NDArray[np.int32]:
    """The ``labels`` column of a response -> ``(H, W)`` int32 labels."""
    data = base64.b64decode(value)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        import tifffile

        return tifffile.imread(io.BytesIO(data)).astype(np.int32)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img).astype(np.int32)


def decode_distance(value: str) -> NDArray[np.float32]:
    """The ``distance`` column of a response -> ``(H, W)`` float32 distance map (0..255 scale)."""
    import tifffile

    return tifffile.imread(io.BytesIO(base64.b64decode(value))).astype(np.float32)


def _tiff_b64(arr: NDArray) -> str:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, compression="zlib")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------------
# The pyfunc
# --------------------------------------------------------------------------------------------------


class KsegPyfunc(mlflow.pyfunc.PythonModel):
    """Segments every row's image; holds no state until :meth:`load_context`."""

    def load_context(self, context: Any) -> None:
        """Loads the kseg model folder logged as the ``model_folder`` artifact.

        The device, windows per batch and precision come from the pyfunc's ``model_config``
        (``mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})``, keys ``device``,
        ``batch_size``, ``dtype``, ``runtime``), else from ``KSEG_DEVICE`` / ``KSEG_BATCH_SIZE`` /
        ``KSEG_DTYPE`` / ``KSEG_RUNTIME``; defaults: ``cpu``, 4, float32, ``auto`` (the fastest
        installed runtime on this CPU, :mod:`kseg.runtime`). The device is resolved by
        :func:`kseg.device.resolve_device` (``cuda`` without a GPU is an error at load time).
        """
        import os

        from kseg.segmenter import Segmenter

        config = dict(getattr(context, "model_config", None) or {})
        device = config.get("device") or os.environ.get("KSEG_DEVICE", "cpu")
        batch_size = int(config.get("batch_size") or os.environ.get("KSEG_BATCH_SIZE", "4"))
        dtype = config.get("dtype") or os.environ.get("KSEG_DTYPE") or None
        self.max_pixels = int(config.get("max_pixels") or max_pixels_from_env(SERVING_MAX_PIXELS))
        runtime = config.get("runtime") or os.environ.get("KSEG_RUNTIME") or "auto"
        self.folder = Path(context.artifacts[ARTIFACT_KEY])
        self.__dict__.pop("_model_mpp", None)  # a reload may bring another folder
        self.segmenter = Segmenter.from_folder(self.folder, device, batch_size, dtype, runtime)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """One output row per input row (see the module docstring for the columns)."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from kseg.predict import segment_at_scale

        if "image" not in model_input.columns:
            raise MlflowException(
                f"input: expected a column 'image' (base64 image), got {list(model_input.columns)}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        params = params or {}
        with_distance = bool(params.get("return_distance", False))
        rows = []
        limit = getattr(self, "max_pixels", SERVING_MAX_PIXELS)
        try:
            # a per-request copy: concurrent requests with other params share the weights only
            segmenter, scale = self._request_segmenter(params.get("tta"), params.get("mpp"))
        except ValueError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from err
        for i, value in enumerate(model_input["image"].tolist()):
            try:
                rgb = decode_image(value, i, limit)
            except ValueError as err:
                # MlflowException with INVALID_PARAMETER_VALUE: the server answers 400 with
                # this message, not a generic one.
                raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from err
            try:
                labels, dist = segment_at_scale(segmenter, rgb, scale, limit, f"image[{i}]")
            except UnsafeInput as err:  # resampled by mpp beyond the pixel limit
                raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from err
            text, fmt = encode_labels(labels)
            row: dict[str, Any] = {
                "labels": text,
                "labels_format": fmt,
                "n_nuclei": int(labels.max(initial=0)),
                "height": int(labels.shape[0]),
                "width": int(labels.shape[1]),
            }
            if with_distance:
                row["distance"] = _tiff_b64(dist.astype(np.float32))
            rows.append(row)
        return pd.DataFrame(rows)

    def _request_segmenter(self, tta: Any, mpp: Any) -> tuple[Any, float]:
        """The segmenter for one request's ``tta`` and the image-to-model resampling factor.

        Raises:
            ValueError: ``tta`` is not a known mode, or ``mpp`` is not a number > 0.
        """
        from kseg.infer import TTA_VIEWS

        segmenter = self.segmenter
        if tta is not None:
            if tta not in TTA_VIEWS:
                raise ValueError(f"params.tta={tta!r}: expected one of {', '.join(TTA_VIEWS)}")
            update = {"infer_tta": tta}  # the thresholds stay those fitted with the model's own
            config = segmenter.model_config.model_copy(update=update)
            segmenter = dataclasses.replace(segmenter, model_config=config)
        if mpp is None:
            return segmenter, 1.0
        if isinstance(mpp, bool) or not isinstance(mpp, int | float) or not 0 < mpp < 1e3:
            raise ValueError(f"params.mpp={mpp!r}: expected the images' µm per pixel, > 0")
        return segmenter, float(mpp) / self._model_mpp

    @functools.cached_property
    def _model_mpp(self) -> float:
        """The model folder's pixel size (``config.json`` ``extra.mpp``), read once."""
        from kseg.slide import model_mpp

        return model_mpp(getattr(self, "folder", None))


def signature() -> Any:
    """Input: column ``image``; params ``return_distance``, ``tta``, ``mpp``; as documented."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema(
            [
                ColSpec("string", "labels"),
                ColSpec("string", "labels_format"),
                ColSpec("long", "n_nuclei"),
                ColSpec("long", "height"),
                ColSpec("long", "width"),
                ColSpec("string", "distance", required=False),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("return_distance", "boolean", False),
                ParamSpec("tta", "string", None),  # None: the model's infer_tta
                ParamSpec("mpp", "double", None),  # None: images at the model's pixel size
            ]
        ),
    )


def input_example(size: int = 48) -> pd.DataFrame:
    """A small H&E-coloured request (pink background, two purple blobs); deterministic."""
    yy, xx = np.mgrid[:size, :size]
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[...] = (235, 190, 215)
    for cy, cx in ((size // 3, size // 3), (2 * size // 3, 2 * size // 3)):
        rgb[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 8) ** 2] = (90, 50, 140)
    return pd.DataFrame({"image": [encode_image(rgb)]})


def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc environment, from the installed distributions.

    The ``+cpu`` local tag is dropped: the same pin then installs the CUDA build on a GPU host.
    """
    reqs = []
    for dist in RUNTIME_DISTRIBUTIONS:
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


#: The pyfunc's code file (MLflow models-from-code): MLflow runs it to get the model object, so
#: the logged model holds this source file and the weights, no pickled Python object.
PYFUNC_CODE = '''"""kseg's MLflow pyfunc, logged as code: the object is made here, not unpickled."""

import mlflow

from kseg.serving import KsegPyfunc

mlflow.models.set_model(KsegPyfunc())
'''


def log_pyfunc(model_dir: Path, name: str = "model") -> Any:
    """Logs ``model_dir`` as a pyfunc model into the active run; returns MLflow's ModelInfo.

    The pyfunc is logged as code (MLflow's models-from-code, ``python_model`` given as a file):
    the artifact holds :data:`PYFUNC_CODE`, the ``kseg`` package (without ``__pycache__``) and the
    model folder, and no cloudpickled object, so loading it runs only kseg's own source and
    needs only the pinned requirements, not a kseg install.
    """
    import kseg

    package = Path(kseg.__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "kseg"
        shutil.copytree(package, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        entry = Path(tmp) / "kseg_pyfunc.py"
        entry.write_text(PYFUNC_CODE)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(entry),
            artifacts={ARTIFACT_KEY: str(model_dir)},
            code_paths=[str(code)],
            signature=signature(),
            input_example=input_example(),
            pip_requirements=pip_requirements(),
        )
