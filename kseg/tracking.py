"""Every MLflow call of kseg, and the lineage tags that tie a run to its code, data and params.

The tracking URI comes from ``MLFLOW_TRACKING_URI``; without it runs go to
``sqlite:///mlflow.db`` in the working directory (MLflow 3 keeps the file store in maintenance
mode), so ``mlflow ui`` in the repository shows them at once. Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kseg.config import Params, flatten, params_hash
from kseg.dvc_paths import stage_paths

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: Experiment tag the MLflow 3 UI reads to show runs, charts and models instead of traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


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
    # rstrip only: a porcelain status line starts with a space (" M path", changed in the tree)
    return out.stdout.rstrip()


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


def dvc_outputs(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Paths DVC writes while it runs: ``dvc.lock`` and every stage's outs, metrics and plots."""
    paths = ["dvc.lock", ".gitignore"]
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return paths
    for stage in stages.values():
        paths.extend(sorted(stage_paths(stage or {})))
    return paths


def git_dirty(status: str, generated: list[str]) -> bool:
    """Whether ``git status --porcelain`` output shows edits other than DVC's own files.

    ``dvc repro`` rewrites ``dvc.lock`` (and the committed metrics and plots files) of the stages
    before train: those changes are the pipeline running, not uncommitted code or params.
    """
    for line in status.splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        if not any(path == g or path.startswith(g.rstrip("/") + "/") for g in generated):
            return True
    return False


def lineage_tags(params: Params, device: str) -> dict[str, str]:
    """Tags that say which code, data and params made a run, and where it ran.

    Besides kseg's own tags, MLflow's ``mlflow.source.*`` tags, so the run page's *Source*
    shows the command and the git commit.
    """
    import torch

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else str(git_dirty(status, dvc_outputs())).lower()
    tags = {
        "git_commit": commit or "unknown",
        "git_dirty": dirty,
        "data_version": data_version(data_dir=params.data.dir),
        "data_source": params.data.source,
        "params_hash": params_hash(params),
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "device": device,
        "python_version": sys.version.split()[0],
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": "kseg train",
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_name(params: Params, stage: str = "train") -> str:
    """A run name that tells runs apart in lists and chart legends.

    ``<stage>-<data source>-<arch>-nf<nfeat>-<params hash, 6>-<4 random hex>``, e.g.
    ``train-tnbc-kidney_segnet-nf16-3fa29c-b71e``. The random part comes from the OS, not from a
    seeded generator: training seeds Python's ``random``, which made MLflow's own generated names
    identical for every run.
    """
    model = params.model
    return "-".join(
        [
            stage,
            params.data.source,
            model.arch,
            f"nf{model.nfeat}",
            params_hash(params)[:6],
            secrets.token_hex(2),
        ]
    )


def run_pointer(model_dir: Path) -> Path:
    """The file beside a model folder naming its MLflow training run (``<folder>.mlflow.json``).

    Outside the folder, so that two identical trainings give byte-identical model folders (one
    DVC hash) although they are two MLflow runs.
    """
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + ".mlflow.json")


def training_run_id(model_dir: Path) -> str | None:
    """The MLflow run that trained ``model_dir``, or None when unknown.

    Read from its run pointer or, for model folders of older kseg versions, ``train_summary.json``.
    """
    for path in (run_pointer(model_dir), Path(model_dir) / "train_summary.json"):
        try:
            run_id = json.loads(path.read_text()).get("mlflow_run_id")
        except (OSError, ValueError, AttributeError):
            continue
        if run_id:
            return str(run_id)
    return None


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
            if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                # MLflow 3's UI opens an untyped experiment in its GenAI (traces) view.
                mlflow.set_experiment_tag(EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            run = mlflow.start_run(
                experiment_id=experiment.experiment_id, run_name=run_name(params)
            )
            flat = {k: str(v) for k, v in flatten(params).items()}
            mlflow.log_params(flat)
        else:
            run = mlflow.start_run(run_id=run_id)
        mlflow.set_tags(lineage_tags(params, device))
        self.run_id = run.info.run_id
        return self.run_id

    def log_dataset(self, params: Params, tiles: Any, context: str) -> None:
        """Logs the tiles a run used as an MLflow dataset input (the *Datasets* column).

        The table has one row per tile (id, patient, split); the digest is the data version
        DVC recorded for ``data/`` (``dvc.lock``), or a hash of the tile ids without DVC.
        """
        if not self.enabled:
            return
        import hashlib

        import mlflow
        import pandas as pd

        df = pd.DataFrame(tiles)
        version = data_version(data_dir=params.data.dir)
        digest = version if version != "unknown" else None
        if digest is None:
            digest = hashlib.sha256("\n".join(map(str, df.iloc[:, 0])).encode()).hexdigest()
        dataset = mlflow.data.from_pandas(
            df,
            source=str(Path(params.prepare.out_dir).resolve()),
            name=params.data.source,
            digest=digest[:36],
        )
        mlflow.log_input(dataset, context=context)

    def set_description(self, text: str) -> None:
        """The run's description (MLflow's ``mlflow.note.content``, shown on the run page)."""
        if self.enabled:
            import mlflow

            mlflow.set_tag("mlflow.note.content", text)

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
