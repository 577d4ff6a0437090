"""Typed, frozen configuration loaded from ``params.yaml``.

Every block of ``params.yaml`` maps to one frozen dataclass. Loading is strict: an unknown key, a
value of the wrong type or a value outside its allowed range raises :class:`ConfigError` with the
dotted key, the offending value and what is allowed. Ranges and choices live in each field's
``metadata`` (``min``, ``max``, ``choices``) so that the rule sits next to the default it guards.

This module imports only the standard library and PyYAML: it is loaded by every ``kseg`` command,
including ``--help``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from kseg.model.config import ModelConfig


class ConfigError(ValueError):
    """A ``params.yaml`` value that kseg cannot use; the message names the key and the rule."""


def _f(default: Any, /, **meta: Any) -> Any:
    """Declares a dataclass field with validation metadata (min, max, choices, help)."""
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        # Nested sections are frozen, but each Params still gets its own default object.
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded synthetic H&E dataset (``data.source: synthetic``)."""

    seed: int = _f(0, min=0, help="RNG seed; the same seed gives byte-identical files")
    n_patients: int = _f(6, min=1, max=1000)
    tiles_per_patient: int = _f(4, min=1, max=1000)
    tile_size: int = _f(256, min=64, max=4096)
    nuclei_per_tile: tuple[int, int] = _f(
        (25, 45), min=0, max=10_000, ordered=True, help="min and max nuclei drawn per tile"
    )
    nucleus_radius: tuple[float, float] = _f(
        (5.0, 11.0), min=1.0, max=256.0, ordered=True, help="min and max semi-axis in pixels"
    )


@dataclass(frozen=True)
class DataConfig:
    """Where the raw dataset comes from and where it is written (see docs/data.md)."""

    source: Literal["synthetic", "tnbc", "kidney", "folder"] = _f("synthetic")
    url: str | None = _f(None, help="override the download URL (http(s)://, file:// or a path)")
    sha256: str | None = _f(None, help="override the expected sha256 of the archive")
    path: str | None = _f(None, help="local archive or folder (kidney, folder sources)")
    dir: str = _f("data", path=True, help="folder the raw dataset is written to")
    retries: int = _f(3, min=0, max=20, help="extra download attempts on transient errors")
    timeout_s: float = _f(60.0, min=1.0, max=3600.0, help="socket timeout per download attempt")
    max_extract_bytes: int = _f(
        16 * 2**30, min=2**20, help="archives: most bytes all entries may unpack to (zip bomb cap)"
    )
    max_entry_ratio: float = _f(
        200.0, min=1.0, help="archives: most an entry may expand over its compressed size"
    )
    max_entries: int = _f(200_000, min=1, help="archives: most entries an archive may list")
    synthetic: SyntheticConfig = _f(SyntheticConfig())

    def validate(self) -> None:
        """A checksum override must be a full sha256 (64 hex digits); paths are not blank."""
        for key in ("url", "path"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ValueError(f"{key}: an empty string; use null for none")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in self.sha256)
        ):
            raise ValueError(f"sha256: {self.sha256!r} is not a sha256 (64 hex digits)")


@dataclass(frozen=True)
class PrepareConfig:
    """Canonical tiles, labels and distance targets, and the per-tile manifest."""

    out_dir: str = _f("prepared", path=True)
    tissue_od: float = _f(
        0.15, min=0.0, max=3.0, help="a pixel is tissue when its largest channel OD exceeds this"
    )
    near_blank_tissue: float = _f(
        0.05, min=0.0, max=1.0, help="a tile with a smaller tissue fraction is flagged near-blank"
    )


@dataclass(frozen=True)
class SplitConfig:
    """Patient-level train / validation / test split (no patient in two splits)."""

    test_patients: tuple[str, ...] = _f(
        (),
        help="patients held out for testing; empty = the source's default "
        "(tnbc: split.tnbc_test_patients; others: drawn with split.seed)",
    )
    tnbc_test_patients: tuple[str, ...] = _f(
        ("02", "06", "10"), help="fixed TNBC test patients (docs/data.md says why these)"
    )
    test_fraction: float = _f(0.2, min=0.0, max=0.9, help="share of tiles when drawn")
    val_fraction: float = _f(0.2, min=0.0, max=0.9, help="share of tiles, from training patients")
    seed: int = _f(0, min=0)


@dataclass(frozen=True)
class ValidateConfig:
    """Great Expectations checks on the prepared manifest and split (see docs/data.md)."""

    min_tiles_per_split: int = _f(1, min=0)
    min_tile_size: int = _f(64, min=1, help="smallest tile height/width accepted")
    min_tissue_fraction: float = _f(0.05, min=0.0, max=1.0)
    mean_nucleus_area: tuple[float, float] = _f(
        (10.0, 5000.0), min=0.0, ordered=True, help="plausible mean nucleus area per tile, pixels"
    )
    od_mean: tuple[float, float] = _f(
        (0.05, 2.0), min=0.0, ordered=True, help="plausible mean OD of tissue pixels (H&E)"
    )
    rgb_mean: tuple[float, float] = _f(
        (30.0, 245.0), min=0.0, max=255.0, ordered=True, help="plausible mean of each RGB channel"
    )
    report: str = _f("reports/validation.html", path=True)
    metrics: str = _f("metrics/validation.json", path=True)


@dataclass(frozen=True)
class StainConfig:
    """Stain normalization, fitted on the training split only."""

    method: Literal["none", "reinhard", "macenko"] = _f("none", help="none = the original's")
    reference: str = _f("pooled", help="'pooled' (pixels of every training tile) or a tile id")
    max_pixels_per_tile: int = _f(65536, min=256, help="pooled fit: pixels sampled per tile")
    io: float = _f(240.0, min=1.0, max=255.0, help="Macenko: transmitted light intensity")
    alpha: float = _f(1.0, min=0.0, max=25.0, help="Macenko: percentile of extreme angles")
    beta: float = _f(0.15, min=0.0, max=3.0, help="optical density below which it is glass")
    stained_pixels: Literal["any_channel", "all_channels"] = _f(
        "any_channel",
        help="Macenko statistics use pixels with OD >= beta in any channel (keeps pale eosin) or "
        "in all channels (torchstain's rule)",
    )
    min_tissue_fraction: float = _f(
        0.05, min=0.0, max=1.0, help="tiles with less tissue pass through unchanged"
    )
    min_stain_angle: float = _f(
        10.0, min=0.0, max=90.0, help="Macenko: H and E closer (degrees) = one stain, pass through"
    )
    report_tiles: int = _f(4, min=0, max=32, help="patients shown before/after in report.png")
    out_dir: str = _f("normalized", path=True)

    def validate(self) -> None:
        """A tile id reference cannot be empty."""
        if not self.reference.strip():
            raise ValueError("reference: give 'pooled' or a training tile id")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation (albumentations), mask-safe."""

    flips: bool = _f(True, help="horizontal and vertical flips (the original's)")
    rotate90: bool = _f(True, help="random multiples of 90 degrees (the original's)")
    affine_p: float = _f(0.0, min=0.0, max=1.0, help="probability of a random affine warp")
    affine_scale: tuple[float, float] = _f((0.9, 1.1), min=0.25, max=4.0, ordered=True)
    affine_rotate: float = _f(15.0, min=0.0, max=180.0, help="max rotation, degrees")
    affine_shear: float = _f(5.0, min=0.0, max=45.0, help="max shear, degrees")
    elastic_p: float = _f(0.0, min=0.0, max=1.0, help="probability of an elastic warp")
    elastic_alpha: float = _f(30.0, min=0.0, max=1000.0, help="displacement scale, pixels")
    elastic_sigma: float = _f(6.0, min=0.5, max=100.0, help="displacement smoothness, pixels")
    blur_p: float = _f(0.0, min=0.0, max=1.0, help="probability of a Gaussian blur")
    blur_sigma: tuple[float, float] = _f((0.3, 1.2), min=0.05, max=10.0, ordered=True)
    brightness_contrast_p: float = _f(0.2, min=0.0, max=1.0)
    brightness: float = _f(0.1, min=0.0, max=1.0, help="max brightness change (fraction)")
    contrast: float = _f(0.1, min=0.0, max=1.0, help="max contrast change (fraction)")
    hed_p: float = _f(0.5, min=0.0, max=1.0, help="probability of stain jitter in HED space")
    hed_sigma: float = _f(0.05, min=0.0, max=1.0, help="H, E, D scaled by U(1-s, 1+s)")
    hed_bias: float = _f(0.02, min=0.0, max=1.0, help="H, E, D shifted by U(-b, b), OD units")

    def validate(self) -> None:
        """Ranges are (low, high) pairs."""
        for name in ("affine_scale", "blur_sigma"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: low {lo} is above high {hi}")


@dataclass(frozen=True)
class TrainConfig:
    """Training of the distance-map regressor (original: Adam 7e-4, L2 7e-4, MSE, batch 2)."""

    epochs: int = _f(3, min=1, max=100_000)
    batch_size: int = _f(2, min=1, max=4096)
    samples_per_epoch: int = _f(0, min=0, help="crops per epoch; 0 = one per training tile")
    lr: float = _f(7e-4, min=0.0, max=10.0)
    weight_decay: float = _f(7e-4, min=0.0, max=1.0)
    optimizer: Literal["adam", "adamw", "sgd"] = _f("adam", help="adam = the original's")
    scheduler: Literal["none", "cosine", "step"] = _f("none", help="none = the original's")
    loss: Literal["mse", "mse_bce"] = _f(
        "mse", help="mse on the 0..255 distance map (original); mse_bce adds a foreground BCE"
    )
    fg_loss_weight: float = _f(1.0, min=0.0, help="weight of the foreground term of mse_bce")
    select_metric: Literal["aji", "pq", "object_f1", "pixel_f1", "val_loss"] = _f(
        "aji", help="validation score that picks the best epoch (after post-processing)"
    )
    early_stopping_patience: int = _f(0, min=0, help="epochs without improvement; 0 = off")
    device: Literal["auto", "cpu", "cuda"] = _f(
        "auto", help="auto = CUDA when present; also used by evaluate and register (re-scoring)"
    )
    amp: bool = _f(True, help="automatic mixed precision (CUDA only)")
    amp_dtype: Literal["float16", "bfloat16"] = _f(
        "float16", help="AMP precision: float16 (with a GradScaler) or bfloat16 (no scaler)"
    )
    channels_last: bool = _f(True, help="channels_last memory format (CUDA only)")
    threads: int = _f(0, min=0, max=512, help="torch CPU threads; 0 = torch's default")
    recompute_levels: int = _f(
        0,
        min=0,
        max=4,
        help="kidney_segnet: recompute the blocks of the N finest resolution levels in backward "
        "instead of storing their activations (less memory, about 2x step time; same weights)",
    )
    workers: int = _f(
        0,
        min=0,
        max=256,
        help="DataLoader worker processes; 0 = load in the training process (the CPU default); "
        "about 8 per GPU keeps one busy. Batches do not depend on it",
    )
    deterministic: bool = _f(
        True,
        help="deterministic algorithms (cudnn autotune off, CUBLAS_WORKSPACE_CONFIG on CUDA); "
        "false lets cuDNN pick the fastest kernels",
    )
    check_every: int = _f(
        0,
        min=0,
        help="steps between host-side NaN/inf checks of the loss (one GPU sync each; always "
        "at epoch end); 0 = every step on CPU, every 50 on CUDA",
    )
    infer_batch_size: int = _f(
        4, min=1, max=4096, help="windows per forward pass in validation, evaluate and register"
    )
    dist_timeout_min: float = _f(
        60.0,
        min=1.0,
        max=10_080.0,
        help="DDP collective timeout (minutes): the other ranks wait this long for rank 0's "
        "validation and post-processing fit",
    )
    checkpoint_dir: str = _f(
        ".checkpoints", path=True, help="resumable checkpoints, one folder per config"
    )
    out_dir: str = _f(
        "models/kseg", path=True, help="the model folder evaluate/register/predict use"
    )
    experiment: str = _f("kseg", help="MLflow experiment name")
    val_overlays: int = _f(2, min=0, max=64, help="validation overlay images logged per epoch")


@dataclass(frozen=True)
class RegisterConfig:
    """MLflow Model Registry: register every evaluated model, promote it only if it is better."""

    model_name: str = _f("kseg", help="registered model name")
    metric: Literal["aji", "pq", "dq", "sq", "object_f1", "pixel_f1", "pixel_iou", "dice"] = _f(
        "aji", help="test metric (metrics/eval.json) that decides; all are higher-is-better"
    )
    min_delta: float = _f(
        0.0, min=0.0, max=1.0, help="the candidate must beat the champion by more than this"
    )
    alias: str = _f("champion", help="alias of the best model (models:/<name>@<alias>)")
    challenger_alias: str | None = _f(
        "challenger", help="alias set on a version that lost the gate; null = none"
    )
    on_split_mismatch: Literal["reevaluate", "refuse"] = _f(
        "reevaluate",
        help="champion scored on another test split: score it again here, or stop with an error",
    )

    def validate(self) -> None:
        """A model name, alias names MLflow accepts, and two different aliases."""
        import re

        if not self.model_name.strip() or any(c in self.model_name for c in "/@'"):
            raise ValueError(f"model_name: {self.model_name!r} must be non-empty, without / @ '")
        for key, name in (("alias", self.alias), ("challenger_alias", self.challenger_alias)):
            if name is None:
                continue
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", name) or re.fullmatch(
                r"(latest|[vV]\d+)", name
            ):
                raise ValueError(
                    f"{key}: {name!r} is not a valid MLflow alias (letters, digits, _ and -; "
                    "not 'latest' or v<number>)"
                )
        if self.alias == self.challenger_alias:
            raise ValueError(f"alias and challenger_alias are both {self.alias!r}")


@dataclass(frozen=True)
class PostprocessConfig:
    """Maps -> instances: DIST dynamic watershed (``dist`` head) or marker watershed (``fg_dist``).

    With ``fit: true`` the train stage chooses the thresholds of the model's head on the validation
    patients (never the test ones) and writes them to ``postprocess.json`` in the model folder;
    evaluate, predict and serving then use those. The values here are the starting point and what
    is used with ``fit: false`` (h 7 / threshold 28 = the original's test settings).
    """

    h: int = _f(7, min=1, max=255, help="dist head: h-maxima depth on the 0..255 scale")
    foreground_threshold: int = _f(
        28, min=0, max=255, help="dist head: 0..255 scale; below is background"
    )
    watershed_line: bool = _f(True, help="dist head: clear the pixels where two nuclei touch")
    fg_threshold: float = _f(
        0.5, min=0.0, max=1.0, help="fg_dist head: foreground probability of a nucleus pixel"
    )
    marker_threshold: float = _f(
        0.5, min=0.0, max=1.0, help="fg_dist head: normalised distance of a nucleus core (marker)"
    )
    marker_h: float = _f(
        0.0,
        min=0.0,
        max=1.0,
        help="fg_dist head: markers are maxima of this dynamic (0..1); 0 = threshold components",
    )
    min_size: int = _f(0, min=0, max=1_000_000, help="instances below this many pixels are dropped")
    fit: bool = _f(
        True,
        help="choose the thresholds on the validation patients after training (false: use these)",
    )


@dataclass(frozen=True)
class Params:
    """All of ``params.yaml``."""

    seed: int = _f(42, min=0)
    data: DataConfig = _f(DataConfig())
    prepare: PrepareConfig = _f(PrepareConfig())
    split: SplitConfig = _f(SplitConfig())
    validate: ValidateConfig = _f(ValidateConfig())
    stain: StainConfig = _f(StainConfig())
    augment: AugmentConfig = _f(AugmentConfig())
    model: ModelConfig = _f(ModelConfig())
    train: TrainConfig = _f(TrainConfig())
    register: RegisterConfig = _f(RegisterConfig())
    postprocess: PostprocessConfig = _f(PostprocessConfig())


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return "a list of " + ", ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Converts a YAML value to ``tp`` or raises ConfigError naming ``key``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin in (types.UnionType, typing.Union):
        return _convert_union(value, tp, key)
    if origin is tuple:
        return _convert_tuple(value, tp, key)
    return _convert_scalar(value, tp, key)


def _convert_union(value: Any, tp: Any, key: str) -> Any:
    for arg in get_args(tp):
        if arg is type(None):
            if value is None:
                return None
            continue
        try:
            return _convert(value, arg, key)
        except ConfigError:
            pass
    raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")


def _convert_tuple(value: Any, tp: Any, key: str) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    args = get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {value!r}")
    return tuple(
        _convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
    )


_SCALARS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
}


_INT64 = 2**63 - 1


def _convert_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp not in _SCALARS:
        raise ConfigError(f"{key}: unsupported setting type {tp!r}")  # a bug in the schema
    accepted, name = _SCALARS[tp]
    # bool is a subclass of int in Python; `seed: true` must not pass as 1.
    if not isinstance(value, accepted) or (tp is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {name}, got {value!r}")
    if tp is int and not -_INT64 - 1 <= value <= _INT64:
        raise ConfigError(f"{key}: {value!r} does not fit a 64-bit integer")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    return float(value) if tp is float else value


def _check_range(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if not isinstance(item, int | float) or isinstance(item, bool):
            continue
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and item < lo) or (hi is not None and item > hi):
            bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"{key}: {value!r} is out of range; allowed {bounds}")
    if meta.get("ordered") and len(items) == 2 and items[0] > items[1]:
        raise ConfigError(
            f"{key}: {list(value)!r} is inverted; expected [low, high] with low <= high"
        )
    if meta.get("path") and not str(value).strip():
        raise ConfigError(f"{key}: an empty path; give a folder or file name")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not allowed; expected one of {meta['choices']}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]!s}; allowed keys{' in ' + prefix if prefix else ''}: "
            + ", ".join(sorted(fields))
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        converted = _convert(value, hints[name], key)
        _check_range(converted, fields[name].metadata, key)
        kwargs[name] = converted
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as err:
            raise ConfigError(f"{prefix or 'params'}: {err}") from err
    return obj


def params_from_dict(raw: dict[str, Any] | None) -> Params:
    """Builds :class:`Params` from a parsed ``params.yaml`` mapping (missing keys take defaults).

    Raises:
        ConfigError: for an unknown key, a wrong type or an out-of-range value.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: expected a mapping at the top level, got {type(raw).__name__}")
    return _build(Params, raw, "")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""


def _mapping_no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"found the key {key!r} twice (first {seen[key]}); YAML would silently keep only "
                "the last one",
                key_node.start_mark,
            )
        seen[key] = f"line {key_node.start_mark.line + 1}"
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates
)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Loads and validates ``params.yaml``.

    Args:
        path: The YAML file. A missing file is an error (the defaults are not guessed silently).

    Raises:
        ConfigError: naming the file, and the key for schema violations.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err}); save it as UTF-8") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the parameters file ({err})") from err
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no Python objects
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if raw is None:
        raise ConfigError(
            f"{path}: the file is empty; kseg will not guess the parameters (write `{{}}` to run "
            "on the built-in defaults, or copy the shipped params.yaml)"
        )
    try:
        return params_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def to_dict(obj: Any) -> Any:
    """Plain-JSON view of a config object (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}`` view of a config, for experiment trackers.

    URLs lose their credentials and query strings (:func:`kseg.safety.redact`).
    """
    from kseg.safety import redact_tree

    out: dict[str, Any] = {}
    for key, value in redact_tree(to_dict(obj)).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_dict(value, name + "."))
        else:
            out[name] = value
    return out


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattens nested dicts with dotted keys."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def params_hash(params: Params) -> str:
    """Stable short hash of the resolved parameters (sorted JSON, sha256, 12 hex digits)."""
    blob = json.dumps(to_dict(params), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def save_config(obj: Any, path: str | Path) -> Path:
    """Writes a config object as JSON next to the artifact that depends on it (atomically).

    URLs lose their credentials and query strings (:func:`kseg.safety.redact`).
    """
    from kseg.fsutil import atomic_write_text
    from kseg.safety import redact_tree

    text = json.dumps(redact_tree(to_dict(obj)), indent=2, sort_keys=True)
    return atomic_write_text(Path(path), text + "\n")
