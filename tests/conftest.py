"""Shared fixtures. Telemetry and update checks of every tool are switched off for the whole run."""

from __future__ import annotations

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
