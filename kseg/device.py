"""One device setting for every stage: train, evaluate, register (re-scoring), predict, serving.

``auto`` picks CUDA when torch sees a GPU, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` ask for
one. Asking for CUDA where there is none is an error that says so (no silent CPU fallback).
"""

from __future__ import annotations

import os

import torch

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(choice: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` of a device setting.

    Args:
        choice: ``auto`` (or None), ``cpu``, ``cuda`` or ``cuda:N``. Plain ``cuda`` (and ``auto``
            on a GPU host) is the GPU of this process's ``LOCAL_RANK`` (0 outside ``torchrun``).

    Raises:
        ValueError: For CUDA without a CUDA device, a GPU index that does not exist, or an
            unknown name.
    """
    text = str(choice if choice is not None else "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {text!r} was asked for, but torch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                "use device cpu or auto"
            )
        index = int(os.environ.get("LOCAL_RANK", "0")) if text == "cuda" else _index(text)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {text!r}: GPU {index} does not exist ({torch.cuda.device_count()} visible)"
            )
        return torch.device("cuda", index)
    raise ValueError(f"device {choice!r}: expected auto, cpu, cuda or cuda:N")


def _index(text: str) -> int:
    try:
        return int(text.split(":", 1)[1])
    except ValueError as err:
        raise ValueError(f"device {text!r}: expected cuda:N with N a GPU index") from err


def amp_dtype(name: str | None) -> torch.dtype | None:
    """``float16`` / ``bfloat16`` -> the torch dtype; None, ``""`` or ``float32`` -> None (off)."""
    if name in (None, "", "none", "float32"):
        return None
    try:
        return AMP_DTYPES[str(name)]
    except KeyError as err:
        raise ValueError(f"dtype {name!r}: expected float32, float16 or bfloat16") from err
