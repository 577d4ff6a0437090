"""Typed, frozen configuration loaded from ``params.yaml``: one pydantic model per block.

Loading is strict (``extra="forbid"``, no string-to-number or number-to-boolean coercion): an
unknown key, a value of the wrong type or outside its allowed range raises :class:`ConfigError`
with the dotted key, the offending value and what is allowed. Choices are ``Literal`` types,
ranges ``Field(ge=..., le=...)`` and each field's help is the docstring under it.
"""

from __future__ import annotations

import hashlib
import json
import types
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic import StrictBool as Bool
from pydantic import StrictStr as Str
from pydantic.fields import FieldInfo

from kseg.model.config import ModelConfig


class ConfigError(ValueError):
    """A ``params.yaml`` value that kseg cannot use; the message names the key and the rule."""


def _allowed(lo: Any, hi: Any) -> str:
    return f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


def _int64(v: int) -> int:
    if not -(2**63) <= v < 2**63:
        raise ValueError(f"{v!r} does not fit a 64-bit integer")
    return v


def _path(v: str) -> str:
    if not v.strip():
        raise ValueError("an empty path; give a folder or file name")
    return v


def _pair(lo: float | None = None, hi: float | None = None) -> AfterValidator:
    """A ``[low, high]`` pair: both within ``[lo, hi]``, low <= high."""

    def check(v: tuple[Any, Any]) -> tuple[Any, Any]:
        if any((lo is not None and x < lo) or (hi is not None and x > hi) for x in v):
            raise ValueError(f"{v!r} is out of range; allowed {_allowed(lo, hi)}")
        if v[0] > v[1]:
            raise ValueError(f"{list(v)!r} is inverted; expected [low, high] with low <= high")
        return v

    return AfterValidator(check)


Int = Annotated[int, Field(strict=True), AfterValidator(_int64)]
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
PathStr = Annotated[str, Field(strict=True), AfterValidator(_path)]
Frac = Annotated[Float, Field(ge=0.0, le=1.0)]
Count = Annotated[Int, Field(ge=0)]
IntPair = tuple[Int, Int]
InputNorm = Literal["dataset", "percentile"]  # kseg.infer.Preprocess.mode
FloatPair = tuple[Float, Float]


class Section(BaseModel):
    """A frozen block of ``params.yaml``: unknown keys are errors, docstrings are the help."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class SyntheticConfig(Section):
    """The embedded synthetic H&E dataset (``data.source: synthetic``)."""

    seed: Count = 0
    """RNG seed; the same seed gives byte-identical files"""
    n_patients: Int = Field(6, ge=1, le=1000)
    tiles_per_patient: Int = Field(4, ge=1, le=1000)
    tile_size: Int = Field(256, ge=64, le=4096)
    nuclei_per_tile: Annotated[IntPair, _pair(0, 10_000)] = (25, 45)
    """min and max nuclei drawn per tile"""
    nucleus_radius: Annotated[FloatPair, _pair(1.0, 256.0)] = (5.0, 11.0)
    """min and max semi-axis in pixels"""


class DataConfig(Section):
    """Where the raw dataset comes from and where it is written (see docs/data.md)."""

    source: Literal["synthetic", "tnbc", "kidney", "folder"] = "synthetic"
    url: Str | None = None
    """override the download URL (http(s)://, file:// or a path)"""
    sha256: Str | None = None
    """override the expected sha256 of the archive"""
    path: Str | None = None
    """local archive or folder (kidney, folder sources)"""
    dir: PathStr = "data"
    """folder the raw dataset is written to"""
    retries: Int = Field(3, ge=0, le=20)
    """extra download attempts on transient errors"""
    timeout_s: Float = Field(60.0, ge=1.0, le=3600.0)
    """socket timeout per download attempt"""
    max_extract_bytes: Int = Field(16 * 2**30, ge=2**20)
    """archives: most bytes all entries may unpack to (zip bomb cap)"""
    max_entry_ratio: Float = Field(200.0, ge=1.0)
    """archives: most an entry may expand over its compressed size"""
    max_entries: Int = Field(200_000, ge=1)
    """archives: most entries an archive may list"""
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def check_rules(self) -> Self:
        """A checksum override must be a full sha256 (64 hex digits); paths are not blank."""
        for key in ("url", "path"):
            if (value := getattr(self, key)) is not None and not value.strip():
                raise ValueError(f"{key}: an empty string; use null for none")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in self.sha256)
        ):
            raise ValueError(f"sha256: {self.sha256!r} is not a sha256 (64 hex digits)")
        return self


class PrepareConfig(Section):
    """Canonical tiles, labels and distance targets, and the per-tile manifest."""

    out_dir: PathStr = "prepared"
    tissue_od: Float = Field(0.15, ge=0.0, le=3.0)
    """a pixel is tissue when its largest channel OD exceeds this"""
    near_blank_tissue: Frac = 0.05
    """a tile with a smaller tissue fraction is flagged near-blank"""


class SplitConfig(Section):
    """Patient-level train / validation / test split (no patient in two splits)."""

    test_patients: tuple[Str, ...] = ()
    """patients held out for testing; empty = the source's default
    (tnbc: split.tnbc_test_patients; others: drawn with split.seed)"""
    tnbc_test_patients: tuple[Str, ...] = ("02", "06", "10")
    """fixed TNBC test patients (docs/data.md says why these)"""
    test_fraction: Float = Field(0.2, ge=0.0, le=0.9)
    """share of tiles when drawn"""
    val_fraction: Float = Field(0.2, ge=0.0, le=0.9)
    """share of tiles, from training patients"""
    seed: Count = 0


class ValidateConfig(Section):
    """Great Expectations checks on the prepared manifest and split (see docs/data.md)."""

    min_tiles_per_split: Count = 1
    min_tile_size: Int = Field(64, ge=1)
    """smallest tile height/width accepted"""
    min_tissue_fraction: Frac = 0.05
    mean_nucleus_area: Annotated[FloatPair, _pair(0.0)] = (10.0, 5000.0)
    """plausible mean nucleus area per tile, pixels"""
    od_mean: Annotated[FloatPair, _pair(0.0)] = (0.05, 2.0)
    """plausible mean OD of tissue pixels (H&E)"""
    rgb_mean: Annotated[FloatPair, _pair(0.0, 255.0)] = (30.0, 245.0)
    """plausible mean of each RGB channel"""
    report: PathStr = "reports/validation.html"
    metrics: PathStr = "metrics/validation.json"


class StainConfig(Section):
    """Stain normalization, fitted on the training split only."""

    method: Literal["none", "reinhard", "macenko"] = "none"
    """none = the original's"""
    reference: Str = "pooled"
    """'pooled' (pixels of every training tile) or a tile id"""
    max_pixels_per_tile: Int = Field(65536, ge=256)
    """pooled fit: pixels sampled per tile"""
    io: Float = Field(240.0, ge=1.0, le=255.0)
    """Macenko: transmitted light intensity"""
    alpha: Float = Field(1.0, ge=0.0, le=25.0)
    """Macenko: percentile of extreme angles"""
    beta: Float = Field(0.15, ge=0.0, le=3.0)
    """optical density below which it is glass"""
    stained_pixels: Literal["any_channel", "all_channels"] = "any_channel"
    """Macenko statistics use pixels with OD >= beta in any channel (keeps pale eosin) or in all
    channels (torchstain's rule)"""
    min_tissue_fraction: Frac = 0.05
    """tiles with less tissue pass through unchanged"""
    min_stain_angle: Float = Field(10.0, ge=0.0, le=90.0)
    """Macenko: H and E closer (degrees) = one stain, pass through"""
    report_tiles: Int = Field(4, ge=0, le=32)
    """patients shown before/after in report.png"""
    out_dir: PathStr = "normalized"

    @model_validator(mode="after")
    def check_rules(self) -> Self:
        """A tile id reference cannot be empty."""
        if not self.reference.strip():
            raise ValueError("reference: give 'pooled' or a training tile id")
        return self


class AugmentConfig(Section):
    """Training-time augmentation (albumentations), mask-safe."""

    flips: Bool = True
    """horizontal and vertical flips (the original's)"""
    rotate90: Bool = True
    """random multiples of 90 degrees (the original's)"""
    affine_p: Frac = 0.0
    """probability of a random affine warp"""
    affine_scale: Annotated[FloatPair, _pair(0.25, 4.0)] = (0.9, 1.1)
    affine_rotate: Float = Field(15.0, ge=0.0, le=180.0)
    """max rotation, degrees"""
    affine_shear: Float = Field(5.0, ge=0.0, le=45.0)
    """max shear, degrees"""
    elastic_p: Frac = 0.0
    """probability of an elastic warp"""
    elastic_alpha: Float = Field(30.0, ge=0.0, le=1000.0)
    """displacement scale, pixels"""
    elastic_sigma: Float = Field(6.0, ge=0.5, le=100.0)
    """displacement smoothness, pixels"""
    blur_p: Frac = 0.0
    """probability of a Gaussian blur"""
    blur_sigma: Annotated[FloatPair, _pair(0.05, 10.0)] = (0.3, 1.2)
    brightness_contrast_p: Frac = 0.2
    brightness: Frac = 0.1
    """max brightness change (fraction)"""
    contrast: Frac = 0.1
    """max contrast change (fraction)"""
    hed_p: Frac = 0.5
    """probability of stain jitter in HED space"""
    hed_sigma: Frac = 0.05
    """H, E, D scaled by U(1-s, 1+s)"""
    hed_bias: Frac = 0.02
    """H, E, D shifted by U(-b, b), OD units"""


class TrainConfig(Section):
    """Training of the distance-map regressor (original: Adam 7e-4, L2 7e-4, MSE, batch 2)."""

    epochs: Int = Field(3, ge=1, le=100_000)
    batch_size: Int = Field(2, ge=1, le=4096)
    samples_per_epoch: Count = 0
    """crops per epoch; 0 = one per training tile"""
    lr: Float = Field(7e-4, ge=0.0, le=10.0)
    weight_decay: Frac = 7e-4
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """adam = the original's"""
    scheduler: Literal["none", "cosine", "step"] = "none"
    """none = the original's"""
    loss: Literal["mse", "mse_bce"] = "mse"
    """mse on the 0..255 distance map (original); mse_bce adds a foreground BCE"""
    fg_loss_weight: Float = Field(1.0, ge=0.0)
    """weight of the foreground term of mse_bce"""
    input_norm: InputNorm = "dataset"
    """network input: dataset = per-channel mean/std of the training tiles (kseg's fix of the
    original's mean image); percentile = each crop / inference window scaled by its own
    1st-99.8th percentiles per channel (stardist, cellpose). Saved in preprocess.json"""
    select_metric: Literal["aji", "pq", "object_f1", "pixel_f1", "val_loss"] = "aji"
    """validation score that picks the best epoch (after post-processing)"""
    checkpoint: Literal["best", "last"] = "best"
    """weights the model folder keeps: best = the epoch with the best select_metric; last = the
    final epoch's (the end of the schedule: more robust on unseen patients than a pick by a few
    validation tiles, docs/results.md). Post-processing is fitted on validation either way"""
    ema_decay: Float = Field(0.0, ge=0.0, le=0.9999)
    """exponential moving average of the weights after every step (BatchNorm statistics copied);
    validation, selection and the saved model use the average; 0 = off (the original's)"""
    swa_epochs: Int = Field(0, ge=0, le=100_000)
    """stochastic weight averaging (Izmailov et al. 2018, torch.optim.swa_utils): the last N
    epochs run at the constant learning rate ``swa_lr``, the model is the equal average of the
    weights after each of their steps, and its BatchNorm statistics are recomputed on one epoch
    of training crops before the final validation. The scheduler runs over the epochs before
    them (cosine down to ``swa_lr``). Needs ``checkpoint: last``; 0 = off (the original's)"""
    swa_lr: Float = Field(5e-4, gt=0.0, le=10.0)
    """learning rate of the averaged epochs"""
    early_stopping_patience: Count = 0
    """epochs without improvement; 0 = off"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = CUDA when present; also used by evaluate and register (re-scoring)"""
    amp: Bool = True
    """automatic mixed precision (CUDA only)"""
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    """AMP precision: float16 (with a GradScaler) or bfloat16 (no scaler)"""
    channels_last: Bool = True
    """channels_last memory format (CUDA only)"""
    val_every: Int = Field(1, ge=1, le=100_000)
    """validate after every N-th epoch and after the last one (1 = every epoch). Training is the
    same either way; checkpoint best and early stopping then see the validated epochs only"""
    epoch_val_tta: Bool = True
    """the validation after each epoch uses model.infer_tta and infer_scales; false = without
    test-time augmentation (4x cheaper with flips; best-epoch selection then ranks epochs without
    it). The post-processing fit after training always uses them, as inference does"""
    cpu_amp: Bool = False
    """CPU: the forward pass under bfloat16 autocast (weights, loss and optimizer stay float32).
    About 2x faster steps on CPUs with native bfloat16 (AVX512-BF16, AMX); emulated, so slower,
    on others (a warning says so). Inference stays float32"""
    cpu_channels_last: Bool = False
    """CPU: channels_last memory format for the network and its inputs (oneDNN's fast layout)"""
    threads: Int = Field(0, ge=0, le=512)
    """torch CPU threads; 0 = torch's default"""
    recompute_levels: Int = Field(0, ge=0, le=4)
    """kidney_segnet: recompute the blocks of the N finest resolution levels in backward instead
    of storing their activations (less memory, about 2x step time; same weights)"""
    workers: Int = Field(0, ge=0, le=256)
    """DataLoader worker processes; 0 = load in the training process (the CPU default); about 8
    per GPU keeps one busy. Batches do not depend on it"""
    deterministic: Bool = True
    """deterministic algorithms (cudnn autotune off, CUBLAS_WORKSPACE_CONFIG on CUDA); false lets
    cuDNN pick the fastest kernels"""
    check_every: Count = 0
    """steps between host-side NaN/inf checks of the loss (one GPU sync each; always at epoch
    end); 0 = every step on CPU, every 50 on CUDA"""
    infer_batch_size: Int = Field(4, ge=1, le=4096)
    """windows per forward pass in validation, evaluate and register"""
    dist_timeout_min: Float = Field(60.0, ge=1.0, le=10_080.0)
    """DDP collective timeout (minutes): the other ranks wait this long for rank 0's validation
    and post-processing fit"""
    checkpoint_dir: PathStr = ".checkpoints"
    """resumable checkpoints, one folder per config"""
    out_dir: PathStr = "models/kseg"
    """the model folder evaluate/register/predict use"""
    experiment: Str = "kseg"
    """MLflow experiment name"""
    val_overlays: Int = Field(2, ge=0, le=64)
    """validation overlay images logged per epoch"""

    @model_validator(mode="after")
    def check_rules(self) -> Self:
        """Early stopping waits for a better epoch, which ``checkpoint: last`` never keeps."""
        if self.early_stopping_patience and self.checkpoint == "last":
            raise ValueError(
                f"early_stopping_patience: {self.early_stopping_patience} needs checkpoint: best "
                "(with checkpoint: last the run would stop at an arbitrary epoch); set it to 0"
            )
        if self.swa_epochs:
            if self.swa_epochs >= self.epochs:
                raise ValueError(
                    f"swa_epochs: {self.swa_epochs} must be fewer than epochs ({self.epochs}): "
                    "the averaged epochs follow the schedule's"
                )
            if self.checkpoint != "last":
                raise ValueError(
                    f"swa_epochs: {self.swa_epochs} needs checkpoint: last (the model is the "
                    "average of the last epochs, not one epoch's weights)"
                )
            if self.ema_decay:
                raise ValueError(
                    f"swa_epochs: {self.swa_epochs} and ema_decay: {self.ema_decay} are two "
                    "weight averages; set one of them to 0"
                )
        return self


_ALIAS = r"(?!latest$|[vV]\d+$)[A-Za-z0-9_-]{1,255}"


class RegisterConfig(Section):
    """MLflow Model Registry: register every evaluated model, promote it only if it is better."""

    model_name: Str = "kseg"
    """registered model name"""
    metric: Literal["aji", "pq", "dq", "sq", "object_f1", "pixel_f1", "pixel_iou", "dice"] = "aji"
    """test metric (metrics/eval.json) that decides; all are higher-is-better"""
    min_delta: Frac = 0.0
    """the candidate must beat the champion by more than this"""
    alias: Str = "champion"
    """alias of the best model (models:/<name>@<alias>)"""
    challenger_alias: Str | None = "challenger"
    """alias set on a version that lost the gate; null = none"""
    on_split_mismatch: Literal["reevaluate", "refuse"] = "reevaluate"
    """champion scored on another test split: score it again here, or stop with an error"""

    @model_validator(mode="after")
    def check_rules(self) -> Self:
        """A model name, alias names MLflow accepts, and two different aliases."""
        import re

        if not self.model_name.strip() or any(c in self.model_name for c in "/@'"):
            raise ValueError(f"model_name: {self.model_name!r} must be non-empty, without / @ '")
        for key in ("alias", "challenger_alias"):
            if (name := getattr(self, key)) is not None and not re.fullmatch(_ALIAS, name):
                raise ValueError(
                    f"{key}: {name!r} is not a valid MLflow alias (letters, digits, _ and -; "
                    "not 'latest' or v<number>)"
                )
        if self.alias == self.challenger_alias:
            raise ValueError(f"alias and challenger_alias are both {self.alias!r}")
        return self


class PostprocessConfig(Section):
    """Maps -> instances: DIST dynamic watershed (``dist`` head) or marker watershed (``fg_dist``).

    With ``fit: true`` the train stage chooses the thresholds of the model's head on the validation
    patients (never the test ones) and writes them to ``postprocess.json`` in the model folder;
    evaluate, predict and serving then use those. The values here are the starting point and what
    is used with ``fit: false`` (h 7 / threshold 28 = the original's test settings).
    """

    h: Int = Field(7, ge=1, le=255)
    """dist head: h-maxima depth on the 0..255 scale"""
    foreground_threshold: Int = Field(28, ge=0, le=255)
    """dist head: 0..255 scale; below is background"""
    watershed_line: Bool = True
    """dist head: clear the pixels where two nuclei touch"""
    fg_threshold: Frac = 0.5
    """fg_dist head: foreground probability of a nucleus pixel"""
    marker_threshold: Frac = 0.5
    """fg_dist head: normalised distance of a nucleus core (marker)"""
    marker_h: Frac = 0.0
    """fg_dist head: markers are maxima of this dynamic (0..1); 0 = threshold components"""
    min_size: Int = Field(0, ge=0, le=1_000_000)
    """instances below this many pixels are dropped"""
    fit: Bool = True
    """choose the thresholds on the validation patients after training (false: use these)"""


# The sections `validate` and `register` share their names with BaseModel class attributes.
warnings.filterwarnings("ignore", 'Field name "(validate|register)" in "Params"', UserWarning)


class Params(Section):
    """All of ``params.yaml``."""

    seed: Count = 42
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    split: SplitConfig = SplitConfig()
    validate: ValidateConfig = ValidateConfig()  # type: ignore[assignment]  # a classmethod too
    stain: StainConfig = StainConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    register: RegisterConfig = RegisterConfig()
    postprocess: PostprocessConfig = PostprocessConfig()


# --------------------------------------------------------------------------------------------------
# Error messages, loading
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (types.UnionType, Union):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return "a list of " + ", ".join(_type_name(a) for a in args if a is not Ellipsis)
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _setting(loc: tuple[Any, ...]) -> tuple[Any, list[Any]]:
    """The type and the constraints of the setting at ``loc`` (a pydantic error location)."""
    tp: Any = Params
    meta: list[Any] = []
    for part in loc:
        if isinstance(part, str):
            info = tp.model_fields[part]
            tp, meta = info.annotation, info.metadata
        else:  # an item of a tuple
            args = get_args(tp)
            tp = args[0] if args[-1] is Ellipsis else args[part]
            tp, *meta = get_args(tp) if get_origin(tp) is Annotated else (tp,)
    return tp, [m for x in meta for m in (x.metadata if isinstance(x, FieldInfo) else [x])]


def _message(err: Any) -> str:
    """One pydantic error as ``key: value and what is allowed``."""
    loc, kind, value = tuple(err["loc"]), err["type"], err["input"]
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if kind == "extra_forbidden":
        parent = key.rpartition(".")[0]
        names = ", ".join(sorted(_setting(loc[:-1])[0].model_fields))
        return f"unknown key {key}; allowed keys{' in ' + parent if parent else ''}: {names}"
    if kind == "value_error":
        return f"{key or 'params'}: {err['ctx']['error']}"
    if kind == "missing" or (kind == "too_long" and loc):  # a tuple of the wrong length
        key, loc = (key.rpartition("[")[0], loc[:-1]) if kind == "missing" else (key, loc)
        tp = _setting(loc)[0]
        return f"{key}: expected {len(get_args(tp))} values ({_type_name(tp)}), got {value!r}"
    tp, meta = _setting(loc)
    if kind in ("greater_than_equal", "less_than_equal"):
        lo = next((m.ge for m in meta if hasattr(m, "ge")), None)
        hi = next((m.le for m in meta if hasattr(m, "le")), None)
        shown = float(value) if tp is float else value  # as loaded: 2 -> 2.0
        return f"{key}: {shown!r} is out of range; allowed {_allowed(lo, hi)}"
    if kind == "finite_number":
        return f"{key}: {value!r} is not a finite number"
    if kind in ("model_type", "model_attributes_type"):
        return f"{key}: expected a mapping of settings, got {value!r}"
    if get_origin(tp) is Literal:
        return f"{key}: {value!r} is not allowed; expected {_type_name(tp)}"
    if get_origin(tp) in (types.UnionType, Union):
        return f"{key}: {value!r} is not {_type_name(tp)}"
    return f"{key}: expected {_EXPECTED.get(tp) or _type_name(tp)}, got {value!r}"


def config_error(err: ValidationError, prefix: tuple[str, ...] = ()) -> ConfigError:
    """The first problem of ``err`` as a :class:`ConfigError` (unknown keys first).

    Args:
        err: From validating ``params.yaml`` or, with ``prefix``, one of its sections.
        prefix: Where the validated model sits in :class:`Params`, e.g. ``("model",)``.
    """
    errors = [{**e, "loc": (*prefix, *e["loc"])} for e in err.errors()]
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    first = min(extra, key=lambda e: (len(e["loc"]), e["loc"])) if extra else errors[0]
    try:
        return ConfigError(_message(first))
    except (KeyError, IndexError, AttributeError):  # a shape _message does not know: pydantic's
        key = ".".join(str(p) for p in first["loc"]) or "params"
        return ConfigError(f"{key}: {first['msg']}, got {first['input']!r}")


def params_from_dict(raw: dict[str, Any] | None) -> Params:
    """Builds :class:`Params` from a parsed ``params.yaml`` mapping (missing keys take defaults).

    Raises:
        ConfigError: for an unknown key, a wrong type or an out-of-range value.
    """
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"params: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise config_error(err) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if (key := self.construct_object(key_node)) in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice (first line {seen[key]}); YAML would silently "
                    "keep only the last one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


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
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # no objects
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err}); save it as UTF-8") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the parameters file ({err})") from err
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
        raise ConfigError(f"{path}: {err}") from None


def setting_type(section: type[BaseModel], name: str) -> Any:
    """The type of one setting with its constraints and help, e.g. for a Prefect flow parameter."""
    info = section.model_fields[name]
    return Annotated[(info.annotation, *info.metadata, Field(description=info.description))]


def to_dict(obj: BaseModel) -> dict[str, Any]:
    """Plain-JSON view of a config object (tuples become lists)."""
    return obj.model_dump(mode="json")


def flatten(obj: BaseModel, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}`` view of a config, for experiment trackers.

    URLs lose their credentials and query strings (:func:`kseg.safety.redact`).
    """
    from kseg.safety import redact_tree

    return flatten_dict(redact_tree(to_dict(obj)), prefix)


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


def save_config(obj: BaseModel, path: str | Path) -> Path:
    """Writes a config object as JSON next to the artifact that depends on it (atomically).

    URLs lose their credentials and query strings (:func:`kseg.safety.redact`).
    """
    from kseg.fsutil import atomic_write_text
    from kseg.safety import redact_tree

    text = json.dumps(redact_tree(to_dict(obj)), indent=2, sort_keys=True)
    return atomic_write_text(Path(path), text + "\n")
