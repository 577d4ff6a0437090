"""Path keys of params.yaml against dvc.yaml (kseg.dvc_paths, `kseg params --stamp`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kseg.cli import PARAMS_STAMP, app
from kseg.config import load_params
from kseg.dvc_paths import PATH_KEYS, check_dvc_paths, stage_paths

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_match_dvc_yaml_and_every_key_names_a_real_stage() -> None:
    check_dvc_paths(load_params(REPO / "params.yaml"), REPO / "dvc.yaml")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for _, stage in PATH_KEYS:
        assert stage in stages  # a renamed stage would silently skip its check
    assert "models/kseg" in stage_paths(stages["train"])
    assert "metrics/validation.json" in stage_paths(stages["validate"])


@pytest.mark.parametrize(
    ("key", "value", "stage"),
    [("train.out_dir", "models/other", "train"), ("prepare.out_dir", "prep2", "prepare"),
     ("validate.metrics", "metrics/v.json", "validate"), ("data.dir", "raw_data/", "fetch")],
)  # fmt: skip
def test_stamp_refuses_a_path_dvc_yaml_does_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: str, stage: str
) -> None:
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    section, name = key.split(".")
    params[section][name] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["params", "--stamp", ".kseg/params.ok"])
    assert res.exit_code == 2, res.output
    msg = " ".join(res.output.split())
    assert f"{key}: '{value}'" in msg and f"{stage} stage writes" in msg, msg
    assert not (tmp_path / ".kseg" / "params.ok").exists()
    # the same value with a trailing slash or ./ is the same path; the repo's values pass
    params[section][name] = yaml.safe_load((REPO / "params.yaml").read_text())[section][name] + "/"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(app, ["params", "--stamp", ".kseg/params.ok"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / ".kseg" / "params.ok").read_text() == PARAMS_STAMP
