"""Every MLflow call of kseg, and the lineage tags that tie a run to its code, data and params.

The tracking URI comes from ``MLFLOW_TRACKING_URI``; without it runs go to
``sqlite:///mlflow.db`` in the working directory (MLflow 3 keeps the file store in maintenance
mode), so ``mlflow ui`` in the repository shows them at once. Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kseg.config import Params, flatten, params_hash

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_tracking(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fails fast, with the cause, when the tracking store cannot be used.

    An ``http(s)`` server must answer its ``/health`` page within ``timeout`` seconds (MLflow's
    own client would retry for minutes first); a ``sqlite`` file must be a database. The URI in
    the message has its credentials removed.

    Raises:
        OSError: The server is unreachable or unhealthy.
        ValueError: The SQLite file is not a database.
    """
    import urllib.error
    import urllib.parse
    import urllib.request

    from kseg.safety import redact

    uri = uri or tracking_uri()
    parts = urllib.parse.urlsplit(uri)
    shown = redact(uri)
    if parts.scheme in ("http", "https"):
        host = parts.hostname or ""
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        if ":" in host:  # IPv6
            netloc = f"[{host}]" + (f":{parts.port}" if parts.port else "")
        url = urllib.parse.urlunsplit(
            (parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", "")
        )
        request = urllib.request.Request(url)
        if parts.username is not None:
            import base64

            user = urllib.parse.unquote(parts.username)
            token = f"{user}:{urllib.parse.unquote(parts.password or '')}"
            request.add_header(
                "Authorization", "Basic " + base64.b64encode(token.encode()).decode()
            )
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                return
        except urllib.error.HTTPError as err:
            if err.code in (401, 403, 404):  # up, but /health is protected or not served
                return
            raise OSError(
                f"MLflow tracking server {shown} answered {err.code} ({err.reason})"
            ) from err
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise OSError(
                f"MLflow tracking server {shown} is unreachable ({reason}); start it, or unset "
                "MLFLOW_TRACKING_URI to track into sqlite:///mlflow.db here"
            ) from err
    if parts.scheme == "sqlite":
        import sqlite3

        path = uri.split(":///", 1)[-1] if ":///" in uri else ""
        if not path or path == ":memory:" or not Path(path).exists():
            return
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                db.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.DatabaseError as err:
            raise ValueError(
                f"{path}: the MLflow tracking database is unreadable ({err}); restore it from a "
                "backup or move it away to start a new one"
            ) from err


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def data_version(lock_path: Path = Path("dvc.lock"), data_dir: str = "data") -> str:
    """md5 of the dataset folder as recorded by DVC (``dvc.lock`` fetch outs), or ``unknown``."""
    try:
        lock = yaml.safe_load(lock_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "unknown"
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == data_dir and out.get("md5"):
                return str(out["md5"])
    return "unknown"


def lineage_tags(params: Params, device: str) -> dict[str, str]:
    """Tags that say which code, data and params made a run, and where it ran."""
    import torch

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "data_version": data_version(data_dir=params.data.dir),
        "data_source": params.data.source,
        "params_hash": params_hash(params),
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "device": device,
        "python_version": sys.version.split()[0],
    }


class Tracker:
    """One MLflow run; a disabled tracker (non-zero DDP ranks) ignores every call."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_id: str | None = None

    def start(self, params: Params, device: str, run_id: str | None = None) -> str | None:
        """Starts (or, with ``run_id``, resumes) the run and logs params and lineage tags."""
        if not self.enabled:
            return None
        import mlflow

        check_tracking()  # seconds, not MLflow's minutes of retries before the first epoch
        mlflow.set_tracking_uri(tracking_uri())
        if run_id is None:
            experiment = mlflow.set_experiment(params.train.experiment)
            run = mlflow.start_run(experiment_id=experiment.experiment_id)
            flat = {k: str(v) for k, v in flatten(params).items()}
            mlflow.log_params(flat)
        else:
            run = mlflow.start_run(run_id=run_id)
        mlflow.set_tags(lineage_tags(params, device))
        self.run_id = run.info.run_id
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Logs numbers for one epoch."""
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Uploads one file (skipped if missing)."""
        if self.enabled and Path(path).is_file():
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_image(self, image: Any, name: str) -> None:
        """Uploads an ``(H, W, 3)`` uint8 array as a PNG artifact named ``name``."""
        if not self.enabled:
            return
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            Image.fromarray(image).save(path)
            self.log_artifact(path, str(Path(name).parent) if "/" in name else None)

    def end(self, status: str = "FINISHED") -> None:
        """Closes the run with ``status`` (FINISHED, FAILED or KILLED)."""
        if self.enabled and self.run_id is not None:
            import mlflow

            mlflow.end_run(status=status)
