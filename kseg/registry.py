"""The ``register`` stage: a new registry version for every evaluated model, a champion gate.

Steps (registry changes are ordered so that an interruption never moves the alias wrongly):

1. Read the candidate's score on the configured metric from ``metrics/eval.json`` and fingerprint
   the test split it was computed on (sha256 of the test ids and their image and label files).
2. Find the current champion (``models:/<name>@<alias>``). Its score comes from its version tags
   when they record the same split fingerprint; a champion scored on another split is scored
   again on this split (``register.on_split_mismatch: reevaluate``), or the stage stops with an
   error (``refuse``). Scores on different test sets are never compared.
3. Log the model folder as a pyfunc model (:mod:`kseg.serving`) with the raw torch weights
   beside it, into the training run when it is on this tracking server; register a version
   tagged with the metrics, split fingerprint, data version, git commit and model digest. A model
   registered before (same digest) is not logged twice: its version is reused.
4. Promote only if the candidate beats the champion by more than ``register.min_delta`` (equal
   stays); the loser gets the challenger alias. The champion alias moves after everything else
   in the registry is in place; the version's ``decision`` tag (``pending`` until then) follows.
   An interrupted run leaves the alias where it was; running it again reuses the version.
5. Write ``metrics/register.json``: decision, both values, versions and the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kseg.config import Params, RegisterConfig, flatten
from kseg.fsutil import atomic_write_text

log = logging.getLogger(__name__)

REPORT = Path("metrics") / "register.json"
#: Direction of each metric the gate may use (all of kseg's test metrics are higher-is-better).
HIGHER_IS_BETTER = {
    "aji": True,
    "pq": True,
    "dq": True,
    "sq": True,
    "object_f1": True,
    "pixel_f1": True,
    "pixel_iou": True,
    "dice": True,
}
SPLIT_TAG = "test_split_sha256"
DIGEST_TAG = "model_sha256"


@dataclass
class Champion:
    """The version holding the alias before this registration, and its score on this split."""

    version: str
    value: float
    source: str  # "version tag" or "re-evaluated on this test split"


# --------------------------------------------------------------------------------------------------
# Fingerprints and inputs
# --------------------------------------------------------------------------------------------------


def split_fingerprint(prepared: Path) -> tuple[str, int]:
    """sha256 of the test tile ids and their image and label files; and the number of tiles.

    Raises:
        ValueError: If ``split.json`` or a test tile file is missing (the file is named).
    """
    from kseg.data.dataset import load_split

    ids = sorted(load_split(prepared)["test"])
    if not ids:
        raise ValueError(f"{prepared / 'split.json'}: the test split is empty")
    digest = hashlib.sha256()
    for tile_id in ids:
        digest.update(tile_id.encode() + b"\0")
        for sub in ("images", "labels"):
            path = prepared / sub / f"{tile_id}.png"
            if not path.is_file():
                raise ValueError(f"{path}: test tile missing; run `kseg prepare`")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest(), len(ids)


def model_digest(model_dir: Path) -> str:
    """sha256 of everything that changes predictions (all files but the training summary)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        if path.name == "train_summary.json" or path.name.startswith("."):
            continue
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def read_eval(path: Path, metric: str) -> dict[str, float]:
    """The finite numbers of ``metrics/eval.json``; the gate metric must be among them.

    Raises:
        ValueError: If the file is missing or unreadable, or the metric is absent or not finite.
    """
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path}: cannot read the test metrics ({err}); run `kseg evaluate`"
        ) from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of metrics")
    value = raw.get(metric)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(
            f"{path}: register.metric={metric!r} needs a finite number there, got {value!r}"
        )
    return {
        k: float(v)
        for k, v in raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def check_metrics_owner(path: Path, digest: str) -> None:
    """Refuses a metrics file that ``kseg evaluate`` did not write for the model of ``digest``.

    Raises:
        ValueError: If the file has no ``model_sha256`` or another one (both are named).
    """
    try:
        recorded = json.loads(path.read_text()).get(DIGEST_TAG)
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: cannot read the test metrics ({err})") from err
    if recorded != digest:
        got = f"model {str(recorded)[:12]}" if recorded else f"no {DIGEST_TAG}"
        raise ValueError(
            f"{path}: these metrics are not of this model ({got}; the model folder is "
            f"{digest[:12]}): run `kseg evaluate` on it first"
        )


def smoke_test(model_dir: Path, prepared: Path, device: str = "cpu") -> None:
    """Loads the candidate and segments one test tile; raises ValueError if anything fails.

    Runs before any registry change, so a truncated or mismatched model never gets a version.
    """
    import numpy as np

    from kseg.data.dataset import load_split, load_tiles
    from kseg.segmenter import Segmenter

    tile = sorted(load_split(prepared)["test"])[:1]
    try:
        segmenter = Segmenter.from_folder(model_dir, device, 1)
        image = load_tiles(prepared / "images", prepared / "labels", tile).images[0]
        labels, dist = segmenter.segment(image)
        if labels.shape != image.shape[:2] or not np.isfinite(dist).all():
            raise ValueError(f"output of shape {labels.shape} or non-finite maps")
    except Exception as err:  # any failure of the candidate is a refusal, not a crash
        raise ValueError(
            f"{model_dir}: the candidate model does not load and run on test tile {tile} "
            f"({type(err).__name__}: {err}); nothing was registered"
        ) from err


def score_model(
    model_dir: Path, prepared: Path, metric: str, device: str = "cpu", batch_size: int = 4
) -> float:
    """Mean ``metric`` of a model folder over the test tiles, exactly as the evaluate stage does.

    ``device``: where the network runs (``auto``, ``cpu``, ``cuda``, ``cuda:N``).
    """
    import numpy as np

    from kseg.data.dataset import load_split, load_tiles
    from kseg.metrics import segmentation_metrics
    from kseg.segmenter import Segmenter

    segmenter = Segmenter.from_folder(model_dir, device, batch_size)
    split = load_split(prepared)
    tiles = load_tiles(prepared / "images", prepared / "labels", split["test"])
    values = []
    for image, gt in zip(tiles.images, tiles.labels, strict=True):
        pred, _ = segmenter.segment(image)
        values.append(float(segmentation_metrics(pred, gt)[metric]))
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def beats(candidate: float, champion: float, cfg: RegisterConfig) -> bool:
    """True if ``candidate`` is better than ``champion`` by more than ``min_delta``."""
    if HIGHER_IS_BETTER[cfg.metric]:
        return candidate > champion + cfg.min_delta
    return candidate < champion - cfg.min_delta


# --------------------------------------------------------------------------------------------------
# Registry look-ups
# --------------------------------------------------------------------------------------------------


def _current_champion(client: Any, cfg: RegisterConfig) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(cfg.model_name, cfg.alias)
    except MlflowException as err:
        # No such model, or no such alias: there is no champion. Anything else (a server
        # error) must stop the stage, not crown the candidate.
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _version_with_digest(client: Any, name: str, digest: str) -> Any | None:
    versions = client.search_model_versions(f"name = '{name}'")
    same = [v for v in versions if (v.tags or {}).get(DIGEST_TAG) == digest]
    return max(same, key=lambda v: int(v.version)) if same else None


def champion_score(
    client: Any,
    version: Any,
    cfg: RegisterConfig,
    split_sha: str,
    prepared: Path,
    device: str = "cpu",
    batch_size: int = 4,
) -> Champion:
    """The champion's score on this test split (from its tags, or scored again on ``device``).

    Raises:
        ValueError: If the champion was scored on another split and re-evaluation is refused.
    """
    tags = version.tags or {}
    tag = f"test_{cfg.metric}"
    if tags.get(SPLIT_TAG) == split_sha and tag in tags:
        return Champion(version.version, float(tags[tag]), "version tag")
    why = (
        f"its tags have no {tag}"
        if tag not in tags
        else f"it was scored on test split {tags.get(SPLIT_TAG, 'unknown')[:12]}, "
        f"this one is {split_sha[:12]}"
    )
    if cfg.on_split_mismatch == "refuse":
        raise ValueError(
            f"cannot compare with {cfg.model_name}@{cfg.alias} (version {version.version}): {why}. "
            "Set register.on_split_mismatch: reevaluate to score it on this split"
        )
    from kseg.predict import resolve_model

    log.info("re-evaluating champion version %s on this test split (%s)", version.version, why)
    with tempfile.TemporaryDirectory() as tmp:
        folder = resolve_model(f"models:/{cfg.model_name}/{version.version}", Path(tmp))
        value = score_model(folder, prepared, cfg.metric, device, batch_size)
    return Champion(version.version, value, "re-evaluated on this test split")


# --------------------------------------------------------------------------------------------------
# Logging the model
# --------------------------------------------------------------------------------------------------


def _training_run(model_dir: Path, client: Any) -> str | None:
    """The model's training run (its run pointer) if that run exists on this tracking server."""
    from mlflow.exceptions import MlflowException

    from kseg.tracking import training_run_id

    run_id = training_run_id(model_dir)
    if not run_id:
        return None
    try:
        client.get_run(run_id)
    except MlflowException:
        log.info("training run %s is not on this tracking server; a new run is made", run_id)
        return None
    return str(run_id)


def log_model(
    params: Params, model_dir: Path, metrics: dict[str, float], client: Any
) -> tuple[Any, str]:
    """Logs the raw model folder and the pyfunc model in one run: ``(ModelInfo, run id)``."""
    import mlflow

    from kseg.serving import log_pyfunc

    run_id = _training_run(model_dir, client)
    failed = "FAILED"
    if run_id is not None:
        # A failure here must not mark the (finished) training run as failed.
        failed = client.get_run(run_id).info.status
        run = mlflow.start_run(run_id=run_id)
    else:
        experiment = mlflow.set_experiment(params.train.experiment)
        run = mlflow.start_run(experiment_id=experiment.experiment_id, run_name="register")
        mlflow.set_tag("kseg.stage", "register")
        mlflow.log_params({k: str(v) for k, v in flatten(params).items()})
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
    status = failed
    try:
        # The raw torch weights (model.pt, config.json, ...) beside the pyfunc model.
        mlflow.log_artifacts(str(model_dir), "kseg_model")
        info = log_pyfunc(model_dir)
        status = "FINISHED"
        return info, run.info.run_id
    finally:
        mlflow.end_run(status=status)


def _version_tags(
    params: Params, metrics: dict[str, float], split_sha: str, n_test: int, digest: str, run: str
) -> dict[str, str]:
    from kseg.tracking import lineage_tags

    lineage = lineage_tags(params, "cpu")
    tags = {f"test_{k}": repr(v) for k, v in metrics.items()}
    tags.update(
        {
            "eval_metric": params.register.metric,
            SPLIT_TAG: split_sha,
            "test_tiles": str(n_test),
            DIGEST_TAG: digest,
            "run_id": run,
            **{k: lineage[k] for k in ("git_commit", "git_dirty", "data_version", "params_hash")},
        }
    )
    return tags


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def decide(
    cfg: RegisterConfig, version: str, value: float, holder: Any | None, champion: Champion | None
) -> tuple[str, bool, str]:
    """``(decision, promote, reason)`` for the candidate ``version`` scoring ``value``.

    ``holder`` is the version holding the alias now; ``champion`` its score, None when the
    holder is the candidate itself (same model digest) or when there is no holder.
    """
    metric, alias = cfg.metric, cfg.alias
    if holder is not None and champion is None:
        return "already_champion", False, f"version {version} already holds @{alias}"
    if champion is None:
        return "champion", True, f"first model: version {version} becomes @{alias}"
    versus = (
        f"champion version {champion.version} ({champion.value:.4f}, {champion.source}) "
        f"by more than {cfg.min_delta:g}"
    )
    if beats(value, champion.value, cfg):
        won = f"{metric} {value:.4f} beats {versus}: version {version} becomes @{alias}"
        return "champion", True, won
    return (
        "challenger",
        False,
        f"{metric} {value:.4f} does not beat {versus}: version {version} is a challenger; "
        f"@{alias} stays on version {champion.version}",
    )


def register(
    params: Params,
    model_dir: Path | None = None,
    eval_path: Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Runs the register stage; returns what it writes to ``metrics/register.json``.

    ``device`` (default ``train.device``) is where a champion is re-scored, if it must be.

    Raises:
        ValueError: On missing inputs (the file is named), or a refused split mismatch.
    """
    import mlflow

    from kseg.predict import MODEL_FILES
    from kseg.safety import redact
    from kseg.tracking import check_tracking, tracking_uri

    cfg = params.register
    model_dir = Path(model_dir or params.train.out_dir)
    missing = [f for f in MODEL_FILES if not (model_dir / f).is_file()]
    if missing:
        raise ValueError(f"{model_dir}: not a kseg model folder (missing {', '.join(missing)})")
    eval_path = Path(eval_path or Path("metrics") / "eval.json")
    metrics = read_eval(eval_path, cfg.metric)
    prepared = Path(params.prepare.out_dir)
    split_sha, n_test = split_fingerprint(prepared)
    digest = model_digest(model_dir)
    check_metrics_owner(eval_path, digest)
    smoke_test(model_dir, prepared, device or params.train.device)

    check_tracking()
    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    holder = _current_champion(client, cfg)
    existing = _version_with_digest(client, cfg.model_name, digest)
    champion: Champion | None = None
    if holder is not None and (existing is None or existing.version != holder.version):
        champion = champion_score(
            client,
            holder,
            cfg,
            split_sha,
            prepared,
            device or params.train.device,
            params.train.infer_batch_size,
        )

    # Registry changes start here; the champion alias is the last one.
    if existing is None:
        info, run_id = log_model(params, model_dir, metrics, client)
        tags = _version_tags(params, metrics, split_sha, n_test, digest, run_id)
        tags["decision"] = "pending"
        version = str(mlflow.register_model(info.model_uri, cfg.model_name, tags=tags).version)
    else:
        version = str(existing.version)
        tags = _version_tags(params, metrics, split_sha, n_test, digest, existing.run_id or "")
        tags["decision"] = "pending"
        for key, val in tags.items():
            client.set_model_version_tag(cfg.model_name, version, key, val)
        log.info("this model is already version %s (same %s): reused", version, DIGEST_TAG)
    decision, promote, reason = decide(cfg, version, metrics[cfg.metric], holder, champion)
    if decision == "challenger" and cfg.challenger_alias:
        client.set_registered_model_alias(cfg.model_name, cfg.challenger_alias, version)
    if promote:
        client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
    # After the alias: an interrupted run leaves "pending", never a decision that did not happen.
    client.set_model_version_tag(cfg.model_name, version, "decision", decision)
    log.info("%s", reason)

    report = {
        "decision": decision,
        "promoted": promote,
        "reason": reason,
        "model_name": cfg.model_name,
        "alias": cfg.alias,
        "metric": cfg.metric,
        "higher_is_better": HIGHER_IS_BETTER[cfg.metric],
        "min_delta": cfg.min_delta,
        "candidate_version": int(version),
        "candidate_value": metrics[cfg.metric],
        "candidate_reused_version": existing is not None,
        "champion_version_before": int(holder.version) if holder else None,
        "champion_value_before": champion.value if champion else None,
        "champion_value_source": champion.source if champion else None,
        "champion_version_after": int(version) if promote else int(holder.version),
        "test_split_sha256": split_sha,
        "n_test_tiles": n_test,
        DIGEST_TAG: digest,
        "model_uri": f"models:/{cfg.model_name}/{version}",
        "tracking_uri": redact(tracking_uri()),
    }
    atomic_write_text(REPORT, json.dumps(report, indent=2) + "\n")
    return report
