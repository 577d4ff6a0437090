"""Stain normalization of H&E tiles: ``none``, ``reinhard`` and ``macenko``, with guards.

Slides from different labs and scanners differ in stain. A normalizer is fitted on the training
split only (one reference tile, or pixels pooled from every training tile) and saved as a small
JSON file (``stain.json``) that travels into the model folder, so inference normalizes the way
training did.

- ``reinhard`` (Reinhard et al. 2001): per-channel mean and standard deviation in CIE L*a*b* are
  matched to the reference's.
- ``macenko`` (Macenko et al., ISBI 2009): the two stain optical-density (OD) vectors of each tile
  are found as the extreme angles of its stained pixels in the plane of the two main eigenvectors;
  the tile's stain concentrations are rescaled to the reference's 99th percentiles and re-coloured
  with the reference's stain vectors.
- ``vahadane`` (sparse NMF) is not offered: its implementations are staintools (last release
  2019, SPAMS dictionary learning) and tiatoolbox (which pulls in torchvision, excluded here);
  neither is a small, well-kept dependency kseg can vouch for (see docs/stain.md).

The numerical conventions are torchstain's numpy backend (``Io = 240``, ``alpha = 1``,
``beta = 0.15``, ``OD = -ln((I + 1) / Io)``); with ``stained_pixels: all_channels`` (torchstain's
pixel rule) the tests check that the output matches torchstain within one grey level. The default,
``any_channel``, keeps pale eosin-only stroma in the Macenko statistics (see ``macenko_matrix``).
kseg computes the same quantities itself rather than calling torchstain, because torchstain keeps
the per-tile stain matrix private (name-mangled), so the guards below could not see it, fits on one
image only, divides by zero on blank tiles (torchstain#54) and truncates instead of rounding. Tiles
a method cannot handle (glass, tissue-poor, a single stain, degenerate eigenvectors, non-finite
numbers) pass through unchanged with a :class:`StainWarning`; they never crash a stage or produce
NaN.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from kseg.config import StainConfig

FORMAT = "kseg-stain"
VERSION = 1
METHODS = ("none", "reinhard", "macenko")
#: Fewest stained pixels (OD >= beta in every channel) Macenko estimates a stain matrix from.
MIN_STAINED_PIXELS = 100
#: Relative size of the second eigenvalue below which the stain plane is undetermined.
MIN_EIGEN_RATIO = 1e-6
#: Reinhard: a L*a*b* channel flatter than this (std) cannot be rescaled.
MIN_LAB_STD = 1e-2


class StainWarning(UserWarning):
    """A tile was passed through unchanged because the method cannot normalize it."""


class Skip(Exception):
    """Raised inside an estimator when a tile must pass through; the message says why."""


# --------------------------------------------------------------------------------------------------
# Optical density and the Macenko stain matrix
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def od_lut(io: float) -> NDArray[np.float32]:
    """``(256,)`` float32 lookup table: OD of each grey level, ``-ln((I + 1) / Io)``."""
    return (-np.log((np.arange(256, dtype=np.float64) + 1.0) / io)).astype(np.float32)


def _check_rgb(rgb: NDArray[Any]) -> NDArray[np.uint8]:
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"stain normalization expects an (H, W, 3) uint8 RGB image, got shape {arr.shape} "
            f"dtype {arr.dtype}"
        )
    return arr


def optical_density(rgb: NDArray[np.uint8], io: float = 240.0) -> NDArray[np.float32]:
    """``(3, H*W)`` float32 optical densities, channel-planar (fast per-channel arithmetic)."""
    return od_lut(io)[np.moveaxis(_check_rgb(rgb), -1, 0)].reshape(3, -1)


def _lincomb(w: NDArray[np.floating], x: NDArray[np.float32]) -> NDArray[np.float32]:
    """``w.T @ x`` for ``w`` (J, K) and channel-planar ``x`` (J, N), as K*J scaled adds.

    NumPy's matmul with an inner dimension of 2 or 3 is several times slower than this.
    """
    out = np.empty((w.shape[1], x.shape[1]), np.float32)
    for k in range(w.shape[1]):
        acc = x[0] * np.float32(w[0, k])
        for j in range(1, w.shape[0]):
            acc += x[j] * np.float32(w[j, k])
        out[k] = acc
    return out


def tissue_fraction(rgb: NDArray[np.uint8], beta: float = 0.15, io: float = 240.0) -> float:
    """Fraction of pixels that are not glass: OD >= ``beta`` in at least one channel."""
    od = optical_density(rgb, io)
    return float((od.max(axis=0) >= beta).mean()) if od.size else 0.0


def _angle_deg(u: NDArray[np.floating], v: NDArray[np.floating]) -> float:
    cos = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-12))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def macenko_matrix(
    od: NDArray[np.float32], alpha: float, beta: float, min_angle: float, any_channel: bool = True
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Stain matrix and concentration scale of one image (Macenko et al. 2009).

    Args:
        od: ``(3, N)`` channel-planar optical densities of all pixels.
        alpha: Percentile (0..50) of the extreme angles taken as the pure stains.
        beta: OD below which a channel counts as transparent.
        min_angle: Smallest angle (degrees) between the hematoxylin and eosin vectors accepted.
        any_channel: A pixel is stained when its OD reaches ``beta`` in any channel (default);
            False is torchstain's rule (all channels), which drops pale eosin-only stroma (red OD
            below beta) and then lets the E vector collapse towards H on eosin-light tiles.

    Returns:
        ``he``: ``(3, 2)`` unit OD vectors, hematoxylin first; ``max_c``: ``(2,)`` 99th
        percentiles of the two concentrations over all pixels.

    Raises:
        Skip: for a tissue-poor tile, degenerate eigenvectors, a single stain or non-finite values.
    """
    over = [od[k] >= beta for k in range(3)]
    mask = (over[0] | over[1] | over[2]) if any_channel else (over[0] & over[1] & over[2])
    stained = od[:, mask]  # (3, M)
    if stained.shape[1] < MIN_STAINED_PIXELS:
        raise Skip(f"tissue-poor: {stained.shape[1]} stained pixels (< {MIN_STAINED_PIXELS})")
    cov = np.cov(stained.astype(np.float64))  # (3, 3)
    if not np.all(np.isfinite(cov)):
        raise Skip("non-finite optical-density covariance")
    evals, evecs = np.linalg.eigh(cov)  # ascending
    if evals[2] <= 0.0 or evals[1] <= MIN_EIGEN_RATIO * evals[2]:
        raise Skip("degenerate eigenvectors: the stained pixels do not span a plane")
    plane = evecs[:, 1:3]  # (3, 2): second and first principal directions
    proj = _lincomb(plane, stained)  # (2, M)
    phi = np.arctan2(proj[1], proj[0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v_min = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_max = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Hematoxylin absorbs more red than eosin: the vector with the larger red OD comes first.
    he = np.stack([v_min, v_max] if v_min[0] > v_max[0] else [v_max, v_min], axis=1)  # (3, 2)
    if np.any(he.sum(axis=0) <= 0.0):
        raise Skip("implausible stain vectors (negative optical density)")
    angle = _angle_deg(he[:, 0], he[:, 1])
    if angle < min_angle:
        raise Skip(f"single stain: H and E vectors {angle:.1f} deg apart (< {min_angle} deg)")
    conc = _lincomb(np.linalg.pinv(he).T, od)  # (2, N), least squares as torchstain
    max_c = np.percentile(conc, 99, axis=1).astype(np.float64)
    if not (np.all(np.isfinite(max_c)) and np.all(max_c > 1e-6)):
        raise Skip(f"no stain signal (99th percentile concentrations {max_c.tolist()})")
    return he, max_c


def _matrix(
    od: NDArray[np.float32], cfg: StainConfig
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    any_channel = cfg.stained_pixels == "any_channel"
    return macenko_matrix(od, cfg.alpha, cfg.beta, cfg.min_stain_angle, any_channel)


def stain_vectors(
    rgb: NDArray[np.uint8], cfg: StainConfig | None = None
) -> NDArray[np.float64] | None:
    """The ``(3, 2)`` Macenko H and E vectors of a tile, or None when they cannot be estimated."""
    cfg = cfg or StainConfig()
    try:
        he, _ = _matrix(optical_density(rgb, cfg.io), cfg)
    except Skip:
        return None
    return he


# --------------------------------------------------------------------------------------------------
# Reinhard in L*a*b* (OpenCV: L in 0..100, a and b in about -127..127, float32)
# --------------------------------------------------------------------------------------------------


def _rgb2lab(rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
    import cv2

    return cv2.cvtColor(rgb.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2Lab)


def _lab2rgb(lab: NDArray[np.float32]) -> NDArray[np.float32]:
    import cv2

    return cv2.cvtColor(lab, cv2.COLOR_Lab2RGB) * np.float32(255)


def lab_stats(rgb: NDArray[np.uint8]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-channel mean and std of an image in L*a*b*, ``(3,)`` each."""
    lab = _rgb2lab(_check_rgb(rgb)).reshape(-1, 3).astype(np.float64)
    return lab.mean(axis=0), lab.std(axis=0)


# --------------------------------------------------------------------------------------------------
# The fitted normalizer
# --------------------------------------------------------------------------------------------------


@dataclass
class StainNormalizer:
    """A fitted stain normalizer; ``transform`` maps an RGB tile to the reference's stain.

    Attributes:
        method: ``none``, ``reinhard`` or ``macenko``.
        params: The fitted reference: Reinhard ``mean``/``std`` (L*a*b*, 3 each); Macenko
            ``stain_matrix`` (3x2, columns H and E) and ``max_concentration`` (2).
        cfg: Guard settings and numerical constants (io, alpha, beta, thresholds).
        info: Provenance (reference, fitted tile ids), saved but not used by ``transform``.
        n_skipped: Tiles passed through unchanged by this object so far.
    """

    method: str
    params: dict[str, Any]
    cfg: StainConfig = field(default_factory=StainConfig)
    info: dict[str, Any] = field(default_factory=dict)
    n_skipped: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"stain method {self.method!r} is not one of {METHODS}")
        if self.method == "macenko":
            he = np.asarray(self.params["stain_matrix"], np.float64)
            max_c = np.asarray(self.params["max_concentration"], np.float64)
            if he.shape != (3, 2) or max_c.shape != (2,) or not np.all(np.isfinite(he)):
                raise ValueError("macenko parameters need stain_matrix 3x2 and max_concentration 2")
            self._he, self._max_c = he, max_c
        elif self.method == "reinhard":
            self._mean = np.asarray(self.params["mean"], np.float64)
            self._std = np.asarray(self.params["std"], np.float64)
            if self._mean.shape != (3,) or self._std.shape != (3,) or np.any(self._std <= 0):
                raise ValueError("reinhard parameters need mean (3) and positive std (3)")

    def transform(self, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Normalizes one ``(H, W, 3)`` uint8 tile; the result has the same shape and dtype.

        A tile the method cannot normalize is returned unchanged (the same array) with a
        :class:`StainWarning` naming the reason.

        Raises:
            ValueError: If ``rgb`` is not an ``(H, W, 3)`` uint8 array.
        """
        rgb = _check_rgb(rgb)
        if self.method == "none" or rgb.size == 0:
            return rgb
        try:
            out = self._macenko(rgb) if self.method == "macenko" else self._reinhard(rgb)
        except Skip as why:
            self.n_skipped += 1
            warnings.warn(
                f"{self.method}: tile passed through unchanged ({why})", StainWarning, stacklevel=2
            )
            return rgb
        return out

    def _tissue_guard(self, od: NDArray[np.float32]) -> None:
        frac = float(
            ((od[0] >= self.cfg.beta) | (od[1] >= self.cfg.beta) | (od[2] >= self.cfg.beta)).mean()
        )
        if frac < self.cfg.min_tissue_fraction:
            raise Skip(f"tissue-poor: {frac:.1%} tissue (< {self.cfg.min_tissue_fraction:.1%})")

    def _macenko(self, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        od = optical_density(rgb, self.cfg.io)  # (3, N)
        self._tissue_guard(od)
        he, max_c = _matrix(od, self.cfg)
        # Concentrations pinv(he) @ od, rescaled so the tile's 99th percentiles match the
        # reference's, re-coloured with the reference vectors: one (3, 3) map of OD.
        mat = self._he @ np.diag(self._max_c / max_c) @ np.linalg.pinv(he)  # (3, 3)
        od_new = _lincomb(mat.T, od)  # (3, N)
        # Io * exp(-OD) gives I + 1 under the OD convention; remove the 1 so the reference
        # maps to itself.
        out = np.float32(self.cfg.io) * np.exp(-od_new) - np.float32(1.0)
        return _to_uint8(out, rgb.shape)

    def _reinhard(self, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        self._tissue_guard(optical_density(rgb, self.cfg.io))
        lab = _rgb2lab(rgb)  # (H, W, 3) float32
        flat = lab.reshape(-1, 3)
        mean, std = flat.mean(axis=0, dtype=np.float64), flat.std(axis=0, dtype=np.float64)
        if np.any(std < MIN_LAB_STD):
            raise Skip(f"flat L*a*b* channel (std {std.round(4).tolist()})")
        scale = (self._std / std).astype(np.float32)
        shift = (self._mean - mean * self._std / std).astype(np.float32)
        return _to_uint8(_lab2rgb(lab * scale + shift), rgb.shape)

    # ---------------------------------------------------------------------------- (de)serialization

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: method, fitted parameters, guard settings, provenance."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "params": self.params,
            "settings": {
                "io": self.cfg.io,
                "alpha": self.cfg.alpha,
                "beta": self.cfg.beta,
                "min_tissue_fraction": self.cfg.min_tissue_fraction,
                "min_stain_angle": self.cfg.min_stain_angle,
                "stained_pixels": self.cfg.stained_pixels,
            },
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainNormalizer:
        """Rebuilds a normalizer from :meth:`to_dict` output.

        Raises:
            ValueError: naming what is missing or wrong.
        """
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a kseg stain file (expected format {FORMAT!r})")
        if d.get("version") != VERSION:
            raise ValueError(f"stain file version {d.get('version')!r}; this kseg reads {VERSION}")
        try:
            cfg = StainConfig(method=d["method"], **d.get("settings", {}))
            return cls(d["method"], dict(d.get("params", {})), cfg, dict(d.get("info", {})))
        except (KeyError, TypeError) as err:
            raise ValueError(f"stain file: missing or unexpected entry {err}") from err

    def save(self, path: str | Path) -> Path:
        """Writes ``stain.json`` atomically."""
        return save_stain(self, path)


def _to_uint8(values: NDArray[np.float32], shape: tuple[int, ...]) -> NDArray[np.uint8]:
    """Rounds to uint8 of ``shape`` (H, W, 3); ``values`` is (H, W, 3) or planar (3, H*W)."""
    if not np.all(np.isfinite(values)):
        raise Skip("non-finite values in the normalized image")
    out = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if out.shape != shape:  # planar (3, N) -> (H, W, 3)
        out = np.ascontiguousarray(np.moveaxis(out.reshape(3, *shape[:2]), 0, -1))
    return out


def save_stain(normalizer: StainNormalizer, path: str | Path) -> Path:
    """Writes a normalizer as JSON (atomically)."""
    from kseg.fsutil import atomic_write_text

    text = json.dumps(normalizer.to_dict(), indent=2, sort_keys=True) + "\n"
    return atomic_write_text(Path(path), text)


def load_stain(path: str | Path) -> StainNormalizer:
    """Reads ``stain.json``.

    Raises:
        ValueError: naming the file when it is unreadable or malformed.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return StainNormalizer.from_dict(raw)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------


def pool_pixels(
    images: Iterable[NDArray[np.uint8]], max_pixels_per_tile: int, seed: int = 0
) -> NDArray[np.uint8]:
    """A seeded random sample of up to ``max_pixels_per_tile`` pixels from each image.

    Returns:
        ``(N, 1, 3)`` uint8, an "image" of the pooled pixels that any single-image fit accepts.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for img in images:
        flat = _check_rgb(img).reshape(-1, 3)
        if len(flat) > max_pixels_per_tile:
            flat = flat[rng.choice(len(flat), max_pixels_per_tile, replace=False)]
        parts.append(flat)
    if not parts:
        raise ValueError("no training tiles to fit the stain normalizer on")
    return np.concatenate(parts)[:, None, :]


def fit_normalizer(
    cfg: StainConfig,
    images: Iterable[NDArray[np.uint8]],
    *,
    tile_ids: Sequence[str] | None = None,
    seed: int = 0,
) -> StainNormalizer:
    """Fits ``cfg.method`` on training tiles.

    Args:
        cfg: The ``stain`` section. ``cfg.reference`` is ``"pooled"`` (pixels sampled from every
            tile) or the id of one training tile.
        images: The training split's ``(H, W, 3)`` uint8 tiles (consumed once).
        tile_ids: Ids matching ``images``; needed when ``cfg.reference`` names a tile.
        seed: Seed of the pooled pixel sample.

    Raises:
        ValueError: if the reference tile is not among ``tile_ids`` or the reference cannot be
            fitted (tissue-poor, single stain...).
    """
    info: dict[str, Any] = {"reference": cfg.reference}
    if cfg.method == "none":
        return StainNormalizer("none", {}, cfg, info)
    if cfg.reference == "pooled":
        ref = pool_pixels(images, cfg.max_pixels_per_tile, seed)
        info["n_fit_tiles"] = len(tile_ids) if tile_ids is not None else None
        info["fit_tiles"] = list(tile_ids) if tile_ids is not None else None
    else:
        ids = list(tile_ids or [])
        if cfg.reference not in ids:
            raise ValueError(
                f"stain.reference: tile {cfg.reference!r} is not in the training split "
                f"({len(ids)} tiles, e.g. {ids[:3]}); use 'pooled' or a training tile id"
            )
        pos = ids.index(cfg.reference)
        ref = next(img for i, img in enumerate(images) if i == pos)
        info["n_fit_tiles"], info["fit_tiles"] = 1, [cfg.reference]
    ref = _check_rgb(ref)
    where = f"stain.reference {cfg.reference!r}"
    if cfg.method == "reinhard":
        mean, std = lab_stats(ref)
        if np.any(std < MIN_LAB_STD):
            raise ValueError(f"{where}: a flat L*a*b* channel; choose a tile with tissue")
        return StainNormalizer("reinhard", {"mean": mean.tolist(), "std": std.tolist()}, cfg, info)
    od = optical_density(ref, cfg.io)
    try:
        he, max_c = _matrix(od, cfg)
    except Skip as why:
        raise ValueError(f"{where}: cannot fit Macenko ({why})") from None
    params = {"stain_matrix": he.tolist(), "max_concentration": max_c.tolist()}
    return StainNormalizer("macenko", params, cfg, info)
