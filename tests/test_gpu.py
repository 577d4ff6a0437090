"""CUDA-only checks of the GPU paths (marker ``gpu``; skipped without a CUDA device).

Run on a GPU host with ``pytest -m gpu tests/test_gpu.py``. The CPU stand-ins of these checks are in
tests/test_model_amp.py (bf16 autocast), tests/test_train_device.py and tests/test_infer_device.py.
"""

from __future__ import annotations

import copy
import datetime
import os

import numpy as np
import pytest
import torch

from kseg.config import ModelConfig
from kseg.model import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

NETS = [
    ModelConfig(nfeat=8, mid_channels=16, tile_size=64, head="fg_dist"),
    ModelConfig(nfeat=8, mid_channels=16, tile_size=64, head="fg_dist", dice_impl="reference"),
    ModelConfig(arch="unet", nfeat=8, tile_size=64, head="fg_dist"),
]


@pytest.mark.parametrize("cfg", NETS, ids=["fast", "reference", "unet"])
@pytest.mark.parametrize(
    "dtype", [None, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_train_step_on_cuda(cfg: ModelConfig, dtype) -> None:
    from kseg.train import loss_fn

    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    torch.manual_seed(0)
    model = build_model(cfg).cuda().train().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    x = torch.randn(2, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.rand(2, 2, 64, 64, device="cuda")
    for _ in range(2):
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            pred = model(x)
        loss = loss_fn("mse", 1.0, pred.float(), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cfg", NETS, ids=["fast", "reference", "unet"])
def test_cuda_float32_matches_cpu(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.randn(2, 3, 64, 64)
    gpu = copy.deepcopy(model).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out_cpu, out_gpu = model(x), gpu(x.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-3, atol=1e-3)


def test_predict_maps_on_cuda_matches_cpu() -> None:
    from kseg.infer import Preprocess, predict_maps

    torch.manual_seed(0)
    model = build_model(NETS[0]).eval()
    image = np.random.default_rng(0).integers(0, 255, (100, 70, 3), dtype=np.uint8)
    cpu = predict_maps(model, image, Preprocess(), 64)
    gpu = predict_maps(copy.deepcopy(model).cuda(), image, Preprocess(), 64, 16, "cuda", None)
    np.testing.assert_allclose(gpu, cpu, atol=2e-3)
    half = predict_maps(model.cuda(), image, Preprocess(), 64, 16, "cuda", None, torch.float16)
    np.testing.assert_allclose(half, cpu, atol=5e-2)


def test_nccl_broadcast_of_the_stop_flag(tmp_path) -> None:
    import torch.distributed as dist

    from kseg.train import stop_flag

    if not dist.is_nccl_available():
        pytest.skip("no NCCL")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(
        "nccl", store=store, rank=0, world_size=1, timeout=datetime.timedelta(minutes=1)
    )
    try:
        flag = stop_flag(torch.device("cuda", 0))
        flag[0] = 1
        dist.broadcast(flag, src=0)
        assert flag.item() == 1
    finally:
        dist.destroy_process_group()


def test_checkpoint_keeps_cuda_rng_and_scaler(tmp_path) -> None:
    from kseg import train as train_mod

    device = torch.device("cuda", 0)
    model = torch.nn.Linear(3, 2).to(device)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cuda", init_scale=256.0)
    state = train_mod.TrainState(epoch=1)
    path = tmp_path / "checkpoint.pt"
    train_mod.save_checkpoint(path, model, opt, sched, state, model.state_dict(), scaler, device)
    expected = torch.rand(4, device=device)
    ckpt = train_mod.load_checkpoint(path)
    scaler2 = torch.amp.GradScaler("cuda")
    train_mod.restore_checkpoint(ckpt, model, opt, sched, scaler2, device)
    assert scaler2.get_scale() == 256.0
    assert torch.equal(torch.rand(4, device=device), expected)
