from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

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
    "model.infer_scales": [1.0],  # one scale (multi-scale TTA off)
    "train.fg_loss_weight": 1.0,
    "train.amp_dtype": "float16",  # CUDA AMP
    "train.epoch_val_tta": True,  # per-epoch validation with model.infer_tta
    "train.val_every": 1,  # validation after every epoch
    "train.cpu_amp": False,  # CPU training in float32
    "train.cpu_channels_last": False,
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
    with pytest.raises(ValidationError, match="frozen"):
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


def test_sections_are_hashable_picklable_and_copied_with_model_copy() -> None:
    import pickle

    from kseg.config import PostprocessConfig

    params = load_params(REPO / "params.yaml")
    assert pickle.loads(pickle.dumps(params)) == params
    assert hash(params_from_dict({})) == hash(Params())
    assert {params.postprocess: 1}[PostprocessConfig(**to_dict(params.postprocess))] == 1
    post = params.postprocess.model_copy(update={"min_size": 5})
    assert (post.min_size, params.postprocess.min_size) == (5, 0)
    # Field help is the docstring under each field (shown by the Prefect UI, JSON schema).
    assert "h-maxima" in (PostprocessConfig.model_fields["h"].description or "")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"seed": 2**64}, f"seed: {2**64} does not fit a 64-bit integer"),
        ({"train": {"lr": float("nan")}}, "train.lr: nan is not a finite number"),
        (
            {"split": {"val_fraction": 2}},
            "split.val_fraction: 2.0 is out of range; allowed [0.0, 0.9]",
        ),
        (
            {"data": {"synthetic": {"nucleus_radius": [-3, 5]}}},
            "data.synthetic.nucleus_radius: (-3.0, 5.0) is out of range; allowed [1.0, 256.0]",
        ),
        (
            {"augment": {"affine_scale": [1.2, 0.8]}},
            "augment.affine_scale: [1.2, 0.8] is inverted; expected [low, high] with low <= high",
        ),
        (
            {"data": {"synthetic": {"nuclei_per_tile": [3, 4, 5]}}},
            "data.synthetic.nuclei_per_tile: expected 2 values (a list of int, int), got [3, 4, 5]",
        ),
        (
            {"split": {"test_patients": ["01", 2]}},
            "split.test_patients[1]: expected a string, got 2",
        ),
        ({"data": {"dir": " "}}, "data.dir: an empty path; give a folder or file name"),
        ({"data": {"sha256": "abc"}}, "data: sha256: 'abc' is not a sha256 (64 hex digits)"),
        ({"model": {"tile_size": 33}}, "model: model.tile_size=33: must be a multiple of 8"),
        (
            {"train": {"checkpoint": "last", "early_stopping_patience": 3}},
            "train: early_stopping_patience: 3 needs checkpoint: best",
        ),
        ({"model": {"head": None}}, "model.head: None is not allowed; expected one of 'dist'"),
        ({"data": {"zz": 1, "aa": 2}}, "unknown key data.aa; allowed keys in data: dir,"),
        ({"dataa": {}, "data": {"sorce": 1}}, "unknown key dataa; allowed keys: augment,"),
    ],
)
def test_messages_are_the_hand_written_ones(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)
    assert str(info.value).startswith(message)


def test_model_config_changes_and_files_are_validated_like_params_yaml() -> None:
    from kseg.model.config import ModelConfig
    from kseg.model.io import config_from_dict

    cfg = ModelConfig()
    assert cfg.with_(tile_size=64).tile_size == 64
    with pytest.raises(ConfigError, match=r"unknown key model\.bogus"):
        cfg.with_(bogus=1)
    with pytest.raises(ConfigError, match=r"model\.arch: 'x' is not allowed"):
        cfg.with_(arch="x")
    with pytest.raises(ValueError, match=r"c\.json: model\.nfeat: expected an integer, got 'a'"):
        config_from_dict({"nfeat": "a"}, "c.json")
    assert config_from_dict({"aspp_rates": [4, 6]}).aspp_rates == (4, 6)
