"""glibc allocator modes (kseg.model.perf): what each does to memory that torch frees.

Run in fresh processes: mallopt is process-wide and the first mode applied would stick. glibc's own
default is not asserted: whether it hands freed activations back depends on the process's
allocation history (its dynamic mmap threshold, whether the freed blocks end at the heap top) and
differed between two machines of the same type, so it is no fixed fact to test kseg against.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_CHILD = """
import json, os, sys
import torch
from kseg.model import perf
mode = sys.argv[1]
modes = {"cap": perf.cap_cpu_heap, "reuse": perf.tune_cpu_allocator}
applied = modes[mode]()
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
# One 28 MiB tensor freed: glibc's default raises its dynamic mmap threshold to 28 MiB here.
warm = torch.ones(7 << 20)
del warm
before = rss()
# Eight live 8 MiB activations (below glibc's 32 MiB dynamic mmap ceiling), then freed.
blocks = [torch.ones(2 << 20) for _ in range(8)]
# A small tensor that stays live, allocated after them: it sits above the blocks, as the next
# layer's small buffers do in training, so a heap cannot shrink back past it.
pin = torch.ones(16 << 10)
held = rss()
del blocks
print(json.dumps({"applied": applied, "held": held - before, "after_free": rss() - before}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_cap_returns_freed_tensors_and_reuse_keeps_them() -> None:
    mib = 1 << 20
    cap, reuse = _run("cap"), _run("reuse")
    assert cap["applied"] and reuse["applied"]
    for run in (cap, reuse):
        # 64 MiB were live (tune_cpu_allocator serves the first 28 from the warm-up's free block).
        assert run["held"] > 32 * mib
    # cap_cpu_heap (recomputing training runs): freed tensors leave the process at once.
    assert cap["after_free"] < 8 * mib
    # tune_cpu_allocator (speed): the heap keeps them for reuse.
    assert reuse["after_free"] > reuse["held"] - 8 * mib
