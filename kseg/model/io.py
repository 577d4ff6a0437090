"""Model folders: ``model.pt`` (state dict) + ``config.json`` (the ModelConfig), written atomically.

Later pipeline stages add their own files (stain parameters, thresholds, ...) to the same folder;
these helpers only touch their two files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from kseg.fsutil import atomic_write_bytes, atomic_write_text
from kseg.model.config import ModelConfig

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.json"


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The config as a JSON-able dict (tuples become lists)."""
    return cfg.model_dump(mode="json")


def config_from_dict(d: dict[str, Any], source: str = "config") -> ModelConfig:
    """Builds a validated ModelConfig from ``d``, naming ``source`` in errors."""
    from kseg.config import config_error

    try:
        return ModelConfig.model_validate(d)
    except ValidationError as err:
        raise ValueError(f"{source}: {config_error(err, ('model',))}") from None


def save_model_folder(
    model: torch.nn.Module, cfg: ModelConfig, folder: str | Path, extra: dict | None = None
) -> Path:
    """Writes ``model.pt`` and ``config.json`` into ``folder`` (created if needed).

    Args:
        model: The network; its ``state_dict()`` is saved (on CPU).
        cfg: Its configuration.
        folder: The model folder. Other files in it are left alone.
        extra: JSON-able metadata stored in ``config.json`` under ``"extra"``.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(folder / WEIGHTS_FILE, buf.getvalue())
    doc = {"model": config_to_dict(cfg), "extra": extra or {}}
    atomic_write_text(folder / CONFIG_FILE, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return folder


def read_model_config(folder: str | Path) -> tuple[ModelConfig, dict]:
    """Reads ``config.json`` of a model folder: ``(cfg, extra)``."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"model folder {folder}: {CONFIG_FILE} is missing")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise ValueError(f"{path}: expected an object with a 'model' object")
    return config_from_dict(doc["model"], str(path)), doc.get("extra", {})


def load_error(err: BaseException) -> str:
    """torch.load's error without its advice to pass ``weights_only=False``.

    That advice would run code from the file; kseg never follows it, so it must not repeat it.
    """
    text = str(err)
    if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
        lines = [ln.strip() for ln in text.splitlines() if "GLOBAL" in ln]
        first = lines[0].split(" was not an allowed global")[0] if lines else ""
        return (
            "the file holds pickled Python objects, not plain tensors; kseg loads weights only "
            "and refuses to run code from a model file" + (f": {first}" if first else "")
        )
    return text


def load_model_folder(
    folder: str | Path, dice_impl: str | None = None
) -> tuple[torch.nn.Module, ModelConfig]:
    """Loads a model folder written by :func:`save_model_folder`.

    Args:
        folder: The model folder.
        dice_impl: Override the DiCE implementation (``fast``/``reference``); same weights.

    Returns:
        ``(model, cfg)``, the model in eval mode on CPU.

    Raises:
        FileNotFoundError: If a file is missing.
        ValueError: If a file is unreadable or the weights do not match the config.
    """
    from kseg.model import build_model

    cfg, _ = read_model_config(folder)
    if dice_impl is not None:
        cfg = cfg.with_(dice_impl=dice_impl)
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"model folder {folder}: {WEIGHTS_FILE} is missing")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(
            f"{path}: cannot be read as a torch state dict ({load_error(err)})"
        ) from err
    model = build_model(cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{path}: weights do not match {CONFIG_FILE} ({cfg}): {err}") from err
    return model.eval(), cfg
