"""The Prefect ``retrain`` flow: end-to-end under the test harness, a real server + worker, retries.

Every flow run here drives the real pipeline: each task is a ``dvc repro --single-item`` process
in a scratch git + DVC copy of the project with the tiny synthetic parameters.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

from flows.retrain import retrain, set_params, stage_order
from kseg.config import ConfigError, load_params
from tests.conftest import stop_process, wait_http
from tests.pipeline_helpers import write_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_project(folder: Path, overrides: dict | None = None, deploy: bool = False) -> Path:
    """A git + DVC repository holding the pipeline files, kseg's sources and tiny params."""
    folder.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", folder / "dvc.yaml")
    ignore = shutil.ignore_patterns("__pycache__")
    # dvc.yaml lists kseg/*.py files as deps: they must exist in the project.
    shutil.copytree(REPO / "kseg", folder / "kseg", ignore=ignore)
    shutil.copytree(REPO / ".dvc", folder / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    if deploy:
        shutil.copytree(REPO / "flows", folder / "flows", ignore=ignore)
        shutil.copy(REPO / "prefect.yaml", folder / "prefect.yaml")
    write_params(folder, overrides)
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    return folder


@pytest.fixture
def no_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages track to sqlite:///mlflow.db inside the project, whatever the caller's shell says."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# --- params editing (no Prefect run needed) ---


def test_set_params_keeps_comments_and_validates_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    before = path.read_text()
    assert set_params(path, {"train.epochs": 7, "data.url": "http://127.0.0.1:1/x.zip"})
    text = path.read_text()
    assert "url: http://127.0.0.1:1/x.zip" in text
    # Every comment line of the original survives, and untouched nulls stay `null`.
    assert [ln for ln in before.splitlines() if ln.lstrip().startswith("#")] == [
        ln for ln in text.splitlines() if ln.lstrip().startswith("#")
    ]
    assert "sha256: null" in text
    cfg = load_params(path)
    assert (cfg.train.epochs, cfg.data.url) == (7, "http://127.0.0.1:1/x.zip")
    assert not set_params(path, {"train.epochs": 7})  # same value: file untouched
    with pytest.raises(ConfigError, match=r"train\.device: 'gpu' is not allowed"):
        set_params(path, {"train.device": "gpu"})
    assert path.read_text() == text


def test_flow_parameter_types_come_from_the_params_models() -> None:
    from prefect.utilities.callables import parameter_schema

    from kseg.config import DataConfig, TrainConfig

    props = parameter_schema(retrain.fn).model_dump()["properties"]

    def allowed(name: str) -> dict:
        return next(t for t in props[name]["anyOf"] if t.get("type") != "null")

    source = DataConfig.model_fields["source"].annotation
    assert allowed("source")["enum"] == list(source.__args__)
    device = TrainConfig.model_fields["device"].annotation
    assert allowed("device")["enum"] == list(device.__args__)
    epochs = TrainConfig.model_json_schema()["properties"]["epochs"]
    assert (allowed("epochs")["minimum"], allowed("epochs")["maximum"]) == (
        epochs["minimum"],
        epochs["maximum"],
    )
    assert allowed("url")["type"] == allowed("sha256")["type"] == "string"
    # Prefect checks a run's values against the same rules before params.yaml is touched.
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError):
        retrain.validate_parameters({"epochs": 0})
    with pytest.raises(ParameterTypeError):
        retrain.validate_parameters({"device": "gpu"})
    assert retrain.validate_parameters({"epochs": 2, "device": "cpu"})["epochs"] == 2


def test_stage_order_follows_the_dependency_graph(tmp_path: Path) -> None:
    stages = {
        "report": {"cmd": "x", "deps": ["metrics/eval.json"]},
        "evaluate": {"cmd": "x", "deps": ["models/m"], "metrics": [{"metrics/eval.json": {}}]},
        "train": {"cmd": "x", "deps": ["data/tiles", "kseg/train.py"], "outs": ["models/m"]},
        "fetch": {"cmd": "x", "outs": ["data"]},
        # A check nobody consumes: it runs as soon as its input exists, before training.
        "check": {"cmd": "x", "deps": ["data/tiles/index.csv"], "outs": ["reports/check.html"]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    assert stage_order(tmp_path) == ["fetch", "check", "train", "evaluate", "report"]
    stages["fetch"]["deps"] = ["metrics/eval.json"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(ValueError, match="cycle") as cycle:
        stage_order(tmp_path)
    assert str((tmp_path / "dvc.yaml").resolve()) in str(cycle.value)
    order = stage_order(REPO)
    assert order[:2] == ["check_params", "fetch"]  # params validated before anything is deleted
    assert set(order) == set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    if {"prepare", "validate", "train"} <= set(order):  # the data gate comes before training
        assert order.index("prepare") < order.index("validate") < order.index("train")


def test_stage_order_uses_dvcs_graph_and_ignores_other_dvc_files(tmp_path: Path) -> None:
    stages = {
        # Depends on a folder that holds another stage's output file, and on a .dvc file's output.
        "summary": {"cmd": "x", "deps": ["metrics", "raw"], "outs": ["summary.md"]},
        "score": {"cmd": "x", "deps": ["models/m"], "metrics": [{"metrics/score.json": {}}]},
        "train": {"cmd": "x", "deps": ["raw/archive.zip"], "outs": ["models/m"]},
        "lint": {"cmd": "x", "deps": ["raw"], "outs": ["reports/lint.txt"]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    # A `dvc add`ed folder (like data.dvc): part of DVC's graph, not a stage the flow runs.
    (tmp_path / "raw.dvc").write_text(yaml.safe_dump({"outs": [{"path": "raw", "md5": "0" * 32}]}))
    assert stage_order(tmp_path) == ["lint", "train", "score", "summary"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages:\n  a: {cmd: x\n", "DVC cannot build the pipeline.*corrupted"),
        ("stages:\n  a: {cmd: x, bogus: 1}\n", "validation failed.*extra keys"),
        ("stages:\n  a: {cmd: x, outs: [o]}\n  b: {cmd: y, outs: [o]}\n", "specified in"),
        (None, "not found"),
    ],
)
def test_stage_order_names_dvc_yaml_when_it_is_broken(
    tmp_path: Path, text: str | None, message: str
) -> None:
    if text is not None:
        (tmp_path / "dvc.yaml").write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        stage_order(tmp_path)
    assert str(info.value).startswith(str((tmp_path / "dvc.yaml").resolve()))


# --- flow runs under the test harness ---


def _task_runs(flow_state) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])
            )
        )


def _logs(task_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])))
    return [log.message for log in logs]


def _artifact_markdown(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    assert [a.key for a in arts] == ["kseg-retrain"]
    return str(arts[0].data)


@pytest.mark.slow
@pytest.mark.usefixtures("harness", "no_mlflow_env")
def test_retrain_end_to_end_then_skips_unchanged_stages(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    import logging

    # The suite runs Prefect at WARNING; the streamed stage output is logged at INFO.
    task_logger = logging.getLogger("prefect.task_runs")
    request.addfinalizer(lambda level=task_logger.level: task_logger.setLevel(level))
    task_logger.setLevel(logging.INFO)
    project = make_project(tmp_path / "p")
    params_before = (project / "params.yaml").read_bytes()
    order = stage_order(project)
    state = retrain(project_dir=str(project), epochs=1, return_state=True)
    assert state.is_completed(), state.message
    first, first_state = state.result(), state
    assert [r["stage"] for r in first["stages"]] == order
    assert all(r["ran"] for r in first["stages"]), first["stages"]
    assert first["params_changed"]
    # The flow parameter applied to this run only: the lock records it, params.yaml is restored.
    assert (project / "params.yaml").read_bytes() == params_before
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] == 1
    assert json.loads((project / "metrics/train.json").read_text())["epochs_run"] == 1
    markdown = _artifact_markdown(state.state_details.flow_run_id)
    summary = json.loads((project / "models/kseg/train_summary.json").read_text())
    pointer = json.loads((project / "models/kseg.mlflow.json").read_text())
    assert pointer["mlflow_run_id"] in markdown
    assert "`train.epochs`: `1`" in markdown
    assert summary["epochs_run"] == 1
    for key, value in json.loads((project / "metrics/eval.json").read_text()).items():
        if isinstance(value, float):
            assert f"| {key} | {value:.4f} |" in markdown
    if (project / "metrics/register.json").exists():
        assert "no registry decision yet" not in markdown

    lock_text = (project / "dvc.lock").read_text()
    state = retrain(project_dir=str(project), epochs=1, return_state=True)
    second = state.result()
    assert [(r["stage"], r["status"]) for r in second["stages"]] == [(s, "skipped") for s in order]
    assert (project / "dvc.lock").read_text() == lock_text
    assert (project / "params.yaml").read_bytes() == params_before
    # Skipped stages are told apart from those that ran, by their state's name.
    assert {r.state_name for r in _task_runs(state)} == {"Skipped", "Completed"}  # report ran
    # The train task's log holds the stage's own output (its epochs), streamed from DVC.
    train_run = next(r for r in _task_runs(first_state) if r.name == "train")
    assert any("epoch 1/1" in line for line in _logs(train_run.id))


@pytest.mark.usefixtures("harness")
def test_failing_validation_fails_the_flow_with_its_output_and_report(tmp_path: Path) -> None:
    # 5 patients, 2 tiles each: no split can hold the 50 tiles this asks for.
    project = make_project(tmp_path / "p", {"validate": {"min_tiles_per_split": 50}})
    state = retrain(project_dir=str(project), return_state=True)
    assert state.is_failed()
    with pytest.raises(RuntimeError) as err:
        state.result()
    message = str(err.value)
    assert "stage 'validate' failed" in message
    # kseg validate's own lines name the failing expectation; the run never reached training.
    assert "expect_column_values_to_be_between(n_tiles)" in message
    report = project / load_params(project / "params.yaml").validate.report
    assert report.is_file()
    assert report.resolve().as_uri() in message
    assert not (project / "models").exists()


# --- a real Prefect server, the checked-in deployment and a worker ---


def _api(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _model_versions(project: Path) -> list[tuple[str, str]]:
    """(name, version) of every registered model version in the project's MLflow database."""
    if not (project / "mlflow.db").exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    return sorted((v.name, v.version) for v in client.search_model_versions())


@pytest.mark.slow
@pytest.mark.usefixtures("harness")
def test_deployment_schedule_and_worker_run_on_a_real_server(tmp_path: Path) -> None:
    """The harness's server (a real `prefect server` API process, shared with the other tests):
    the CLI deploys, a worker process runs the deployment with a parameter."""
    from prefect.settings import PREFECT_API_URL

    project = make_project(tmp_path / "p", deploy=True)
    params_before = (project / "params.yaml").read_bytes()
    api = str(PREFECT_API_URL.value()).rstrip("/")
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect_home"),
        "PREFECT_API_URL": api,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # the stages track to the project's mlflow.db
    prefect = str(BIN / "prefect")

    def cli(*args: str, cwd: Path = tmp_path) -> str:
        proc = subprocess.run(
            [prefect, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    procs: list[subprocess.Popen] = []
    try:
        wait_http(f"{api}/health", timeout=120)
        spec = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
        pool = spec["work_pool"]["name"]
        cli("work-pool", "create", pool, "--type", "process")
        cli("--no-prompt", "deploy", "--all", cwd=project)

        deployment = _api(f"{api}/deployments/name/retrain/{spec['name']}")
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [
            s["cron"] for s in spec["schedules"]
        ]
        assert all(s["active"] for s in deployment["schedules"])
        # The templated working directory is the folder the deployment was registered from.
        step = deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
        assert Path(step["directory"]) == project

        assert _model_versions(project) == []
        run = _api(
            f"{api}/deployments/{deployment['id']}/create_flow_run",
            {"parameters": {"epochs": 1}},
        )
        worker = subprocess.Popen(
            [prefect, "worker", "start", "--pool", pool, "--run-once"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        procs.append(worker)
        output, _ = worker.communicate(timeout=400)
        state = _api(f"{api}/flow_runs/{run['id']}")["state"]
        assert state["type"] == "COMPLETED", f"{state}\n{output[-4000:]}"
        # The run's parameter applied to that run only: the lock records it, params.yaml is
        # as before, so the next run without parameters uses the committed configuration.
        assert (project / "params.yaml").read_bytes() == params_before
        lock = yaml.safe_load((project / "dvc.lock").read_text())
        assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] == 1
        # The register stage added the first version of the model to the project's registry.
        assert len(_model_versions(project)) == 1
    finally:
        for proc in reversed(procs):
            stop_process(proc)
    for proc in procs:
        assert proc.poll() is not None


# --- fetch retries ---


def _tnbc_zip() -> bytes:
    """A one-tile archive in the layout of the official TNBC zip."""
    from PIL import Image

    def png(mode: str, value: int) -> bytes:
        buf = io.BytesIO()
        Image.new(mode, (32, 32), value).save(buf, format="PNG")
        return buf.getvalue()

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("TNBC_NucleiSegmentation/Slide_01/01_1.png", png("RGBA", 128))
        zf.writestr("TNBC_NucleiSegmentation/GT_01/01_1.png", png("L", 0))
    return buf.getvalue()


class _FlakyServer(http.server.ThreadingHTTPServer):
    """Answers 503 to the first ``failures`` requests, then serves ``body``."""

    def __init__(self, body: bytes, failures: int) -> None:
        self.body, self.failures, self.requests = body, failures, 0
        super().__init__(("127.0.0.1", 0), _FlakyHandler)


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    server: _FlakyServer

    def do_GET(self) -> None:
        self.server.requests += 1
        if self.server.requests <= self.server.failures:
            self.send_error(503, "try again later")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.usefixtures("harness")
def test_fetch_fails_twice_then_the_task_retries_succeed(tmp_path: Path) -> None:
    import hashlib

    body = _tnbc_zip()
    # retries: 0 turns the downloader's own retries off: each failed request fails `kseg fetch`,
    # so only the flow's task retries can get past the two 503s.
    project = make_project(tmp_path / "p", {"data": {"retries": 0, "timeout_s": 10.0}})
    server = _FlakyServer(body, failures=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/TNBC_NucleiSegmentation.zip"
        state = retrain(
            project_dir=str(project),
            source="tnbc",
            url=url,
            sha256=hashlib.sha256(body).hexdigest(),
            stages=["fetch"],
            return_state=True,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert state.is_completed(), state.message
    assert [(r["stage"], r["status"]) for r in state.result()["stages"]] == [
        ("check_params", "ran"),
        ("fetch", "ran"),
    ]
    assert server.requests == 3
    assert (project / "data/TNBC_NucleiSegmentation/GT_01/01_1.png").is_file()
    fetch_run = next(r for r in _task_runs(state) if r.name == "fetch")
    assert fetch_run.run_count == 3  # two failed attempts, then the one that succeeded

    # A permanent error (an archive that is not there) fails at once: no retry, params restored.
    before = (project / "params.yaml").read_bytes()
    state = retrain(
        project_dir=str(project),
        source="tnbc",
        url=str(tmp_path / "missing.zip"),
        stages=["fetch"],
        return_state=True,
    )
    assert state.is_failed()
    assert (project / "params.yaml").read_bytes() == before
    (fetch_run,) = [r for r in _task_runs(state) if r.name == "fetch"]
    assert fetch_run.run_count == 1, "a configuration error must not be retried"
