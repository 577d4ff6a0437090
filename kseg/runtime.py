"""Where the network runs at inference: PyTorch, ONNX Runtime or OpenVINO (``--runtime``).

``torch`` is kseg's eager fast path. ``compiled`` is the same network with the DiCE blocks run as
``torch.compile``d stencil kernels (:mod:`kseg.model.stencil`; the first use compiles for about a
minute with the system C++ compiler, cached on disk by inductor; models without DiCE blocks run
as ``torch``). ``onnx`` and ``openvino`` run the model's ONNX export
(:mod:`kseg.export`, cached under ``$KSEG_CACHE_DIR`` or ``~/.cache/kseg``, keyed by the weights'
digest) and need the optional packages (``pip install 'kseg[onnx]'``, ``'kseg[openvino]'``).
Each runtime object is called like the torch network: a standardized ``B x 3 x H x W`` float32
tensor in, the raw head ``B x C x H x W`` out, so tiling, blending, test-time augmentation and
post-processing (:func:`kseg.infer.predict_maps`) are the same code for every runtime.

``auto`` (the default of ``kseg predict`` and serving, or ``KSEG_RUNTIME``) measures every
installed runtime once on one inference window of the model on this CPU, takes the fastest and
remembers the choice (same cache, keyed by the model, the CPU and the thread count); any runtime
that fails to export or run is skipped with a warning, and torch is the fallback. On a GPU
(``--device cuda``) ``auto`` is torch. ``auto`` does not consider ``compiled``: its compile time
would be paid on a one-tile run.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kseg.fsutil import atomic_write_text

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "compiled", "onnx", "openvino")
CHOICES = ("auto", *RUNTIMES)
_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino"}
_EXTRA_HINT = {"onnx": "pip install 'kseg[onnx]'", "openvino": "pip install 'kseg[openvino]'"}


def cache_root() -> Path:
    """Folder of cached exports and runtime choices (``KSEG_CACHE_DIR`` or ``~/.cache/kseg``)."""
    env = os.environ.get("KSEG_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "kseg"


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def installed_runtimes() -> list[str]:
    """The runtimes ``auto`` chooses from: torch always, onnx and openvino when installed.

    ``compiled`` is never chosen automatically (its first use compiles).
    """
    # The export needs the onnx package (and onnxscript for torch.export-based exports, which
    # export_model uses only where torch lacks the legacy exporter).
    exporter = _importable("onnx")
    out = ["torch"]
    out += [name for name, pkg in _PACKAGES.items() if exporter and _importable(pkg)]
    return out


class OnnxRuntimeNet:
    """An ONNX export run by ONNX Runtime (CPU execution provider), called like the network.

    Args:
        path: The ``.onnx`` file (``kseg export``).
        threads: Intra-op threads (default: torch's thread count).
    """

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run(None, {self.input_name: arr})
        return torch.from_numpy(out)


class CompiledTorchNet:
    """The torch network with the compiled DiCE stencil kernels on (``--runtime compiled``).

    Args:
        net: The eval-mode network.
    """

    name = "compiled"

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net
        self.batch = 0  # the largest batch seen: smaller ones are padded to it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        from kseg.model.ops import fused_eval

        # Inductor compiles one graph per block and input shape (about 5 s each): a last, partial
        # batch of windows is padded with zeros to the full batch instead of compiling again.
        # Each window's output depends on that window only (eval-mode BatchNorm).
        n = x.shape[0]
        self.batch = max(self.batch, n)
        if n < self.batch:
            x = torch.cat((x, x.new_zeros(self.batch - n, *x.shape[1:])))
        with fused_eval(True):
            return self.net(x)[:n]


@functools.cache
def _openvino_core() -> Any:
    """The process's one ``openvino.Core``, shared by every compiled model.

    Each ``Core`` that compiles a model for the CPU points the calling thread's alternate signal
    stack (``sigaltstack``) at memory of its own and, when destroyed, puts back the one it found.
    With two Cores destroyed in the order they were made, the main thread is left pointing at
    unmapped memory, and the next signal with a Python handler (torch's DataLoader installs one
    for SIGCHLD) kills the process with SIGSEGV: the CI crash of 2026-12-06, reproduced in
    ``tests/test_export.py::test_openvino_nets_dropped_in_any_order_leave_signals_safe``. One
    Core for the process keeps one alternate stack for its lifetime.
    """
    import openvino as ov

    return ov.Core()


class OpenVinoNet:
    """An ONNX export compiled by OpenVINO for the CPU, in float32, called like the network.

    OpenVINO would pick bfloat16 on CPUs that have it; ``INFERENCE_PRECISION_HINT=f32`` keeps
    the results those of the float32 network.
    """

    name = "openvino"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        core = _openvino_core()
        config = {
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self.path = Path(path)
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        result = self.request.infer({0: arr})
        return torch.from_numpy(result[self.compiled.output(0)].copy())


def cached_onnx(folder: str | Path) -> Path:
    """The ONNX export of a model folder, exported once and cached by the weights' digest."""
    from kseg.export import EXPORT_VERSION, _weights_digest, export_model

    folder = Path(folder)
    # Same weights, same torch, same export code (EXPORT_VERSION): the same file.
    torch_version = torch.__version__.split("+")[0]
    key = f"{_weights_digest(folder)[:20]}-torch{torch_version}-v{EXPORT_VERSION}"
    path = cache_root() / "onnx" / f"{key}.onnx"
    if not path.is_file():
        log.info("exporting %s to ONNX (once; cached in %s)", folder, path.parent)
        export_model(folder, "onnx", path)
    return path


def load_runtime(name: str, folder: str | Path, net: torch.nn.Module) -> Callable:
    """The callable that runs the network of ``folder`` on runtime ``name``.

    Raises:
        ValueError: If the runtime is unknown or its packages are not installed.
    """
    if name not in RUNTIMES:
        raise ValueError(f"--runtime {name!r}: expected one of {list(CHOICES)}")
    if name == "torch":
        return net
    if name == "compiled":
        return CompiledTorchNet(net)
    if name not in installed_runtimes():
        raise ValueError(
            f"--runtime {name}: {_PACKAGES[name]} (with onnx for the export) is "
            f"not installed; {_EXTRA_HINT[name]}"
        )
    path = cached_onnx(folder)
    return OnnxRuntimeNet(path) if name == "onnx" else OpenVinoNet(path)


def _time_call(fn: Callable, x: torch.Tensor, reps: int = 2) -> float:
    with torch.inference_mode():
        fn(x)  # warm-up (oneDNN primitives, ORT arenas)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - t0)
    return best


def _choice_key(folder: Path, window: int) -> str:
    from kseg.export import _weights_digest

    cpu = platform.processor() or platform.machine()
    return f"{_weights_digest(folder)[:20]}|{cpu}|threads={torch.get_num_threads()}|w={window}"


def choose_runtime(
    requested: str, folder: str | Path, net: torch.nn.Module, window: int, device: str = "cpu"
) -> tuple[str, Callable]:
    """Resolves ``requested`` (``auto`` or a runtime name) to ``(name, callable)``.

    ``auto`` on the CPU measures each installed runtime once on a ``1 x 3 x window x window``
    input and keeps the fastest (remembered in the cache); on another device it is torch.

    Raises:
        ValueError: For an unknown name, a missing package, or a non-torch runtime on a GPU.
    """
    folder = Path(folder)
    if requested not in CHOICES:
        raise ValueError(f"--runtime {requested!r}: expected one of {list(CHOICES)}")
    if requested != "auto":
        if requested != "torch" and device != "cpu":
            raise ValueError(f"--runtime {requested}: runs on the CPU only (got device {device})")
        return requested, load_runtime(requested, folder, net)
    candidates = installed_runtimes()
    if device != "cpu" or candidates == ["torch"]:
        return "torch", net
    memo = cache_root() / "runtime_choice.json"
    key = _choice_key(folder, window)
    try:
        known = json.loads(memo.read_text()) if memo.is_file() else {}
    except (OSError, ValueError):
        known = {}
    if known.get(key, {}).get("runtime") in candidates:
        name = known[key]["runtime"]
        try:
            return name, load_runtime(name, folder, net)
        except Exception as err:  # cache from another environment: measure again
            log.warning("runtime %s remembered for this model failed (%s); measuring", name, err)
    x = torch.randn(1, 3, window, window, generator=torch.Generator().manual_seed(0))
    timings: dict[str, float] = {}
    loaded: dict[str, Callable] = {}
    for name in candidates:
        try:
            loaded[name] = load_runtime(name, folder, net)
            timings[name] = _time_call(loaded[name], x)
        except Exception as err:  # a runtime that cannot run this model is skipped
            log.warning("runtime %s skipped for %s: %s", name, folder, err)
    name = min(timings, key=timings.__getitem__) if timings else "torch"
    log.info(
        "runtime auto: %s (%s per %dx%d window)",
        name,
        ", ".join(f"{k} {v:.3f} s" for k, v in timings.items()),
        window,
        window,
    )
    known[key] = {"runtime": name, "seconds": timings}
    try:
        atomic_write_text(memo, json.dumps(known, indent=2) + "\n")
    except OSError as err:
        log.debug("runtime choice not cached (%s)", err)
    return name, loaded.get(name, net)
