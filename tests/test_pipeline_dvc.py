"""`dvc repro` on a scratch copy of the project: runs every stage, then has nothing to do; what
DVC shows afterwards (metrics diff against the commit, experiments table, plots) has content."""

from __future__ import annotations

import hashlib
import json
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
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    shutil.copy(REPO / "data.dvc", tmp_path / "data.dvc")  # raw/ absent: repro is unaffected
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


def _git(*args: str, cwd: Path) -> str:
    cmd = ["git", "-c", "user.name=kseg test", "-c", "user.email=test@kseg.invalid", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout


def _lock_md5(project: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]
    return next(o["md5"] for o in lock["outs"] if o["path"] == path)


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

    _check_committed_metrics_and_plots(dvc_project)


def _check_committed_metrics_and_plots(project: Path) -> None:
    """After a commit: metrics diff has a baseline, exp show has values, plots have data, and a
    forced retraining gives the same model hash with an MLflow run tagged clean."""
    remote = project.parent / "dvc_remote"
    assert _dvc("remote", "add", "-d", "team", str(remote), cwd=project).returncode == 0
    _git("add", "-A", cwd=project)
    _git("commit", "-q", "-m", "pipeline run", cwd=project)

    # The raw dataset travels through the DVC remote byte for byte: push, clone, pull.
    pushed = _dvc("push", "fetch", cwd=project)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    clone = project.parent / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    pulled = _dvc("pull", "fetch", cwd=clone)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert _tree_hash(clone / "data") == _tree_hash(project / "data")
    assert _dvc("status", "fetch", cwd=clone).stdout.strip().endswith("up to date.")

    tracked = _git("ls-files", "metrics", cwd=project).split()
    assert {"metrics/train.json", "metrics/eval.json", "metrics/register.json"} <= set(tracked)
    model_md5 = _lock_md5(project, "train", "models/kseg")

    # The numbers DVC compares: no text, ids or timings.
    shown = json.loads(_dvc("metrics", "show", "--json", cwd=project).stdout)
    if isinstance(shown, list):
        files = shown[0]["data"]
    else:  # DVC 3 names the workspace "" (older releases "workspace")
        files = shown["" if "" in shown else "workspace"]["data"]

    def leaves(d: object) -> list:  # (validation.json lists failures: none after a pass)
        if isinstance(d, dict | list):
            return [x for v in (d.values() if isinstance(d, dict) else d) for x in leaves(v)]
        return [d]

    for name, content in files.items():
        # eval.json's model_sha256 ties the scores to the weights register checks (issue 15): the
        # one non-number, and not a score a person compares.
        data = {k: v for k, v in content["data"].items() if k != "model_sha256"}
        values = leaves(data)
        assert values and all(isinstance(v, int | float) for v in values), (name, values)
        assert len(values) <= 16, f"{name}: {len(values)} columns in dvc exp show"
        assert "seconds" not in json.dumps(content) and "per_s" not in json.dumps(content), name

    # Two identical trainings: one DVC hash; the run is not "dirty" for DVC's own writes (here a
    # rewritten metrics file, as `dvc repro` of the stages before train leaves them).
    validation = project / "metrics" / "validation.json"
    validation.write_text(json.dumps(json.loads(validation.read_text())))
    assert _git("status", "--porcelain", cwd=project).strip() == "M metrics/validation.json"
    forced = _dvc("repro", "-f", "-s", "train", cwd=project)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert _lock_md5(project, "train", "models/kseg") == model_md5
    import mlflow

    pointer = json.loads((project / "models" / "kseg.mlflow.json").read_text())
    run = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(
        pointer["mlflow_run_id"]
    )
    assert run.data.tags["git_dirty"] == "false", _git("status", "--porcelain", cwd=project)
    assert (
        run.data.tags["mlflow.source.git.commit"] == _git("rev-parse", "HEAD", cwd=project).strip()
    )

    # The committed values are the baseline of `dvc metrics diff` (none "missing").
    diff = _dvc("metrics", "diff", "HEAD", "--all", "--json", cwd=project)
    assert diff.returncode == 0, diff.stderr
    train = json.loads(diff.stdout)["metrics/train.json"]
    assert train["val.aji"]["old"] is not None and train["val.aji"]["new"] is not None
    exp = _dvc("exp", "show", "--json", "--no-pager", cwd=project)
    assert exp.returncode == 0, exp.stderr
    rows = json.loads(exp.stdout)  # the workspace, then the commit (the baseline)
    assert [r["rev"] for r in rows][:1] == ["workspace"] and len(rows) >= 2
    for row in rows:
        for name, content in row["data"]["metrics"].items():
            assert "error" not in content and content["data"], (row["rev"], name, content)

    # Every declared plot has data; per-tile AJI on a categorical axis of tile ids.
    shown_plots = json.loads(_dvc("plots", "show", "--json", cwd=project).stdout)
    assert not shown_plots.get("errors"), shown_plots["errors"]
    plots = shown_plots["data"]
    assert {"losses", "validation", "test_tiles"} <= set(plots)
    for name in ("losses", "validation", "test_tiles"):
        (plot,) = plots[name]
        values = plot["content"]["data"]["values"]
        assert values, name
    tiles = plots["test_tiles"][0]["content"]
    assert tiles["encoding"]["y"]["type"] == "nominal"
    assert tiles["encoding"]["x"]["scale"]["zero"] is True  # bars start at 0
    assert all(isinstance(v["tile_id"], str) and v["aji"] != "" for v in tiles["data"]["values"])
    series = {
        v["rev"] + v.get("field", "") for v in plots["losses"][0]["content"]["data"]["values"]
    }
    assert any("val_loss" in s for s in series), series

    _check_bad_params_lose_nothing(project)


def _check_bad_params_lose_nothing(project: Path) -> None:
    """`dvc exp run -S train.epochs=0` fails in check_params, before DVC deletes any output."""
    models, data = _tree_hash(project / "models"), _tree_hash(project / "data")
    bad = _dvc("exp", "run", "-S", "train.epochs=0", cwd=project)
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0, out
    assert "Running stage 'check_params'" in out and "train.epochs" in out, out
    assert "Running stage 'fetch'" not in out and "Running stage 'train'" not in out, out
    assert _tree_hash(project / "models") == models and _tree_hash(project / "data") == data
    # a valid edit reruns what reads it, not the pipeline: the stamp stays byte-identical
    # (the failed run deleted the stamp: check_params runs again and writes the same bytes)
    _git("checkout", "params.yaml", cwd=project)
    again = _dvc("repro", cwd=project)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Running stage 'check_params'" in again.stdout, again.stdout
    for stage in ("fetch", "prepare", "normalize", "train"):
        assert f"Running stage '{stage}'" not in again.stdout, again.stdout
    assert _tree_hash(project / "models") == models
