"""Tiled inference: a distance map for an image of any size from a network built for one tile size.

The image is covered by overlapping windows of the model's tile size; window predictions are
blended with a smooth weight that is highest in the window centre, so there are no seams and a
nucleus cut by one window's border is predicted whole by its neighbour. Post-processing then runs on
the blended map of the whole image, so a nucleus on a window border comes out as one instance.
Memory for the network is bounded by ``batch_size`` windows, whatever the image size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from numpy.typing import NDArray

from kseg.config import InputNorm
from kseg.fsutil import atomic_write_text

PREPROCESS_FILE = "preprocess.json"


INPUT_NORMS: tuple[str, ...] = get_args(InputNorm)


@dataclass(frozen=True)
class Preprocess:
    """Input normalization of the network, saved in the model folder as ``preprocess.json``.

    ``mode="dataset"``: per-channel ``(x - mean) / std`` with the mean and std of the
    (stain-normalized) training tiles on the 0..255 scale. The original subtracts a per-pixel BGR
    mean image from RGB input (a channel-order bug); kseg standardizes per channel instead, which
    works for any tile size. ``mode="percentile"``: every network input (a training crop, an
    inference window) is scaled by its own per-channel percentiles, ``low -> 0`` and ``high -> 1``
    (stardist's and cellpose's default), so a paler or darker stain reaches the network at the same
    contrast; ``mean``/``std`` are then only recorded.
    """

    mean: tuple[float, float, float] = (128.0, 128.0, 128.0)
    std: tuple[float, float, float] = (64.0, 64.0, 64.0)
    mode: InputNorm = "dataset"
    percentiles: tuple[float, float] = (1.0, 99.8)

    def __post_init__(self) -> None:
        if self.mode not in INPUT_NORMS:
            raise ValueError(f"input normalization {self.mode!r}; expected one of {INPUT_NORMS}")
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles {self.percentiles!r}; expected 0 <= low < high <= 100")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float on the 0..255 scale -> the network's input (same shape)."""
        if self.mode == "dataset":
            mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            return (x - mean) / std
        flat = x.flatten(2)  # (B, 3, H * W)
        # torch.quantile refuses inputs above 2**24 elements: large windows are subsampled on a
        # fixed stride (deterministic; 2**18 pixels pin the percentiles to well under a grey level).
        flat = flat[..., :: max(1, flat.shape[-1] >> 18)]
        q = torch.tensor(self.percentiles, device=x.device, dtype=flat.dtype) / 100.0
        low, high = torch.quantile(flat, q, dim=-1, keepdim=True).unsqueeze(-1)  # (B, 3, 1, 1)
        # A flat input (blank glass) would divide by ~0: one grey level is the smallest range.
        return (x - low) / (high - low).clamp_min(1.0)

    def to_tensor(self, images: NDArray[np.uint8]) -> torch.Tensor:
        """``(B, H, W, 3)`` or ``(H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float32 normalized."""
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
        return self.normalize(x)

    def save(self, folder: Path) -> Path:
        """Writes ``preprocess.json`` into ``folder``."""
        raw = asdict(self)
        if self.mode == "dataset":  # the file of every model made before input_norm existed
            del raw["mode"], raw["percentiles"]
        return atomic_write_text(Path(folder) / PREPROCESS_FILE, json.dumps(raw) + "\n")

    @classmethod
    def load(cls, folder: Path) -> Preprocess:
        """Reads ``preprocess.json`` from a model folder."""
        path = Path(folder) / PREPROCESS_FILE
        try:
            raw = json.loads(path.read_text())
            mean = tuple(float(v) for v in raw["mean"])
            std = tuple(float(v) for v in raw["std"])
        except (OSError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a kseg preprocess file ({err})") from err
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(
                f"{path}: mean and std need 3 values (R, G, B), got {len(mean)} and {len(std)}"
            )
        if not all(np.isfinite(mean)) or not all(np.isfinite(std)) or min(std) <= 0:
            raise ValueError(f"{path}: mean must be finite and std finite and positive")
        try:
            percentiles = tuple(float(v) for v in raw.get("percentiles", cls.percentiles))
            return cls(mean, std, str(raw.get("mode", cls.mode)), percentiles)  # type: ignore[arg-type]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def fit(cls, images: list[NDArray[np.uint8]], mode: InputNorm = "dataset") -> Preprocess:
        """Per-channel mean and std over all pixels of ``images`` (each ``(H, W, 3)`` uint8).

        Args:
            images: The training tiles.
            mode: ``dataset`` or ``percentile`` (see the class).
        """
        total = np.zeros(3)
        total_sq = np.zeros(3)
        count = 0
        for img in images:
            pix = img.reshape(-1, 3).astype(np.float64)
            total += pix.sum(0)
            total_sq += (pix**2).sum(0)
            count += len(pix)
        mean = total / max(count, 1)
        std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 1.0))
        return cls(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), mode=mode)


def window_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of size ``tile`` covering ``[0, length)`` with >= ``overlap``.

    The last window is aligned with the end, so every window lies inside the (padded) image.
    """
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_ramp(tile: int, at_start: bool = False, at_end: bool = False) -> NDArray[np.float32]:
    """1-D Hann-like weight of a window, 1 in the centre and near 0 at its edges.

    A window edge that lies on the image border has no neighbour to hand over to, so the ramp is
    flat (1) on that side: pixels there are trusted as much as the window's centre.
    """
    ramp = np.sin(np.pi * (np.arange(tile) + 0.5) / tile) ** 2
    half = tile // 2
    if at_start:
        ramp[:half] = 1.0
    if at_end:
        ramp[half:] = 1.0
    return np.maximum(ramp, 1e-3).astype(np.float32)


def blend_weight(tile: int) -> NDArray[np.float32]:
    """``(tile, tile)`` weight of an interior window (see :func:`blend_ramp`)."""
    ramp = blend_ramp(tile)
    return np.outer(ramp, ramp)


def _window_weights(tile: int, device: torch.device) -> dict[tuple[bool, ...], torch.Tensor]:
    """Blend weights on ``device``, keyed by which image borders a window touches.

    ``(top, bottom, left, right)`` -> ``(tile, tile)`` float32, the outer product of the two
    :func:`blend_ramp` s (the same float32 values as ``np.outer``). At most 16 kinds exist, so each
    is built once per image instead of once per window.
    """
    out = {}
    for top in (False, True):
        for bottom in (False, True):
            for left in (False, True):
                for right in (False, True):
                    ry = torch.from_numpy(blend_ramp(tile, top, bottom))
                    rx = torch.from_numpy(blend_ramp(tile, left, right))
                    out[top, bottom, left, right] = torch.outer(ry, rx).to(device)
    return out


def _standardize(preprocess: Preprocess, crops: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 on any device -> ``(B, 3, H, W)`` float32, as ``to_tensor``."""
    return preprocess.normalize(crops.permute(0, 3, 1, 2).float())


def _windows(h: int, w: int, tile: int, overlap: int) -> Iterator[tuple[int, int]]:
    for y in window_starts(h, tile, overlap):
        for x in window_starts(w, tile, overlap):
            yield y, x


def output_to_maps(out: torch.Tensor, head: str) -> torch.Tensor:
    """Network output -> the maps post-processing reads, ``(B, C, h, w)``.

    ``dist``: the distance map as is (already >= 0). ``fg_dist``: sigmoid of both logits, i.e. the
    foreground probability and the normalised distance, both in [0, 1] (blending probabilities, not
    logits, keeps a window that is sure of itself from being outvoted by a border window).
    """
    return torch.sigmoid(out) if head == "fg_dist" else out


def model_head(model: torch.nn.Module) -> str:
    """The head of a kseg network (``dist`` for a model without a config, e.g. a test stand-in)."""
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "head", "dist")


@torch.inference_mode()
def predict_maps(
    model: torch.nn.Module,
    image: NDArray[np.uint8],
    preprocess: Preprocess,
    tile: int,
    overlap: int | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    head: str | None = None,
    dtype: torch.dtype | None = None,
    tta: str = "none",
    input_scale: float = 1.0,
    scales: Sequence[float] = (1.0,),
) -> NDArray[np.float32]:
    """Predicted maps of an RGB image of any size, ``(C, H, W)`` float32.

    The image goes to ``device`` once (as uint8); windows are cut, standardized, run and blended
    there, and only the blended maps come back, so a GPU does not wait for the host per batch.

    Args:
        model: Network in eval mode mapping ``(B, 3, tile, tile)`` to ``(B, C, tile, tile)``.
        image: ``(H, W, 3)`` uint8 RGB (already stain-normalized if the model expects it).
        preprocess: Input standardization of the model.
        tile: Window size (the model's tile size).
        overlap: Overlap of neighbouring windows in pixels (default: a quarter tile).
        batch_size: Windows per forward pass; bounds the network's memory.
        device: Where the network runs (and the blending).
        head: ``dist`` or ``fg_dist`` (default: the model's own, see :func:`model_head`).
        dtype: ``torch.float16`` / ``torch.bfloat16`` runs the network under autocast; None
            (default) in float32. Blending is float32 either way.
        tta: Test-time augmentation: ``none``; ``flips`` (the mean of the maps of the window
            and of its horizontal, vertical and double flips, each flipped back; 4x the work);
            or ``dihedral`` (the flips and the flips of the transposed window; 8x the work).
        input_scale: The network's resolution relative to the image's (``model.input_scale``):
            the image is resampled by it before tiling and the maps are resampled back to
            ``(H, W)`` (:mod:`kseg.resample`); ``tile`` and ``overlap`` are in network pixels.
        scales: Multi-scale test-time augmentation (``model.infer_scales``): the maps of the
            image run at ``input_scale * factor`` for each factor (each with ``tta``), resampled
            back to ``(H, W)`` and averaged. ``(1.0,)`` = one scale.

    Returns:
        ``(C, H, W)`` float32 blended maps: the distance map (``dist``), or the foreground
        probability and the normalised distance (``fg_dist``).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if tuple(scales) != (1.0,):
        if not scales:
            raise ValueError("scales: need one or more factors")
        total = sum(
            predict_maps(
                model,
                image,
                preprocess,
                tile,
                overlap,
                batch_size,
                device,
                head,
                dtype,
                tta,
                input_scale * factor,
            )
            for factor in scales
        )
        return (total / len(scales)).astype(np.float32)
    if input_scale != 1.0:
        from kseg.resample import resize_image, resize_maps

        small = resize_image(image, input_scale)
        maps = predict_maps(
            model, small, preprocess, tile, overlap, batch_size, device, head, dtype, tta
        )
        return resize_maps(maps, image.shape[0], image.shape[1])
    head = model_head(model) if head is None else head
    overlap = tile // 4 if overlap is None else overlap
    h, w = image.shape[:2]
    # Images smaller than a tile are padded by reflection (constant padding looks like glass).
    ph, pw = max(0, tile - h), max(0, tile - w)
    mode = "reflect" if ph < h and pw < w else "symmetric"
    padded = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode) if ph or pw else image
    hh, ww = padded.shape[:2]
    device = torch.device(device)
    # uint8, sent once (a copy: the image may be a read-only array)
    pixels = torch.from_numpy(np.array(padded, dtype=np.uint8, order="C")).to(device)
    weights = _window_weights(tile, device)
    acc: torch.Tensor | None = None
    weight_sum = torch.zeros((hh, ww), dtype=torch.float32, device=device)
    positions = list(_windows(hh, ww, tile, overlap))
    for i in range(0, len(positions), max(1, batch_size)):
        chunk = positions[i : i + max(1, batch_size)]
        crops = torch.stack([pixels[y : y + tile, x : x + tile] for y, x in chunk])
        x_in = _standardize(preprocess, crops)
        amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        with amp:
            out = _maps_with_tta(model, x_in, head, tta)
        out = out.float()  # (b, C, tile, tile)
        if acc is None:
            acc = torch.zeros((out.shape[1], hh, ww), dtype=torch.float32, device=device)
        for (y, x), pred in zip(chunk, out, strict=True):
            weight = weights[y == 0, y + tile >= hh, x == 0, x + tile >= ww]
            acc[:, y : y + tile, x : x + tile] += pred * weight
            weight_sum[y : y + tile, x : x + tile] += weight
    assert acc is not None  # at least one window
    return (acc / weight_sum)[:, :h, :w].cpu().numpy()


#: Each test-time augmentation view as (quarter turns in the H-W plane, flipped dims), applied in
#: that order (inputs are B x C x H x W; windows are square, so a quarter turn keeps their shape).
TTA_VIEWS: dict[str, tuple[tuple[int, tuple[int, ...]], ...]] = {
    "none": ((0, ()),),
    "flips": ((0, ()), (0, (3,)), (0, (2,)), (0, (2, 3))),
    # the 8 symmetries of the square: the 4 flips and the 4 flips of the transpose
    "dihedral": tuple((k, dims) for k in (0, 1) for dims in ((), (3,), (2,), (2, 3))),
}


def _maps_with_tta(model: torch.nn.Module, x: torch.Tensor, head: str, tta: str) -> torch.Tensor:
    """Mean of the maps of every TTA view of ``x``, each mapped back to ``x``'s frame."""
    if tta not in TTA_VIEWS:
        raise ValueError(f"model.infer_tta: unknown {tta!r}; expected one of {list(TTA_VIEWS)}")
    total: torch.Tensor | None = None
    for turns, dims in TTA_VIEWS[tta]:
        view = torch.rot90(x, turns, (2, 3)) if turns else x
        view = view.flip(dims) if dims else view
        maps = output_to_maps(model(view), head)
        maps = maps.flip(dims) if dims else maps  # undo in reverse order
        maps = torch.rot90(maps, -turns, (2, 3)) if turns else maps
        total = maps if total is None else total.add_(maps)
    assert total is not None
    return total / len(TTA_VIEWS[tta])


def predict_distance(
    model: torch.nn.Module,
    image: NDArray[np.uint8],
    preprocess: Preprocess,
    tile: int,
    overlap: int | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> NDArray[np.float32]:
    """First channel of :func:`predict_maps` as ``(H, W)``: the distance map of a ``dist`` model."""
    return predict_maps(model, image, preprocess, tile, overlap, batch_size, device)[0]
