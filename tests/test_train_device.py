"""Training's device, data-loading and checkpoint plumbing, tested on CPU.

Each test would have caught a GPU-only bug: a CPU stop flag that NCCL rejects, batches that
change with the number of DataLoader workers, an fp16 run that resumes without its loss scale.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kseg import train as train_mod
from kseg.data.dataset import Tiles, TrainDataset
from kseg.device import amp_dtype, resolve_device
from kseg.infer import Preprocess


def test_stop_flag_lives_on_the_training_device() -> None:
    for device in (torch.device("cpu"), torch.device("meta")):
        flag = train_mod.stop_flag(device)
        assert flag.device.type == device.type and flag.shape == (1,)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        for name in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match="torch sees no CUDA device"):
                resolve_device(name)
    assert amp_dtype("bfloat16") is torch.bfloat16 and amp_dtype(None) is None
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        amp_dtype("int8")


def _dataset(seed: int = 3) -> TrainDataset:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8) for _ in range(5)]
    labels = []
    for _ in range(5):
        lab = np.zeros((48, 48), np.int32)
        y, x = rng.integers(4, 30, 2)
        lab[y : y + 10, x : x + 12] = 1
        labels.append(lab)
    tiles = Tiles([f"t{i}" for i in range(5)], images, labels)
    return TrainDataset(tiles, 32, Preprocess(), seed, samples_per_epoch=9)


def _epochs(workers: int, epochs: int = 2) -> list[list[torch.Tensor]]:
    dataset = _dataset()
    loader, sampler = train_mod.build_loader(dataset, 2, seed=3, workers=workers)
    out = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        out.append([torch.cat([x.flatten(), y.flatten()]) for x, y in loader])
    return out


def test_batches_do_not_depend_on_workers() -> None:
    serial = _epochs(0)
    assert len(serial[0]) == 4  # 9 samples, batch 2, drop_last
    assert not torch.equal(serial[0][0], serial[1][0])  # each epoch draws anew
    for run in (_epochs(2), _epochs(2)):  # persistent workers still see each epoch
        assert len(run) == len(serial)
        for a_epoch, b_epoch in zip(serial, run, strict=True):
            for a, b in zip(a_epoch, b_epoch, strict=True):
                assert torch.equal(a, b)


def test_loader_options_follow_the_device() -> None:
    loader, _ = train_mod.build_loader(_dataset(), 2, 3, workers=2, device=torch.device("cuda"))
    assert loader.pin_memory and loader.persistent_workers and loader.num_workers == 2
    loader, _ = train_mod.build_loader(_dataset(), 2, 3, workers=0, device=torch.device("cpu"))
    assert not loader.pin_memory and not loader.persistent_workers


def test_checkpoint_round_trip_keeps_scaler_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for _ in range(4):  # moves the scale and the growth tracker
        opt.zero_grad()
        scaler.scale(model(torch.randn(4, 3)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    state = train_mod.TrainState(epoch=2, best_score=0.5, best_epoch=1, history=[{"epoch": 1}])
    path = tmp_path / "checkpoint.pt"
    best = {k: v.clone() for k, v in model.state_dict().items()}
    train_mod.save_checkpoint(path, model, opt, sched, state, best, scaler, torch.device("cpu"))

    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(model2.parameters())
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda _: 1.0)
    scaler2 = torch.amp.GradScaler("cpu")
    ckpt = train_mod.load_checkpoint(path)  # weights_only=True
    state2, best2 = train_mod.restore_checkpoint(ckpt, model2, opt2, sched2, scaler2)
    assert scaler2.state_dict() == scaler.state_dict()
    assert scaler2.get_scale() == scaler.get_scale() != 1024.0
    assert state2 == state
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]) and torch.equal(best[k], best2[k])
    assert ckpt["cuda_rng"].numel() == 0  # a CPU run stores no CUDA RNG


def test_divergence_watch_names_the_first_bad_step() -> None:
    watch = train_mod.DivergenceWatch(torch.device("cpu"))
    watch.record(torch.tensor(1.0), 0)
    watch.raise_if_diverged(0)
    watch.record(torch.tensor(float("inf")), 1)
    watch.record(torch.tensor(float("nan")), 2)
    with pytest.raises(train_mod.TrainingDiverged, match=r"loss is inf at epoch 4, step 2"):
        watch.raise_if_diverged(3)


def test_determinism_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    bench, det = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        train_mod.configure_determinism(torch.device("cuda"), True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory  # NaN fill off (speed)
        train_mod.configure_determinism(torch.device("cuda"), False)
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = bench, det
        train_mod.configure_determinism(torch.device("cpu"), True)


@pytest.mark.parametrize(
    "model_keys",
    [
        {"arch": "kidney_segnet", "nfeat": 8, "mid_channels": 32, "tile_size": 32},
        {
            "arch": "kidney_segnet",
            "nfeat": 8,
            "mid_channels": 32,
            "tile_size": 32,
            "dice_dim_kernels": "per_position",
            "head": "dist",
        },
        {"arch": "unet", "nfeat": 8, "tile_size": 32},
    ],
)
def test_training_step_reads_no_uninitialized_memory(model_keys: dict) -> None:
    """Why ``configure_determinism`` may turn torch's NaN fill of new tensors off.

    With the fill, a kernel that read memory it never wrote would see NaN; without it, whatever
    the allocator left there. A forward + backward step of each network gives the same loss and
    gradients bit for bit both ways, after a step that leaves non-NaN garbage in the freed memory.
    """
    from kseg.config import params_from_dict
    from kseg.model import build_model

    params = params_from_dict({"model": model_keys})
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=gen)
    channels = 2 if params.model.head == "fg_dist" else 1
    y = torch.rand(2, channels, 32, 32, generator=gen)
    torch.manual_seed(0)
    model = build_model(params.model)

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = train_mod.loss_fn("mse", 1.0, model(x), y)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    saved = torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.utils.deterministic.fill_uninitialized_memory = True
        filled = grads()
        torch.utils.deterministic.fill_uninitialized_memory = False
        (torch.full((2, 64, 32, 32), 7.0) * 3).sum()  # freed blocks now hold non-NaN values
        unfilled = grads()
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = saved
    assert all(torch.isfinite(g).all() for g in filled)
    assert all(torch.equal(a, b) for a, b in zip(filled, unfilled, strict=True))


@pytest.mark.parametrize(
    ("cpu_amp", "cpu_channels_last"), [(False, False), (True, False), (True, True)]
)
def test_cpu_bf16_autocast_and_channels_last_reach_the_training_step(
    cpu_amp: bool, cpu_channels_last: bool
) -> None:
    from kseg.config import params_from_dict
    from kseg.model import build_model

    params = params_from_dict(
        {
            "model": {"arch": "unet", "nfeat": 4, "tile_size": 32},
            "train": {"cpu_amp": cpu_amp, "cpu_channels_last": cpu_channels_last, "amp": True},
        }
    )
    cpu = torch.device("cpu")
    assert train_mod.autocast_setting(params.train, cpu) == (cpu_amp, torch.bfloat16)
    assert train_mod.uses_channels_last(params.train, cpu) is cpu_channels_last
    # train.amp / train.channels_last (true) are the CUDA settings: they leave the CPU alone
    assert (
        train_mod.autocast_setting(params.train.model_copy(update={"cpu_amp": False}), cpu)[0]
        is False
    )

    torch.manual_seed(0)
    model = build_model(params.model)
    if cpu_channels_last:
        model = model.to(memory_format=torch.channels_last)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen: list[tuple[torch.dtype, bool]] = []
    first_conv.register_forward_hook(
        lambda _m, inputs, out: seen.append(
            (out.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last))
        )
    )
    loader, sampler = train_mod.build_loader(_dataset(), 2, seed=3, workers=0)
    sampler.set_epoch(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    out = train_mod._train_epoch(params, model, loader, opt, scaler, cpu, 0)
    assert np.isfinite(out["train_loss"]) and len(seen) == len(loader) > 0
    assert {dtype for dtype, _ in seen} == {torch.bfloat16 if cpu_amp else torch.float32}
    assert {layout for _, layout in seen} == {cpu_channels_last}
    # the weights stay float32 and are updated
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
