"""``kseg export``: a model folder as an ONNX or TorchScript file that runs without kseg.

The exported graph is the eval-mode network (kseg's fast path, every BatchNorm folded into the
linear map before it or into a scale/shift, constants folded by the exporter). ONNX goes through
torch's TorchScript-based exporter by default (seconds; the ``torch.export``-based one takes
10-70 s for these networks and is used with ``exporter="dynamo"`` or once torch drops the former);
TorchScript through ``torch.jit.trace`` + ``torch.jit.freeze``. While tracing, the network takes
exportable forms of two eager speed-ups (:func:`kseg.model.ops.exporting`).

* input ``input``: ``B x 3 x H x W`` float32, RGB standardized with the model's preprocessing
  constants, ``(rgb_0_255 - mean) / std`` (after the model's stain normalization, if any);
* output ``output``: ``B x C x H x W`` float32, the raw head. ``dist`` head: one channel, the
  distance map (>= 0). ``fg_dist`` head: two logits; ``sigmoid`` gives the foreground probability
  and the normalised distance that post-processing reads.

H and W are dynamic (any multiple of 8) for a size-agnostic network: the U-Net, and Kidney-SegNet
with ``model.dice_dim_kernels: shared`` and the adaptive pyramid pooling. Kidney-SegNet with the
original per-position DiCE kernels has one height-wise kernel per row and one width-wise kernel per
column, so it is exported for ``tile_size x tile_size`` windows only (the metadata says so, and
``kseg predict`` tiles images into such windows). The batch dimension is always dynamic.

Everything another runtime needs to reproduce ``kseg predict`` travels with the file, as one JSON
document (:func:`export_metadata`): in the ONNX ``metadata_props`` under ``kseg``, in the
TorchScript archive as the extra file ``kseg.json``, and as a sidecar ``<file>.json`` beside it
(preprocessing constants, head and output channels, inference window and overlap, test-time
augmentation, the post-processing values fitted on validation, the stain normalizer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kseg.fsutil import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from kseg.infer import Preprocess

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
EXPORTERS = ("auto", "legacy", "dynamo")
METADATA_KEY = "kseg"
TORCHSCRIPT_EXTRA = "kseg.json"
ONNX_OPSET = 18
#: Bumped when the exported graph changes for the same weights (invalidates cached exports).
EXPORT_VERSION = 2
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class ExportError(ValueError):
    """The model could not be exported (the reason names the model and the format)."""


def is_size_agnostic(cfg: Any) -> bool:
    """Whether the network runs on any H, W divisible by 8 (so the export has dynamic H, W)."""
    if cfg.arch == "unet":
        return True
    return cfg.dice_dim_kernels == "shared" and cfg.fix_aspp_adaptive_pool


class _Exported(torch.nn.Module):
    """The eval-mode network as a plain ``forward(input) -> output`` for tracing."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def export_metadata(folder: Path, cfg: Any, fmt: str, size: int | None) -> dict[str, Any]:
    """The JSON document stored with an export (see the module docstring).

    Args:
        folder: The kseg model folder.
        cfg: Its ``ModelConfig``.
        fmt: ``onnx`` or ``torchscript``.
        size: The fixed window edge, or None for dynamic H and W.
    """
    from kseg.infer import Preprocess
    from kseg.model.io import config_to_dict
    from kseg.postprocess_fit import load_postprocess

    pre = Preprocess.load(folder)
    post = load_postprocess(folder)
    if post is None:
        from kseg.config import PostprocessConfig, params_from_dict

        post = PostprocessConfig()
        if (folder / "params.json").is_file():
            post = params_from_dict(json.loads((folder / "params.json").read_text())).postprocess
    stain = None
    if (folder / "stain.json").is_file():
        stain = json.loads((folder / "stain.json").read_text())
    channels = (
        ["foreground_logit", "normalised_distance_logit"] if cfg.head == "fg_dist" else ["distance"]
    )
    if size is None:
        shape_note = "H and W dynamic, any multiples of 8"
    else:
        shape_note = (
            f"H = W = {size} only: Kidney-SegNet with per-position DiCE kernels (one height-wise "
            "kernel per row, one width-wise kernel per column) is built for one tile size; tile "
            "larger images into overlapping windows of this size"
        )
    window = cfg.window if size is None else size
    return {
        "format": "kseg-export",
        "version": 1,
        "kseg_version": _kseg_version(),
        "export_format": fmt,
        "source_model": str(folder),
        "model_sha256": _weights_digest(folder),
        "model": config_to_dict(cfg),
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "layout": "NCHW",
            "channels": ["R", "G", "B"],
            "height": size or "dynamic",
            "width": size or "dynamic",
            "multiple_of": 8,
            "shape_note": shape_note,
            "preprocess": _preprocess_meta(pre),
        },
        "output": {
            "name": OUTPUT_NAME,
            "head": cfg.head,
            "channels": channels,
            "maps": "sigmoid(output)" if cfg.head == "fg_dist" else "output",
            "maps_channels": (
                ["foreground_probability", "normalised_distance"]
                if cfg.head == "fg_dist"
                else ["distance"]
            ),
        },
        "inference": {
            # The network's resolution relative to the image's: resample the image by it (area)
            # before cutting windows and the maps back to the image's size (bilinear).
            "input_scale": cfg.input_scale,
            "window": window,
            "overlap": window // 4,
            "blend": "sin^2 ramp per window edge (flat on image borders), see kseg.infer",
            "tta": cfg.infer_tta,
            # multi-scale: the maps at input_scale x each factor (each with tta), averaged
            "scales": list(cfg.infer_scales),
        },
        "postprocess": post.model_dump(),
        "stain": stain,
    }


def _preprocess_meta(pre: Preprocess) -> dict[str, Any]:
    """How to turn RGB 0..255 into the network input, for a runtime without kseg."""
    if pre.mode == "percentile":
        return {
            "mode": "percentile",
            "percentiles": list(pre.percentiles),
            "formula": "(rgb_0_255 - p_low) / max(p_high - p_low, 1) per channel and per input "
            "window, p = that window's percentiles (linear interpolation), after stain "
            "normalization",
        }
    return {
        "mode": "dataset",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "formula": "(rgb_0_255 - mean) / std per channel, after stain normalization",
    }


def _kseg_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kseg")
    except PackageNotFoundError:
        return "unknown"


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("model.pt", "config.json", "preprocess.json"):
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def load_network(folder: Path) -> tuple[torch.nn.Module, Any]:
    """The model folder's network in eval mode (fast path: BatchNorms folded) and its config."""
    from kseg.model import load_model_folder

    model, cfg = load_model_folder(folder, dice_impl="fast")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fold_conv_batchnorms(model)
    return model, cfg


def fold_conv_batchnorms(model: torch.nn.Module) -> int:
    """Folds the BatchNorm of every eval-mode ``ConvBNReLU`` block into its conv, in place.

    The U-Net's blocks. Kidney-SegNet's fast path folds its own BatchNorms in its eval forward
    (and reads them there, so they stay). Exporters and runtimes may fold them too, but not all
    do it alike, so the exported graph gets the folded convs from here. Returns the number of
    BatchNorms folded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from kseg.model.blocks import ConvBNReLU

    folded = 0
    for seq in model.modules():
        if not isinstance(seq, ConvBNReLU):
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if (
                type(conv) is torch.nn.Conv2d
                and type(bn) is torch.nn.BatchNorm2d
                and bn.running_mean is not None
                and not bn.training
            ):
                seq[i] = fuse_conv_bn_eval(conv, bn)
                seq[i + 1] = torch.nn.Identity()
                folded += 1
    return folded


def export_model(
    folder: str | Path,
    fmt: str,
    out: str | Path,
    size: int | None = None,
    opset: int = ONNX_OPSET,
    exporter: str = "auto",
) -> dict[str, Any]:
    """Exports the network of a kseg model folder to ``out`` (atomic) plus ``<out>.json``.

    Args:
        folder: A kseg model folder (``model.pt``, ``config.json``, ``preprocess.json``...).
        fmt: ``onnx`` or ``torchscript``.
        out: The file to write.
        size: Fixed window edge for the export; default: dynamic H, W where the network is
            size-agnostic, else its ``tile_size`` (and a different ``size`` is refused).
        opset: ONNX opset version.
        exporter: ONNX exporter: ``legacy`` (torch's TorchScript-based ``torch.onnx.export(...,
            dynamo=False)``: seconds), ``dynamo`` (the ``torch.export``-based one: 10-70 s for
            these networks on one core, see docs/model.md) or ``auto`` = legacy while torch has
            it, else dynamo. Both give the same function (tests compare them with torch).

    Returns:
        The metadata written with the file.

    Raises:
        ExportError: If the format is unknown, the optional packages are missing, the size is not
            allowed, or the exporter fails (the model and format are named).
    """
    folder, out = Path(folder), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {list(FORMATS)}")
    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter {exporter!r}: expected one of {list(EXPORTERS)}")
    net, cfg = load_network(folder)
    dynamic = is_size_agnostic(cfg) and size is None
    if not is_size_agnostic(cfg):
        if size not in (None, cfg.tile_size):
            raise ExportError(
                f"{folder}: Kidney-SegNet with per-position DiCE kernels (model.dice_dim_kernels: "
                f"per_position) exports at its tile size {cfg.tile_size} only, not {size}"
            )
        size = cfg.tile_size
    if size is not None and (size % 8 or size < 8):
        raise ExportError(f"--size {size}: must be a positive multiple of 8")
    meta = export_metadata(folder, cfg, fmt, None if dynamic else size)
    example_size = size or min(cfg.window, 256)
    # Batch 2: torch.export specializes a dimension whose example value is 0 or 1.
    example = torch.zeros(2, 3, example_size, example_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Exported(net).eval()
    try:
        if fmt == "onnx":
            _export_onnx(wrapper, example, out, meta, dynamic, opset, exporter)
        else:
            _export_torchscript(wrapper, example, out, meta)
    except ExportError:
        raise
    except Exception as err:  # exporters raise many types
        raise ExportError(f"{folder}: {fmt} export failed ({type(err).__name__}: {err})") from err
    atomic_write_text(sidecar_path(out), json.dumps(meta, indent=2) + "\n")
    return meta


def sidecar_path(out: str | Path) -> Path:
    """The sidecar JSON of an exported file: ``model.onnx`` -> ``model.onnx.json``."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def _export_onnx(
    module: torch.nn.Module,
    example: torch.Tensor,
    out: Path,
    meta: dict[str, Any],
    dynamic: bool,
    opset: int,
    exporter: str,
) -> None:
    try:
        import onnx
    except ImportError as err:
        raise ExportError(
            "ONNX export needs the optional packages: pip install 'kseg[onnx]'"
        ) from err
    if exporter == "auto":
        exporter = "legacy" if _has_legacy_exporter() else "dynamo"
    with torch.no_grad():
        if exporter == "legacy":
            proto = onnx.load_model_from_string(_legacy_onnx(module, example, dynamic, opset))
        else:
            proto = _dynamo_onnx(module, example, dynamic, opset)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    proto.doc_string = "kseg nuclei segmentation network; metadata_props['kseg'] describes it"
    onnx.checker.check_model(proto)
    with atomic_path(out) as tmp_out:
        onnx.save(proto, str(tmp_out))


def _has_legacy_exporter() -> bool:
    """Whether this torch still has the TorchScript-based ONNX exporter (deprecated in 2.9)."""
    try:
        from torch.onnx._internal.torchscript_exporter import utils  # noqa: F401
    except ImportError:
        return False
    return True


def _legacy_onnx(
    module: torch.nn.Module, example: torch.Tensor, dynamic: bool, opset: int
) -> bytes:
    """The serialized model from ``torch.onnx.export(..., dynamo=False)`` (jit trace based)."""
    import io
    import warnings

    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The deprecation notice, and trace warnings about the networks' shape checks (Python
        # ints during a trace): the checks hold for every multiple-of-8 size the export admits.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (example,),
            buf,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buf.getvalue()


def _dynamo_onnx(module: torch.nn.Module, example: torch.Tensor, dynamic: bool, opset: int) -> Any:
    """The ONNX ``ModelProto`` from the ``torch.export``-based exporter."""
    import onnx
    from torch.export import Dim

    shape: dict[int, Any] = {0: Dim("batch", min=1, max=1024)}
    if dynamic:
        # H = 8 h, W = 8 w: three 2x poolings need multiples of 8.
        shape[2] = 8 * Dim("h8", min=1, max=1024)
        shape[3] = 8 * Dim("w8", min=1, max=1024)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=(shape,),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            optimize=True,
            verbose=False,
        )
        program.save(str(raw), external_data=False)
        return onnx.load(str(raw))


def _export_torchscript(
    module: torch.nn.Module, example: torch.Tensor, out: Path, meta: dict[str, Any]
) -> None:
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # The networks' shape checks read Python ints during the trace; they hold for every
        # size the export admits (multiples of 8, or the one tile size).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (example,), check_trace=False, strict=True)
        frozen = torch.jit.freeze(traced.eval())
    with atomic_path(out) as tmp_out:
        torch.jit.save(frozen, str(tmp_out), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(meta)})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The kseg metadata of an exported file (embedded; the sidecar if none is embedded).

    Raises:
        ValueError: If the file has none (the file is named).
    """
    path = Path(path)
    doc: str | None = None
    if path.suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        doc = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
    else:
        files = {TORCHSCRIPT_EXTRA: ""}
        try:
            torch.jit.load(str(path), map_location="cpu", _extra_files=files)
            doc = files[TORCHSCRIPT_EXTRA] or None
        except RuntimeError:
            doc = None
    if doc is None and sidecar_path(path).is_file():
        doc = sidecar_path(path).read_text()
    if doc is None:
        raise ValueError(f"{path}: no kseg metadata (not written by `kseg export`?)")
    return json.loads(doc)
