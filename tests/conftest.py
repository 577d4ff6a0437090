"""Shared fixtures. Telemetry and update checks of every tool are switched off for the whole run."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Offline and quiet: no tool may phone home from a test (see docs/environment.md of the team).
for _key, _value in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ.setdefault(_key, _value)
# The opt-in compiled inference kernels would add a compile to every process a test starts; the
# tests that need them turn them on themselves.
os.environ.pop("KSEG_FUSED_EVAL", None)
# `kseg predict` / serving default to `--runtime auto`, which exports the model to ONNX and times
# every installed runtime once per model; tests that are not about runtimes keep torch (the ones
# that are, tests/test_export.py, choose theirs explicitly).
os.environ.setdefault("KSEG_RUNTIME", "torch")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def shared_dir() -> Path | None:
    """The team's shared folder (reference tensors, TNBC data), or None when absent."""
    env = os.environ.get("KSEG_SHARED")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared", REPO.parents[1] / "shared"]
    for cand in candidates:
        if (cand / "reference").is_dir() or (cand / "data").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def harness():
    """One temporary Prefect API (SQLite) for every in-process flow run of the session.

    Shared by tests/test_flows.py and tests/test_slide_flow.py so that it starts once (~10 s).
    """
    from prefect.testing.utilities import prefect_test_harness

    # KSEG_PREFECT_STARTUP_TIMEOUT: more seconds on a machine shared with a training run
    timeout = int(os.environ.get("KSEG_PREFECT_STARTUP_TIMEOUT", "300"))
    with prefect_test_harness(server_startup_timeout=timeout):
        yield


@pytest.fixture(scope="session")
def shared() -> Path:
    """Path of ../shared; skips the test when it is not there."""
    path = shared_dir()
    if path is None:
        pytest.skip("../shared (reference tensors and TNBC data) not found; set KSEG_SHARED")
    return path


@pytest.fixture(scope="session")
def tnbc_dir(shared: Path) -> Path:
    """The real TNBC dataset folder, laid out as its official archive."""
    path = shared / "data" / "TNBC_NucleiSegmentation"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


def run_kseg(*args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Runs the installed ``kseg`` console script in ``cwd`` (a real process)."""
    exe = shutil.which("kseg", path=str(BIN)) or "kseg"
    proc = subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kseg {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A scratch copy of the project's pipeline files (params.yaml, dvc.yaml) to run stages in."""
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Polls ``url`` until it answers 200, or fails with the server's output."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not come up in {timeout:.0f} s")


def stop_process(proc: subprocess.Popen) -> None:
    """Stops a server by its PID (SIGTERM, then SIGKILL), and its process group."""
    import signal

    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    # Children (uvicorn workers, job runners) share the group started with start_new_session.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite backend; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    exe = shutil.which("mlflow", path=str(BIN)) or "mlflow"
    log_file = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            exe,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        cwd=root,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc=proc)
        yield url
    finally:
        stop_process(proc)
        log_file.close()
