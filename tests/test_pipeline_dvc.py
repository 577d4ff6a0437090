"""`dvc repro` on a scratch copy of the project: runs what exists, then has nothing to do."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
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
    # The committed lock matches what a fresh run produces: synthetic data is deterministic.
    lock = (dvc_project / "dvc.lock").read_text()
    committed = REPO / "dvc.lock"
    if committed.exists():
        for line in committed.read_text().splitlines():
            if ".dir" in line:
                assert line in lock
    assert _tree_hash(dvc_project / "data") == data_hash
