"""Training stage: MLflow run contents, kill-and-resume equality, NaN stop, DDP with gloo."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.pipeline_helpers import (
    REPO,
    copy_project,
    kseg_process,
    make_prepared_project,
    run_stage,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared_project(tmp_path_factory.mktemp("tiny") / "project")


def _mlflow_env(folder: Path) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(
        folder / "models" / "kseg" / "model.pt", map_location="cpu", weights_only=True
    )


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_epochs_logged_to_mlflow(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    import mlflow

    project = copy_project(prepared, tmp_path / "p")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _mlflow_env(project)["MLFLOW_TRACKING_URI"])
    run_stage("train", project)
    pointer = json.loads((project / "models" / "kseg.mlflow.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=_mlflow_env(project)["MLFLOW_TRACKING_URI"])
    run = client.get_run(pointer["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # A name that tells runs apart: stage, data, architecture, params hash, a random suffix.
    assert re.fullmatch(
        r"train-synthetic-kidney_segnet-nf4-[0-9a-f]{6}-[0-9a-f]{4}", run.info.run_name
    )
    assert run.data.tags["mlflow.note.content"].startswith("kseg train: kidney_segnet")
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "synthetic"
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "training"
    assert run.data.params["train.epochs"] == "2"
    assert run.data.params["model.nfeat"] == "4"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    assert len(client.get_metric_history(run.info.run_id, "aji")) == 2
    tags = run.data.tags
    for tag in (
        "git_commit",
        "git_dirty",
        "data_version",
        "params_hash",
        "torch_version",
        "device",
    ):
        assert tags.get(tag), tag
    assert tags["device"] == "cpu"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "model_folder", "val_overlays"} <= artifacts
    # The learning curve (kseg.plots, matplotlib): a 640x400 PNG with something drawn on it.
    (curve,) = client.list_artifacts(run.info.run_id, "plots")
    assert curve.path == "plots/learning_curve.png"
    from PIL import Image

    with Image.open(client.download_artifacts(run.info.run_id, curve.path, str(tmp_path))) as im:
        assert im.format == "PNG" and im.size == (640, 400)
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or ()) > 20
    folder = {a.path for a in client.list_artifacts(run.info.run_id, "model_folder")}
    assert "model_folder/config.json" in folder
    # DVC metrics come from the same numbers as MLflow; the kept epoch's scores are best_*.
    metrics = json.loads((project / "metrics" / "train.json").read_text())
    best = client.get_metric_history(run.info.run_id, "aji")[metrics["best_epoch"] - 1]
    assert metrics["val"]["aji"] == pytest.approx(best.value)
    assert run.data.metrics["best_aji"] == pytest.approx(best.value)
    assert run.data.metrics["best_epoch"] == metrics["best_epoch"]
    # Only numbers a person compares: no ids, strings or timings in the files DVC compares.
    flat = json.dumps(metrics)
    assert not any(k in flat for k in ("run_id", "tiles_per_s", "seconds", "fingerprint"))
    assert all(isinstance(v, int | float) for v in metrics["val"].values())
    assert "tiles_per_s" not in (project / "metrics" / "train_curve.csv").read_text()

    # Same params, same data, another train.out_dir: the same model folder byte for byte (one
    # DVC hash for identical trainings), and the pipeline's metrics/ files are left alone.
    first = project / "models" / "kseg"
    metrics_before = {p.name: p.read_bytes() for p in (project / "metrics").iterdir()}
    other = (project / "params.yaml").read_text().replace("out_dir: models/kseg", "out_dir: o/m")
    (project / "other.yaml").write_text(other)
    shutil.rmtree(project / ".checkpoints")
    old = Path.cwd()
    os.chdir(project)
    try:
        from typer.testing import CliRunner

        from kseg.cli import app

        result = CliRunner().invoke(app, ["train", "-p", "other.yaml", "--fresh"])
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result.output
    second = project / "o" / "m"
    assert {p.name: p.read_bytes() for p in (project / "metrics").iterdir()} == metrics_before
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        a, b = (first / name).read_bytes(), (second / name).read_bytes()
        if name == "params.json":  # holds train.out_dir
            continue
        if name == "train_summary.json":  # the params hash differs with train.out_dir
            a, b = (json.loads(x) for x in (a, b))
            assert a.pop("fingerprint") != b.pop("fingerprint")
        assert a == b, name
    assert (project / "o" / "m.mlflow.json").is_file()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    prepared: Path, tmp_path: Path, monkeypatch
) -> None:
    import kseg.train as train_mod
    from kseg.config import load_params

    project = copy_project(prepared, tmp_path / "p")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _mlflow_env(project)["MLFLOW_TRACKING_URI"])
    real = train_mod.loss_fn
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 3 else loss  # epoch 2 diverges

    monkeypatch.setattr(train_mod, "loss_fn", flaky)
    with pytest.raises(train_mod.TrainingDiverged, match=r"loss is nan at epoch 2"):
        train_mod.train(load_params("params.yaml"))
    (ckpt,) = (project / ".checkpoints").glob("*/checkpoint.pt")
    assert train_mod.load_checkpoint(ckpt)["epoch"] == 1
    assert not (project / "models").exists()


@pytest.mark.parametrize("keep", ["best", "last"])
def test_checkpoint_option_keeps_the_best_or_the_last_epoch(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: str
) -> None:
    import kseg.train as train_mod
    from kseg.config import load_params

    project = copy_project(prepared, tmp_path / "p")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _mlflow_env(project)["MLFLOW_TRACKING_URI"])
    text = (project / "params.yaml").read_text().replace("checkpoint: best", f"checkpoint: {keep}")
    (project / "params.yaml").write_text(text)
    # Validation says epoch 1 is the better one of the two.
    scores = iter([1.0, 0.0])
    monkeypatch.setattr(train_mod, "_score", lambda params, row: next(scores))
    summary = train_mod.train(load_params("params.yaml"))
    (ckpt,) = (project / ".checkpoints").glob("*/checkpoint.pt")
    saved = train_mod.load_checkpoint(ckpt)
    last = saved["model"]  # the final epoch's weights
    assert saved["epoch"] == 2
    kept = _weights(project)
    assert summary["best_epoch"] == (1 if keep == "best" else 2)
    same = all(torch.equal(kept[k], last[k]) for k in last)
    assert same == (keep == "last")
    # The post-processing is fitted for the weights that were kept.
    assert (project / "models" / "kseg" / "postprocess.json").is_file()


def test_validates_after_every_nth_and_the_last_epoch() -> None:
    from kseg.train import validates_after

    assert [e + 1 for e in range(10) if validates_after(e, 4, 10)] == [4, 8, 10]
    assert [e + 1 for e in range(3) if validates_after(e, 1, 3)] == [1, 2, 3]
    assert [e + 1 for e in range(3) if validates_after(e, 5, 3)] == [3]


def test_val_every_skips_validations_and_trains_the_same_weights(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    import kseg.train as train_mod
    from kseg.config import load_params

    folders, validated = {}, {}
    real_validate = train_mod.validate_epoch
    for every in (1, 2):
        project = copy_project(prepared, tmp_path / f"every{every}")
        monkeypatch.chdir(project)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", _mlflow_env(project)["MLFLOW_TRACKING_URI"])
        doc = yaml.safe_load((project / "params.yaml").read_text())
        doc["train"].update(epochs=3, val_every=every, checkpoint="last")
        (project / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        epochs: list[int] = []

        def spy(*args, _seen=epochs, **kwargs):
            # args: params, model, tiles, preprocess, device, tracker, epoch (0-based)
            if kwargs.get("maps_out") is None:  # the per-epoch validation, not the final fit
                _seen.append(args[6] + 1)
            return real_validate(*args, **kwargs)

        monkeypatch.setattr(train_mod, "validate_epoch", spy)
        summary = train_mod.train(load_params("params.yaml"))
        assert summary["best_epoch"] == 3
        folders[every], validated[every] = project, epochs
    assert validated == {1: [1, 2, 3], 2: [2, 3]}
    _assert_same_weights(_weights(folders[1]), _weights(folders[2]))  # training is unchanged
    # The curve keeps a row per epoch; an epoch without validation has empty score cells.
    rows = (folders[2] / "models" / "kseg" / "train_curve.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 4 and "aji" in header and "train_loss" in header
    cells = [dict(zip(header, r.split(","), strict=True)) for r in rows[1:]]
    assert [c["aji"] != "" for c in cells] == [False, True, True]
    assert all(c["train_loss"] != "" for c in cells)


def test_swa_learning_rate_runs_the_schedule_then_holds_swa_lr() -> None:
    import itertools
    import math

    from kseg.config import TrainConfig
    from kseg.train import swa_lr_factor

    cfg = TrainConfig(
        epochs=10, swa_epochs=4, swa_lr=0.0005, lr=0.002, scheduler="cosine", checkpoint="last"
    )
    factors = [swa_lr_factor(cfg, e) for e in range(10)]
    assert factors[0] == 1.0  # the cosine starts at lr ...
    # ... and ends at swa_lr over the 6 scheduled epochs: 0.25 + 0.75 * (1 + cos(pi / 2)) / 2
    assert math.isclose(factors[3], 0.25 + 0.75 * 0.5)
    assert factors[6:] == [0.25] * 4  # the averaged epochs run at swa_lr
    assert all(a > b for a, b in itertools.pairwise(factors[:7]))  # falling to swa_lr
    step = cfg.model_copy(update={"scheduler": "step"})
    assert [swa_lr_factor(step, e) for e in range(10)] == [1, 1, 0.25, 0.25, 0.25, 0.25] + [
        0.25
    ] * 4  # 0.1 after a third of 6 epochs is below swa_lr: floored
    none = cfg.model_copy(update={"scheduler": "none"})
    assert [swa_lr_factor(none, e) for e in range(10)] == [1.0] * 6 + [0.25] * 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"swa_epochs": 3}, "fewer than epochs"),
        ({"swa_epochs": 1, "checkpoint": "best"}, "needs checkpoint: last"),
        ({"swa_epochs": 1, "ema_decay": 0.9}, "two weight averages"),
    ],
)
def test_swa_settings_that_cannot_work_are_refused(change: dict, message: str) -> None:
    from pydantic import ValidationError

    from kseg.config import TrainConfig

    with pytest.raises(ValidationError, match=message):
        TrainConfig(**{"epochs": 3, "checkpoint": "last", **change})


def test_swa_saves_the_average_of_the_last_epochs_with_its_own_batchnorm_statistics(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    import kseg.train as train_mod
    from kseg.config import load_params

    def swa_project(name: str) -> Path:
        project = copy_project(prepared, tmp_path / name)
        monkeypatch.chdir(project)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", _mlflow_env(project)["MLFLOW_TRACKING_URI"])
        doc = yaml.safe_load((project / "params.yaml").read_text())
        doc["train"].update(
            epochs=3, swa_epochs=2, swa_lr=0.001, checkpoint="last", samples_per_epoch=8
        )
        (project / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        return project

    # A run stopped in its last epoch, halfway through the average, then resumed ...
    interrupted = swa_project("interrupted")
    real_epoch = train_mod._train_epoch

    def fail_in_epoch_3(*args, **kwargs):
        if args[6] == 2:  # params, model, loader, opt, scaler, device, epoch (0-based)
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train_epoch", fail_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(load_params("params.yaml"))
    monkeypatch.setattr(train_mod, "_train_epoch", real_epoch)
    train_mod.train(load_params("params.yaml"))
    # ... and one straight through.
    project = swa_project("swa")
    params = load_params("params.yaml")
    summary = train_mod.train(params)
    assert summary["best_epoch"] == 3
    _assert_same_weights(_weights(project), _weights(interrupted))
    ckpt = train_mod.load_checkpoint(next(Path(".checkpoints").glob("*/checkpoint.pt")))
    assert int(ckpt["ema"]["n_averaged"]) == 2 * 8 // 2  # every step (batch 2) of two epochs
    saved, live = _weights(project), ckpt["model"]
    averaged = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"}
    _assert_same_weights(saved, averaged)  # the model folder holds the average ...
    weights = [k for k, v in live.items() if v.is_floating_point() and "running" not in k]
    assert any(not torch.equal(saved[k], live[k]) for k in weights)  # ... not the last step
    # BatchNorm statistics recomputed for the averaged weights, not the live network's.
    running = [k for k in live if k.endswith("running_var")]
    assert running and all(not torch.equal(saved[k], live[k]) for k in running)
    # Each row's lr is the rate after its epoch's scheduler step: epoch 1 ran at lr (0.002,
    # scheduler none), the averaged epochs 2 and 3 at swa_lr.
    rows = (project / "models" / "kseg" / "train_curve.csv").read_text().splitlines()
    assert [float(r.split(",")[-1]) for r in rows[1:]] == [0.001] * 3
    assert rows[0].split(",")[-1] == "lr"


def test_killed_run_resumes_to_the_same_weights(prepared: Path, tmp_path: Path) -> None:
    overrides = ["--params", "params.yaml"]
    straight = copy_project(prepared, tmp_path / "straight")
    killed = copy_project(prepared, tmp_path / "killed")
    for folder in (straight, killed):
        # With a weight average: it is saved, so it must also be resumed exactly.
        text = (folder / "params.yaml").read_text().replace("epochs: 2", "epochs: 4")
        text = text.replace("ema_decay: 0.0", "ema_decay: 0.5")
        assert "ema_decay: 0.5" in text
        (folder / "params.yaml").write_text(text)
    proc = kseg_process(["train", *overrides], straight, _mlflow_env(straight))
    assert proc.wait(timeout=600) == 0, proc.stdout.read() if proc.stdout else ""

    proc = kseg_process(["train", *overrides], killed, _mlflow_env(killed))
    deadline = time.time() + 300
    ckpts: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        ckpts = list((killed / ".checkpoints").glob("*/checkpoint.pt"))
        if ckpts:
            break
        time.sleep(0.05)
    assert ckpts, "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "models" / "kseg" / "model.pt").exists()
    proc = kseg_process(["train", *overrides], killed, _mlflow_env(killed))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    assert re.search(r"resuming from .* after epoch [123]", out), out
    _assert_same_weights(_weights(straight), _weights(killed))
    # The last epoch's raw weights and weight average too (the saved model is the best epoch's).
    from kseg.train import load_checkpoint

    last = [
        load_checkpoint(next((f / ".checkpoints").glob("*/checkpoint.pt")))
        for f in (straight, killed)
    ]
    assert last[0]["epoch"] == last[1]["epoch"] == 4
    _assert_same_weights(last[0]["model"], last[1]["model"])
    _assert_same_weights(last[0]["ema"], last[1]["ema"])


def test_torchrun_two_ranks_gloo(prepared: Path, tmp_path: Path) -> None:
    import mlflow

    project = copy_project(prepared, tmp_path / "ddp")
    env = {**os.environ, **_mlflow_env(project), "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "kseg",
            "train",
            "--params",
            "params.yaml",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    digests = dict(re.findall(r"rank (\d) final weights sha256 ([0-9a-f]{64})", proc.stderr))
    assert set(digests) == {"0", "1"}, proc.stderr
    assert digests["0"] == digests["1"]
    runs = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
        [
            e.experiment_id
            for e in mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()
        ]
    )
    assert len(runs) == 1
    assert (project / "models" / "kseg" / "model.pt").is_file()


def test_logs_to_a_real_mlflow_server(
    prepared: Path, tmp_path: Path, mlflow_server: str, monkeypatch
) -> None:
    import mlflow

    project = copy_project(prepared, tmp_path / "srv")
    text = (project / "params.yaml").read_text().replace("epochs: 2", "epochs: 1")
    (project / "params.yaml").write_text(text)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    run_stage("train", project)
    pointer = json.loads((project / "models" / "kseg.mlflow.json").read_text())
    assert pointer["mlflow_tracking_uri"] == mlflow_server
    run = mlflow.MlflowClient(mlflow_server).get_run(pointer["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_loss"] > 0
    assert not (project / "mlflow.db").exists()


def test_fingerprint_covers_code_and_torch_version(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import shutil

    from kseg import train as train_mod
    from kseg.config import load_params

    params = load_params(REPO / "params.yaml")
    first = train_mod.fingerprint(params, [])
    assert train_mod.fingerprint(params, []) == first  # stable
    # code_digest hashes the sources beside train.py: point it at a copy of the package.
    copy = shutil.copytree(Path(train_mod.__file__).parent, tmp_path / "kseg",
                           ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    monkeypatch.setattr(train_mod, "__file__", str(copy / "train.py"))
    assert train_mod.fingerprint(params, []) == first  # same bytes elsewhere: same job
    # One byte of a source in a subpackage (the ops the model trains with) moves it ...
    source = copy / "model" / "ops.py"
    original = source.read_bytes()
    at = original.index(b"def prelu") + len("def ")
    source.write_bytes(original[:at] + b"q" + original[at + 1 :])  # def prelu -> def qrelu
    changed = train_mod.fingerprint(params, [])
    assert changed != first
    source.write_bytes(original)
    assert train_mod.fingerprint(params, []) == first  # ... and back
    # A new module changes what runs too.
    (copy / "model" / "extra.py").write_text("X = 1\n")
    assert train_mod.fingerprint(params, []) not in (first, changed)
    (copy / "model" / "extra.py").unlink()
    monkeypatch.setattr(train_mod.torch, "__version__", "0.0.0-other")
    assert train_mod.fingerprint(params, []) != first


def test_git_dirty_ignores_what_dvc_writes() -> None:
    from kseg.tracking import dvc_outputs, git_dirty

    generated = dvc_outputs(REPO / "dvc.yaml")
    assert {"dvc.lock", "metrics/train.json", "models/kseg"} <= set(generated)
    # What `dvc repro` changes before train runs is not an uncommitted change of the code.
    assert not git_dirty(" M dvc.lock\n M metrics/validation.json\n", generated)
    assert git_dirty(" M dvc.lock\n M kseg/train.py\n", generated)
    assert git_dirty("M  params.yaml\n", generated)
    assert not git_dirty("", generated)


def test_lineage_reads_real_git_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The status a real git prints (" M path" first) is read whole: DVC's files are not dirt."""
    from kseg.config import load_params
    from kseg.tracking import lineage_tags

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "validation.json").write_text("{}")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    monkeypatch.chdir(tmp_path)
    params = load_params(tmp_path / "params.yaml")
    assert lineage_tags(params, "cpu")["git_dirty"] == "false"
    (tmp_path / "metrics" / "validation.json").write_text('{"ok": 1}')  # as dvc repro leaves it
    assert lineage_tags(params, "cpu")["git_dirty"] == "false"
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text() + "\n# edited\n")
    assert lineage_tags(params, "cpu")["git_dirty"] == "true"


def test_weight_average_is_the_decayed_mean_of_the_weights() -> None:
    from kseg.train import weight_average

    assert weight_average(torch.nn.Linear(2, 2), 0.0) is None
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    ema = weight_average(net, 0.9)
    weights = []
    for step in range(3):  # three "optimizer steps", each setting known values
        with torch.no_grad():
            net[0].weight.fill_(float(step + 1))
        net(torch.randn(4, 1, 3, 3) + step)  # train mode: BatchNorm statistics move
        weights.append(net[0].weight.detach().clone())
        ema.update_parameters(net)
    # avg_0 = w_0, avg_t = 0.9 avg_(t-1) + 0.1 w_t
    expect = (0.9 * (0.9 * weights[0] + 0.1 * weights[1])) + 0.1 * weights[2]
    assert torch.allclose(ema.module[0].weight, expect, atol=1e-6)
    assert not torch.allclose(ema.module[0].weight, weights[2])  # not just the last weights
    # BatchNorm statistics are the live model's (an average would not match the averaged
    # weights), the batch counter included.
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)
    assert torch.equal(ema.module[1].running_var, net[1].running_var)
    assert int(ema.module[1].num_batches_tracked) == 3


def test_input_scale_trains_on_shrunk_tiles_and_validates_at_the_data_resolution(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    import yaml

    import kseg.train as train_mod
    import kseg.validation_loop as val_mod
    from kseg.config import load_params
    from kseg.data.dataset import load_split, load_tiles
    from kseg.segmenter import Segmenter

    project = copy_project(prepared, tmp_path / "p")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _mlflow_env(project)["MLFLOW_TRACKING_URI"])
    doc = yaml.safe_load((project / "params.yaml").read_text())
    doc["model"]["input_scale"] = 0.5
    doc["train"]["epochs"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    trained_on: list[tuple[int, ...]] = []
    real_dataset = train_mod.TrainDataset

    def spy_dataset(tiles, *args, **kwargs):
        trained_on.extend(image.shape for image in tiles.images)
        return real_dataset(tiles, *args, **kwargs)

    validated: list[tuple[tuple[int, ...], float]] = []
    real_predict = val_mod.predict_maps

    def spy_predict(model, image, *args, **kwargs):
        validated.append((image.shape, kwargs["input_scale"]))
        maps = real_predict(model, image, *args, **kwargs)
        assert maps.shape[1:] == image.shape[:2]
        return maps

    monkeypatch.setattr(train_mod, "TrainDataset", spy_dataset)
    monkeypatch.setattr(val_mod, "predict_maps", spy_predict)
    train_mod.train(load_params("params.yaml"))

    split = load_split(project / "prepared")
    full = load_tiles(
        project / "normalized" / "images", project / "prepared" / "labels", split["train"]
    )
    assert trained_on == [(h // 2, w // 2, 3) for h, w in (i.shape[:2] for i in full.images)]
    val_shapes = {
        i.shape
        for i in load_tiles(
            project / "normalized" / "images", project / "prepared" / "labels", split["val"]
        ).images
    }
    # Per-epoch validation and the post-processing fit: full-size tiles, resampled inside.
    assert validated and {shape for shape, _ in validated} == val_shapes
    assert {scale for _, scale in validated} == {0.5}
    folder = project / "models" / "kseg"
    assert json.loads((folder / "config.json").read_text())["model"]["input_scale"] == 0.5
    seg = Segmenter.from_folder(folder)
    image = full.images[0]
    labels, _ = seg.segment(image)
    assert labels.shape == image.shape[:2] and np.issubdtype(labels.dtype, np.integer)


@pytest.mark.parametrize("epoch_val_tta", [True, False])
def test_epoch_validation_tta_follows_the_option_and_the_fit_uses_the_models(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, epoch_val_tta: bool
) -> None:
    import yaml

    import kseg.train as train_mod
    import kseg.validation_loop as val_mod
    from kseg.config import load_params
    from kseg.data.dataset import load_split

    project = copy_project(prepared, tmp_path / "p")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _mlflow_env(project)["MLFLOW_TRACKING_URI"])
    doc = yaml.safe_load((project / "params.yaml").read_text())
    doc["model"].update(infer_tta="flips", infer_scales=[1.0, 1.25])
    doc["train"].update(epochs=2, epoch_val_tta=epoch_val_tta)
    doc["postprocess"]["fit"] = True
    (project / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    # (tta, scales, maps kept for the post-processing fit)
    calls: list[tuple[str, tuple[float, ...], bool]] = []
    real_validate = val_mod.validate_epoch

    def spy_validate(*args, **kwargs):
        real_predict = val_mod.predict_maps
        seen: list[tuple[str, tuple[float, ...]]] = []

        def spy_predict(*p_args, **p_kwargs):
            seen.append((p_kwargs["tta"], tuple(p_kwargs["scales"])))
            return real_predict(*p_args, **p_kwargs)

        monkeypatch.setattr(val_mod, "predict_maps", spy_predict)
        try:
            return real_validate(*args, **kwargs)
        finally:
            monkeypatch.setattr(val_mod, "predict_maps", real_predict)
            kept = kwargs.get("maps_out") is not None
            calls.extend((tta, scales, kept) for tta, scales in set(seen))

    monkeypatch.setattr(train_mod, "validate_epoch", spy_validate)
    train_mod.train(load_params("params.yaml"))
    assert load_split(project / "prepared")["val"]  # there were validation tiles to see
    model_tta = ("flips", (1.0, 1.25))
    per_epoch = model_tta if epoch_val_tta else ("none", (1.0,))
    assert calls == [(*per_epoch, False), (*per_epoch, False), (*model_tta, True)]
