"""A trained kseg model folder as one object: image in, instance labels out.

The model folder (written by the train stage) holds everything inference needs, so evaluation,
``kseg predict`` and the MLflow pyfunc model all segment the same way:

- ``model.pt`` + ``config.json``: the network (kseg.model.save_model_folder);
- ``preprocess.json``: input standardization fitted on the training tiles;
- ``stain.json`` (optional): the stain normalizer fitted on the training split;
- ``postprocess.json`` (optional): post-processing values fitted on the validation patients
  (:mod:`kseg.postprocess_fit`); without it, ``params.json``'s ``postprocess`` block is used.
- ``params.json``: the full parameters.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from kseg.config import ModelConfig, PostprocessConfig, params_from_dict
from kseg.infer import Preprocess, predict_maps

log = logging.getLogger(__name__)


@dataclass
class Segmenter:
    """Stain normalization -> tiled network inference -> DIST watershed."""

    model: torch.nn.Module
    model_config: ModelConfig
    preprocess: Preprocess
    postprocess: PostprocessConfig
    stain: Any | None = None  # kseg.stain normalizer with .transform(rgb) -> rgb
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 4
    dtype: torch.dtype | None = None  # autocast precision of the network; None = float32
    runtime: str = "torch"  # where the network runs (kseg.runtime): torch, compiled, onnx...

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 4,
        dtype: str | torch.dtype | None = None,
        runtime: str = "torch",
    ) -> Segmenter:
        """Loads a model folder written by the train stage.

        Args:
            folder: The model folder.
            device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (:func:`kseg.device.resolve_device`).
            batch_size: Windows per forward pass.
            dtype: ``float16`` / ``bfloat16`` (or the torch dtype) runs the network under
                autocast; None or ``float32``: float32.
            runtime: ``torch``, ``compiled``, ``onnx``, ``openvino`` or ``auto`` (the fastest
                installed one, measured on this CPU; :func:`kseg.runtime.choose_runtime`).

        Raises:
            ValueError: If a required file is missing or malformed (the file is named), or the
                device is not available.
        """
        from kseg.device import amp_dtype, resolve_device
        from kseg.model import load_model_folder, tune_cpu_allocator

        tune_cpu_allocator()  # reuse freed activation memory (see kseg.model.perf)
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a model folder (run `kseg train` or give one)")
        model, model_cfg = load_model_folder(folder)
        device = resolve_device(device)
        model.to(device).eval()
        params_path = folder / "params.json"
        from kseg.postprocess_fit import load_postprocess

        post = load_postprocess(folder)
        if post is None:
            post = PostprocessConfig()
            if params_path.is_file():
                try:
                    post = params_from_dict(json.loads(params_path.read_text())).postprocess
                except ValueError as err:  # JSONDecodeError and ConfigError alike
                    raise ValueError(f"{params_path}: not a kseg params file ({err})") from err
        stain = None
        if (folder / "stain.json").is_file():
            from kseg.stain import load_stain

            stain = load_stain(folder / "stain.json")
        precision = dtype if isinstance(dtype, torch.dtype) else amp_dtype(dtype)
        net = model
        if runtime != "torch":
            from kseg.runtime import CHOICES, choose_runtime

            if runtime not in CHOICES:
                raise ValueError(f"--runtime {runtime!r}: expected one of {list(CHOICES)}")
            if precision is None:
                runtime, net = choose_runtime(runtime, folder, model, model_cfg.window, device.type)
            elif runtime == "auto":  # reduced precision is torch's autocast
                runtime = "torch"
            else:
                raise ValueError(f"--runtime {runtime}: float32 only (got --dtype {dtype})")
        return cls(
            net,
            model_cfg,
            Preprocess.load(folder),
            post,
            stain,
            device,
            batch_size,
            precision,
            runtime,
        )

    def normalize(self, rgb: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """Applies the trained stain normalization (identity when there is none)."""
        return rgb if self.stain is None else self.stain.transform(rgb)

    def maps(self, rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Predicted ``(C, H, W)`` maps of an ``(H, W, 3)`` uint8 image of any size."""
        return predict_maps(
            self.model,
            self.normalize(rgb),
            self.preprocess,
            self.model_config.window,
            batch_size=self.batch_size,
            device=self.device,
            head=self.model_config.head,
            tta=self.model_config.infer_tta,
            dtype=self.dtype,
            input_scale=self.model_config.input_scale,
            scales=self.model_config.infer_scales,
        )

    def distance(self, rgb: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Predicted ``(H, W)`` distance map (the normalised distance for ``fg_dist`` models)."""
        return self.maps(rgb)[-1]

    def segment(self, rgb: NDArray[np.uint8]) -> tuple[NDArray[np.int32], NDArray[np.float32]]:
        """Instance labels (0 = background) and the distance map they came from."""
        from kseg.postprocess import postprocess_maps

        maps = self.maps(rgb)
        return postprocess_maps(maps, self.postprocess), maps[-1]
