"""A tiny but complete project (synthetic data, prepared, normalized) for stage tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from kseg.cli import app

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "seed": 1,
    "data": {
        "source": "synthetic",
        "synthetic": {
            "seed": 5,
            "n_patients": 5,
            "tiles_per_patient": 2,
            "tile_size": 96,
            "nuclei_per_tile": [10, 16],
            "nucleus_radius": [4.0, 7.0],
        },
    },
    "model": {"nfeat": 4, "mid_channels": 8, "tile_size": 64},
    "train": {
        "epochs": 2,
        "batch_size": 2,
        "samples_per_epoch": 0,
        "threads": 1,
        "val_overlays": 1,
    },
}


def write_params(folder: Path, overrides: dict | None = None) -> Path:
    """Writes params.yaml: the repo's file with the tiny settings and ``overrides`` merged in.

    Every key of the repo's params.yaml is present, as DVC requires for the params it tracks.
    """
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    params = _merge(_merge(base, TINY_PARAMS), overrides or {})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def run_stage(name: str, folder: Path, *args: str) -> str:
    """Runs ``kseg <name>`` in-process with ``folder`` as working directory."""
    old = Path.cwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(app, [name, "--params", "params.yaml", *args])
    finally:
        os.chdir(old)
    if result.exit_code != 0:
        raise AssertionError(f"kseg {name} failed ({result.exit_code}):\n{result.output}")
    return result.output


def make_prepared_project(folder: Path, overrides: dict | None = None) -> Path:
    """fetch -> prepare -> normalize in ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    write_params(folder, overrides)
    for stage in ("fetch", "prepare", "normalize"):
        run_stage(stage, folder)
    return folder


def copy_project(src: Path, dst: Path) -> Path:
    """Copies a prepared project without its training outputs."""
    shutil.copytree(
        src,
        dst,
        ignore=shutil.ignore_patterns(
            "models", ".checkpoints", "metrics", "mlflow.db", "mlruns", "reports"
        ),
    )
    return dst


def kseg_process(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """Starts ``kseg ARGS`` as a real process."""
    exe = shutil.which("kseg", path=str(Path(sys.executable).parent)) or "kseg"
    return subprocess.Popen(
        [exe, *args],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def make_model_folder(folder: Path, tile_size: int = 64, seed: int = 0) -> Path:
    """An untrained but real, tiny kseg model folder (weights, config, preprocess, params)."""
    import torch

    from kseg.config import Params, params_from_dict, save_config
    from kseg.infer import Preprocess
    from kseg.model import build_model, save_model_folder

    params: Params = params_from_dict(
        {"model": {"nfeat": 4, "mid_channels": 8, "tile_size": tile_size}}
    )
    torch.manual_seed(seed)
    model = build_model(params.model).eval()
    save_model_folder(model, params.model, folder)
    Preprocess().save(folder)
    save_config(params, folder / "params.json")
    return folder
