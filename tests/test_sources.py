"""Sources end to end: TNBC over loopback HTTP, failures that leave data/ alone, kidney and folder
layouts, and `dvc exp run -S data.source=tnbc` rerunning exactly the data stages."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from scipy import ndimage as ndi
from typer.testing import CliRunner

from kseg.cli import app
from kseg.data.synthetic import generate
from kseg.fsutil import MARKER, MARKER_TEXT
from tests.http_helpers import serve
from tests.test_prepare import SMALL

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tnbc_site(tnbc_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The TNBC folder zipped like the official archive (with __MACOSX junk), a truncated copy
    and an archive with a ``../`` entry, served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("site")
    good = root / "TNBC_NucleiSegmentation.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
        for path in sorted(tnbc_dir.rglob("*.png")):
            zf.write(path, f"TNBC_NucleiSegmentation/{path.relative_to(tnbc_dir)}")
        zf.writestr("__MACOSX/TNBC_NucleiSegmentation/Slide_01/._01_1.png", b"\x00\x05\x16\x07")
    (root / "truncated.zip").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with zipfile.ZipFile(root / "evil.zip", "w") as zf:
        zf.writestr("TNBC_NucleiSegmentation/Slide_01/01_1.png", b"x")
        zf.writestr("../evil.png", b"x")
    os.environ["KSEG_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    with serve(root) as server:
        yield server
    os.environ.pop("KSEG_CACHE", None)


def _fetch(project: Path, **data: str) -> object:
    params = {"data": data}
    (project / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    old = Path.cwd()
    os.chdir(project)
    try:
        return runner.invoke(app, ["fetch", "--params", "params.yaml"])
    finally:
        os.chdir(old)


def test_tnbc_over_http_fetch_prepare_validate(tnbc_site, tnbc_dir, tmp_path: Path) -> None:
    url = f"{tnbc_site.url}/TNBC_NucleiSegmentation.zip"
    sha = _sha(tnbc_site.root / "TNBC_NucleiSegmentation.zip")
    res = _fetch(tmp_path, source="tnbc", url=url, sha256=sha)
    assert res.exit_code == 0, res.output
    raw = tmp_path / "data" / "TNBC_NucleiSegmentation"
    assert not (tmp_path / "data" / "__MACOSX").exists()
    assert sorted(p.name for p in raw.iterdir()) == sorted(p.name for p in tnbc_dir.iterdir()
                                                           if p.is_dir())  # fmt: skip
    for name in ("prepare", "validate"):
        os.chdir(tmp_path)
        try:
            out = runner.invoke(app, [name, "--params", "params.yaml"])
        finally:
            os.chdir(REPO)
        assert out.exit_code == 0, out.output
    man = pd.read_csv(tmp_path / "prepared/manifest.csv", dtype={"patient": str, "tile_id": str})
    assert len(man) == 50 and man["patient"].nunique() == 11
    assert man["n_nuclei"].sum() >= 4000
    # 47 tiles ship as RGBA and 3 as RGB; all become RGB uint8 (manifest dtype/channels).
    assert set(man["source_mode"]) == {"RGBA", "RGB"} and (man["channels"] == 3).all()
    assert (man["mask_kind"] == "binary").all()
    split = json.loads((tmp_path / "prepared/split.json").read_text())
    assert split["patients"]["test"] == ["02", "06", "10"] and len(split["test"]) == 10
    # Labels are exactly the 8-connected components of the binary ground truth.
    gt = np.asarray(Image.open(raw / "GT_04" / "04_3.png")) > 0
    expected, _ = ndi.label(gt, structure=np.ones((3, 3), bool))
    labels = np.asarray(Image.open(tmp_path / "prepared/labels/04_3.png"))
    np.testing.assert_array_equal(labels, expected)
    assert json.loads((tmp_path / "metrics/validation.json").read_text())["n_nuclei"] >= 4000


@pytest.mark.parametrize(
    ("archive", "sha_of", "message"),
    [
        ("TNBC_NucleiSegmentation.zip", "wrong", "sha256 mismatch"),
        ("truncated.zip", "TNBC_NucleiSegmentation.zip", "sha256 mismatch"),
        ("truncated.zip", "truncated.zip", "not a readable zip archive"),
        ("evil.zip", "evil.zip", "unsafe archive entry '../evil.png'"),
    ],
)
def test_bad_archive_fails_clearly_and_leaves_data(
    tnbc_site, tmp_path, monkeypatch, archive, sha_of, message
):
    # An empty cache: the cache is content-addressed, so a cached good archive would be used.
    cache = tmp_path.parent / f"{tmp_path.name}-cache"
    monkeypatch.setenv("KSEG_CACHE", str(cache))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("previous dataset")
    (tmp_path / "data" / MARKER).write_text(MARKER_TEXT)  # written by a previous kseg fetch
    sha = "f" * 64 if sha_of == "wrong" else _sha(tnbc_site.root / sha_of)
    res = _fetch(tmp_path, source="tnbc", url=f"{tnbc_site.url}/{archive}", sha256=sha)
    assert res.exit_code == 2
    assert message in res.output and "data/ left unchanged" in res.output
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [MARKER, "keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml"]  # no staging
    assert not (tmp_path.parent / "evil.png").exists()
    assert not list(cache.rglob("*.part"))  # no half-written download left behind


def _binary_tiles(root: Path, names: dict[str, str], image_dir: str, mask_dir: str) -> None:
    """Synthetic tiles renamed to ``names`` (P01_01 -> new relative name), binary masks."""
    src = root.parent / "gen"
    generate(SMALL, src)
    for old, new in names.items():
        img, msk = root / image_dir / f"{new}.png", root / mask_dir / f"{new}_mask.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        msk.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "images" / f"{old}.png", img)
        mask = np.asarray(Image.open(src / "masks" / f"{old}.png"))
        Image.fromarray(((mask > 0) * 255).astype(np.uint8)).save(msk)


def test_kidney_zip_with_tcga_names(tmp_path: Path, monkeypatch) -> None:
    layout = tmp_path / "kidney" / "Kidney_Irshad"
    names = {
        "P01_01": "TCGA-B0-5711-01Z-00-DX1_1",
        "P01_02": "TCGA-B0-5711-01Z-00-DX1_2",
        "P02_01": "TCGA-CJ-4642-01Z-00-DX1_1",
        "P03_01": "TCGA-B9-A44B-01Z-00-DX1_4",
    }
    _binary_tiles(layout, names, "images", "masks")  # fmt: skip
    archive = shutil.make_archive(str(tmp_path / "kidney"), "zip", tmp_path / "kidney")
    project = tmp_path / "project"
    project.mkdir()
    res = _fetch(project, source="kidney", path=archive)
    assert res.exit_code == 0, res.output
    index = pd.read_csv(project / "data/index.csv")
    assert sorted(index["patient"].unique()) == ["TCGA-B0-5711", "TCGA-B9-A44B", "TCGA-CJ-4642"]
    assert set(index["tile_id"]) == set(names.values())
    monkeypatch.chdir(project)
    from kseg.config import load_params
    from kseg.data.prepare import prepare

    summary = prepare(load_params("params.yaml"))
    assert summary["n_patients"] == 3
    man = pd.read_csv("prepared/manifest.csv")
    assert (man["mask_kind"] == "binary").all() and (man["n_nuclei"] > 0).all()


def test_kidney_original_layout_per_patient_folders_and_missing_path(tmp_path: Path) -> None:
    layout = tmp_path / "kid"
    _binary_tiles(layout, {"P01_01": "caseA/t1", "P01_02": "caseA/t2", "P02_01": "caseB/t1"},
                  "data", "gts")  # fmt: skip
    project = tmp_path / "project"
    project.mkdir()
    res = _fetch(project, source="kidney", path=str(layout))
    assert res.exit_code == 0, res.output
    index = pd.read_csv(project / "data/index.csv")
    assert dict(zip(index["tile_id"], index["patient"], strict=True)) == {
        "caseA_t1": "caseA", "caseA_t2": "caseA", "caseB_t1": "caseB"}  # fmt: skip
    res = _fetch(project, source="kidney")
    assert res.exit_code == 2 and "Irshad" in res.output and "data.path" in res.output
    assert (project / "data/index.csv").is_file()  # the previous data/ is still there


def test_folder_with_missing_mask_is_named(tmp_path: Path) -> None:
    layout = tmp_path / "mine"
    _binary_tiles(layout, {"P01_01": "a_1", "P01_02": "a_2"}, "images", "masks")
    (layout / "masks" / "a_2_mask.png").unlink()
    res = _fetch(tmp_path, source="folder", path=str(layout))
    assert res.exit_code == 2 and "no mask for 1 image(s)" in res.output and "a_2.png" in res.output


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _ran(proc: subprocess.CompletedProcess[str]) -> set[str]:
    stages = {"fetch", "prepare", "validate"}
    return {s for s in stages if f"Running stage '{s}'" in proc.stdout}


def test_dvc_exp_run_switching_source_reruns_the_data_stages(tnbc_site, tmp_path: Path) -> None:
    project = tmp_path / "repo"
    project.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / "kseg", project / "kseg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    (project / ".gitignore").write_text(".cache/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "-A"], cwd=project, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=project, check=True)
    # Small synthetic data first: all three data stages run, then nothing is left to do.
    small = ["data.synthetic.tile_size=64", "data.synthetic.n_patients=5",
             "data.synthetic.tiles_per_patient=2"]  # fmt: skip
    first = _dvc("exp", "run", "validate", *[a for kv in small for a in ("-S", kv)], cwd=project)
    assert _ran(first) == {"fetch", "prepare", "validate"}
    assert _ran(_dvc("repro", "validate", cwd=project)) == set()
    url = f"{tnbc_site.url}/TNBC_NucleiSegmentation.zip"
    sha = _sha(tnbc_site.root / "TNBC_NucleiSegmentation.zip")
    switched = _dvc("exp", "run", "validate", "-S", "data.source=tnbc", "-S", f"data.url={url}",
                    "-S", f"data.sha256={sha}", cwd=project)  # fmt: skip
    assert _ran(switched) == {"fetch", "prepare", "validate"}
    assert json.loads((project / "metrics/validation.json").read_text())["n_tiles"] == 50
    # A split parameter does not touch the download; a validate parameter only reruns validate.
    assert _ran(_dvc("exp", "run", "validate", "-S", "split.seed=1", cwd=project)) == {
        "prepare", "validate"}  # fmt: skip
    assert _ran(_dvc("exp", "run", "validate", "-S", "validate.min_tiles_per_split=2",
                     cwd=project)) == {"validate"}  # fmt: skip


def test_raw_archives_travel_through_data_dvc(tnbc_site, tmp_path: Path) -> None:
    """`kseg fetch` keeps the archive in raw/ (data.dvc); a clone pulls it and fetches offline."""
    project = tmp_path / "repo"
    project.mkdir()
    for name in ("params.yaml", "dvc.yaml", "data.dvc", ".gitignore"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    env = {k: v for k, v in os.environ.items() if k != "KSEG_CACHE"}  # the default: raw/
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"

    def run(*cmd: str, cwd: Path = project) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (cmd, proc.stdout + proc.stderr)
        return proc

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    run("git", "init", "-q")
    served = tnbc_site.root / "TNBC_NucleiSegmentation.zip"
    sha = _sha(served)
    url = f"{tnbc_site.url}/TNBC_NucleiSegmentation.zip"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(source="tnbc", url=url, sha256=sha)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    before = tnbc_site.count("/TNBC_NucleiSegmentation.zip")
    run("kseg", "fetch")
    assert tnbc_site.count("/TNBC_NucleiSegmentation.zip") == before + 1
    kept = project / "raw" / f"{sha}.zip"
    assert kept.read_bytes() == served.read_bytes()
    # the team's commit: data.dvc records raw/, the bytes go to the remote
    run("dvc", "commit", "-f", "data.dvc")
    lock = yaml.safe_load((project / "data.dvc").read_text())
    assert lock["outs"][0]["path"] == "raw" and lock["outs"][0]["nfiles"] == 1
    run("dvc", "remote", "add", "-d", "team", str(tmp_path / "remote"))
    run("dvc", "push", "data.dvc")
    run(*git, "add", "-A")
    run(*git, "commit", "-qm", "raw archives")
    assert "raw" not in run("git", "ls-files").stdout.split()  # the bytes are DVC's, not git's
    # a teammate: clone, pull, fetch with the server gone (a dead URL) and no download
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    run("dvc", "pull", "data.dvc", cwd=clone)
    assert (clone / "raw" / f"{sha}.zip").read_bytes() == served.read_bytes()
    params["data"]["url"] = "http://127.0.0.1:9/TNBC_NucleiSegmentation.zip"  # nothing listens
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    run("kseg", "fetch", cwd=clone)
    assert tnbc_site.count("/TNBC_NucleiSegmentation.zip") == before + 1
    assert len(list((clone / "data" / "TNBC_NucleiSegmentation").glob("Slide_*/*.png"))) == 50
    assert run("dvc", "status", "data.dvc", cwd=clone).stdout.strip().endswith("up to date.")
