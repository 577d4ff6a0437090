"""The ``train`` stage: distance-map regression, model selection on validation patients, resumable.

- Loss: MSE on the 0..255 distance target (the original), or ``mse_bce`` adding a foreground BCE.
- Selection: after every epoch the validation tiles (patients never used for testing) are
  segmented with the full post-processing and scored (AJI by default); the best epoch's weights
  are the model. The original picked its checkpoint on the test set.
- Resumable: a checkpoint (weights, optimizer, scheduler, RNG, epoch, best score, history,
  MLflow run id) is written atomically after every epoch under
  ``train.checkpoint_dir/<fingerprint>`` (params, data, kseg sources, torch version); running the
  stage again continues from it and ends with the same weights as an uninterrupted run on CPU.
- DDP: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (NCCL
  on GPUs, gloo on CPU); only rank 0 validates, logs and writes. Collective tensors live on the
  training device (NCCL takes no CPU tensor) and the process group's timeout
  (``train.dist_timeout_min``) covers rank 0's validation while the other ranks wait.
- GPU: AMP in float16 (GradScaler) or bfloat16, DataLoader workers with pinned memory, and the
  loss is accumulated on the device and checked for NaN every ``train.check_every`` steps, so a
  step does not wait for the host.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from kseg.config import Params, TrainConfig, params_hash, save_config
from kseg.data.dataset import Tiles, TrainDataset, load_split, load_tiles, resample_tiles
from kseg.device import amp_dtype, resolve_device
from kseg.fsutil import atomic_dir, atomic_path, atomic_write_text, check_replaceable, write_failure
from kseg.infer import Preprocess
from kseg.safety import redact
from kseg.tracking import Tracker, dvc_outputs, run_pointer, tracking_uri
from kseg.validation_loop import validate_epoch

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model and optimizer."""

    epoch: int = 0  # epochs completed
    best_score: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None


# --------------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (third-party code may use the global RNG)
    torch.manual_seed(seed)


def configure_determinism(device: torch.device, deterministic: bool) -> None:
    """Makes ``train.deterministic`` do what it says, on CPU and CUDA.

    Deterministic: ``torch.use_deterministic_algorithms`` (ops without a deterministic kernel
    warn instead of failing), and on CUDA cuDNN autotuning off, deterministic cuDNN kernels and
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS reads it when its handle is created, so this runs
    before the first CUDA op; a value already set is kept). Otherwise cuDNN autotunes
    (``cudnn.benchmark``) and kernels may be nondeterministic. Either way new tensors are not
    filled with NaN (``torch.utils.deterministic.fill_uninitialized_memory``, on by default in
    deterministic mode): the same results, faster.
    """
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN (a guard against kernels that read
    # memory they never wrote). No kernel kseg runs does (tests/test_train_device.py), so results
    # are the same bit for bit without it; the fill cost ~12% of a Kidney-SegNet epoch on the CPU.
    torch.utils.deterministic.fill_uninitialized_memory = False
    if device.type != "cuda":
        return
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def _init_distributed(device: torch.device, timeout_min: float = 60.0) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_min),
        )
    return dist.get_rank(), dist.get_world_size()


def stop_flag(device: torch.device) -> torch.Tensor:
    """The early-stop flag rank 0 broadcasts after each epoch, on the training device.

    NCCL broadcasts device tensors only (a CPU tensor fails); gloo takes CPU tensors.
    """
    return torch.zeros(1, device=device)


# --------------------------------------------------------------------------------------------------
# Data loading
# --------------------------------------------------------------------------------------------------


class EpochSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)``: the epoch travels with each index, to the loading process.

    With persistent DataLoader workers, ``dataset.set_epoch`` in the training process would not
    reach the workers' copies of the dataset; :class:`EpochDataset` sets it from the index.
    ``set_epoch`` also reseeds the wrapped sampler (DistributedSampler's epoch, or the
    RandomSampler's generator), as the training loop did.
    """

    def __init__(self, base: torch.utils.data.Sampler[int], seed: int) -> None:
        self.base, self.seed, self.epoch = base, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Selects ``epoch``'s order and random stream."""
        self.epoch = epoch
        if isinstance(self.base, torch.utils.data.DistributedSampler):
            self.base.set_epoch(epoch)
        elif isinstance(self.base, torch.utils.data.RandomSampler) and self.base.generator:
            self.base.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]


class EpochDataset(torch.utils.data.Dataset):
    """A :class:`TrainDataset` indexed by ``(epoch, index)`` (see :class:`EpochSampler`)."""

    def __init__(self, base: TrainDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        if self.base.epoch != epoch:
            self.base.set_epoch(epoch)
        return self.base[index]


def _seed_worker(seed: int, worker_id: int) -> None:
    """Seeds a DataLoader worker's global RNGs from (seed, worker id).

    The samples do not depend on it (each is drawn from ``default_rng([seed, epoch, index])``);
    this only pins down third-party code that reads the global RNGs.
    """
    random.seed(seed * 1_000_003 + worker_id)
    np.random.seed((seed * 1_000_003 + worker_id) % 2**32)  # noqa: NPY002
    torch.manual_seed(seed * 1_000_003 + worker_id)


def build_loader(
    dataset: TrainDataset,
    batch_size: int,
    seed: int,
    workers: int = 0,
    device: torch.device | None = None,
    world: int = 1,
) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    """The training DataLoader and its sampler (call ``sampler.set_epoch(e)`` before epoch e).

    ``workers`` processes load batches ahead of the step (persistent across epochs); memory is
    pinned when training on CUDA so host-to-device copies can overlap. The batches are the same
    for any number of workers.
    """
    import functools

    base: torch.utils.data.Sampler[int]
    if world > 1:
        base = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed)
    else:
        base = torch.utils.data.RandomSampler(dataset, generator=torch.Generator())
    sampler = EpochSampler(base, seed)
    loader = torch.utils.data.DataLoader(
        EpochDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=len(dataset) > batch_size,
        num_workers=workers,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=functools.partial(_seed_worker, seed) if workers > 0 else None,
    )
    return loader, sampler


def _optimizer(params: Params, model: torch.nn.Module) -> torch.optim.Optimizer:
    cfg = params.train
    if cfg.optimizer == "adam":  # the original: Adam with coupled L2 (weight_decay)
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay
    )


def _scheduler(params: Params, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    cfg = params.train
    if cfg.swa_epochs:
        return torch.optim.lr_scheduler.LambdaLR(opt, partial(swa_lr_factor, cfg))
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def swa_lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of ``epoch`` (0-based) over ``cfg.lr`` in a run with weight averaging.

    The configured schedule runs over the first ``epochs - swa_epochs`` epochs, ending at
    ``swa_lr`` (cosine: ``swa_lr + (lr - swa_lr) * (1 + cos(pi * e / T)) / 2``; step: tenfold
    drops at thirds of T, floored at ``swa_lr``; none: ``lr``), then the averaged epochs run at
    ``swa_lr``.
    """
    main = cfg.epochs - cfg.swa_epochs
    floor = cfg.swa_lr / cfg.lr if cfg.lr else 1.0
    if epoch >= main:
        return floor
    if cfg.scheduler == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * epoch / main))
    if cfg.scheduler == "step":
        return max(floor, 0.1 ** (epoch // max(1, main // 3)))
    return 1.0


def loss_fn(kind: str, fg_weight: float, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Training loss of a head's output ``pred`` against its target (both B x C x H x W).

    ``dist`` head (1 channel): MSE on the 0..255 distance map (``mse``, the original); ``mse_bce``
    adds BCE of ``pred > 0`` vs. nucleus pixels, treating ``pred / 8`` as a logit around a margin
    of 8 distance units, so it pushes background below and nuclei above the post-processing
    threshold without a second head.

    ``fg_dist`` head (2 channels, ``kind`` is ignored): :func:`fg_dist_loss`.
    """
    if pred.shape[1] == 2:
        return fg_dist_loss(pred, target)
    mse = F.mse_loss(pred, target)
    if kind == "mse":
        return mse
    logits = (pred - 8.0) / 8.0
    fg = (target > 0).float()
    # Scale the BCE to the MSE's magnitude (targets span 0..255) so the weight stays intuitive.
    return mse + fg_weight * 255.0 * F.binary_cross_entropy_with_logits(logits, fg)


def fg_dist_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of the ``fg_dist`` head: BCE + soft Dice on the foreground, BCE on the distance.

    Args:
        pred: B x 2 x H x W logits (foreground, normalised distance).
        target: B x 2 x H x W (nucleus mask in {0, 1}, normalised distance in [0, 1]).

    The Dice term counters the imbalance of small nuclei against background (as HoVer-Net's NP
    branch does); the distance is learnt with a soft-target BCE, whose gradient ``p - t`` is well
    scaled over [0, 1] where an MSE on probabilities would vanish near 0 and 1.
    """
    fg_logit, dist_logit = pred[:, 0], pred[:, 1]
    fg, dist = target[:, 0], target[:, 1]
    bce = F.binary_cross_entropy_with_logits(fg_logit, fg)
    prob = torch.sigmoid(fg_logit)
    inter = (prob * fg).sum((1, 2))
    dice = 1.0 - (2.0 * inter + 1.0) / (prob.sum((1, 2)) + fg.sum((1, 2)) + 1.0)
    return bce + dice.mean() + F.binary_cross_entropy_with_logits(dist_logit, dist)


def code_digest() -> str:
    """sha256 of the kseg package's Python sources and the torch version.

    Part of the job fingerprint: a checkpoint written by other code (a fix, a faster op with
    different rounding) must not be resumed as if it came from this code.
    """
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint(params: Params, tiles: list[Tiles]) -> str:
    """Identifies a training job: its params, code and the exact pixels and labels it trains on."""
    digest = hashlib.sha256(params_hash(params).encode())
    digest.update(code_digest().encode())
    for split in tiles:
        for tile_id, img, lab in zip(split.ids, split.images, split.labels, strict=True):
            digest.update(tile_id.encode())
            digest.update(img.tobytes())
            digest.update(lab.tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def weight_average(
    model: torch.nn.Module, decay: float, equal: bool = False
) -> torch.optim.swa_utils.AveragedModel | None:
    """A moving average of ``model``'s weights, or None when ``decay`` is 0 and not ``equal``.

    With ``decay``: ``avg = decay * avg + (1 - decay) * current`` after every optimizer step (the
    first step copies); with ``equal``: the plain mean of every update (stochastic weight
    averaging). Both are torch's :class:`~torch.optim.swa_utils.AveragedModel`. Buffers (BatchNorm
    running statistics) are not averaged: an average of running statistics mixes in the large
    variances of the first steps, which do not match the averaged weights (a Kidney-SegNet averaged
    that way at 0.98 predicted no nucleus after 8 TNBC epochs, its running variances 60-85% off
    the live ones). Both copy the live model's after each update; SWA then recomputes them for
    the final average (torch's ``update_bn``, in :func:`train`).
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if equal:
        return AveragedModel(model, use_buffers=False)
    if decay <= 0.0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    state: TrainState,
    best_state: dict[str, torch.Tensor],
    scaler: torch.amp.GradScaler | None = None,
    device: torch.device | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> None:
    """Writes the resumable checkpoint atomically (temp file + rename).

    Besides weights, optimizer and scheduler: the CPU RNG, the CUDA RNG of the training GPU (when
    on CUDA) and the GradScaler's state (loss scale and growth tracker of an fp16 AMP run).
    """
    on_cuda = device is not None and device.type == "cuda"
    cuda_rng = torch.cuda.get_rng_state(device) if on_cuda else torch.empty(0, dtype=torch.uint8)
    payload = {
        "model": model.state_dict(),
        "best_model": best_state,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "ema": ema.state_dict() if ema is not None else {},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": cuda_rng,
        "epoch": state.epoch,
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "run_id": state.run_id or "",
    }
    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except RuntimeError as err:  # torch reports a failed write (disk full, ulimit -f) this way
        raise OSError(write_failure(path, err)) from err


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Reads a checkpoint with ``weights_only=True`` (no pickled code is executed)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        from kseg.model.io import load_error

        raise ValueError(
            f"{path}: unreadable checkpoint ({load_error(err)}); delete it to start over"
        ) from err


def restore_checkpoint(
    ckpt: dict[str, Any],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    scaler: torch.amp.GradScaler | None = None,
    device: torch.device | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Loads a checkpoint's states into the run's objects; returns the TrainState and best weights.

    The CUDA RNG is restored when both the checkpoint and this run are on CUDA; the scaler's
    state when the checkpoint has one (a run without AMP stores none).
    """
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:  # the fingerprint covers train.ema_decay: a run with one has one
        ema.load_state_dict(ckpt["ema"])
    torch.set_rng_state(ckpt["torch_rng"])
    cuda_rng = ckpt.get("cuda_rng")
    if device is not None and device.type == "cuda" and cuda_rng is not None and cuda_rng.numel():
        torch.cuda.set_rng_state(cuda_rng, device)
    state = TrainState(
        epoch=ckpt["epoch"],
        best_score=ckpt["best_score"],
        best_epoch=ckpt["best_epoch"],
        history=list(ckpt["history"]),
        run_id=ckpt["run_id"] or None,
    )
    return state, ckpt["best_model"]


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def _load_data(params: Params) -> tuple[dict[str, list[str]], Tiles, Tiles]:
    """The split, the training tiles at the network's resolution, the validation tiles as stored.

    Training tiles are resampled once here by ``model.input_scale`` (crops, augmentation and the
    input standardization then work at the network's resolution); validation tiles stay at the
    data's resolution, because validation segments them as evaluation and predict will: through
    :func:`kseg.infer.predict_maps`, which resamples on the way in and out.
    """
    prepared = Path(params.prepare.out_dir)
    split = load_split(prepared)
    normalized = Path(params.stain.out_dir) / "images"
    image_dir = normalized if normalized.is_dir() else prepared / "images"
    train = load_tiles(image_dir, prepared / "labels", split["train"])
    val = load_tiles(image_dir, prepared / "labels", split["val"])
    return split, resample_tiles(train, params.model.input_scale), val


def _build_augment(params: Params) -> Any:
    from kseg.augment import build_augmentation

    return build_augmentation(params.augment, params.seed)


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[Any]:
    """A rich progress bar over all steps of the run (terminal only; CI gets one line per epoch).

    While it is shown, log records go through rich's console (above the bar) instead of being
    written over it; the bar disappears at the end, leaving the plain per-epoch log lines.
    """
    if not enabled:
        yield None
        return
    import logging as _logging

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description:<10} epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        transient=True,
    )
    handlers = [
        h
        for h in _logging.getLogger().handlers
        if isinstance(h, _logging.StreamHandler) and h.stream in (sys.stderr, sys.__stderr__)
    ]
    with progress:
        # rich redirects sys.stderr while live; handlers made earlier hold the real stream.
        old = [h.setStream(sys.stderr) for h in handlers]
        try:
            yield progress
        finally:
            for handler, stream in zip(handlers, old, strict=True):
                if stream is not None:
                    handler.setStream(stream)


def _train_info(loss: float, rate: float) -> str:
    shown = "-" if math.isnan(loss) else f"{loss:.4g}"
    return f"loss {shown}  {rate:.1f} tiles/s"


def autocast_setting(cfg: TrainConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    """Whether the training forward runs under autocast on ``device``, and in which dtype.

    CUDA: ``train.amp`` in ``train.amp_dtype``. CPU: ``train.cpu_amp``, always bfloat16 (CPU
    autocast has no float16 loss scaling and bfloat16 keeps float32's range).
    """
    if device.type == "cuda":
        return bool(cfg.amp), amp_dtype(cfg.amp_dtype) or torch.float16
    return bool(cfg.cpu_amp) and device.type == "cpu", torch.bfloat16


def uses_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the network and its inputs use the channels_last memory format.

    ``train.channels_last`` on CUDA, ``train.cpu_channels_last`` on CPU.
    """
    if device.type == "cuda":
        return bool(cfg.channels_last)
    return bool(cfg.cpu_channels_last) and device.type == "cpu"


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def _train_epoch(
    params: Params,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    progress: Any = None,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    cfg = params.train
    model.train()
    use_amp, dtype = autocast_setting(cfg, device)
    fmt = torch.channels_last if uses_channels_last(cfg, device) else None
    check_every = cfg.check_every or (50 if device.type == "cuda" else 1)
    watch = DivergenceWatch(device)
    # Sums in float64 on the device: the same numbers as a host-side float sum, without a sync.
    total = torch.zeros((), dtype=torch.float64, device=device)
    count, start, shown = 0, time.perf_counter(), float("nan")
    for step, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
            pred = model(x)
        loss = loss_fn(cfg.loss, cfg.fg_loss_weight, pred.float(), y)
        watch.record(loss.detach(), step)
        if (step + 1) % check_every == 0:  # before the update: on CPU, every step as before
            watch.raise_if_diverged(epoch)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if after_step is not None:
            after_step()
        total += loss.detach().double() * len(x)
        count += len(x)
        if progress is not None:
            if (step + 1) % check_every == 0:
                shown = loss.item()
            rate = count / max(time.perf_counter() - start, 1e-9)
            info = _train_info(shown, rate)
            progress.update(progress.task_ids[0], advance=1, epoch=epoch + 1, info=info)
    watch.raise_if_diverged(epoch)
    seconds = time.perf_counter() - start
    return {"train_loss": total.item() / max(count, 1), "tiles_per_s": count / max(seconds, 1e-9)}


class DivergenceWatch:
    """Remembers the first non-finite loss of an epoch on the device; the host asks when it likes.

    ``record`` queues two tiny device ops per step (no sync); ``raise_if_diverged`` syncs once and
    raises :class:`TrainingDiverged` naming the first bad step and its loss.
    """

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((), -1, dtype=torch.int64, device=device)
        self.value = torch.zeros((), dtype=torch.float64, device=device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        """Notes ``loss`` of ``step`` (0-based) if it is the first non-finite one."""
        new = (self.first < 0) & ~torch.isfinite(loss)
        self.first = torch.where(new, step, self.first)
        self.value = torch.where(new, loss.double(), self.value)

    def raise_if_diverged(self, epoch: int) -> None:
        """Raises TrainingDiverged if any recorded loss was NaN or infinite."""
        first = int(self.first.item())
        if first >= 0:
            raise TrainingDiverged(
                f"loss is {self.value.item()} at epoch {epoch + 1}, step {first + 1}; the run "
                "stops and the last good checkpoint is kept (lower train.lr or check the data)"
            )


def train(params: Params, resume: bool = True) -> dict[str, Any]:  # noqa: C901 (one linear story)
    """Runs the train stage; returns the summary written to ``metrics/train.json``.

    Args:
        params: Validated parameters.
        resume: Continue from a matching checkpoint if there is one (same params and data).

    Raises:
        TrainingDiverged: On a NaN/inf loss (the last good checkpoint stays).
        ValueError: On missing or inconsistent inputs, naming the file.
    """
    from kseg.model import build_model, cap_cpu_heap, tune_cpu_allocator

    cfg = params.train
    if not cfg.recompute_levels:
        # Reuse freed activation memory (3-5x faster elementwise ops on CPU), at the price of a
        # heap that keeps its peak.
        tune_cpu_allocator()
    else:
        # A run that recomputes to save memory returns freed activations at once instead
        # (glibc's default heap fragments: 3.7 GB peak where the live tensors need 2.5 GB).
        cap_cpu_heap()
    device = resolve_device(cfg.device)
    configure_determinism(device, cfg.deterministic)  # before the first CUDA op (cuBLAS)
    rank, world = _init_distributed(device, cfg.dist_timeout_min)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seed_everything(params.seed)
    check_replaceable(Path(cfg.out_dir))  # before training, not after it

    split, train_tiles, val_tiles = _load_data(params)
    preprocess = Preprocess.fit(train_tiles.images, cfg.input_norm)
    job = fingerprint(params, [train_tiles, val_tiles])
    ckpt_path = Path(cfg.checkpoint_dir) / job / CHECKPOINT

    model = build_model(params.model).to(device)
    if hasattr(model, "recompute_levels"):  # Kidney-SegNet only (the U-Net keeps little)
        model.recompute_levels = cfg.recompute_levels
    if uses_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    if cfg.cpu_amp and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning(
            "train.cpu_amp: this CPU has no native bfloat16 (AVX512-BF16 / AMX): autocast is "
            "emulated and slower than float32; set train.cpu_amp false"
        )
    # The average validates, is selected and is saved; the raw weights keep training.
    ema = weight_average(model, cfg.ema_decay)
    evaluated = ema.module if ema is not None else model
    # Stochastic weight averaging: an equal average over the steps of the last swa_epochs; the
    # live weights validate until the last epoch (the average has no BatchNorm statistics yet).
    swa = weight_average(model, 0.0, equal=True) if cfg.swa_epochs else None
    average = ema if ema is not None else swa  # one checkpoint slot: the two are exclusive
    opt = _optimizer(params, model)
    sched = _scheduler(params, opt)
    # fp16 needs loss scaling; bf16 has float32's range and does not.
    use_scaler = cfg.amp and device.type == "cuda" and cfg.amp_dtype == "float16"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    state = TrainState()
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        state, best_state = restore_checkpoint(ckpt, model, opt, sched, scaler, device, average)
        if rank == 0:
            log.info("resuming from %s after epoch %d", ckpt_path, state.epoch)

    dataset = TrainDataset(
        train_tiles,
        params.model.tile_size,
        preprocess,
        params.seed,
        cfg.samples_per_epoch,
        _build_augment(params),
        head=params.model.head,
    )
    loader, sampler = build_loader(
        dataset, cfg.batch_size, params.seed, cfg.workers, device=device, world=world
    )
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    tracker = Tracker(enabled=rank == 0)
    fresh_run = state.run_id is None
    tracker.start(params, str(device), run_id=state.run_id)
    state.run_id = tracker.run_id
    if fresh_run:
        tracker.log_dataset(params, _tile_table(split), context="training")
    status = "FAILED"
    bar = _progress_bar(rank == 0 and sys.stderr.isatty())
    try:
        progress = bar.__enter__()
        on_val_tile = None
        if progress is not None:
            progress.add_task(
                "training",
                total=len(loader) * cfg.epochs,
                completed=len(loader) * state.epoch,
                epoch=state.epoch + 1,
                info=_train_info(float("nan"), 0.0),
            )
            val_task = progress.add_task(
                "validation", total=len(val_tiles), epoch=state.epoch + 1, info="", visible=False
            )

            def on_val_tile() -> None:
                progress.update(val_task, advance=1)

        swa_from = cfg.epochs - cfg.swa_epochs
        for epoch in range(state.epoch, cfg.epochs):
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            if ema is not None:
                after_step = lambda: ema.update_parameters(model)  # noqa: E731
            elif swa is not None and epoch >= swa_from:
                after_step = lambda: swa.update_parameters(model)  # noqa: E731
            else:
                after_step = None
            row = _train_epoch(
                params, net, loader, opt, scaler, device, epoch, progress, after_step
            )
            sched.step()
            stop = stop_flag(device)  # NCCL broadcasts device tensors only
            validated = validates_after(epoch, cfg.val_every, cfg.epochs)
            if swa is not None and epoch + 1 == cfg.epochs:
                # BatchNorm statistics for the average (the live ones belong to the last
                # weights): one pass over this epoch's crops again, in training mode, no gradients.
                update_bn(loader, swa.module, device)
                evaluated = swa.module  # the final validation, the saved model and the fit
            if rank == 0:
                if validated:
                    if progress is not None:
                        progress.reset(
                            val_task, total=len(val_tiles), epoch=epoch + 1, visible=True
                        )
                    row.update(
                        validate_epoch(
                            params,
                            evaluated,
                            val_tiles,
                            preprocess,
                            device,
                            tracker,
                            epoch,
                            on_tile=on_val_tile,
                            tta=None if cfg.epoch_val_tta else "none",
                        )
                    )
                    if progress is not None:
                        progress.update(val_task, visible=False)
                    score = _score(params, row)
                    if score > state.best_score or cfg.checkpoint == "last":
                        state.best_score, state.best_epoch = score, epoch + 1
                        best_state = {
                            k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()
                        }
                row["lr"] = opt.param_groups[0]["lr"]
                state.epoch = epoch + 1
                state.history.append({"epoch": epoch + 1, **row})
                # Checkpoint first: a tracking server dying here must not cost the epoch.
                save_checkpoint(
                    ckpt_path, model, opt, sched, state, best_state, scaler, device, average
                )
                tracker.log_metrics(row, step=epoch + 1)
                _log_epoch(state, row, cfg.epochs)
                patience = cfg.early_stopping_patience
                if validated and patience and state.epoch - state.best_epoch >= patience:
                    log.info("early stop: no improvement for %d epochs", patience)
                    stop[0] = 1
            if world > 1:
                dist.broadcast(stop, src=0)
            if stop.item():
                break
        if world > 1:
            # BatchNorm statistics drift per rank; rank 0's are the model's.
            for buf in model.buffers():
                dist.broadcast(buf, src=0)
            log.info("rank %d final weights sha256 %s", rank, _weights_digest(model))
        summary: dict[str, Any] = {}
        if rank == 0:
            model.load_state_dict(best_state)
            post, fit_report = _fit_postprocess(params, model, val_tiles, preprocess, device)
            summary = _write_outputs(params, model, preprocess, state, split, job, post, fit_report)
            _log_selected_epoch(tracker, params, state, summary)
            _log_run_artifacts(tracker, params, state)
        status = "FINISHED"
        return summary
    finally:
        bar.__exit__(None, None, None)
        tracker.end(status)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _fit_postprocess(
    params: Params,
    model: torch.nn.Module,
    val_tiles: Tiles,
    preprocess: Preprocess,
    device: torch.device,
) -> tuple[Any, dict[str, Any]]:
    """The post-processing values for the selected model, chosen on the validation tiles.

    With ``postprocess.fit: false`` (or no validation tile) the configured values are kept.
    """
    from kseg.postprocess_fit import fit_postprocess

    if not params.postprocess.fit or len(val_tiles) == 0:
        return params.postprocess, {"fitted": False}
    maps: list[np.ndarray] = []
    validate_epoch(params, model, val_tiles, preprocess, device, maps_out=maps)
    start = time.perf_counter()
    post, report = fit_postprocess(
        maps, val_tiles.labels, params.postprocess, params.model.head, params.train.select_metric
    )
    report.update(fitted=True, seconds=round(time.perf_counter() - start, 2))
    log.info(
        "post-processing fitted on %d validation tiles: %s %.4f (configured values: %.4f)",
        len(maps),
        report["metric"],
        report["score"],
        report["base_score"],
    )
    return post, report


def validates_after(epoch: int, val_every: int, epochs: int) -> bool:
    """Whether validation runs after ``epoch`` (0-based): every ``val_every``-th and the last."""
    return (epoch + 1) % val_every == 0 or epoch + 1 == epochs


def _score(params: Params, row: dict[str, float]) -> float:
    metric = params.train.select_metric
    if metric == "val_loss" or metric not in row:
        return -row.get("val_loss", row["train_loss"])
    return row[metric]


def _log_epoch(state: TrainState, row: dict[str, float], epochs: int) -> None:
    parts = [f"epoch {state.epoch}/{epochs}"]
    parts += [f"{k} {v:.4g}" for k, v in row.items()]
    parts.append(f"best epoch {state.best_epoch} ({state.best_score:.4g})")
    log.info("  ".join(parts))  # one plain line per epoch: readable in CI logs and dvc output


def _tile_table(split: dict[str, list[str]]) -> list[dict[str, str]]:
    """One row per training and validation tile: the dataset input logged to MLflow."""
    return [{"tile_id": t, "split": name} for name in ("train", "val") for t in split[name]]


#: Per-epoch values that measure the machine, not the model: logged to MLflow, kept out of the
#: files DVC hashes (model folder, metrics, plots), so identical trainings give identical files.
TIMING_KEYS = ("tiles_per_s", "val_seconds", "seconds")


def writes_pipeline_metrics(out_dir: str) -> bool:
    """Whether a training into ``out_dir`` is the pipeline's train stage.

    Only that one writes ``metrics/train.json`` and ``metrics/train_curve.csv`` (the files
    ``dvc.yaml`` declares): a ``kseg train -p other.yaml`` into another folder must not
    overwrite them. Without a ``dvc.yaml`` in the working directory the default folder counts.
    """
    target = Path(out_dir).as_posix().rstrip("/")
    if Path("dvc.yaml").is_file():
        return target in dvc_outputs()
    return target == "models/kseg"


def _history_keys(history: list[dict[str, float]]) -> list[str]:
    """Every key of the history's rows in first-seen order (unvalidated epochs lack the scores)."""
    return list(dict.fromkeys(k for row in history for k in row))


def _curve_csv(history: list[dict[str, float]]) -> str:
    keys = [k for k in (_history_keys(history) or ["epoch"]) if k not in TIMING_KEYS]
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in history]
    return "\n".join(lines) + "\n"


def _write_outputs(
    params: Params,
    model: torch.nn.Module,
    preprocess: Preprocess,
    state: TrainState,
    split: dict[str, list[str]],
    job: str,
    post: Any,
    fit_report: dict[str, Any],
) -> dict[str, Any]:
    """Writes the model folder atomically, its run pointer, and the DVC metrics and plots files.

    Everything written into the folder is a function of params, data and code only (no run id,
    no timing), so two identical CPU trainings give the same DVC hash of ``models/kseg``.
    """
    from kseg.model import save_model_folder
    from kseg.postprocess_fit import save_postprocess

    out = Path(params.train.out_dir)
    best = state.history[state.best_epoch - 1] if state.best_epoch > 0 else {}
    skip = (*TIMING_KEYS, "epoch", "lr", "train_loss")
    scores = {("loss" if k == "val_loss" else k): v for k, v in best.items() if k not in skip}
    summary: dict[str, Any] = {
        "best_epoch": state.best_epoch,
        "best_score": state.best_score,
        "select_metric": params.train.select_metric,
        "epochs_run": state.epoch,
        "fingerprint": job,
        "n_train_tiles": len(split["train"]),
        "n_val_tiles": len(split["val"]),
        "train_loss": best.get("train_loss"),  # of the kept epoch
        "val": scores,  # the kept epoch's validation scores and loss
    }
    if fit_report.get("fitted"):
        summary["val_fitted_" + fit_report["metric"]] = fit_report["score"]
    fit_saved = {k: v for k, v in fit_report.items() if k not in TIMING_KEYS}
    with atomic_dir(out) as staging:
        save_model_folder(model.cpu(), params.model, staging)
        preprocess.save(staging)
        stain = Path(params.stain.out_dir) / "stain.json"
        if stain.is_file():
            shutil.copy(stain, staging / "stain.json")
        save_config(params, staging / "params.json")
        if fit_report.get("fitted"):
            save_postprocess(staging, post, fit_saved)
        atomic_write_text(staging / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(staging / "train_curve.csv", _curve_csv(state.history))
    pointer = {"mlflow_run_id": state.run_id, "mlflow_tracking_uri": redact(tracking_uri())}
    atomic_write_text(run_pointer(out), json.dumps(pointer, indent=2) + "\n")
    if writes_pipeline_metrics(params.train.out_dir):
        # Numbers a person compares across commits (`dvc metrics diff`), nested for a short
        # `dvc exp show`: no strings, ids or timings.
        metrics = {
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
            "train_loss": best.get("train_loss"),
            "val": scores,
        }
        if fit_report.get("fitted"):
            metrics["val_fitted_" + fit_report["metric"]] = fit_report["score"]
        metrics_dir = Path("metrics")
        atomic_write_text(metrics_dir / "train.json", json.dumps(metrics, indent=2) + "\n")
        atomic_write_text(metrics_dir / "train_curve.csv", _curve_csv(state.history))
    else:
        log.info("train.out_dir %s is not the pipeline's: metrics/ left as it is", out)
    return {**summary, **pointer}


def _log_selected_epoch(
    tracker: Tracker, params: Params, state: TrainState, summary: dict[str, Any]
) -> None:
    """Logs the kept epoch's scores as ``best_*`` and a description of the run.

    The charts show every epoch; the run's metric columns would otherwise show the last epoch,
    not the model that was kept.
    """
    row = state.history[state.best_epoch - 1] if state.best_epoch > 0 else {}
    best = {f"best_{k}": v for k, v in row.items() if k not in (*TIMING_KEYS, "epoch", "lr")}
    best["best_epoch"] = float(state.best_epoch)
    fitted = f"val_fitted_{params.train.select_metric}"
    if fitted in summary:
        best[f"best_{fitted}"] = summary[fitted]
    tracker.log_metrics(best, step=state.best_epoch)
    model = params.model
    tracker.set_description(
        f"kseg train: {model.arch} (nfeat {model.nfeat}, {model.head} head, "
        f"{model.tile_size} px tiles) on {params.data.source} data, "
        f"{summary['n_train_tiles']} training / {summary['n_val_tiles']} validation tiles, "
        f"{state.epoch} epochs. Kept epoch {state.best_epoch} "
        f"(validation {params.train.select_metric} {state.best_score:.4f}); its scores are the "
        "best_* metrics, the test scores (test_*) come from kseg evaluate."
    )


def _log_run_artifacts(tracker: Tracker, params: Params, state: TrainState) -> None:
    from kseg.plots import line_chart

    present = _history_keys(state.history)
    keys = [k for k in ("train_loss", "val_loss", "aji", "pq", "pixel_f1") if k in present]
    # An epoch without validation is NaN: a gap in the chart.
    series = {k: [r.get(k, float("nan")) for r in state.history] for k in keys}
    chart = line_chart(series, title="learning curve")
    tracker.log_image(chart, "plots/learning_curve.png")
    out = Path(params.train.out_dir)
    names = ("config.json", "params.json", "preprocess.json", "train_summary.json")
    for name in (*names, "postprocess.json"):
        tracker.log_artifact(out / name, "model_folder")
    tracker.log_artifact(Path("dvc.lock"))
    tracker.log_artifact(out / "train_curve.csv")
