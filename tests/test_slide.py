"""Whole-slide prediction on pyramidal TIFFs built from real TNBC tiles (kseg.slide).

The big slide (4096 x 4096 at 0.125 µm/px, i.e. 80x, with a glass quadrant and no pixel size in
its tags) is segmented once, through the real ``kseg predict`` command in a child process that
reports its own peak memory; the other tests read its outputs. A small fast model folder (random
weights, deterministic maps of the real pixels) keeps it quick; one test runs the shipped model.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi

from kseg import slide as S
from tests.slide_helpers import fast_model, mosaic, tnbc_pairs, write_pyramid

BIG_MPP = 0.125  # level 0 of the big slide: TNBC (0.25 µm/px) upsampled 2x
BLOCK, MARGIN = 512, 64  # working-grid (0.25 µm/px) block geometry of the big run
GLASS = {(r, c) for r in (2, 3) for c in range(4)}  # mosaic cells (512 px at 0.25 µm/px): glass
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs(tnbc_dir: Path) -> list:
    return tnbc_pairs(tnbc_dir)


@pytest.fixture(scope="module")
def model_dir(pairs: list, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fast_model(tmp_path_factory.mktemp("fast_model"), [p[0] for p in pairs])


@pytest.fixture(scope="module")
def big(pairs: list, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The 4096 x 4096 slide, segmented by ``kseg predict`` in a child process."""
    root = tmp_path_factory.mktemp("big")
    rgb25, _ = mosaic(pairs, 4, 4, glass=GLASS)  # 2048 x 2048 at 0.25 µm/px
    rgb = cv2.resize(rgb25, (4096, 4096), interpolation=cv2.INTER_LINEAR)
    slide = write_pyramid(root / "big.tif", rgb, mpp=None, levels=3, factor=4)
    del rgb
    out = root / "out"
    script = textwrap.dedent(
        f"""
        import json, sys
        import tiffslide
        from kseg.cli import app
        import kseg.slide as S

        largest = [0]
        read = tiffslide.TiffSlide.read_region
        def spy(self, location, level, size, **kw):
            largest[0] = max(largest[0], int(size[0]) * int(size[1]))
            return read(self, location, level, size, **kw)
        tiffslide.TiffSlide.read_region = spy
        base = S.peak_rss_mb()  # this child's own peak, not the pytest process's
        try:
            app(["predict", {str(slide)!r}, "--model", {str(model_dir)!r}, "--out", {str(out)!r},
                 "--mpp", "{BIG_MPP}", "--block", "{BLOCK}", "--margin", "{MARGIN}"])
        except SystemExit as err:
            code = err.code
        peak = S.peak_rss_mb()
        print(json.dumps({{"code": code, "base_mb": base, "peak_mb": peak,
                          "largest_read_px": largest[0]}}))
        """
    )
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["code"] in (0, None), proc.stderr[-3000:]
    summary = json.loads((out / "big_slide.json").read_text())
    return {"rgb25": rgb25, "slide": slide, "out": out, "stats": stats, "summary": summary}


def rasterize(features: list, shape: tuple[int, int], scale: float) -> tuple[np.ndarray, int]:
    """Labels image of the polygons (level-0 coords / ``scale``) and the pixels painted twice.

    Rings are pixel-corner coordinates: a pixel belongs to a polygon when its centre is inside.
    """
    from kseg.geojson import ring_mask

    labels = np.zeros(shape, np.int32)
    cover = np.zeros(shape, np.uint8)
    for i, feat in enumerate(features, start=1):
        geom = feat["geometry"]
        polys = geom["coordinates"] if geom["type"] == "MultiPolygon" else [geom["coordinates"]]
        mask = np.zeros(shape, bool)
        for ring in (r for poly in polys for r in poly):  # even-odd: holes cut out of exteriors
            mask ^= ring_mask(np.asarray(ring) / scale, shape)  # clipped to the image
        cover += mask
        labels[mask] = i
    return labels, int((cover > 1).sum())


def test_big_slide_memory_is_bounded_and_reads_are_windows(big: dict) -> None:
    stats, summary = big["stats"], big["summary"]
    # the acceptance bound, and the increment over the imported libraries: a full-resolution
    # copy of this slide alone (4096^2 RGB plus its 2048^2 working image and two float maps) is
    # ~110 MB; the streamed run stays within one block's worth of buffers.
    assert stats["peak_mb"] < 2048, stats
    assert stats["peak_mb"] - stats["base_mb"] < 400, stats
    # no read is larger than one block with its margins, in level-0 pixels (2x: 80x -> 40x)
    region = (BLOCK + 2 * MARGIN) * 2
    assert 0 < stats["largest_read_px"] <= max(region**2, 32 * 2**20 // 4) < 4096**2, stats
    assert summary["level"] == 0 and summary["working_mpp"] == pytest.approx(0.25)
    assert summary["mpp"] == BIG_MPP and summary["size_px"] == [4096, 4096]
    assert summary["nuclei"] > 500


def test_big_slide_glass_is_skipped(big: dict) -> None:
    summary = big["summary"]
    assert summary["blocks_glass"] == len(GLASS)  # one 512 working block per glass cell
    assert summary["blocks"] == 16 - len(GLASS)
    with open(big["out"] / "big_nuclei.csv") as fh:
        rows = list(csv.DictReader(fh))
    xs = np.array([float(r["x_px"]) for r in rows])
    ys = np.array([float(r["y_px"]) for r in rows])
    assert len(xs) > 500 and (ys >= 2048 + 128).sum() == 0  # level-0 px; margin tolerance
    # the overlay is a downsampled picture with outlines drawn on it
    over = cv2.imread(str(big["out"] / "big_overlay.png"))
    assert over is not None and max(over.shape[:2]) <= 4096 // 4


def test_big_slide_geojson_is_valid_qupath_and_matches_csv(big: dict) -> None:
    import shapely.geometry
    import shapely.validation

    doc = json.loads((big["out"] / "big.geojson").read_text())
    feats = doc["features"]
    assert doc["type"] == "FeatureCollection" and len(feats) == big["summary"]["nuclei"]
    kinds = {"Polygon": 0, "MultiPolygon": 0}
    for feat in feats:
        geom = feat["geometry"]
        kinds[geom["type"]] += 1
        polys = geom["coordinates"] if geom["type"] == "MultiPolygon" else [geom["coordinates"]]
        for ring in (r for poly in polys for r in poly):
            assert ring[0] == ring[-1] and len(ring) >= 5  # closed, pixel-edge rings
            assert all(0 <= x <= 4096 and 0 <= y <= 4096 for x, y in ring)
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus"
        shape = shapely.geometry.shape(geom)
        assert shape.is_valid, shapely.validation.explain_validity(shape)
        # pixel-exact outlines: the polygon area is the nucleus' pixel count (level-0 px = 1/4)
        area_um2 = props["measurements"]["Area µm^2"]
        assert shape.area * BIG_MPP**2 == pytest.approx(area_um2, abs=1e-3)
    # both kinds are exercised (the fast model's random weights make many diagonal fragments)
    assert kinds["Polygon"] > 0 and kinds["MultiPolygon"] > 0, kinds
    with open(big["out"] / "big_nuclei.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(feats)
    for row in rows[:50]:
        assert float(row["x_um"]) == pytest.approx(float(row["x_px"]) * BIG_MPP, abs=0.01)


def test_big_slide_equals_whole_image_away_from_seams_and_seam_nuclei_are_single(
    big: dict, model_dir: Path
) -> None:
    """Block-wise equals in-memory prediction of the same working image; seams split nothing."""
    from kseg.segmenter import Segmenter

    slide = S.open_slide(big["slide"])
    geom = S.plan_geometry(slide, BIG_MPP, 0.25)
    rows = 1024 + 128  # the tissue half and some glass below it
    work = S.read_working_region(slide, geom, 0, 0, geom.work_width, rows)
    slide.close()
    whole, _ = Segmenter.from_folder(model_dir).segment(work)
    doc = json.loads((big["out"] / "big.geojson").read_text())
    mine, overlap_px = rasterize(doc["features"], whole.shape, geom.downsample)
    assert overlap_px == 0  # no two nuclei share a pixel, across seams too
    seams = range(BLOCK, geom.work_width, BLOCK)
    stats: dict[str, list] = {"seam": [], "far": []}
    for k, sl in enumerate(ndi.find_objects(whole), start=1):
        if sl is None or sl[0].stop > 1024 - 8:  # tissue only, away from the glass edge
            continue
        if max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) > MARGIN:
            continue  # not nucleus-sized (the margin must exceed the largest nucleus)
        obj = whole[sl] == k
        ids, counts = np.unique(mine[sl][obj], return_counts=True)
        counts = counts[ids > 0]
        crosses = any(sl[1].start < s < sl[1].stop for s in seams) or any(
            sl[0].start < s < sl[0].stop for s in seams
        )
        pieces = int((counts >= 0.2 * obj.sum()).sum())  # slide nuclei holding >= 20% of it
        best = counts.max() / obj.sum() if len(counts) else 0.0
        stats["seam" if crosses else "far"].append((pieces, best))
    seam, far = np.array(stats["seam"]), np.array(stats["far"])
    assert len(seam) > 50 and len(far) > 500
    # away from seams: the same instances, pixel for pixel (pixel-exact polygons)
    assert (far[:, 1] >= 0.9).mean() > 0.99
    # on seams: never split in two, and found whole as often as away from the seams
    assert (seam[:, 0] > 1).sum() == 0
    assert (seam[:, 1] >= 0.9).mean() > 0.97


# --------------------------------------------------------------------------------------------------
# Small slides
# --------------------------------------------------------------------------------------------------


def test_shipped_model_reads_the_40x_level_of_an_80x_slide_and_finds_the_nuclei(
    pairs: list, tmp_path: Path
) -> None:
    """Real model, real pixels: the level is chosen from the model card's pixel size."""
    import shapely.geometry

    from kseg.predict import pretrained_model
    from kseg.segmenter import Segmenter

    rgb, gt = pairs[20]  # a 512 x 512 TNBC tile at 0.25 µm/px (40x)
    big = cv2.resize(rgb, (1024, 1024), interpolation=cv2.INTER_LINEAR)  # as scanned at 80x
    path = write_pyramid(tmp_path / "x80.tif", big, mpp=0.125, levels=2, factor=2)
    folder = pretrained_model()
    assert S.model_mpp(folder) == 0.25  # config.json extra.mpp, as the model card states
    result = S.segment_slide(
        path, Segmenter.from_folder(folder), tmp_path / "out", target_mpp=0.25, block=1024
    )
    summary = result.summary
    assert summary["level"] == 1 and summary["working_mpp"] == pytest.approx(0.25)
    feats = json.loads((tmp_path / "out" / "x80.geojson").read_text())["features"]
    # every ground-truth nucleus (>= 30 px) whose centre lies inside a predicted polygon is found
    found, total = 0, 0
    polys = [shapely.geometry.shape(f["geometry"]) for f in feats]
    assert sum(p.is_valid for p in polys) / len(polys) > 0.85  # real nuclei: blobby outlines
    gt_lab, n = ndi.label(gt)
    for k, (cy, cx) in enumerate(ndi.center_of_mass(gt, gt_lab, range(1, n + 1)), start=1):
        if (gt_lab == k).sum() < 30:
            continue
        total += 1
        pt = shapely.geometry.Point(cx * 2, cy * 2)  # level-0 (80x) pixels
        found += any(p.buffer(0).contains(pt) for p in polys)
    assert total > 10 and found / total > 0.6, (found, total)


def test_interrupted_slide_resumes_from_finished_blocks(
    pairs: list, model_dir: Path, tmp_path: Path
) -> None:
    from kseg.segmenter import Segmenter

    rgb, _ = mosaic(pairs, 1, 1)
    path = write_pyramid(tmp_path / "s.tif", rgb, levels=2, factor=4)
    seg = Segmenter.from_folder(model_dir)
    kw = {"block": 256, "margin": 32, "model_id": "fast"}

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        S.segment_slide(path, seg, tmp_path / "out", on_block=stop_after_two, **kw)
    assert not (tmp_path / "out" / "s_slide.json").exists()  # not finished
    assert len(list((tmp_path / "out" / ".s.parts").glob("*.npz"))) == 2
    resumed = S.segment_slide(path, seg, tmp_path / "out", **kw).summary
    assert resumed["blocks"] == 4 and resumed["blocks_computed"] == 2
    fresh = S.segment_slide(path, seg, tmp_path / "fresh", **kw).summary
    assert fresh["blocks_computed"] == 4
    a = json.loads((tmp_path / "out" / "s.geojson").read_text())
    b = json.loads((tmp_path / "fresh" / "s.geojson").read_text())
    assert a == b and len(a["features"]) > 20
    assert not (tmp_path / "out" / ".s.parts").exists()


def test_slide_without_pixel_size_needs_mpp_and_bad_files_are_named(
    pairs: list, tmp_path: Path
) -> None:
    rgb, _ = mosaic(pairs, 1, 1)
    path = write_pyramid(tmp_path / "nompp.tif", rgb, mpp=None, levels=2)
    assert S.is_slide(path)
    slide = S.open_slide(path)
    with pytest.raises(S.SlideError, match=r"nompp\.tif.*--mpp"):
        S.slide_mpp(slide, path)
    assert S.slide_mpp(slide, path, 0.5) == 0.5
    geom = S.plan_geometry(slide, 0.0625, 0.25)  # wants 4x: level 1 exactly, no resampling
    assert (geom.level, geom.downsample, geom.resample) == (1, 4.0, 1.0)
    geom = S.plan_geometry(slide, 0.125, 0.25)  # wants 2x: level 0, area-downsampled 2x
    assert (geom.level, geom.downsample, geom.work_width) == (0, 2.0, 256)
    region = S.read_working_region(slide, geom, 0, 0, 256, 256)
    expected = cv2.resize(rgb, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(region.astype(int) - expected).max() <= 1
    slide.close()
    bad = tmp_path / "corrupt.svs"
    bad.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    with pytest.raises(S.SlideError, match=r"corrupt\.svs"):
        S.open_slide(bad)


def test_same_file_names_in_different_folders_get_distinct_outputs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a" / "s1.svs", tmp_path / "b" / "s1.svs", tmp_path / "a" / "s2.ome.tif"
    names = S.output_names([a, b, c])
    assert names[c] == "s2" and len({names[a], names[b], names[c]}) == 3
    assert names[a].startswith("s1-") and names[a] == S.output_names([b, a])[a]  # stable
    # a name already used in the output folder by another slide is not taken over
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "s2_slide.json").write_text(json.dumps({"source": "/elsewhere/s2.tif"}))
    assert S.claim_name(tmp_path / "out", c, "s2") != "s2"


def test_predict_never_overwrites_same_named_images(model_dir: Path, tmp_path: Path) -> None:
    from kseg.predict import predict

    for folder, value in (("a", 60), ("b", 200)):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "x.png"), np.full((64, 64, 3), value, np.uint8))
    out = tmp_path / "out"
    report = predict(
        [tmp_path / "a", tmp_path / "b" / "x.png"], str(model_dir), out, progress=False
    )
    labels = sorted(p.name for p in report.written if p.name.endswith("_labels.tif"))
    assert len(labels) == 2 and labels[0] != labels[1] and not report.failed
    assert sorted(p.name for p in out.glob("*_labels.tif")) == labels
