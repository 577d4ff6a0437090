"""`dvc repro` on a scratch copy of the project: runs every stage, then has nothing to do."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline_helpers import write_params

REPO = Path(__file__).resolve().parents[1]


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    write_params(tmp_path)  # the tiny configuration: the whole pipeline in seconds
    shutil.copytree(REPO / "kseg", tmp_path / "kseg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def _tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_repro_twice_second_does_nothing(dvc_project: Path) -> None:
    first = _dvc("repro", cwd=dvc_project)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'fetch'" in first.stdout
    data_hash = _tree_hash(dvc_project / "data")
    second = _dvc("repro", cwd=dvc_project)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout
    assert _tree_hash(dvc_project / "data") == data_hash
    # Every stage of dvc.yaml ran and is recorded in the lock.
    stages = yaml.safe_load((dvc_project / "dvc.yaml").read_text())["stages"]
    lock = yaml.safe_load((dvc_project / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(stages)
    for name in stages:
        assert f"Running stage '{name}'" in first.stdout
