"""Hostile inputs (issue 15): bad params, images, archives, models and requests.

The table runs each bad input through the real command (in-process ``kseg``) or the served
model's ``predict`` and checks three things: it is refused (non-zero exit or an error), the message
names the file, key or request row at fault, and nothing outside the command's output folder
changed (a sentinel "home" folder, the inputs and the project itself are hashed before and after).
Every input is made here, in ``tmp_path``, and is small; the big images are PNG headers that claim
a huge size, which is exactly what a decompression bomb is.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import types
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from kseg.cli import app
from tests.pipeline_helpers import make_model_folder

runner = CliRunner()


# --------------------------------------------------------------------------------------------------
# Helpers: inputs and snapshots
# --------------------------------------------------------------------------------------------------


def png_bytes(h: int = 24, w: int = 24, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w, 4) if mode == "RGBA" else (h, w)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def mask_bytes(h: int = 24, w: int = 24) -> bytes:
    mask = np.zeros((h, w), np.uint8)
    mask[4:12, 4:12] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG header (and a token IDAT) claiming ``width`` x ``height`` RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def make_zip(path: Path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16) | 0x10  # a symbolic link
            zf.writestr(info, target)
    return path


def dataset_entries(index: str | None = None, n: int = 2) -> dict[str, bytes]:
    """images/ + masks/ of ``n`` tiles, and ``index.csv`` when given."""
    out: dict[str, bytes] = {}
    for i in range(n):
        out[f"images/P1_{i}.png"] = png_bytes(seed=i)
        out[f"masks/P1_{i}.png"] = mask_bytes()
    if index is not None:
        out["index.csv"] = index.encode()
    return out


def snapshot(root: Path, skip: tuple[str, ...]) -> dict[str, str]:
    """sha256 (or 'dir'/'link') of everything under ``root`` except the ``skip`` subpaths."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if any(rel == s or rel.startswith(s + "/") for s in skip):
            continue
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write_params(proj: Path, params: dict | str | bytes) -> Path:
    proj.mkdir(parents=True, exist_ok=True)
    path = proj / "params.yaml"
    if isinstance(params, bytes):
        path.write_bytes(params)
    elif isinstance(params, str):
        path.write_text(params)
    else:
        path.write_text(json.dumps(params))  # JSON is YAML
    return path


def invoke(proj: Path, args: list[str]) -> tuple[int, str]:
    old = Path.cwd()
    os.chdir(proj)
    try:
        res = runner.invoke(app, args)
    finally:
        os.chdir(old)
    out = res.output
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        out += f"\nUNCAUGHT {type(res.exception).__name__}: {res.exception}"
    return res.exit_code, out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("hostile_model"))


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
# Each case: setup(tmp, model_dir) -> (command args, output folder relative to tmp / "proj").
# The project is tmp / "proj"; a sentinel tmp / "home" / ".bashrc" must survive everything.

Setup = Callable[[Path, Path], tuple[list[str], str]]


def _params_case(params: dict | str | bytes) -> Setup:
    def setup(tmp: Path, _model: Path) -> tuple[list[str], str]:
        write_params(tmp / "proj", params)
        return ["params", "-p", "params.yaml"], ""

    return setup


def _fetch_zip(entries: dict[str, bytes], links: dict[str, str] | None = None, **data) -> Setup:
    def setup(tmp: Path, _model: Path) -> tuple[list[str], str]:
        archive = make_zip(tmp / "src.zip", entries, links)
        cfg = {"source": "folder", "path": str(archive), **data}
        if cfg.get("sha256") == "auto":
            cfg["sha256"] = hashlib.sha256(archive.read_bytes()).hexdigest()
        write_params(tmp / "proj", {"data": cfg})
        return ["fetch", "-p", "params.yaml"], "data"

    return setup


def _fetch_folder(index: str | None, link: tuple[str, str] | None = None, **data) -> Setup:
    def setup(tmp: Path, _model: Path) -> tuple[list[str], str]:
        src = tmp / "src"
        for name, blob in dataset_entries(index).items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(blob)
        if link:
            (src / link[0]).parent.mkdir(parents=True, exist_ok=True)
            (src / link[0]).symlink_to(tmp / link[1])
        write_params(tmp / "proj", {"data": {"source": "folder", "path": str(src), **data}})
        return ["fetch", "-p", "params.yaml"], "data"

    return setup


def _prepare(first_row: str, files: dict[str, bytes] | None = None) -> Setup:
    """A hand-made data/ folder (as a hostile dataset could leave it), then prepare.

    ``first_row`` comes first in index.csv; four good tiles of four more patients follow.
    """
    good = "".join(f"t{i},P{i + 1},images/P1_{i}.png,masks/P1_{i}.png\n" for i in range(1, 5))
    index = "tile_id,patient,image,mask\n" + first_row + good

    def setup(tmp: Path, _model: Path) -> tuple[list[str], str]:
        data = tmp / "proj" / "data"
        for name, blob in {**dataset_entries(None, n=5), **(files or {})}.items():
            (data / name).parent.mkdir(parents=True, exist_ok=True)
            (data / name).write_bytes(blob)
        (data / "index.csv").write_text(index)
        write_params(tmp / "proj", {})
        return ["prepare", "-p", "params.yaml"], "prepared"

    return setup


def _predict(files: dict[str, bytes], *extra: str, model: str | None = None) -> Setup:
    def setup(tmp: Path, model_dir: Path) -> tuple[list[str], str]:
        inputs = tmp / "proj" / "in"
        inputs.mkdir(parents=True)
        for name, blob in files.items():
            (inputs / name).write_bytes(blob)
        spec = model or str(model_dir)
        args = ["predict", *[str(inputs / n) for n in files], "--model", spec, "--out", "out"]
        return [*args, *extra], "out"

    return setup


def _bad_model(change: Callable[[Path], None]) -> Setup:
    def setup(tmp: Path, model_dir: Path) -> tuple[list[str], str]:
        bad = shutil.copytree(model_dir, tmp / "proj" / "model")
        change(bad)
        (tmp / "proj" / "in.png").write_bytes(png_bytes(40, 40))
        return ["predict", "in.png", "--model", "model", "--out", "out"], "out"

    return setup


def _truncate(name: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return change


def _write(name: str, blob: bytes) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        (folder / name).write_bytes(blob)

    return change


def _pickle_bomb(folder: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    (folder / "model.pt").write_bytes(pickle.dumps({"w": Evil()}))


def _foreign_out(key: str, stage: str) -> Setup:
    """An output folder pointed at a folder of the user's own files."""

    def setup(tmp: Path, _model: Path) -> tuple[list[str], str]:
        mine = tmp / "proj" / "mine"
        mine.mkdir(parents=True)
        (mine / "thesis.docx").write_text("years of work")
        section, field = key.split(".")
        write_params(tmp / "proj", {section: {field: "mine"}})
        return [stage, "-p", "params.yaml"], ""

    return setup


HEADER = "tile_id,patient,image,mask\n"
TRAVERSAL_INDEX = HEADER + "../../../home/.bashrc,P1,images/P1_0.png,masks/P1_0.png\n"
ABS_INDEX = "tile_id,patient,image,mask\nt0,P1,/etc/hostname,masks/P1_0.png\n"
DOTDOT_INDEX = "tile_id,patient,image,mask\nt0,P1,../../home/.bashrc,masks/P1_0.png\n"
OK_ROW = "t0,P1,images/P1_0.png,masks/P1_0.png\n"
BOMB = {"images/a.png": b"\0" * (8 * 2**20), "masks/a.png": b"x"}

# fmt: off
CASES: list[tuple[str, Setup, list[str]]] = [
    # --- params (defect 10, 8) ---
    ("d10-lr-nan", _params_case("train: {lr: .nan}\n"), ["train.lr", "finite"]),
    ("d10-lr-inf", _params_case("train: {weight_decay: .inf}\n"), ["train.weight_decay"]),
    ("d10-inverted-nuclei", _params_case({"data": {"synthetic": {"nuclei_per_tile": [50, 10]}}}),
     ["data.synthetic.nuclei_per_tile", "inverted"]),
    ("d10-inverted-area", _params_case({"validate": {"mean_nucleus_area": [5000, 10]}}),
     ["validate.mean_nucleus_area", "inverted"]),
    ("d10-inverted-affine", _params_case({"augment": {"affine_scale": [1.2, 0.8]}}),
     ["augment.affine_scale"]),
    ("d10-negative-radius", _params_case({"data": {"synthetic": {"nucleus_radius": [-3, 5]}}}),
     ["data.synthetic.nucleus_radius", "out of range"]),
    ("d10-seed-overflow", _params_case({"seed": 2**64}), ["seed", "64-bit"]),
    ("d10-empty-data-dir", _params_case({"data": {"dir": ""}}), ["data.dir", "empty path"]),
    ("d10-empty-out-dir", _params_case({"train": {"out_dir": " "}}), ["train.out_dir", "empty"]),
    ("d10-empty-url", _params_case({"data": {"url": ""}}), ["data", "url"]),
    ("d10-duplicate-key", _params_case("train:\n  epochs: 9\ntrain:\n  lr: 0.1\n"),
     ["params.yaml", "'train' twice"]),
    ("d10-empty-file", _params_case(""), ["params.yaml", "empty"]),
    ("d8-not-utf8", _params_case(b"train:\n  experiment: caf\xe9\n"), ["params.yaml", "UTF-8"]),
    ("d10-rgb-range", _params_case({"validate": {"rgb_mean": [30, 300]}}), ["validate.rgb_mean"]),
    ("d5-cap-too-low", _params_case({"data": {"max_extract_bytes": 10}}),
     ["data.max_extract_bytes"]),
    # --- archives (defects 1, 5) ---
    ("d5-dotdot-entry", _fetch_zip({**dataset_entries(), "../evil.png": b"x"}),
     ["../evil.png", "outside"]),
    ("d5-absolute-entry", _fetch_zip({**dataset_entries(), "/tmp/kseg-evil.png": b"x"}),
     ["kseg-evil.png"]),
    ("d5-symlink-entry", _fetch_zip(dataset_entries(), links={"images/l.png": "/etc/hostname"}),
     ["images/l.png", "symbolic link"]),
    ("d5-ratio-bomb", _fetch_zip(BOMB), ["images/a.png", "data.max_entry_ratio"]),
    ("d5-total-cap", _fetch_zip(BOMB, max_extract_bytes=2**20, max_entry_ratio=1e9),
     ["data.max_extract_bytes"]),
    ("d5-entries-cap", _fetch_zip(dataset_entries(n=5), max_entries=4), ["data.max_entries"]),
    ("d5-wrong-layout", _fetch_zip({"x/a.png": png_bytes(), "y/a.png": mask_bytes()}),
     ["images/", "nothing was extracted"]),
    ("d5-tnbc-layout", _fetch_zip(dataset_entries(), source="tnbc", sha256="auto"),
     ["TNBC", "nothing was extracted"]),
    ("d12-truncated-zip", lambda t, m: _truncated_zip(t), ["src.zip", "zip"]),
    ("d1-tileid-traversal", _fetch_zip(dataset_entries(TRAVERSAL_INDEX)),
     ["index.csv line 2", "tile_id"]),
    ("d1-absolute-image", _fetch_zip(dataset_entries(ABS_INDEX)),
     ["index.csv line 2, column image", "/etc/hostname"]),
    ("d1-dotdot-image", _fetch_folder(DOTDOT_INDEX), ["index.csv line 2, column image", ".."]),
    ("d1-symlink-image", _fetch_folder(None, link=("images/P1_9.png", "home/.bashrc")),
     ["P1_9.png", "outside the dataset"]),
    ("d12-missing-row-file", _fetch_folder("tile_id,patient,image,mask\nt0,P1,images/no.png,"
                                           "masks/P1_0.png\n"),
     ["index.csv line 2", "images/no.png", "not found in the dataset"]),
    ("d4-foreign-data-dir", _foreign_out("data.dir", "fetch"), ["mine", "not written by kseg"]),
    ("d4-foreign-train-out", _foreign_out("train.out_dir", "train"),
     ["mine", "not written by kseg"]),
    # --- a hostile data/ folder read by prepare (defects 1, 8, 12) ---
    ("d1-prepare-tileid", _prepare("../../x,P1,images/P1_0.png,masks/P1_0.png\n"),
     ["index.csv line 2", "tile_id"]),
    ("d1-prepare-absolute", _prepare("t0,P1,/etc/hostname,masks/P1_0.png\n"),
     ["index.csv line 2", "/etc/hostname"]),
    ("d12-prepare-truncated", _prepare(OK_ROW, {"images/P1_0.png": png_bytes()[:120]}),
     ["P1_0.png", "t0"]),
    ("d8-prepare-bomb", _prepare(OK_ROW, {"images/P1_0.png": huge_png(30000, 30000)}),
     ["P1_0.png"]),
    ("d12-prepare-not-image", _prepare(OK_ROW, {"masks/P1_0.png": b"hello"}), ["masks/P1_0.png"]),
    # --- images given to predict (defects 2, 12) ---
    ("d2-predict-bomb", _predict({"big.png": huge_png(30000, 30000)}), ["big.png", "limit"]),
    ("d2-predict-limit", _predict({"big.png": huge_png(3000, 3000)}, "--max-pixels", "1000000"),
     ["big.png", "1,000,000"]),
    ("d12-predict-text", _predict({"notes.png": b"not an image"}), ["notes.png"]),
    ("d12-predict-truncated", _predict({"cut.png": png_bytes(64, 64)[:200]}), ["cut.png"]),
    ("d12-predict-empty-tif", _predict({"empty.tif": b""}), ["empty.tif"]),
    # --- models (defects 3, 12, 13) ---
    ("d12-model-http", _predict({"a.png": png_bytes()}, model="http://127.0.0.1:9/m"),
     ["--model", "MLflow model URI"]),
    ("d12-model-missing", _predict({"a.png": png_bytes()}, model="no_such_model"),
     ["no_such_model"]),
    ("d3-truncated-weights", _bad_model(_truncate("model.pt")), ["model.pt"]),
    ("d13-pickled-code", _bad_model(_pickle_bomb), ["model.pt", "refuses to run code"]),
    ("d8-one-channel-preprocess", _bad_model(_write("preprocess.json", b'{"mean":[1],"std":[1]}')),
     ["preprocess.json", "3 values"]),
    ("d12-params-json", _bad_model(_write("params.json", b"")), ["params.json"]),
    ("d12-config-json", _bad_model(_write("config.json", b'{"model": {"arch": "foo"}}')),
     ["config.json"]),
]
# fmt: on


def _truncated_zip(tmp: Path) -> tuple[list[str], str]:
    archive = make_zip(tmp / "src.zip", dataset_entries())
    archive.write_bytes(archive.read_bytes()[:300])
    write_params(tmp / "proj", {"data": {"source": "folder", "path": str(archive)}})
    return ["fetch", "-p", "params.yaml"], "data"


@pytest.mark.parametrize(("setup", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing_else(
    setup: Setup, needles: list[str], tmp_path: Path, model_dir: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# the user's shell\n")
    (tmp_path / "proj").mkdir()
    args, output = setup(tmp_path, model_dir)
    skip = (f"proj/{output}",) if output else ()
    before = snapshot(tmp_path, skip)
    code, out = invoke(tmp_path / "proj", args)
    assert code != 0, out
    assert "UNCAUGHT" not in out and "Traceback" not in out, out
    assert "error" in out or "failed" in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in: {out}"
    after = snapshot(tmp_path, skip)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    assert not list((tmp_path / "proj").glob(".*staging*")), "a staging folder was left behind"
    assert not (tmp_path / "proj" / "pwned").exists()


# --- requests to the served model (defect 2) ---


@pytest.fixture(scope="module")
def pyfunc(model_dir: Path):
    from kseg.serving import ARTIFACT_KEY, KsegPyfunc

    model = KsegPyfunc()
    context = types.SimpleNamespace(
        artifacts={ARTIFACT_KEY: str(model_dir)}, model_config={"max_pixels": 1_000_000}
    )
    model.load_context(context)
    return model


def _b64(blob: bytes) -> str:
    import base64

    return base64.b64encode(blob).decode()


REQUESTS = [
    ("d2-huge-png", pd.DataFrame({"image": [_b64(huge_png(12000, 12000))]}), "image[0]"),
    ("d2-over-limit", pd.DataFrame({"image": [_b64(huge_png(1001, 1000))]}), "1,000,000"),
    ("not-base64", pd.DataFrame({"image": ["%%%not base64%%%"]}), "base64"),
    ("base64-text", pd.DataFrame({"image": [_b64(b"hello world")]}), "image[0]"),
    ("second-row", pd.DataFrame({"image": [_b64(png_bytes()), _b64(b"GIF89a")]}), "image[1]"),
    ("number", pd.DataFrame({"image": [12]}), "image[0]"),
    ("no-image-column", pd.DataFrame({"img": ["x"]}), "'image'"),
]


@pytest.mark.parametrize(
    ("frame", "needle"), [r[1:] for r in REQUESTS], ids=[r[0] for r in REQUESTS]
)
def test_bad_request_is_a_clear_4xx(pyfunc, frame: pd.DataFrame, needle: str) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises((MlflowException, ValueError)) as info:
        pyfunc.predict(None, frame)
    assert needle in str(info.value)
    if isinstance(info.value, MlflowException):
        assert info.value.get_http_status_code() == 400


def test_the_table_covers_enough_inputs() -> None:
    assert len(CASES) + len(REQUESTS) >= 40


# --------------------------------------------------------------------------------------------------
# One test per defect of issue 15 that the table cannot show
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.pipeline_helpers import make_prepared_project

    secret_url = "https://mirror.example.org/x.zip?X-Amz-Signature=SECRETQUERY"
    overrides = {"data": {"url": secret_url}, "train": {"epochs": 1}}
    return make_prepared_project(tmp_path_factory.mktemp("hostile") / "project", overrides)


def test_d2_predict_refuses_a_bomb_and_segments_the_rest(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "big.png").write_bytes(huge_png(30000, 30000))  # 900 MP in 100 bytes
    (tmp_path / "ok.png").write_bytes(png_bytes(40, 40))
    code, out = invoke(tmp_path, ["predict", "big.png", "ok.png", "--model", str(model_dir)])
    assert code == 1, out
    assert "big.png: 30000 x 30000 pixels" in out and "100,000,000" in out
    assert (tmp_path / "predictions" / "ok_labels.tif").is_file()
    assert not list((tmp_path / "predictions").glob("big*"))


def _registry_project(tmp_path: Path) -> Path:
    from tests.test_registry import _project

    return _project(tmp_path / "proj")


def test_d3_register_refuses_a_broken_candidate_before_any_registry_change(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kseg.registry import model_digest

    folder = _registry_project(tmp_path)
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    weights = (broken / "model.pt").read_bytes()
    (broken / "model.pt").write_bytes(weights[: len(weights) // 2])
    # Hand-edited metrics that even carry the right digest: the model itself must be checked.
    metrics = {"aji": 0.99, "model_sha256": model_digest(broken)}
    (folder / "metrics").mkdir()
    (folder / "metrics" / "eval.json").write_text(json.dumps(metrics))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    code, out = invoke(folder, ["register", "-p", "params.yaml", "--model", str(broken)])
    assert code != 0
    assert "does not load and run" in out and "model.pt" in out and "nothing was registered" in out
    assert not (folder / "mlflow.db").exists()  # the registry was not even opened
    assert not (folder / "metrics" / "register.json").exists()


def test_d3_register_refuses_metrics_of_another_model(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _registry_project(tmp_path)
    other = make_model_folder(tmp_path / "other", seed=7)
    (folder / "metrics").mkdir()
    for scores in ({"aji": 0.9}, {"aji": 0.9, "model_sha256": "0" * 64}):
        (folder / "metrics" / "eval.json").write_text(json.dumps(scores))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        code, out = invoke(folder, ["register", "-p", "params.yaml", "--model", str(other)])
        assert code != 0
        assert "eval.json" in out and "not of this model" in out and "kseg evaluate" in out
    assert not (folder / "mlflow.db").exists()


def test_d6_no_secret_in_any_file_or_run(
    prepared: Path, tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from tests.pipeline_helpers import copy_project, run_stage

    project = copy_project(prepared, tmp_path / "p")
    host = mlflow_server.removeprefix("http://")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://analyst:SECRETTOKEN@{host}")
    for stage in ("train", "evaluate", "register"):
        run_stage(stage, project)
    found = [
        str(p.relative_to(project))
        for p in project.rglob("*")
        if p.is_file() and (b"SECRETTOKEN" in p.read_bytes() or b"SECRETQUERY" in p.read_bytes())
    ]
    assert found == ["params.yaml"]  # the user's own input, and nothing kseg wrote
    # The run pointer beside the model folder names the run and the (redacted) server.
    summary = json.loads((project / "models" / "kseg.mlflow.json").read_text())
    assert summary["mlflow_tracking_uri"] == f"http://***@{host}"
    assert json.loads((project / "data" / "fetch_params.json").read_text())["url"].endswith("?***")
    run = mlflow.MlflowClient(mlflow_server).get_run(summary["mlflow_run_id"])
    logged = json.dumps([run.data.params, run.data.tags])
    assert "SECRET" not in logged and run.data.params["data.url"].endswith("?***")
    # The registered model bundles train_summary.json: fetched back, it holds no secret either.
    version = json.loads((project / "metrics" / "register.json").read_text())["candidate_version"]
    local = mlflow.artifacts.download_artifacts(
        f"models:/kseg/{version}", dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_server
    )
    blobs = [p.read_bytes() for p in Path(local).rglob("*") if p.is_file()]
    assert blobs and not any(b"SECRETTOKEN" in b for b in blobs)
    # Defect 14: the served model is code and weights, no pickled object.
    names = {p.name for p in Path(local).rglob("*")}
    assert "python_model.pkl" not in names and "kseg_pyfunc.py" in names
    assert "model_code_path" in (Path(local) / "MLmodel").read_text()


FULL_DISK = r"""
import json, resource, sys
from pathlib import Path
import numpy as np
out = Path(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))  # Python ignores SIGXFSZ
result = {}
from kseg.predict import write_outputs
rgb = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)  # ~120 kB PNG
try:
    write_outputs(out, "tile", rgb, np.zeros((200, 200), np.int32))
except OSError as err:
    result["predict"] = str(err)
from kseg.fsutil import atomic_write_bytes
try:
    atomic_write_bytes(out / "big.bin", b"x" * 100_000)
except OSError as err:
    result["bytes"] = str(err)
import torch
from kseg.train import save_checkpoint, TrainState
model = torch.nn.Linear(200, 200)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
try:
    save_checkpoint(out / "ck" / "checkpoint.pt", model, opt, sched, TrainState(), {})
except OSError as err:
    result["checkpoint"] = str(err)
print(json.dumps(result))
"""


def test_d7_full_disk_fails_loudly_and_leaves_nothing_under_a_final_name(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(out)],
        capture_output=True,
        text=True,
        timeout=600,  # seconds on an idle machine; imports crawl on a loaded one
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "tile_overlay.png" in result["predict"]
    assert "big.bin" in result["bytes"] and "file size limit" in result["bytes"]
    assert "checkpoint.pt" in result["checkpoint"] and "cannot write" in result["checkpoint"]
    left = sorted(p.name for p in out.rglob("*") if p.is_file())
    # The labels TIFF (tiny) was complete; the overlay, the blob and the checkpoint never appear,
    # and no temporary file is left behind.
    assert left == ["tile_labels.tif"], left


def _closed_port_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")


def test_d8_train_fails_fast_when_tracking_is_unreachable(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from tests.pipeline_helpers import copy_project

    project = copy_project(prepared, tmp_path / "p")
    _closed_port_env(monkeypatch)
    start = time.perf_counter()
    code, out = invoke(project, ["train", "-p", "params.yaml"])
    assert code != 0
    assert "unreachable" in out and "127.0.0.1" in out and "Traceback" not in out
    assert time.perf_counter() - start < 60
    assert not (project / "models").exists()


def test_d8_checkpoint_is_saved_before_metrics_are_logged(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException

    from kseg.tracking import Tracker
    from tests.pipeline_helpers import copy_project

    project = copy_project(prepared, tmp_path / "p")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")

    def server_died(self, metrics, step):
        raise MlflowException("API request failed: connection refused (the server died)")

    monkeypatch.setattr(Tracker, "log_metrics", server_died)
    code, out = invoke(project, ["train", "-p", "params.yaml"])
    assert code != 0 and "server died" in out and "Traceback" not in out
    checkpoints = list((project / ".checkpoints").rglob("checkpoint.pt"))
    assert len(checkpoints) == 1  # epoch 1 is kept: a rerun resumes after it
    import torch

    assert torch.load(checkpoints[0], weights_only=True)["epoch"] == 1


def test_d9_evaluate_fails_when_tracking_is_unreachable(
    prepared: Path, tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.pipeline_helpers import copy_project

    project = copy_project(prepared, tmp_path / "p")
    model = shutil.copytree(model_dir, project / "models" / "kseg")
    (model / "train_summary.json").write_text(json.dumps({"mlflow_run_id": "0123abcd"}))
    _closed_port_env(monkeypatch)
    code, out = invoke(project, ["evaluate", "-p", "params.yaml"])
    assert code != 0, out
    assert "unreachable" in out and "127.0.0.1" in out


def test_d13_stale_staging_is_cleaned_and_outputs_follow_the_umask(tmp_path: Path) -> None:
    from kseg.fsutil import MARKER
    from tests.pipeline_helpers import write_params as tiny_params

    tiny_params(tmp_path)
    stale = tmp_path / ".data.staging.999999999.abc"  # a killed fetch (no such pid)
    (stale / "images").mkdir(parents=True)
    old = os.umask(0o022)
    try:
        code, out = invoke(tmp_path, ["fetch", "-p", "params.yaml"])
    finally:
        os.umask(old)
    assert code == 0, out
    assert not stale.exists()
    data = tmp_path / "data"
    assert (data / MARKER).is_file()
    assert data.stat().st_mode & 0o777 == 0o755
    assert (data / "fetch_params.json").stat().st_mode & 0o777 == 0o644
    # kseg's own folder is replaced on the next run (the marker says it may).
    code, out = invoke(tmp_path, ["fetch", "-p", "params.yaml"])
    assert code == 0, out


def test_d13_rgba_is_composited_and_a_multipage_tiff_gives_page_one(tmp_path: Path) -> None:
    import tifffile

    from kseg.data.prepare import to_rgb
    from kseg.predict import read_image, to_rgb8

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[0, 0, 3] = 255  # one opaque pixel, the rest transparent (glass)
    got = to_rgb8(rgba)
    assert got[0, 0].tolist() == [10, 20, 30] and got[1, 1].tolist() == [255, 255, 255]
    assert np.array_equal(got, to_rgb(Image.fromarray(rgba)))  # the same as prepare
    pages = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (50, 150)])
    tifffile.imwrite(tmp_path / "stack.tif", pages, photometric="rgb")
    assert np.all(read_image(tmp_path / "stack.tif") == 50)


def test_d13_pickle_refusal_does_not_advise_unsafe_loading(tmp_path: Path, model_dir: Path) -> None:
    from kseg.model import load_model_folder

    bad = shutil.copytree(model_dir, tmp_path / "m")
    _pickle_bomb(bad)
    with pytest.raises(ValueError, match="refuses to run code") as info:
        load_model_folder(bad)
    assert "weights_only=False" not in str(info.value) and "`False`" not in str(info.value)


def test_d13_checksum_advice_never_pins_a_bad_official_archive(tmp_path: Path) -> None:
    from kseg.data.download import ChecksumError, verify_sha256
    from kseg.data.sources import TNBC_SHA256

    (tmp_path / "a.zip").write_bytes(b"corrupt")
    with pytest.raises(ChecksumError) as info:
        verify_sha256(tmp_path / "a.zip", TNBC_SHA256)
    assert "do not change data.sha256" in str(info.value)
    assert "set data.sha256" not in str(info.value)


def test_redaction_keeps_what_is_not_secret() -> None:
    from kseg.safety import redact, redact_text

    assert redact("http://u:p@h:5000/a?b=c#d") == "http://***@h:5000/a?***#***"
    assert redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    assert redact("data/tiles") == "data/tiles"
    assert redact_text("GET https://t0k@h/x?sig=1 failed") == "GET https://***@h/x?*** failed"


def test_d13_flow_checks_stages_before_rewriting_params(project: Path) -> None:
    from flows.retrain import retrain

    before = (project / "params.yaml").read_bytes()
    with pytest.raises(ValueError, match="not in"):
        retrain.fn(epochs=7, stages=["trian"], project_dir=str(project))
    assert (project / "params.yaml").read_bytes() == before


def test_d8_corrupt_tracking_database_is_named(tmp_path: Path) -> None:
    from kseg.tracking import check_tracking

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not an sqlite database, it was truncated by a full disk" * 20)
    with pytest.raises(ValueError, match=r"mlflow\.db: the MLflow tracking database is unreadable"):
        check_tracking(f"sqlite:///{db}")
    check_tracking(f"sqlite:///{tmp_path / 'new.db'}")  # a missing file is a new store: fine
