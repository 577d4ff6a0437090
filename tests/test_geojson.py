"""QuPath GeoJSON of `kseg predict`: valid, oriented, pixel-exact polygons (shapely checks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from PIL import Image
from scipy import ndimage as ndi
from shapely.geometry import shape

from kseg.geojson import mask_polygons, ring_mask, rings_mask
from kseg.predict import geojson_features, predict


def _check_feature(geometry: dict, mask: np.ndarray, where: str) -> shapely.Geometry:
    """Asserts one nucleus geometry is valid, oriented and covers exactly ``mask``'s pixels."""
    geom = shape(geometry)
    assert geom.is_valid, f"{where}: {shapely.is_valid_reason(geom)}"
    parts = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
    for poly in parts:
        assert poly.exterior.is_ccw, f"{where}: exterior ring is clockwise"
        assert all(not ring.is_ccw for ring in poly.interiors), f"{where}: hole is ccw"
    assert geom.area == mask.sum(), f"{where}: area {geom.area} != {mask.sum()} pixels"
    # Pixel-exact: the polygon holds the centre of every nucleus pixel and of no other pixel
    # (outside the nucleus' box plus one pixel, its bounds alone say so).
    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert geom.bounds == (x0, y0, x1, y1), f"{where}: bounds {geom.bounds}"
    sl = np.s_[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1]
    box = mask[sl]
    ys, xs = np.mgrid[sl][:, : box.shape[0], : box.shape[1]]
    inside = shapely.contains_xy(geom, xs + 0.5, ys + 0.5)
    np.testing.assert_array_equal(inside, box, err_msg=where)
    return geom


def _check_labels(labels: np.ndarray, features: list[dict], where: str) -> None:
    ids = [int(i) for i in np.unique(labels) if i]
    assert [f["properties"]["kseg_id"] for f in features] == ids
    for feat in features:
        lab = feat["properties"]["kseg_id"]
        _check_feature(feat["geometry"], labels == lab, f"{where} nucleus {lab}")


def test_awkward_shapes_give_valid_exact_polygons() -> None:
    """Corner-touching parts, pockets open through a corner, holes, islands in holes."""
    img = np.zeros((24, 40), np.int32)
    img[1, 1] = 1  # single pixel
    img[1, 3] = img[2, 4] = img[3, 3] = 2  # three pixels touching only at corners
    img[5:10, 1:6] = 3  # ring with a hole holding an island of the same nucleus
    img[6:9, 2:5] = 0
    img[7, 3] = 3
    c = np.array(
        [
            [0, 1, 1, 1, 0],
            [1, 0, 0, 0, 1],  # C whose tips touch diagonally: a pocket open through a corner
            [1, 0, 0, 0, 0],
            [1, 1, 0, 1, 0],
            [0, 1, 1, 0, 0],
        ]
    )
    img[12:17, 1:6][c == 1] = 4
    img[12:16, 8:12] = (np.indices((4, 4)).sum(0) % 2) * 5  # checkerboard
    img[18:23, 8:20] = 6  # rectangle: 4 corners only
    rng = np.random.default_rng(0)
    img[1:11, 20:38][rng.random((10, 18)) < 0.55] = 7  # random speckle, many pockets
    feats = geojson_features(img)
    _check_labels(img, feats, "synthetic")
    rect = feats[[f["properties"]["kseg_id"] for f in feats].index(6)]["geometry"]
    assert rect == {
        "type": "Polygon",
        "coordinates": [[[8, 18], [20, 18], [20, 23], [8, 23], [8, 18]]],
    }
    assert len(mask_polygons(img == 5)) == 8  # 8 checkerboard squares touching at corners
    # nested: square ring > island with a hole > island; each hole belongs to its own part
    nest = np.zeros((13, 13), bool)
    for k, value in enumerate((True, False, True, False, True)):
        nest[1 + k : 12 - k, 1 + k : 12 - k] = value
    polys = mask_polygons(nest)
    assert [len(poly) for poly in polys] == [2, 2, 1]  # outer + hole, middle + hole, centre
    assert [min(poly[1]) for poly in polys[:2]] == [(2, 2), (4, 4)]  # each hole in its own shell


def test_predicted_tnbc_tile_gives_valid_exact_detections(tnbc_dir: Path, tmp_path: Path) -> None:
    """`kseg predict` with the shipped model on a real TNBC tile: every detection checked."""
    src = tnbc_dir / "Slide_07" / "07_3.png"  # the densest tile: ~300 nuclei
    tile = tmp_path / "07_3.png"
    # A quarter of it (~75 nuclei) keeps the CPU inference short.
    Image.open(src).convert("RGB").crop((0, 0, 256, 256)).save(tile)
    report = predict([tile], "pretrained", tmp_path / "out", progress=False)
    assert not report.failed
    labels = tifffile.imread(tmp_path / "out" / "07_3_labels.tif")
    collection = json.loads((tmp_path / "out" / "07_3.geojson").read_text())
    feats = collection["features"]
    assert len(feats) > 40, "the shipped model should find the nuclei of a TNBC tile"
    _check_labels(labels, feats, "07_3")
    rows = {
        int(r.split(",")[0]): r.split(",")
        for r in (tmp_path / "out" / "07_3_nuclei.csv").read_text().splitlines()[1:]
    }
    for feat in feats:
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus"
        m = props["measurements"]
        assert m["Area px^2"] == shape(feat["geometry"]).area == float(rows[props["kseg_id"]][3])
        assert m["Hematoxylin OD mean"] > 0
        assert set(m) >= {"Perimeter px", "Eccentricity", "Eosin OD mean"}


@pytest.mark.parametrize("name", ["GT_07/07_3.png", "GT_04/04_8.png"])
def test_tnbc_ground_truth_nuclei_give_valid_exact_polygons(tnbc_dir: Path, name: str) -> None:
    """Hand-drawn nuclei (touching, ragged) of real tiles: the harder shapes."""
    mask = np.asarray(Image.open(tnbc_dir / name))
    labels, _ = ndi.label(mask.reshape((*mask.shape[:2], -1))[..., 0] > 0)
    _check_labels(labels, geojson_features(labels), name)


def test_ring_mask_gives_back_the_traced_pixels_where_fillpoly_grows_them() -> None:
    """Rings -> pixels is the exact inverse of pixels -> rings (even-odd over all rings)."""
    import cv2

    rng = np.random.default_rng(7)
    for trial in range(60):
        noise = rng.random((24, 31))
        mask = noise > 0.5 if trial % 2 else ndi.binary_opening(noise > 0.4)
        back = np.zeros(mask.shape, bool)
        for poly in mask_polygons(mask):
            for ring in poly:
                back ^= ring_mask(ring, mask.shape)
        np.testing.assert_array_equal(back, mask)
    # a 2 x 3 block traced on pixel corners: OpenCV would paint 3 x 4 pixels
    block = np.zeros((6, 6), bool)
    block[1:3, 2:5] = True
    ring = mask_polygons(block)[0][0]
    assert ring_mask(ring, block.shape).sum() == 6
    filled = cv2.fillPoly(np.zeros((6, 6), np.uint8), [np.asarray(ring, np.int32)], 1)
    assert filled.sum() == 12
    # float rings and rings reaching outside the image are clipped, not wrapped
    shifted = ring_mask(np.asarray(ring, float) - 2.0, block.shape)  # rows -1..0, cols 0..2
    assert shifted.sum() == 3 and shifted[0, :3].all()


def test_rings_mask_equals_skimage_polygon_and_is_the_xor_of_its_rings() -> None:
    """The scanline fill against skimage's point-in-polygon fill, on random float polygons."""
    from skimage.draw import polygon

    rng = np.random.default_rng(3)
    for _ in range(300):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        rings = [rng.uniform(-6, 45, (int(rng.integers(3, 10)), 2)) for _ in range(3)]
        expected = np.zeros(shape, bool)
        for ring in rings:  # pixel centres (c + 0.5, r + 0.5), the polygon not closed
            one = np.zeros(shape, bool)
            rr, cc = polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape=shape)
            one[rr, cc] = True
            np.testing.assert_array_equal(ring_mask(ring, shape), one)
            expected ^= one
        np.testing.assert_array_equal(rings_mask(rings, shape), expected)
    assert not rings_mask([], (3, 4)).any() and rings_mask([], (3, 4)).shape == (3, 4)
