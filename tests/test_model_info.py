"""``model_info`` against parameters and MACs counted by hand."""

from __future__ import annotations

import math

from kseg.model import model_info
from kseg.model.config import ModelConfig


def dice_params(c_in: int, c_out: int, size: int, k: int = 3) -> int:
    """By hand from the block definition (docs/model.md)."""
    dims = k * k * c_in + 2 * size * k * k  # channel-, height-, width-wise kernels
    br = 3 * c_in * 3  # BN(3C) weight+bias, PReLU(3C)
    wavg = 3 * c_in + 3 * c_in  # grouped 1x1 3C->C (3 per channel), BN(C), PReLU(C)
    proj = c_out * (c_in // math.gcd(c_in, c_out)) * 9 + 3 * c_out
    gate = c_in * (c_in // 4) + (c_in // 4) * c_out
    return dims + br + wavg + proj + gate


def kidney_segnet_params(n: int, mid: int, t: int, upconv: bool) -> tuple[int, int]:
    """(total, used) for the original-compatible network; upconv weights are never used."""
    w, s = (n, 2 * n, 4 * n, 8 * n), (t, t // 2, t // 4, t // 8)
    bn = 2
    total = 3 * 9 * n + n + bn * n  # conv1a + bias + bn1a
    enc = [(n, n, 0), (n, w[1], 1), (w[1], w[1], 1), (w[1], w[2], 2), (w[2], w[2], 2)]
    enc += [(w[2], w[3], 3), (w[3], w[3], 3)]
    for c_in, c_out, lvl in enc:
        total += dice_params(c_in, c_out, s[lvl]) + bn * c_out
    aspp = dice_params(w[3], mid, s[3], k=1) + 3 * dice_params(w[3], mid, s[3])
    aspp += (4 * mid + w[3]) * w[3] + w[3]
    total += aspp
    up = 0
    for lvl in (2, 1, 0):
        c, g = w[lvl], w[lvl + 1]
        att = (c * c + c) + (g * c + c) + (c * c * 9 + c) + (c + 1) + (c + c)
        total += att + dice_params(2 * c, c, s[lvl]) + dice_params(c, c, s[lvl]) + 2 * bn * c
        up += g * c * 9 + c
    total += n + 1  # head
    return total + (up if upconv else 0), total


def test_small_original_config_matches_hand_count():
    cfg = ModelConfig.original_compatible(nfeat=4, mid_channels=8).with_(tile_size=32)
    info = model_info(cfg)
    total, used = kidney_segnet_params(4, 8, 32, upconv=True)
    assert (info["params_total"], info["params_used"]) == (total, used)
    assert dice_params(32, 32, 512) == 10_880  # the figure quoted for the original


def test_original_sizes_match_published_counts():
    # Counts of the original code measured with torch 2.13 (shared/docs/original-kidney-segnet.md).
    assert model_info(ModelConfig.original_compatible(), macs=False)["params_total"] == 1_359_652
    assert kidney_segnet_params(32, 256, 512, upconv=False)[1] == 972_356
    assert model_info(ModelConfig.original_compatible(nfeat=16), macs=False)["params_total"] == (
        496_852
    )


def test_unet_macs_match_hand_count():
    n, t = 4, 16
    cfg = ModelConfig(arch="unet", nfeat=n, tile_size=t)
    info = model_info(cfg)
    w = (n, 2 * n, 4 * n, 8 * n)
    conv, deconv = 0, 0
    for lvl, (c_in, c_out) in enumerate(((3, w[0]), (w[0], w[1]), (w[1], w[2]), (w[2], w[3]))):
        px = (t >> lvl) ** 2
        conv += px * 9 * (c_in * c_out + c_out * c_out)
    for lvl in range(3):
        px_in = (t >> (lvl + 1)) ** 2
        deconv += px_in * w[lvl + 1] * w[lvl] * 4  # 2x2 stride-2 transposed conv
        px = (t >> lvl) ** 2
        conv += px * 9 * (2 * w[lvl] * w[lvl] + w[lvl] * w[lvl])
    conv += t * t * n  # head
    assert info["macs_conv2d"] == conv
    assert info["macs"] == conv + deconv
    assert info["params_used"] == info["params_total"]


def test_input_scale_states_the_input_tile_and_keeps_the_network_cost():
    cfg = ModelConfig(arch="unet", nfeat=4, tile_size=16)
    half = model_info(cfg.with_(input_scale=0.5))
    full = model_info(cfg)
    assert (half["input_tile"], full["input_tile"]) == (32, 16)
    assert half["macs"] == full["macs"]  # the cost is per network tile: 16 px = 32 input px


def test_model_info_command_names_the_input_tile_of_the_shipped_preset():
    from pathlib import Path

    from typer.testing import CliRunner

    from kseg.cli import app

    preset = Path(__file__).resolve().parents[1] / "kseg" / "presets" / "tnbc-unet.yaml"
    # The preset's inference window: a whole 512 tile (205 px at input_scale 0.4, padded to 208).
    res = CliRunner().invoke(app, ["model-info", "--params", str(preset), "--tile-size", "208"])
    assert res.exit_code == 0, res.output
    assert "tile 208 = 520 input px (input_scale 0.4)" in res.output
    assert "6.087" in res.output  # GMACs of the network per 512 tile (README column)
