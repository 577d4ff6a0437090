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
  on GPUs, gloo on CPU); only rank 0 validates, logs and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kseg.config import Params, params_hash, save_config
from kseg.data.dataset import Tiles, TrainDataset, load_split, load_tiles
from kseg.fsutil import atomic_dir, atomic_path, atomic_write_text
from kseg.infer import Preprocess
from kseg.tracking import Tracker, tracking_uri
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


def resolve_device(choice: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda was asked for, but torch sees no CUDA device")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device(f"cuda:{local_rank}")


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch; makes CPU kernels deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (third-party code may use the global RNG)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


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
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


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


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    state: TrainState,
    best_state: dict[str, torch.Tensor],
) -> None:
    """Writes the resumable checkpoint atomically (temp file + rename)."""
    payload = {
        "model": model.state_dict(),
        "best_model": best_state,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "epoch": state.epoch,
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "run_id": state.run_id or "",
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Reads a checkpoint with ``weights_only=True`` (no pickled code is executed)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        raise ValueError(f"{path}: unreadable checkpoint ({err}); delete it to start over") from err


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def _load_data(params: Params) -> tuple[dict[str, list[str]], Tiles, Tiles]:
    prepared = Path(params.prepare.out_dir)
    split = load_split(prepared)
    normalized = Path(params.stain.out_dir) / "images"
    image_dir = normalized if normalized.is_dir() else prepared / "images"
    train = load_tiles(image_dir, prepared / "labels", split["train"])
    val = load_tiles(image_dir, prepared / "labels", split["val"])
    return split, train, val


def _build_augment(params: Params) -> Any:
    from kseg.augment import build_augmentation

    return build_augmentation(params.augment, params.seed)


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _progress_bar(enabled: bool) -> Any:
    """A rich progress bar over all steps of the run (terminal only; CI gets one line per epoch)."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4g}  {task.fields[rate]:.1f} tiles/s"),
        TimeRemainingColumn(),
        transient=True,
    )


def _train_epoch(
    params: Params,
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    epoch: int,
    progress: Any = None,
) -> dict[str, float]:
    cfg = params.train
    model.train()
    use_amp = cfg.amp and device.type == "cuda"
    fmt = torch.channels_last if cfg.channels_last and device.type == "cuda" else None
    total, count, start = 0.0, 0, time.perf_counter()
    for step, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            pred = model(x)
        loss = loss_fn(cfg.loss, cfg.fg_loss_weight, pred.float(), y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; the run stops and "
                "the last good checkpoint is kept (lower train.lr or check the data)"
            )
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        total += loss.item() * len(x)
        count += len(x)
        if progress is not None:
            rate = count / max(time.perf_counter() - start, 1e-9)
            progress.update(
                progress.task_ids[0], advance=1, epoch=epoch + 1, loss=loss.item(), rate=rate
            )
    seconds = time.perf_counter() - start
    return {"train_loss": total / max(count, 1), "tiles_per_s": count / max(seconds, 1e-9)}


def train(params: Params, resume: bool = True) -> dict[str, Any]:  # noqa: C901 (one linear story)
    """Runs the train stage; returns the summary written to ``metrics/train.json``.

    Args:
        params: Validated parameters.
        resume: Continue from a matching checkpoint if there is one (same params and data).

    Raises:
        TrainingDiverged: On a NaN/inf loss (the last good checkpoint stays).
        ValueError: On missing or inconsistent inputs, naming the file.
    """
    from kseg.model import build_model, tune_cpu_allocator

    tune_cpu_allocator()  # reuse freed activation memory (3-5x faster elementwise ops on CPU)
    cfg = params.train
    device = resolve_device(cfg.device)
    rank, world = _init_distributed(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    seed_everything(params.seed)

    split, train_tiles, val_tiles = _load_data(params)
    preprocess = Preprocess.fit(train_tiles.images)
    job = fingerprint(params, [train_tiles, val_tiles])
    ckpt_path = Path(cfg.checkpoint_dir) / job / CHECKPOINT

    model = build_model(params.model).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = _optimizer(params, model)
    sched = _scheduler(params, opt)
    state = TrainState()
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        best_state = ckpt["best_model"]
        state = TrainState(
            epoch=ckpt["epoch"],
            best_score=ckpt["best_score"],
            best_epoch=ckpt["best_epoch"],
            history=list(ckpt["history"]),
            run_id=ckpt["run_id"] or None,
        )
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
    sampler: torch.utils.data.Sampler[int]
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=params.seed)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator())
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=len(dataset) > cfg.batch_size
    )
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")

    tracker = Tracker(enabled=rank == 0)
    tracker.start(params, str(device), run_id=state.run_id)
    state.run_id = tracker.run_id
    status = "FAILED"
    bar = _progress_bar(rank == 0 and sys.stderr.isatty())
    try:
        progress = bar.__enter__()
        if progress is not None:
            progress.add_task(
                "train",
                total=len(loader) * cfg.epochs,
                completed=len(loader) * state.epoch,
                epoch=state.epoch + 1,
                loss=float("nan"),
                rate=0.0,
            )
        for epoch in range(state.epoch, cfg.epochs):
            dataset.set_epoch(epoch)
            if isinstance(sampler, torch.utils.data.DistributedSampler):
                sampler.set_epoch(epoch)
            else:
                sampler.generator.manual_seed(params.seed * 1_000_003 + epoch)
            row = _train_epoch(params, net, loader, opt, scaler, device, epoch, progress)
            sched.step()
            stop = torch.zeros(1)
            if rank == 0:
                row.update(
                    validate_epoch(params, model, val_tiles, preprocess, device, tracker, epoch)
                )
                row["lr"] = opt.param_groups[0]["lr"]
                score = _score(params, row)
                if score > state.best_score:
                    state.best_score, state.best_epoch = score, epoch + 1
                    best_state = {
                        k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                    }
                state.epoch = epoch + 1
                state.history.append({"epoch": epoch + 1, **row})
                tracker.log_metrics(row, step=epoch + 1)
                save_checkpoint(ckpt_path, model, opt, sched, state, best_state)
                _log_epoch(state, row, cfg.epochs)
                patience = cfg.early_stopping_patience
                if patience and state.epoch - state.best_epoch >= patience:
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
    """Writes the model folder atomically, plus the DVC metrics and plots files."""
    from kseg.model import save_model_folder
    from kseg.postprocess_fit import save_postprocess

    out = Path(params.train.out_dir)
    summary = {
        "best_epoch": state.best_epoch,
        "best_score": state.best_score,
        "select_metric": params.train.select_metric,
        "epochs_run": state.epoch,
        "mlflow_run_id": state.run_id,
        "mlflow_tracking_uri": tracking_uri(),
        "fingerprint": job,
        "n_train_tiles": len(split["train"]),
        "n_val_tiles": len(split["val"]),
    }
    if fit_report.get("fitted"):
        summary["val_fitted_" + fit_report["metric"]] = fit_report["score"]
    with atomic_dir(out) as staging:
        save_model_folder(model.cpu(), params.model, staging)
        preprocess.save(staging)
        stain = Path(params.stain.out_dir) / "stain.json"
        if stain.is_file():
            shutil.copy(stain, staging / "stain.json")
        save_config(params, staging / "params.json")
        if fit_report.get("fitted"):
            save_postprocess(staging, post, fit_report)
        atomic_write_text(staging / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    metrics_dir = Path("metrics")
    best = state.history[state.best_epoch - 1] if state.best_epoch > 0 else {}
    atomic_write_text(
        metrics_dir / "train.json", json.dumps({**summary, **best}, indent=2, default=str) + "\n"
    )
    keys = list(state.history[0]) if state.history else ["epoch"]
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in state.history]
    atomic_write_text(metrics_dir / "train_curve.csv", "\n".join(lines) + "\n")
    return summary


def _log_run_artifacts(tracker: Tracker, params: Params, state: TrainState) -> None:
    from kseg.plots import line_chart

    keys = [k for k in ("train_loss", "val_loss", "aji", "pq", "pixel_f1") if k in state.history[0]]
    chart = line_chart({k: [r[k] for r in state.history] for k in keys}, title="learning curve")
    tracker.log_image(chart, "plots/learning_curve.png")
    out = Path(params.train.out_dir)
    for name in ("config.json", "params.json", "preprocess.json", "train_summary.json"):
        tracker.log_artifact(out / name, "model_folder")
    tracker.log_artifact(Path("dvc.lock"))
    tracker.log_artifact(Path("metrics") / "train_curve.csv")
