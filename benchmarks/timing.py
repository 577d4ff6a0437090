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
