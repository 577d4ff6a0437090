"""The shipped params presets (kseg/presets): what the README's reproduce commands rely on.

Each preset must load with the strict params rules (a typo in a key or a value out of range would
only show after a user's download and minutes of preparation), keep TNBC's fixed test patients and
the protocol's final-epoch checkpoint, and its network must segment a whole 512 x 512 TNBC tile
at the preset's resolution and window: maps of the tile's own size, finite, probabilities in 0..1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kseg.config import load_params
from kseg.infer import Preprocess, predict_maps
from kseg.model import build_model
from tests.bench_helpers import ROOT

PRESETS = sorted((ROOT / "kseg" / "presets").glob("*.yaml"))


def test_the_documented_recipes_are_shipped() -> None:
    assert [p.name for p in PRESETS] == ["tnbc-kidney-segnet.yaml", "tnbc-unet.yaml"]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_valid_and_keeps_the_protocol(path: Path) -> None:
    params = load_params(path)
    assert params.data.source == "tnbc"
    assert params.data.path is None  # no machine's local path in a shipped preset
    assert tuple(params.split.tnbc_test_patients) == ("02", "06", "10")
    assert params.train.checkpoint == "last"  # the CV protocol's choice (docs/results.md)
    assert params.postprocess.fit  # thresholds chosen on validation, never fixed by hand
    assert params.model.head == "fg_dist"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_network_segments_a_whole_512_tile(path: Path) -> None:
    cfg = load_params(path).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tile = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    maps = predict_maps(
        model,
        tile,
        Preprocess(mode="percentile"),
        cfg.window,
        input_scale=cfg.input_scale,
        tta=cfg.infer_tta,
    )
    assert maps.shape == (2, 512, 512)  # fg_dist: foreground probability, normalised distance
    assert np.isfinite(maps).all()
    assert maps[0].min() >= 0.0 and maps[0].max() <= 1.0
