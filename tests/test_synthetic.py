from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from kseg.config import SyntheticConfig
from kseg.data.synthetic import draw_instances, generate

SMALL = SyntheticConfig(
    seed=3, n_patients=3, tiles_per_patient=2, tile_size=128, nuclei_per_tile=(20, 30)
)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(SMALL, a)
    generate(SMALL, b)
    generate(SyntheticConfig(**{**SMALL.__dict__, "seed": 4}), c)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert ha == hb
    images = [k for k in ha if k.startswith("images/")]
    assert len(images) == 6
    assert all(ha[k] != hc[k] for k in images)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    generate(SMALL, out)
    return out


def test_index_and_layout(dataset: Path) -> None:
    with (dataset / "index.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    assert sorted({r["patient"] for r in rows}) == ["P01", "P02", "P03"]
    for row in rows:
        img = np.asarray(Image.open(dataset / row["image"]))
        mask = np.asarray(Image.open(dataset / row["mask"]))
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        assert mask.shape == (128, 128) and mask.dtype == np.uint16


def test_masks_match_what_is_drawn(dataset: Path) -> None:
    touching_pairs = 0
    for path in sorted((dataset / "masks").glob("*.png")):
        mask = np.asarray(Image.open(path)).astype(np.int64)
        ids = np.unique(mask[mask > 0])
        # Labels are exactly 1..N: the count of instances equals the largest label.
        assert ids.tolist() == list(range(1, mask.max() + 1))
        assert 10 <= len(ids) <= 30
        for lab in ids:
            _, n = ndi.label(mask == lab, structure=np.ones((3, 3)))
            assert n == 1, f"{path.name}: label {lab} is {n} pieces"
        # Touching neighbours exist: a pixel of one label next to a pixel of another.
        right = (mask[:, :-1] > 0) & (mask[:, 1:] > 0) & (mask[:, :-1] != mask[:, 1:])
        down = (mask[:-1] > 0) & (mask[1:] > 0) & (mask[:-1] != mask[1:])
        touching_pairs += int(right.sum() + down.sum())
    assert touching_pairs > 0


def test_nuclei_are_dark_and_stain_varies_by_patient(dataset: Path) -> None:
    od_by_patient: dict[str, list[np.ndarray]] = {}
    for path in sorted((dataset / "images").glob("*.png")):
        img = np.asarray(Image.open(path)).astype(float)
        mask = np.asarray(Image.open(dataset / "masks" / path.name)) > 0
        # Hematoxylin absorbs red strongly: nuclei are darker than stroma in the red channel.
        assert img[mask, 0].mean() < img[~mask, 0].mean() - 40
        od = -np.log((img[mask] + 1) / 256).mean(axis=0)
        od_by_patient.setdefault(path.name[:3], []).append(od / np.linalg.norm(od))
    means = np.array([np.mean(v, axis=0) for v in od_by_patient.values()])
    within = max(np.ptp(np.array(v), axis=0).max() for v in od_by_patient.values())
    between = np.ptp(means, axis=0).max()
    assert between > within  # patient stain differences dominate tile-to-tile noise


def test_draw_instances_is_deterministic_and_connected() -> None:
    a = draw_instances(np.random.default_rng(1), 96, 40, (4.0, 9.0))
    b = draw_instances(np.random.default_rng(1), 96, 40, (4.0, 9.0))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint16 and a.max() > 10
