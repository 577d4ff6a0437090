"""Best-of-N wall-clock timing shared by the benchmark scripts (imported from their folder)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def best_of(fn: Callable[[], Any], repeat: int = 1, warmup: bool = False) -> tuple[float, Any]:
    """Runs ``fn`` ``repeat`` times (after one untimed call if ``warmup``).

    Returns:
        The fastest run in seconds and the last run's result.
    """
    if warmup:
        fn()  # e.g. oneDNN primitive creation, allocator warm-up
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def train_step(model: Any, opt: Any, scaler: Any, x: Any, y: Any, dtype: Any = None) -> None:
    """One optimizer step as ``kseg train`` takes it: forward (under autocast when ``dtype``),
    the training loss, scaled backward, step; waits for CUDA so the time is the step's own."""
    import torch

    from kseg.train import loss_fn

    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        pred = model(x)
    loss = loss_fn("mse", 1.0, pred.float(), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
