"""The ``retrain`` Prefect flow: one task per DVC stage, DVC decides what runs.

Each task runs ``dvc repro --single-item <stage>`` in the project folder, in the order of the
stage graph declared in ``dvc.yaml``, so ``dvc.lock`` stays the record of what was built from what
and a stage whose deps and params did not change is skipped by DVC (the task reports
``ran: False`` and its task ends in a ``Skipped`` state). The per-run knobs (data source, URL,
checksum, epochs, device) are written into ``params.yaml`` for the run, as DVC params, after
validation through :mod:`kseg.config`, and the file is restored when the run ends: a run's
parameters apply to that run only, there is no second configuration system, and ``dvc.lock``
records what the run used. Run it with ``python -m flows.retrain`` or through the deployment in
``prefect.yaml`` (see docs/orchestration.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from kseg.config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    load_params,
    params_from_dict,
    setting_type,
)
from kseg.fsutil import atomic_write_bytes, atomic_write_text

# The types of the params.yaml settings the knobs set (choices, ranges, help), taken from the same
# models: the Prefect UI shows drop-downs and limits, and Prefect checks a run's values by them.
Source = setting_type(DataConfig, "source")
Url = setting_type(DataConfig, "url")
Sha256 = setting_type(DataConfig, "sha256")
Epochs = setting_type(TrainConfig, "epochs")
Device = setting_type(TrainConfig, "device")

FETCH_RETRIES = 3  # downloads fail transiently (mirrors, proxies); waits of 2, 4, 8 s
FETCH_BACKOFF_S = 2.0
OUTPUT_TAIL_LINES = 40
#: ``kseg`` exits with this (EX_TEMPFAIL) when it failed for a passing reason (network).
EX_TEMPFAIL = 75


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message holds the tail of its output.

    ``transient``: the stage's command exited with EX_TEMPFAIL (a network error that may pass);
    only such failures are retried.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def retry_if_transient(task: Any, task_run: Any, state: State) -> bool:
    """Prefect ``retry_condition_fn``: retry a stage only after a transient failure.

    A configuration or data error (``source=folder`` without a path, a checksum mismatch, a 404)
    fails the same way every time; retrying it only delays the report.
    """
    err = state.data if isinstance(state.data, BaseException) else None
    return isinstance(err, StageFailed) and err.transient


def _dvc_stage_graph(project: Path) -> tuple[Any, list[Any]]:
    """DVC's own stage graph of ``project`` and the stages of its ``dvc.yaml``, in file order.

    Uses ``dvc.repo.Repo(...).index``, the object ``dvc repro`` and ``dvc dag`` build their graph
    from, so a stage follows another exactly when DVC says so (deps matched against outs,
    metrics and plots, folders holding files and files inside folders). ``dvc dag`` has no
    machine-readable output but ``--dot`` text and, unlike the index, needs ``.dvc/`` to exist.
    The graph's edges point from a stage to the stages it depends on.

    Raises:
        ValueError: naming ``dvc.yaml`` when it is missing, unreadable, invalid, or cyclic.
    """
    from dvc.exceptions import CyclicGraphError, DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    dvc_yaml = (project / "dvc.yaml").resolve()
    if not dvc_yaml.is_file():
        raise ValueError(f"{dvc_yaml}: not found; the flow runs the stages of this file")
    try:
        # uninitialized: the graph needs only the pipeline files, not .dvc/ (nor its cache).
        with Repo(str(project), uninitialized=True) as repo:
            graph = repo.index.graph  # raises for cycles, overlapping or duplicated outputs
            stages = [
                st
                for st in repo.index.stages
                if isinstance(st, PipelineStage) and Path(st.path).resolve() == dvc_yaml
            ]
    except CyclicGraphError as err:
        raise ValueError(f"{dvc_yaml}: the stages form a cycle ({err})") from err
    except DvcException as err:
        detail = f": {err.__cause__}" if err.__cause__ is not None else ""
        raise ValueError(f"{dvc_yaml}: DVC cannot build the pipeline: {err}{detail}") from err
    return graph, stages


def stage_order(project: Path) -> list[str]:
    """Stage names of ``dvc.yaml`` in dependency order, checks as early as possible.

    The dependencies are DVC's (:func:`_dvc_stage_graph`), so a stage added to dvc.yaml later is
    picked up without touching this flow. Stages are ordered by depth (longest chain of producers
    above them); at equal depth a stage whose outputs nobody consumes (a check such as
    ``validate``) goes first, so a failing check stops the run before the expensive stages, then
    dvc.yaml's order decides. Stages of other files (``data.dvc``) count for the depth but are
    not returned: the flow runs ``dvc repro --single-item <name>`` for dvc.yaml's stages only.

    Raises:
        ValueError: naming ``dvc.yaml`` when it is missing, invalid, or its stages form a cycle.
    """
    import networkx as nx

    graph, stages = _dvc_stage_graph(Path(project))
    depth: dict[Any, int] = {}
    # Topological order lists a stage before the stages it depends on: walk it backwards.
    for node in reversed(list(nx.topological_sort(graph))):
        depth[node] = 1 + max((depth[dep] for dep in graph.successors(node)), default=-1)
    index = {st: i for i, st in enumerate(stages)}
    ordered = sorted(stages, key=lambda st: (depth[st], graph.in_degree(st) > 0, index[st]))
    return [st.name for st in ordered]


def set_params(path: Path, updates: dict[str, Any]) -> bool:
    """Sets dotted keys in ``params.yaml``, keeping its comments; validates before writing.

    Args:
        path: The params file.
        updates: ``{"train.epochs": 5, ...}``; the values are YAML scalars.

    Returns:
        Whether the file changed.

    Raises:
        kseg.config.ConfigError: naming the key, when the result is not valid; the file is then
            left untouched.
    """
    from ruamel.yaml import YAML

    rt = YAML()  # round-trip mode: comments, key order and quoting survive
    # ruamel writes None as an empty value; keep the file's explicit `null`s.
    rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    data = rt.load(path.read_text(encoding="utf-8")) or {}
    changed = False
    for key, value in updates.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if leaf not in node or node[leaf] != value:
            node[leaf] = value
            changed = True
    if changed:
        try:
            params_from_dict(json.loads(json.dumps(data)))  # plain dicts and lists
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
        buf = io.StringIO()
        rt.dump(data, buf)
        atomic_write_text(path, buf.getvalue())
    return changed


@contextlib.contextmanager
def run_params(path: Path, updates: dict[str, Any]) -> Iterator[bool]:
    """Applies a run's parameter values to ``params.yaml`` for the run only.

    The values are validated and written as :func:`set_params` does (DVC reads them from the
    file, and ``dvc.lock`` records them); on exit, success or failure, the file gets its
    original bytes back, so the next run without parameters uses the committed configuration.
    If someone else changed the file during the run, their version is kept (with a warning).

    Yields:
        Whether the run's values changed the file.
    """
    original = path.read_bytes()
    changed = set_params(path, updates)
    written = path.read_bytes()
    try:
        yield changed
    finally:
        if changed:
            if path.read_bytes() == written:
                atomic_write_bytes(path, original)
            else:
                get_run_logger().warning(
                    "%s was changed by someone else during the run; it is not restored", path
                )


def _dvc_env() -> dict[str, str]:
    # `dvc` and the stage commands (`kseg ...`) live next to this interpreter, activated or not.
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


@task(task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(project: str, stage: str) -> dict[str, Any] | State:
    """``dvc repro --single-item STAGE``; returns ``{"stage", "ran", "status", "seconds"}``.

    The stage's output is streamed line by line into the task's log (a long ``train`` shows its
    epochs as they end). A stage DVC did not run ends in a ``Completed`` state named ``Skipped``
    (or ``Cached`` when DVC restored its outputs from the run cache), so the UI tells it apart.
    """
    logger = get_run_logger()
    start = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        cwd=project,
        env=_dvc_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line.strip():
                lines.append(line)
                logger.info("%s", line)
    seconds = round(time.perf_counter() - start, 2)
    out = "\n".join(lines)
    if proc.returncode != 0:
        message = f"stage '{stage}' failed (dvc exit {proc.returncode}):\n" + "\n".join(
            lines[-OUTPUT_TAIL_LINES:]
        )
        if stage == "validate":  # the failing expectations are in the output; the rest is here
            report = Path(project, load_params(Path(project, "params.yaml")).validate.report)
            message += f"\nvalidation report: {report.resolve().as_uri()}"
        logger.error("%s", message)
        raise StageFailed(message, transient=f"exited with {EX_TEMPFAIL}" in out)
    if f"Running stage '{stage}'" in out:
        status = "ran"
    elif "is cached - skipping run" in out:
        status = "restored"  # DVC's run cache had outputs for these exact deps and params
    else:
        status = "skipped"
    logger.info("stage '%s': %s in %.1f s", stage, status, seconds)
    result = {"stage": stage, "ran": status == "ran", "status": status, "seconds": seconds}
    if status == "ran":
        return result
    name = "Skipped" if status == "skipped" else "Cached"
    why = "unchanged deps and params" if status == "skipped" else "outputs from DVC's run cache"
    return Completed(data=result, name=name, message=f"stage '{stage}' not run: {why}")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _table(data: dict[str, Any] | None, missing: str) -> str:
    if not data:
        return f"_{missing}_\n"
    rows = [
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in data.items()
        if isinstance(v, int | float | str | bool) or v is None
    ]
    return "| key | value |\n|---|---|\n" + "\n".join(rows) + "\n"


def render_report(
    project: Path, results: list[dict[str, Any]], updates: dict[str, Any] | None = None
) -> str:
    """Markdown summary: run parameters, stages, test metrics, MLflow run, registry decision."""
    lines = ["# kseg retrain\n"]
    if updates:
        lines += ["Parameters of this run (params.yaml restored afterwards):\n"]
        lines += [f"- `{k}`: `{v}`" for k, v in updates.items()] + [""]
    lines += ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} |" for r in results]
    summary = _read_json(project / "models/kseg/train_summary.json") or {}
    pointer = _read_json(project / "models/kseg.mlflow.json") or {}
    run = {
        **{k: pointer.get(k) for k in ("mlflow_run_id", "mlflow_tracking_uri")},
        "best_epoch": summary.get("best_epoch"),
    }
    return "\n".join(
        [
            *lines,
            "\n## Test metrics (metrics/eval.json)\n",
            _table(_read_json(project / "metrics/eval.json"), "no metrics/eval.json yet"),
            "## MLflow run (models/kseg.mlflow.json)\n",
            _table(run if summary else None, "no trained model yet"),
            "## Registry decision (metrics/register.json)\n",
            _table(_read_json(project / "metrics/register.json"), "no registry decision yet"),
        ]
    )


@task(cache_policy=NO_CACHE)
def publish_report(
    project: str, results: list[dict[str, Any]], updates: dict[str, Any] | None = None
) -> str:
    """Creates the ``kseg-retrain`` Markdown artifact; returns its text."""
    markdown = render_report(Path(project), results, updates)
    create_markdown_artifact(markdown, key="kseg-retrain", description="kseg retraining summary")
    return markdown


#: The dvc.yaml stage that validates params.yaml (``kseg params --stamp``); see docs/security.md.
CHECK_STAGE = "check_params"


@flow(name="retrain")
def retrain(
    source: Source | None = None,
    url: Url = None,
    sha256: Sha256 = None,
    epochs: Epochs | None = None,
    device: Device | None = None,
    stages: list[str] | None = None,
    project_dir: str = ".",
) -> dict[str, Any]:
    """Re-runs the kseg pipeline through DVC and publishes a summary artifact.

    The knobs below apply to this run only: ``params.yaml`` is restored when the run ends.

    Args:
        source: ``data.source``; None keeps params.yaml's value (same for every knob below).
        url: ``data.url``, a download URL, ``file://`` URL or local path.
        sha256: ``data.sha256``, the expected archive checksum.
        epochs: ``train.epochs``.
        device: ``train.device``.
        stages: Run only these stages (in pipeline order); None runs every stage of dvc.yaml.
            ``check_params`` (params.yaml validation, cheap) always runs first when dvc.yaml has
            it, so that a bad knob fails before any stage deletes its outputs.
        project_dir: The project folder (holds dvc.yaml, params.yaml, dvc.lock).

    Returns:
        ``{"stages": [per-stage results], "params_changed": bool, "report": markdown}``.
    """
    project = Path(project_dir).resolve()
    knobs = {
        "data.source": source,
        "data.url": url,
        "data.sha256": sha256,
        "train.epochs": epochs,
        "train.device": device,
    }
    # Every argument is checked before params.yaml is touched: a typo in `stages` must not leave
    # a rewritten params.yaml behind.
    order = stage_order(project)
    unknown = sorted(set(stages or []) - set(order))
    if unknown:
        raise ValueError(f"stages {unknown} are not in {project / 'dvc.yaml'}; it has {order}")
    updates = {k: v for k, v in knobs.items() if v is not None}
    results = []
    with run_params(project / "params.yaml", updates) as changed:
        for stage in order:
            if stages is not None and stage not in stages and stage != CHECK_STAGE:
                continue
            runner = run_stage
            if stage == "fetch":
                runner = run_stage.with_options(
                    retries=FETCH_RETRIES,
                    retry_delay_seconds=exponential_backoff(FETCH_BACKOFF_S),
                    retry_condition_fn=retry_if_transient,
                )
            # The state, then its result: a stage that did not run returns a named state.
            results.append(runner(str(project), stage, return_state=True).result())
        report = publish_report(str(project), results, updates)
    return {"stages": results, "params_changed": changed, "report": report}


if __name__ == "__main__":
    retrain()
