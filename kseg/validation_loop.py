"""Per-epoch validation: segment the validation tiles exactly as evaluation will, and score them.

Model selection uses a segmentation score after post-processing (AJI by default), not the loss,
because a lower MSE on the distance map does not always mean better-separated nuclei.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from kseg.config import Params
from kseg.data.dataset import Tiles
from kseg.data.targets import training_target
from kseg.infer import Preprocess, predict_maps

if TYPE_CHECKING:
    from kseg.tracking import Tracker

SCORES = ("aji", "pq", "dq", "sq", "object_f1", "pixel_f1", "pixel_iou")


def validate_epoch(
    params: Params,
    model: torch.nn.Module,
    tiles: Tiles,
    preprocess: Preprocess,
    device: torch.device,
    tracker: Tracker | None = None,
    epoch: int = 0,
    maps_out: list[np.ndarray] | None = None,
    on_tile: Callable[[], None] | None = None,
    tta: str | None = None,
) -> dict[str, float]:
    """Mean validation loss and segmentation scores over ``tiles``.

    ``val_loss`` is the mean squared error of the maps against the head's targets (for ``fg_dist``:
    of the probabilities against the mask and the normalised distance). If ``maps_out`` is given,
    the predicted maps are appended to it (for fitting the post-processing); ``on_tile`` is called
    after each tile (a progress bar). ``tta`` overrides ``model.infer_tta`` and then runs one scale
    (None: the model's test-time augmentation, ``infer_tta`` at each of ``infer_scales``).

    Returns:
        ``val_loss`` and the means of :data:`SCORES` (empty dict when there is no validation tile).
    """
    from kseg.metrics import segmentation_metrics
    from kseg.plots import overlay
    from kseg.postprocess import postprocess_maps

    if len(tiles) == 0:
        return {}
    was_training = model.training
    model.eval()
    losses, rows = [], []
    try:
        for i, (tile_id, image, labels) in enumerate(
            zip(tiles.ids, tiles.images, tiles.labels, strict=True)
        ):
            head = params.model.head
            pred = predict_maps(
                model,
                image,
                preprocess,
                params.model.window,
                batch_size=params.train.infer_batch_size,
                device=device,
                head=head,
                tta=params.model.infer_tta if tta is None else tta,
                input_scale=params.model.input_scale,
                scales=params.model.infer_scales if tta is None else (1.0,),
            )
            losses.append(float(np.mean((pred - training_target(labels, head)) ** 2)))
            if maps_out is not None:
                maps_out.append(pred)
            instances = postprocess_maps(pred, params.postprocess)
            rows.append(segmentation_metrics(instances, labels))
            if tracker is not None and i < params.train.val_overlays:
                tracker.log_image(
                    overlay(image, instances, labels),
                    f"val_overlays/epoch{epoch + 1:03d}_{tile_id}.png",
                )
            if on_tile is not None:
                on_tile()
    finally:
        model.train(was_training)
    out = {"val_loss": float(np.mean(losses))}
    for key in SCORES:
        values = [r[key] for r in rows if key in r and np.isfinite(r[key])]
        if values:
            out[key] = float(np.mean(values))
    return out
