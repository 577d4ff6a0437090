from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from kseg.config import (
    ConfigError,
    Params,
    flatten,
    flatten_dict,
    load_params,
    params_from_dict,
    params_hash,
    save_config,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]


#: Keys the repo's params.yaml leaves unset, with the documented defaults they must resolve to
#: (written out here, not read from the dataclasses that produce them).
UNSET_DEFAULTS = {
    "model.infer_tta": "none",  # no test-time augmentation
    "train.fg_loss_weight": 1.0,
    "train.amp_dtype": "float16",  # CUDA AMP
    "train.threads": 0,  # torch's default
    "train.workers": 0,  # load batches in the main process
    "train.deterministic": True,
    "train.check_every": 0,
    "train.infer_batch_size": 4,
    "train.dist_timeout_min": 60.0,
    "train.checkpoint_dir": ".checkpoints",
    "train.val_overlays": 2,
}


def test_repo_params_yaml_loads_and_matches_defaults_where_unset() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "synthetic"
    assert params.postprocess.h == 7
    assert params.postprocess.foreground_threshold == 28
    assert params_from_dict({}) == Params()
    resolved = flatten_dict(to_dict(params))  # tuples as lists, as YAML writes them
    written = flatten_dict(yaml.safe_load((REPO / "params.yaml").read_text()))
    # Every value written in params.yaml is the value loaded ...
    for key, value in written.items():
        assert resolved[key] == value, key
    # ... and every key it leaves out takes its known default (a new key shows up here, so that
    # its default is written down; a changed default fails instead of silently moving).
    assert set(resolved) - set(written) == set(UNSET_DEFAULTS)
    for key, value in UNSET_DEFAULTS.items():
        assert resolved[key] == value and type(resolved[key]) is type(value), key


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"data": {"sorce": "tnbc"}}, "data.sorce"),
        ({"dataa": {}}, "dataa"),
        ({"data": {"synthetic": {"n_patient": 3}}}, "data.synthetic.n_patient"),
    ],
)
def test_unknown_key_is_named(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown key {needle}\b"):
        params_from_dict(raw)


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        ({"data": {"source": "zenodo"}}, r"data\.source: 'zenodo' is not allowed; expected one of"),
        ({"seed": "abc"}, r"seed: expected an integer, got 'abc'"),
        ({"seed": True}, r"seed: expected an integer"),
        ({"seed": -1}, r"seed: -1 is out of range; allowed \[0, inf\]"),
        ({"postprocess": {"h": 300}}, r"postprocess\.h: 300 is out of range; allowed \[1, 255\]"),
        ({"postprocess": {"watershed_line": "yes"}}, r"watershed_line: expected true or false"),
        ({"split": {"val_fraction": 1.5}}, r"split\.val_fraction: 1\.5 is out of range"),
        ({"data": {"synthetic": {"nuclei_per_tile": [3]}}}, r"nuclei_per_tile: expected 2 values"),
        ({"data": {"url": 5}}, r"data\.url: 5 is not str or null"),
        ({"data": "tnbc"}, r"data: expected a mapping"),
    ],
)
def test_bad_values_name_key_value_and_rule(raw: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        params_from_dict(raw)


def test_types_are_converted_and_frozen() -> None:
    params = params_from_dict(
        {"split": {"test_patients": ["01", "02"], "val_fraction": 0}, "data": {"url": None}}
    )
    assert params.split.test_patients == ("01", "02")
    assert isinstance(params.split.val_fraction, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 3  # type: ignore[misc]


def test_load_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("data: {sorce: tnbc}\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: unknown key data\.sorce"):
        load_params(bad)
    with pytest.raises(ConfigError, match="parameters file not found"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("data: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "broken.yaml")


def test_roundtrip_save_and_hash(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml")
    out = save_config(params, tmp_path / "config.json")
    import json

    again = params_from_dict(json.loads(out.read_text()))
    assert again == params
    assert params_hash(again) == params_hash(params)
    assert params_hash(params_from_dict({"seed": 1})) != params_hash(params_from_dict({"seed": 2}))
    flat = flatten(params)
    assert flat["data.synthetic.seed"] == params.data.synthetic.seed
    assert yaml.safe_load(yaml.safe_dump(to_dict(params))) == to_dict(params)
