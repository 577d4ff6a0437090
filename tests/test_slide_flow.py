"""The ``segment-slides`` flow on a real Dask LocalCluster (two workers) through prefect-dask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.slides import segment_slides, worker_segmenter
from tests.slide_helpers import fast_model, mosaic, tnbc_pairs, write_pyramid


@pytest.fixture(scope="module")
def slides(tnbc_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("slides")
    pairs = tnbc_pairs(tnbc_dir)
    model = fast_model(root / "model", [p[0] for p in pairs])
    a, b = root / "lab_a", root / "lab_b"
    a.mkdir(), b.mkdir()
    # two slides with the same file name in different folders, and a corrupt one
    write_pyramid(a / "case.tif", mosaic(pairs[:1], 1, 1)[0], levels=2)
    write_pyramid(b / "case.tif", mosaic(pairs[5:6], 1, 1)[0], levels=2)
    (a / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)
    return {"a": a, "b": b, "model": model, "out": root / "out"}


def test_flow_segments_on_two_dask_workers_reports_the_corrupt_slide_and_skips_on_rerun(
    slides: dict, harness: None
) -> None:
    kw = {
        "slides": [str(slides["a"]), str(slides["b"] / "case.tif")],
        "out_dir": str(slides["out"]),
        "model": str(slides["model"]),
        "n_workers": 2,
        "processes": False,
        "block": 256,
        "margin": 32,
    }
    state = segment_slides(**kw, return_state=True)
    assert state.is_failed()
    message = str(state.message) + repr(state.result(raise_on_failure=False))
    assert "broken.svs" in message and "case.tif" not in message.split("failed")[-1]
    report = json.loads((slides["out"] / "slides_report.json").read_text())
    assert list(report["failed"]) == [str(slides["a"] / "broken.svs")]
    assert "broken.svs" in report["failed"][str(slides["a"] / "broken.svs")]
    # both slides named case.tif are written, under distinct names, with complete outputs
    names = sorted(d["name"] for d in report["done"])
    assert len(names) == 2 and names[0] != names[1] and all(n.startswith("case-") for n in names)
    for name in names:
        summary = json.loads((slides["out"] / f"{name}_slide.json").read_text())
        assert summary["nuclei"] > 20
        for suffix in (".geojson", "_nuclei.csv", "_overlay.png"):
            assert (slides["out"] / f"{name}{suffix}").stat().st_size > 0
    # ran on Dask workers; the model was loaded once per worker (one segmenter per worker)
    workers = {d["worker"] for d in report["done"]}
    assert all(not w.startswith("pid-") for w in workers)
    assert len({(d["worker"], d["segmenter_id"]) for d in report["done"]}) == len(workers)
    # a rerun skips the finished slides and still reports the corrupt one
    again = segment_slides(**kw, fail_on_error=False)
    assert sorted(again["skipped"]) == sorted(
        [str(slides["a"] / "case.tif"), str(slides["b"] / "case.tif")]
    )
    assert again["done"] == [] and list(again["failed"]) == [str(slides["a"] / "broken.svs")]


def test_model_is_loaded_once_per_process_outside_dask(slides: dict) -> None:
    (first, _), where = worker_segmenter(str(slides["model"]))
    (second, _), _ = worker_segmenter(str(slides["model"]))
    assert first is second and where.startswith("pid-")
