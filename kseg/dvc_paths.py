"""Params keys that name what a ``dvc.yaml`` stage writes must agree with ``dvc.yaml``.

The stages read their output paths from params (``train.out_dir``...) so that they also run
outside DVC, while ``dvc.yaml`` declares the same paths literally (DVC templating would make every
key mandatory in params.yaml). Under DVC the two must agree, or ``dvc exp run -S
train.out_dir=models/other`` would write where DVC does not look. ``kseg params --stamp`` (the
``check_params`` stage) refuses the disagreement before anything runs.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import yaml

#: ``(params key, dvc.yaml stage that writes it)``.
PATH_KEYS = (
    ("data.dir", "fetch"),
    ("prepare.out_dir", "prepare"),
    ("validate.report", "validate"),
    ("validate.metrics", "validate"),
    ("stain.out_dir", "normalize"),
    ("train.out_dir", "train"),
)


def _norm(path: str) -> str:
    return PurePosixPath(str(path).replace("\\", "/")).as_posix().rstrip("/")


def entry_paths(entries: list[Any] | None) -> list[str]:
    """Paths of a dvc.yaml deps/outs/metrics/plots list (items are a str or ``{path: opts}``)."""
    return [_norm(e if isinstance(e, str) else next(iter(e))) for e in entries or []]


def stage_paths(stage: dict[str, Any]) -> set[str]:
    """Every path a dvc.yaml stage writes: its outs, metrics and plots."""
    return {p for kind in ("outs", "metrics", "plots") for p in entry_paths(stage.get(kind))}


def _value(params: Any, key: str) -> str:
    obj = params
    for part in key.split("."):
        obj = getattr(obj, part)
    return str(obj)


def check_dvc_paths(params: Any, dvc_yaml: Path) -> None:
    """Raises ValueError naming each path key that ``dvc_yaml``'s stage does not write.

    Stages missing from ``dvc_yaml`` are not checked (a trimmed pipeline).
    """
    try:
        stages = (yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8")) or {})["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise ValueError(f"{dvc_yaml}: cannot read its stages ({err})") from err
    problems = []
    for key, name in PATH_KEYS:
        if name not in stages:
            continue
        value, declared = _value(params, key), stage_paths(stages[name] or {})
        if _norm(value) not in declared:
            problems.append(
                f"{key}: {value!r}, but {dvc_yaml}'s {name} stage writes "
                f"{', '.join(sorted(declared)) or 'nothing'}"
            )
    if problems:
        raise ValueError(
            "; ".join(problems) + ". Under DVC change both (dvc.yaml's paths are literal), "
            "or run the kseg command outside DVC"
        )
