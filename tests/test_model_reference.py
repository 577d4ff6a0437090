"""The original Kidney-SegNet, loaded through the key mapping, reproduces the reference tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import shared_dir

SHARED = shared_dir()
REF = SHARED / "reference" if SHARED else None
CKPT = "original_kidney_segnet_nfeat8_mid32.pt"
IO = "original_kidney_segnet_nfeat8_mid32_io.npz"

pytestmark = pytest.mark.skipif(
    REF is None or not (REF / CKPT).is_file(), reason="shared/reference tensors not available"
)


@pytest.fixture(scope="module")
def io_ref() -> dict[str, np.ndarray]:
    with np.load(REF / IO) as d:
        return {k: d[k] for k in d.files}


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_original_checkpoint_reproduces_output_and_features(impl, io_ref):
    from kseg.model import load_original_checkpoint

    model, cfg = load_original_checkpoint(REF / CKPT, dice_impl=impl)
    assert (cfg.nfeat, cfg.mid_channels, cfg.tile_size) == (8, 32, 512)
    assert not (cfg.fix_aspp_adaptive_pool or cfg.fix_decoder_concat_upsampled)
    feats: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = model(torch.from_numpy(io_ref["input"]), feats)
    np.testing.assert_allclose(out.numpy(), io_ref["output"], rtol=0, atol=1e-4)
    names = [k for k in io_ref if k.startswith("feature_")]
    assert len(names) == 5
    for key in names:
        got = feats[key.removeprefix("feature_")].numpy()
        assert got.shape == io_ref[key].shape, key
        np.testing.assert_allclose(got, io_ref[key], rtol=0, atol=1e-4, err_msg=key)
    # The reference output is not trivially zero (the head ends in ReLU).
    assert float(np.abs(io_ref["output"]).max()) > 0.1


def test_list_checkpoint_and_module_prefix(tmp_path):
    from kseg.model import load_original_checkpoint

    sd = torch.load(REF / CKPT, weights_only=True)
    path = tmp_path / "best.pt"
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    torch.save([prefixed, {"lr": 7e-4, "nfeat": 8}, [0.8, 0.7, 0.75]], path)
    model, _ = load_original_checkpoint(path)
    got = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
