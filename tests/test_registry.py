"""`kseg register`: the champion gate, the pyfunc model in a fresh process, REST serving.

Model folders are real (tiny, untrained) kseg models; the candidates' test scores are written
into metrics/eval.json by hand so that "better" and "worse" are under the test's control.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kseg.registry import model_digest
from tests.conftest import BIN, free_port, stop_process, wait_http
from tests.pipeline_helpers import make_model_folder, run_stage, write_params

# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _tile(seed: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic H&E image ``(h, w, 3)`` and its instance labels."""
    from kseg.data.synthetic import draw_instances, patient_stain, render_tile

    rng = np.random.default_rng(seed)
    size = max(h, w)
    labels = draw_instances(rng, size, max(4, size * size // 900), (4.0, 7.0))[:h, :w]
    return render_tile(rng, labels, patient_stain(rng)), labels


def _write_prepared(folder: Path, seeds: list[int]) -> None:
    """prepared/ with a test split of 80 x 80 tiles (and empty train/val)."""
    ids = [f"p9_t{s}" for s in seeds]
    for sub in ("images", "labels"):
        (folder / "prepared" / sub).mkdir(parents=True, exist_ok=True)
    for tile_id, seed in zip(ids, seeds, strict=True):
        rgb, labels = _tile(seed, 80, 80)
        Image.fromarray(rgb).save(folder / "prepared" / "images" / f"{tile_id}.png")
        label_path = folder / "prepared" / "labels" / f"{tile_id}.png"
        Image.fromarray(labels.astype(np.uint16)).save(label_path)
    split = {"train": [], "val": [], "test": ids}
    (folder / "prepared" / "split.json").write_text(json.dumps(split))


def _project(folder: Path, register: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_params(folder, {"register": register or {}})
    _write_prepared(folder, [1, 2])
    return folder


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread while inside.

    On a busy 2-core machine two OpenMP threads spin against other processes (measured for
    700 x 900: 1.5 s on one thread, 10-60 s on two); the subprocesses get OMP_NUM_THREADS=1 too,
    so both sides of every comparison run the same kernels.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _segment(model_dir: Path, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local reference segmentation (one torch thread)."""
    from kseg.segmenter import Segmenter

    with _one_thread():
        return Segmenter.from_folder(model_dir).segment(rgb)


def _env(**extra: str) -> dict[str, str]:
    """Environment of a child process: one torch thread, the venv's bin first on PATH."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path, **extra}


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def _register(folder: Path, model: Path, aji: float) -> dict:
    """Fabricated test scores for ``model``, then ``kseg register``; returns register.json."""
    metrics = folder / "metrics"
    metrics.mkdir(exist_ok=True)
    digest = model_digest(model)  # as `kseg evaluate` records it
    scores = {"aji": aji, "pq": aji / 2, "n_tiles": 2, "model_sha256": digest}
    (metrics / "eval.json").write_text(json.dumps(scores))
    run_stage("register", folder, "--model", str(model))
    return json.loads((metrics / "register.json").read_text())


def _client() -> Any:
    import mlflow

    return mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _champion(name: str = "kseg", alias: str = "champion") -> str:
    return str(_client().get_model_version_by_alias(name, alias).version)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four different real model folders (different random weights)."""
    root = tmp_path_factory.mktemp("models")
    return [make_model_folder(root / f"m{i}", seed=i) for i in range(4)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, models: list[Path]) -> Iterator[Path]:
    """A project whose SQLite registry has models[0] as kseg@champion; tracking URI set."""
    folder = _project(tmp_path_factory.mktemp("registry"))
    with _tracking(f"sqlite:///{folder / 'mlflow.db'}"):
        assert _register(folder, models[0], 0.5)["decision"] == "champion"
        yield folder


# --------------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------------


def test_worse_model_stays_challenger_and_better_one_takes_the_alias(
    tmp_path: Path, models: list[Path]
) -> None:
    folder = _project(tmp_path / "proj")
    with _tracking(f"sqlite:///{folder / 'mlflow.db'}"):
        first = _register(folder, models[0], 0.50)
        assert (first["decision"], first["candidate_version"], _champion()) == ("champion", 1, "1")
        assert first["champion_version_before"] is None

        worse = _register(folder, models[1], 0.40)
        assert worse["decision"] == "challenger" and not worse["promoted"]
        assert _champion() == "1" and _champion(alias="challenger") == "2"
        assert worse["champion_value_before"] == 0.50 and worse["candidate_value"] == 0.40
        assert worse["champion_value_source"] == "version tag"
        assert "0.4000 does not beat champion version 1 (0.5000" in worse["reason"]

        equal = _register(folder, models[2], 0.50)  # a tie keeps the champion
        assert (equal["decision"], _champion(), equal["champion_version_after"]) == (
            "challenger",
            "1",
            1,
        )

        again = _register(folder, models[0], 0.50)  # same model: no new version
        assert again["decision"] == "already_champion" and again["candidate_reused_version"]
        assert again["candidate_version"] == 1

        better = _register(folder, models[3], 0.61)
        assert (better["decision"], better["candidate_version"], _champion()) == (
            "champion",
            4,
            "4",
        )
        assert better["champion_version_before"] == 1 and "beats" in better["reason"]

        client = _client()
        assert len(client.search_model_versions("name = 'kseg'")) == 4
        tags = client.get_model_version("kseg", "4").tags
        assert float(tags["test_aji"]) == 0.61 and float(tags["test_pq"]) == 0.305
        assert tags["test_split_sha256"] == better["test_split_sha256"]
        assert tags["decision"] == "champion" and tags["eval_metric"] == "aji"
        for key in ("git_commit", "data_version", "model_sha256", "params_hash", "run_id"):
            assert tags[key]
        assert client.get_model_version("kseg", "2").tags["decision"] == "challenger"
        # The raw torch weights are logged beside the pyfunc model, in the same run.
        run_files = {f.path for f in client.list_artifacts(tags["run_id"], "kseg_model")}
        assert "kseg_model/model.pt" in run_files


def _evaluate(folder: Path, model: Path) -> dict:
    """A real ``kseg evaluate`` of ``model`` on the project's test split; returns eval.json."""
    run_stage("evaluate", folder, "--model", str(model))
    return json.loads((folder / "metrics" / "eval.json").read_text())


def test_champion_scored_on_another_split(tmp_path: Path, models: list[Path]) -> None:
    """Refused with a clear message, or re-scored on this split (never compared across splits)."""
    folder = _project(tmp_path / "proj", {"on_split_mismatch": "refuse"})
    with _tracking(f"sqlite:///{folder / 'mlflow.db'}"):
        on_first_split = _evaluate(folder, models[0])["aji"]
        _register(folder, models[0], 0.9)
        shutil.rmtree(folder / "prepared")
        _write_prepared(folder, [3, 4, 5])  # another test split
        with pytest.raises(AssertionError, match="scored on test split"):
            _register(folder, models[1], 0.95)
        assert _champion() == "1"
        assert len(_client().search_model_versions("name = 'kseg'")) == 1  # nothing logged

        write_params(folder, {"register": {"on_split_mismatch": "reevaluate"}})
        report = _register(folder, models[1], 0.95)
        # What `kseg evaluate` says of the champion on the new split, not what register's own
        # scoring function says: re-scoring must be the evaluate stage's AJI, tile for tile.
        evaluated = _evaluate(folder, models[0])
    assert evaluated["model_sha256"] == model_digest(models[0]) and evaluated["n_tiles"] == 3
    assert report["champion_value_source"] == "re-evaluated on this test split"
    assert report["champion_value_before"] == pytest.approx(evaluated["aji"], abs=1e-12)
    # The champion really scores differently here than on its own split (and than 0.9), so a
    # stale value could not pass; 0.95 beats an untrained model.
    assert evaluated["aji"] != pytest.approx(on_first_split, abs=1e-6)
    assert evaluated["aji"] != 0.9 and report["decision"] == "champion"


def test_interrupted_registration_leaves_the_alias_and_a_rerun_finishes_it(
    tmp_path: Path, models: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also: a model whose training run is on this server is logged into that run."""
    import mlflow

    from kseg.config import load_params
    from kseg.registry import register

    folder = _project(tmp_path / "proj")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    _register(folder, models[0], 0.5)
    report_before = (folder / "metrics" / "register.json").read_text()
    client = _client()
    run_id = client.create_run(client.get_experiment_by_name("kseg").experiment_id).info.run_id
    trained = shutil.copytree(models[1], tmp_path / "trained")
    (trained / "train_summary.json").write_text(json.dumps({"mlflow_run_id": run_id}))
    scores = {"aji": 0.7, "model_sha256": model_digest(trained)}
    (folder / "metrics" / "eval.json").write_text(json.dumps(scores))
    params = load_params(folder / "params.yaml")
    monkeypatch.chdir(folder)

    real = mlflow.MlflowClient.set_registered_model_alias

    def interrupted(self, name: str, alias: str, version: str) -> None:
        if alias == "champion":
            raise KeyboardInterrupt  # the process is stopped just before the alias moves
        real(self, name, alias, version)

    with monkeypatch.context() as patch:
        patch.setattr(mlflow.MlflowClient, "set_registered_model_alias", interrupted)
        with pytest.raises(KeyboardInterrupt):
            register(params, trained)
    assert _champion() == "1"
    assert client.get_model_version("kseg", "2").tags["decision"] == "pending"
    assert (folder / "metrics" / "register.json").read_text() == report_before

    report = register(params, trained)  # the rerun reuses version 2 and finishes the job
    assert (report["decision"], report["candidate_reused_version"], _champion()) == (
        "champion",
        True,
        "2",
    )
    version = client.get_model_version("kseg", "2")
    assert version.tags["decision"] == "champion"
    assert version.run_id == run_id and version.tags["run_id"] == run_id
    assert len(client.search_model_versions("name = 'kseg'")) == 2


# --------------------------------------------------------------------------------------------------
# Using the champion: fresh process, REST server, kseg predict
# --------------------------------------------------------------------------------------------------

FRESH_LOAD = """
import json, sys
import numpy as np
import mlflow
from PIL import Image
import io, base64
model = mlflow.pyfunc.load_model("models:/kseg@champion")
import kseg
import pandas as pd
b64 = base64.b64encode(open(sys.argv[1], "rb").read()).decode()
out = model.predict(pd.DataFrame({"image": [b64]}), params={"return_distance": True})
from kseg.serving import decode_distance, decode_labels
np.save(sys.argv[2], decode_labels(out["labels"][0]))
np.save(sys.argv[3], decode_distance(out["distance"][0]))
print(json.dumps({"kseg": kseg.__file__, "n": int(out["n_nuclei"][0])}))
"""


def test_champion_loads_in_a_fresh_process_and_segments_700x900(
    registry: Path, models: list[Path], tmp_path: Path
) -> None:
    rgb, _ = _tile(7, 700, 900)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    script = tmp_path / "load.py"
    script.write_text(FRESH_LOAD)
    proc = subprocess.run(
        [sys.executable, str(script), "big.png", "labels.npy", "dist.npy"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=_env(PYTHONPATH=""),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    labels, dist = np.load(tmp_path / "labels.npy"), np.load(tmp_path / "dist.npy")
    want_labels, want_dist = _segment(models[0], rgb)
    assert labels.shape == (700, 900) and info["n"] == want_labels.max() > 0
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(dist, want_dist, rtol=0, atol=1e-4)
    # kseg came from the code bundled in the logged model, not from the repository checkout.
    assert "/code/kseg/" in info["kseg"], info["kseg"]


def test_mlflow_models_serve_answers_the_documented_request(
    registry: Path, models: list[Path], tmp_path: Path
) -> None:
    from kseg.serving import decode_labels, encode_image

    port = free_port()
    log_file = (tmp_path / "serve.log").open("w")
    exe = shutil.which("mlflow", path=str(BIN)) or "mlflow"
    cmd = [exe, "models", "serve", "-m", "models:/kseg@champion", "--env-manager", "local"]
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=_env(),  # the server execs `uvicorn` by name: the venv's bin must be on PATH
    )
    rgb, _ = _tile(11, 130, 170)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=proc)
        body = {"dataframe_split": {"columns": ["image"], "data": [[encode_image(rgb)]]}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as resp:
            answer = json.loads(resp.read())
        # Request params travel over REST too (declared in the signature) and reach the model:
        # a valid one is applied, an unknown value is a 400 that names it.
        answers = []
        for params in ({"tta": "flips"}, {"tta": "rot45"}):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps({**body, "params": params}).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=120) as resp:
                    answers.append((resp.status, json.loads(resp.read())))
            except urllib.error.HTTPError as err:
                answers.append((err.code, json.loads(err.read())))
    finally:
        stop_process(proc)
        log_file.close()
    assert proc.poll() is not None
    (row,) = answer["predictions"]
    want, _ = _segment(models[0], rgb)
    assert row["labels_format"] == "png" and (row["height"], row["width"]) == (130, 170)
    assert row["n_nuclei"] == want.max() and "distance" not in row
    np.testing.assert_array_equal(decode_labels(row["labels"]), want)
    from kseg.segmenter import Segmenter

    seg = Segmenter.from_folder(models[0])
    seg.model_config = seg.model_config.model_copy(update={"infer_tta": "flips"})
    with _one_thread():
        want_flips, _ = seg.segment(rgb)
    (status, flipped), (bad_status, bad) = answers
    assert status == 200, flipped
    np.testing.assert_array_equal(decode_labels(flipped["predictions"][0]["labels"]), want_flips)
    assert bad_status == 400 and "params.tta='rot45': expected one of" in bad["message"], bad


def test_kseg_predict_from_the_registry(registry: Path, models: list[Path], tmp_path: Path) -> None:
    import tifffile
    from typer.testing import CliRunner

    from kseg.cli import app

    rgb, _ = _tile(13, 90, 120)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    out = tmp_path / "out"
    args = ["predict", str(tmp_path / "x.png"), "--out", str(out)]
    args += ["--model", "models:/kseg@champion"]
    with _one_thread():
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    want, _ = _segment(models[0], rgb)
    np.testing.assert_array_equal(tifffile.imread(out / "x_labels.tif"), want)


def test_registration_against_a_real_mlflow_server(
    mlflow_server: str, tmp_path: Path, models: list[Path]
) -> None:
    from kseg.predict import resolve_model
    from kseg.registry import model_digest

    name = f"kseg-{tmp_path.name}"  # the server is shared by the session
    folder = _project(tmp_path / "proj", {"model_name": name})
    with _tracking(mlflow_server):
        first = _register(folder, models[0], 0.5)
        worse = _register(folder, models[1], 0.3)
        assert (first["decision"], worse["decision"]) == ("champion", "challenger")
        assert _champion(name) == "1" and _champion(name, "challenger") == "2"
        assert first["tracking_uri"] == mlflow_server
        local = resolve_model(f"models:/{name}@champion", tmp_path / "dl")
    assert model_digest(local) == model_digest(models[0])
