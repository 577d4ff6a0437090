"""Stain normalizers: identity on the reference, guards, torchstain agreement, TNBC spread."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kseg.config import StainConfig
from kseg.data.synthetic import (
    EOSIN,
    HEMATOXYLIN,
    PatientStain,
    draw_instances,
    patient_stain,
    render_tile,
)
from kseg.normalize import stain_spread
from kseg.stain import (
    StainNormalizer,
    StainWarning,
    fit_normalizer,
    load_stain,
    save_stain,
)
from tests.stain_oracle import angular_spread, hed_levels, region_colours, relative_spread

METHODS = ("reinhard", "macenko")


def synthetic_tile(seed: int, size: int = 128, stain: PatientStain | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = draw_instances(rng, size, size // 4, (5.0, 10.0))
    return render_tile(rng, labels, stain or patient_stain(np.random.default_rng(seed + 100)))


def fit_on(method: str, tile: np.ndarray, **kw: object) -> StainNormalizer:
    cfg = StainConfig(method=method, reference="ref", **kw)  # type: ignore[arg-type]
    return fit_normalizer(cfg, [tile], tile_ids=["ref"])


def read_tnbc(tnbc_dir: Path) -> dict[str, tuple[str, np.ndarray]]:
    tiles = {}
    for path in sorted(tnbc_dir.glob("Slide_*/*.png")):
        with Image.open(path) as img:
            tiles[path.stem] = (path.parent.name.split("_")[1], np.asarray(img.convert("RGB")))
    return tiles


def read_tnbc_mask(tnbc_dir: Path, patient: str, tile_id: str) -> np.ndarray:
    """The ground-truth nucleus mask of a TNBC tile (GT_<patient>/<tile>.png, any channel)."""
    with Image.open(tnbc_dir / f"GT_{patient}" / f"{tile_id}.png") as img:
        arr = np.asarray(img)
    return (arr.reshape(arr.shape[0], arr.shape[1], -1) > 0).any(-1)


@pytest.fixture(scope="module")
def tnbc(tnbc_dir: Path) -> dict[str, tuple[str, np.ndarray]]:
    tiles = read_tnbc(tnbc_dir)
    if len(tiles) < 10:
        pytest.skip(f"{tnbc_dir}: expected the 50 TNBC tiles, found {len(tiles)}")
    return tiles


# ------------------------------------------------------------------------------------ identity


@pytest.mark.parametrize("method", METHODS)
def test_reference_tile_normalized_to_itself_is_nearly_unchanged(method: str) -> None:
    tile = synthetic_tile(0)
    out = fit_on(method, tile).transform(tile)
    diff = np.abs(out.astype(int) - tile)
    if method == "reinhard":  # an exact round trip through L*a*b*, up to rounding
        assert diff.max() <= 1
    else:  # Macenko keeps only the two-stain plane of OD: noise off that plane is dropped
        assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 6


@pytest.mark.parametrize("method", METHODS)
def test_reference_identity_on_real_tnbc_tile(method: str, tnbc: dict) -> None:
    _, tile = tnbc["01_1"]
    out = fit_on(method, tile).transform(tile)
    diff = np.abs(out.astype(int) - tile)
    # Measured: reinhard max 1; macenko mean 2.2, p99 7 (the off-plane residual of real H&E).
    limit = (0.01, 1, 1) if method == "reinhard" else (3.0, 10, 40)
    assert diff.mean() < limit[0] and np.percentile(diff, 99) <= limit[1] and diff.max() <= limit[2]


# -------------------------------------------------------------------------------------- guards


def _no_eosin_tile() -> np.ndarray:
    return synthetic_tile(3, stain=PatientStain(HEMATOXYLIN, EOSIN, 1.0, 0.0, 240.0))


GLASS = np.clip(np.random.default_rng(0).normal(238, 3, (64, 80, 3)), 0, 255).astype(np.uint8)
BAD_TILES = {
    "white": np.full((64, 64, 3), 255, np.uint8),
    "black": np.zeros((64, 64, 3), np.uint8),
    "uniform_grey": np.full((64, 64, 3), 128, np.uint8),
    "glass_no_tissue": GLASS,
    "tissue_poor": np.where(np.arange(64)[:, None, None] < 2, 120, GLASS[:, :64]).astype(np.uint8),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(BAD_TILES))
def test_tiles_without_usable_tissue_pass_through_unchanged(method: str, name: str) -> None:
    norm = fit_on(method, synthetic_tile(1))
    tile = BAD_TILES[name].copy()
    with pytest.warns(StainWarning, match="passed through unchanged"):
        out = norm.transform(tile)
    assert out.dtype == np.uint8 and np.array_equal(out, BAD_TILES[name])
    assert norm.n_skipped == 1


def test_macenko_passes_a_tile_without_eosin_through() -> None:
    norm = fit_on("macenko", synthetic_tile(1))
    tile = _no_eosin_tile()
    with pytest.warns(StainWarning, match="single stain"):
        out = norm.transform(tile)
    assert np.array_equal(out, tile)


def test_normal_tiles_raise_no_warning_and_change() -> None:
    for method in METHODS:
        norm = fit_on(method, synthetic_tile(1))
        tile = synthetic_tile(7)
        with warnings.catch_warnings():
            warnings.simplefilter("error", StainWarning)
            out = norm.transform(tile)
        assert np.abs(out.astype(int) - tile).mean() > 2.0  # patients 1 and 7 differ in stain


@pytest.mark.parametrize("method", [*METHODS, "none"])
def test_shape_and_dtype_kept_for_non_square_tiles(method: str) -> None:
    tile = synthetic_tile(2, size=160)[:100, :150]
    norm = fit_normalizer(StainConfig(method=method), [synthetic_tile(1)])
    out = norm.transform(tile)
    assert out.shape == (100, 150, 3) and out.dtype == np.uint8


def test_bad_input_is_a_clear_error() -> None:
    norm = fit_on("macenko", synthetic_tile(1))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB image, got shape \(8, 8\)"):
        norm.transform(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="dtype float32"):
        norm.transform(np.zeros((8, 8, 3), np.float32))


# ------------------------------------------------------------------------------------- fitting


def test_reference_must_be_a_training_tile() -> None:
    cfg = StainConfig(method="macenko", reference="P09_01")
    with pytest.raises(ValueError, match=r"stain.reference: tile 'P09_01' is not in the training"):
        fit_normalizer(cfg, [synthetic_tile(1)], tile_ids=["P01_01"])


def test_blank_reference_cannot_be_fitted() -> None:
    with pytest.raises(ValueError, match=r"cannot fit Macenko .*tissue-poor"):
        fit_on("macenko", BAD_TILES["white"])


def test_pooled_fit_is_seeded_and_uses_every_tile() -> None:
    tiles = [synthetic_tile(s) for s in range(3)]
    cfg = StainConfig(method="macenko", max_pixels_per_tile=4096)
    a = fit_normalizer(cfg, tiles, seed=1).params
    b = fit_normalizer(cfg, iter(tiles), seed=1).params  # any iterable, consumed once
    single = fit_normalizer(cfg, tiles[:1], seed=1).params
    assert a == b and a != single


def test_save_load_round_trip_keeps_the_transform(tmp_path: Path) -> None:
    tile, other = synthetic_tile(1), synthetic_tile(5)
    for method in (*METHODS, "none"):
        norm = fit_normalizer(StainConfig(method=method), [tile], tile_ids=["x"])
        path = save_stain(norm, tmp_path / f"{method}.json")
        assert path.stat().st_size < 2048  # a small file that travels with the model
        back = load_stain(path)
        assert back.method == method and back.to_dict() == norm.to_dict()
        assert np.array_equal(back.transform(other), norm.transform(other))


def test_malformed_stain_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "stain.json"
    path.write_text(
        json.dumps(
            {
                "format": "kseg-stain",
                "version": 1,
                "method": "macenko",
                "params": {"stain_matrix": [[1, 0]], "max_concentration": [1, 1]},
            }
        )
    )
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*stain_matrix 3x2"):
        load_stain(path)
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a kseg stain file"):
        load_stain(path)


# ---------------------------------------------------------------------------- against torchstain


@pytest.mark.parametrize("method", METHODS)
def test_matches_torchstain_numpy_backend(method: str, tnbc: dict) -> None:
    torchstain = pytest.importorskip("torchstain")
    ref, tile = tnbc["01_1"][1], tnbc["05_2"][1]
    lib = (
        torchstain.normalizers.MacenkoNormalizer
        if method == "macenko"
        else torchstain.normalizers.ReinhardNormalizer
    )(backend="numpy")
    lib.fit(ref)
    expected = lib.normalize(tile, stains=False)[0] if method == "macenko" else lib.normalize(tile)
    ours = fit_on(method, ref, stained_pixels="all_channels")  # torchstain's pixel rule
    diff = np.abs(ours.transform(tile).astype(int) - expected)
    # torchstain truncates where kseg rounds (and Reinhard's L*a*b* matrices differ slightly).
    assert np.mean(diff <= 1) > 0.999 and diff.mean() < 0.6


# --------------------------------------------------------------------------------- TNBC spread


def test_normalization_shrinks_per_patient_stain_spread_on_tnbc(tnbc: dict, tnbc_dir: Path) -> None:
    """Fit on 7 of the 11 patients, measure the spread over all of them (held-out ones too).

    Up to 3 tiles per patient keep the test short; benchmarks/stain.py --spread uses all 50. The
    spread is measured twice: with kseg's Macenko estimator (what the stage reports), and without
    it, from the colours of the ground-truth nuclei and of the stroma (tests/stain_oracle.py).
    """
    tnbc = {k: v for k, v in tnbc.items() if int(k.split("_")[1]) <= 3}
    masks = {k: read_tnbc_mask(tnbc_dir, p, k) for k, (p, _) in tnbc.items()}
    patients = sorted({p for p, _ in tnbc.values()})
    train = set(patients[::3]) | set(patients[1::3])
    train_tiles = [img for p, img in tnbc.values() if p in train]
    cfg = StainConfig(method="macenko")

    def spread(images: dict[str, tuple[str, np.ndarray]]) -> dict[str, float]:
        colours: dict[str, list[np.ndarray]] = {}
        levels: dict[str, list[np.ndarray]] = {}
        for k, (p, img) in images.items():
            colours.setdefault(p, []).append(region_colours(img, masks[k]))
            levels.setdefault(p, []).append(hed_levels(img, masks[k]))
        h_deg, e_deg = angular_spread(colours)
        cv = relative_spread(levels)
        mean_levels = np.mean([np.mean(v, axis=0) for v in levels.values()], axis=0)
        return {
            **stain_spread({k: img for k, (_, img) in images.items()},
                           {k: p for k, (p, _) in images.items()}, cfg),
            "nuclei_deg": h_deg, "stroma_deg": e_deg,
            "hed_h_nuclei_cv": cv[0], "hed_e_stroma_cv": cv[2],
            "hed_h_nuclei": mean_levels[0], "hed_h_stroma": mean_levels[1],
        }  # fmt: skip

    before = spread(tnbc)
    results = {"none": before}
    for method in METHODS:
        norm = fit_normalizer(StainConfig(method=method), train_tiles, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StainWarning)
            results[method] = spread({k: (p, norm.transform(img)) for k, (p, img) in tnbc.items()})
    print("per-patient stain spread:", json.dumps(results))
    assert before["n_patients"] == len(patients) and before["h_deg"] > 1.0
    assert before["nuclei_deg"] > 1.0 and before["stroma_deg"] > 1.0
    # Macenko aligns the stain vectors themselves; Reinhard matches L*a*b* moments, which moves
    # eosin towards the reference but not hematoxylin (measured: H 3.6 -> 3.9, E 7.0 -> 5.9 deg).
    assert results["reinhard"]["e_deg"] < before["e_deg"]
    assert results["macenko"]["h_deg"] < 0.5 * before["h_deg"]
    assert results["macenko"]["e_deg"] < 0.5 * before["e_deg"]
    # Independently of kseg's estimator (measured, 3 tiles per patient: nuclei 2.6 -> 1.4 deg,
    # stroma 3.1 -> 1.6 deg; rgb2hed spread over patients H 0.26 -> 0.15, E 0.47 -> 0.24).
    mac = results["macenko"]
    assert mac["nuclei_deg"] < 0.7 * before["nuclei_deg"]
    assert mac["stroma_deg"] < 0.7 * before["stroma_deg"]
    assert mac["hed_h_nuclei_cv"] < 0.75 * before["hed_h_nuclei_cv"]
    assert mac["hed_e_stroma_cv"] < 0.75 * before["hed_e_stroma_cv"]
    # ... and the nuclei are still hematoxylin: far more of it than in the stroma (before: 2.7x).
    assert mac["hed_h_nuclei"] > 2 * mac["hed_h_stroma"]
    # Reinhard evens out the stroma (3.1 -> 0.6 deg, rgb2hed E 0.47 -> 0.08), not the nuclei.
    assert results["reinhard"]["stroma_deg"] < 0.5 * before["stroma_deg"]
    assert results["reinhard"]["hed_e_stroma_cv"] < 0.5 * before["hed_e_stroma_cv"]
