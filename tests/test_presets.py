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
from kseg.model import ModelConfig, build_model
from tests.bench_helpers import ROOT

PRESETS = sorted((ROOT / "kseg" / "presets").glob("*.yaml"))
#: Not a recipe: the README table's "original-compatible" row (docs/results.md, twenty-first round).
ORIGINAL = ROOT / "kseg" / "presets" / "original" / "tnbc-kidney-segnet-original.yaml"


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


def test_original_preset_trains_the_original_network_as_the_authors_did() -> None:
    params = load_params(ORIGINAL)
    assert params.data.source == "tnbc" and params.data.path is None
    assert tuple(params.split.tnbc_test_patients) == ("02", "06", "10")
    # The network exactly: the config that loads the authors' checkpoints strictly.
    assert params.model == ModelConfig.original_compatible(nfeat=32, mid_channels=256)
    train, aug, post = params.train, params.augment, params.postprocess
    assert (train.optimizer, train.lr, train.weight_decay, train.scheduler, train.loss) == (
        "adam",
        7e-4,
        7e-4,
        "none",
        "mse",
    )
    assert (train.batch_size, train.samples_per_epoch, train.ema_decay) == (2, 0, 0.0)
    assert train.checkpoint == "best" and train.val_every == 1
    assert aug.flips and aug.rotate90
    assert aug.affine_p == aug.elastic_p == aug.blur_p == 0.0
    assert aug.brightness_contrast_p == aug.hed_p == 0.0
    assert params.stain.method == "none"
    # The original's fixed test-time post-processing, not values fitted on validation.
    assert not post.fit
    assert (post.h, post.foreground_threshold, post.watershed_line) == (7, 28, True)
