"""Model folders and original-checkpoint conversion: round trips and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kseg.model import build_model, convert_original, load_model_folder, save_model_folder
from kseg.model.compat import load_original_checkpoint
from kseg.model.config import ModelConfig

CFG = ModelConfig(nfeat=4, mid_channels=8, tile_size=32)


def test_round_trip_keeps_weights_config_and_other_files(tmp_path):
    model = build_model(CFG)
    (tmp_path / "stain.json").write_text("{}")
    save_model_folder(model, CFG, tmp_path, {"run": "abc"})
    loaded, cfg = load_model_folder(tmp_path)
    assert cfg == CFG
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert json.loads((tmp_path / "config.json").read_text())["extra"] == {"run": "abc"}
    assert (tmp_path / "stain.json").exists()
    ref, cfg2 = load_model_folder(tmp_path, dice_impl="reference")
    assert cfg2.dice_impl == "reference"
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), loaded(x), rtol=1e-5, atol=1e-6)


def test_missing_and_mismatched_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model_folder(tmp_path)
    save_model_folder(build_model(CFG), CFG, tmp_path)
    (tmp_path / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.pt"):
        load_model_folder(tmp_path)
    save_model_folder(build_model(CFG.with_(nfeat=8)), CFG, tmp_path)
    with pytest.raises(ValueError, match="do not match"):
        load_model_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"nfeat": 4, "bogus": 1}}))
    with pytest.raises(ValueError, match="bogus"):
        load_model_folder(tmp_path)


def test_bad_original_checkpoint_messages(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pt"):
        load_original_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_original_checkpoint(tmp_path / "nope.pt")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="missing"):
        load_original_checkpoint(tmp_path / "other.pt")


def test_convert_bare_state_dict(tmp_path):
    cfg = ModelConfig.original_compatible(nfeat=4, mid_channels=8).with_(tile_size=32)
    model = build_model(cfg)
    torch.save(model.state_dict(), tmp_path / "orig.pt")
    out = convert_original(tmp_path / "orig.pt", tmp_path / "converted")
    loaded, got = load_model_folder(out)
    assert got == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_converted_original_checkpoint_runs_in_kseg_predict(
    shared: Path, tnbc_dir: Path, tmp_path: Path
) -> None:
    """convert-original -> a folder `kseg predict` accepts; the mean is the original's input's."""
    import tifffile
    from PIL import Image
    from typer.testing import CliRunner

    from kseg.cli import app

    src = shared / "reference" / "original_kidney_segnet_nfeat8_mid32.pt"
    runner = CliRunner()
    refused = runner.invoke(app, ["convert-original", str(src), "--out", str(tmp_path / "m")])
    assert refused.exit_code == 2 and "--mean-from" in refused.output
    assert not (tmp_path / "m").exists()
    slide = tnbc_dir / "Slide_01"
    res = runner.invoke(
        app, ["convert-original", str(src), "--out", str(tmp_path / "m"), "--mean-from", str(slide)]
    )
    assert res.exit_code == 0, res.output
    # the oracle: per-image min-max to 0..255 (the original's input), then the channel means
    means = []
    for path in sorted(slide.glob("*.png")):
        rgb = np.asarray(Image.open(path).convert("RGB"), np.float64)
        means.append(((rgb - rgb.min()) * 255.0 / (rgb.max() - rgb.min())).reshape(-1, 3).mean(0))
    pre = json.loads((tmp_path / "m" / "preprocess.json").read_text())
    np.testing.assert_allclose(pre["mean"], np.mean(means, axis=0), atol=0.5)  # RGBA on white
    assert pre["std"] == [1.0, 1.0, 1.0]
    tile = sorted(slide.glob("*.png"))[0]
    out = runner.invoke(
        app, ["predict", str(tile), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")]
    )
    assert out.exit_code == 0, out.output
    labels = tifffile.imread(next((tmp_path / "o").glob("*labels*.tif*")))
    assert labels.shape == (512, 512) and labels.dtype.kind == "u"
