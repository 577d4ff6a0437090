"""Patient-level k-fold cross-validation of a kseg configuration (issue #13's README table).

Usage::

    python benchmarks/cv.py kseg/presets/tnbc-unet.yaml --data /path/to/TNBC_NucleiSegmentation \\
        --folds 4 --out cv_unet [--jobs 2] [--threads 1] [--seeds 42 43]

Every patient is held out in exactly one fold (:func:`kseg.data.splits.patient_folds`,
scikit-learn's ``GroupKFold`` with patients as groups, balanced by tile count). A fold is an
ordinary kseg project in ``OUT/fold<i>``: the preset with ``split.test_patients`` set to the
fold's patients, so the validation patients (checkpoint and post-processing thresholds) are drawn
from the fold's training patients as the preset says, and the held-out patients are read by
nothing but the scoring. Each fold runs ``kseg fetch prepare validate normalize train`` and
``benchmarks/quality.py``; ``--jobs`` folds run at once with ``--threads`` torch threads each. A
fold that already has its scores is not run again (rerun the command after an interruption).

Prints one row per fold and the mean and standard deviation over folds of the held-out scores,
and writes them to ``OUT/cv.json``.

``--seeds`` trains every fold once per seed (``OUT/fold<i>_seed<s>``; the preset's ``seed`` is
replaced). A fold's score is then the mean over its seeds, the mean and sd over folds are of those
means, and ``seed_sd`` is the pooled within-fold standard deviation over seeds. Measured on TNBC
(docs/results.md, sixteenth round): the seed alone moved one fold's held-out AJI by 0.044, as much
as most recipe changes, so comparisons of recipes need two or more seeds per fold.

Reporting and choosing are different uses. Over all patients (``--data`` the whole dataset) the
held-out scores describe a recipe, but the fixed test patients are held out in some folds and
trained on in the others, so such a CV must not decide anything. To compare candidate recipes
(the adoption protocol of docs/results.md), give ``--data`` a copy of the dataset without the test
patients (for TNBC: every ``Slide_XX``/``GT_XX`` pair but 02, 06 and 10, copied, not linked: the
fetch stage refuses links that leave the folder); the folds then never see a test tile.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kseg.fsutil import atomic_write_text  # noqa: E402

METRICS = ("aji", "pq", "object_f1", "pixel_f1", "pixel_iou")
STAGES = ("fetch", "prepare", "validate", "normalize", "train")


def _write_params(
    preset: Path,
    data: Path,
    folder: Path,
    test_patients: list[str],
    probe: bool = False,
    seed: int | None = None,
) -> None:
    params = yaml.safe_load(preset.read_text())
    params["data"]["path"] = str(data)
    if seed is not None:
        params["seed"] = seed
    params["split"]["test_patients"] = test_patients
    if probe:  # only lists the patients: the data may lack the fixed TNBC test patients
        params["split"]["tnbc_test_patients"] = []
    params["train"]["out_dir"] = "models/cv"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "params.yaml", yaml.safe_dump(params, sort_keys=False))


def _kseg(stage: str, folder: Path, env: dict[str, str]) -> None:
    log = folder / f"{stage}.log"
    with log.open("w") as out:
        rc = subprocess.run(
            [str(Path(sys.executable).parent / "kseg"), stage, "-p", "params.yaml"],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        ).returncode
    if rc != 0:
        raise RuntimeError(f"kseg {stage} failed in {folder} (exit {rc}); see {log}")


def _patients(preset: Path, data: Path, folder: Path, env: dict[str, str]) -> tuple[list, list]:
    """Tile ids and their patients, from a prepare run of the preset in ``folder``."""
    _write_params(preset, data, folder, [], probe=True)
    for stage in ("fetch", "prepare"):
        _kseg(stage, folder, env)
    with (folder / "prepared" / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [r["tile_id"] for r in rows], [r["patient"] for r in rows]


def _run_fold(fold: Path, env: dict[str, str]) -> dict:
    scores = fold / "scores.json"
    if scores.is_file():
        return json.loads(scores.read_text())
    for stage in STAGES:
        _kseg(stage, fold, env)
    rows = fold / "quality.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "models/cv", "--json", str(rows)],
        cwd=fold,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    by_split = {r["split"]: r for r in json.loads(rows.read_text())}
    split = json.loads((fold / "prepared" / "split.json").read_text())
    result = {
        "held_out_patients": split["patients"]["test"],
        "val_patients": split["patients"]["val"],
        "held_out_tiles": len(split["test"]),
        "val": {m: by_split["val"][m] for m in METRICS},
        "held_out": {m: by_split["test"][m] for m in METRICS},
    }
    atomic_write_text(scores, json.dumps(result, indent=2) + "\n")
    return result


def summarize(runs: list[dict]) -> dict:
    """Held-out mean and sd over folds of each metric, each fold first averaged over its seeds.

    Args:
        runs: One dict per trained fold model: ``fold`` (index), ``held_out`` (metric -> score).

    Returns:
        Metric -> ``{"mean", "sd", "seed_sd"}``: ``sd`` over the folds' seed means, ``seed_sd``
        the pooled standard deviation over seeds within folds (None with one seed per fold).
    """
    by_fold: dict[int, list[dict]] = {}
    for run in runs:
        by_fold.setdefault(run["fold"], []).append(run["held_out"])
    out = {}
    for m in METRICS:
        means = [statistics.mean(r[m] for r in rows) for rows in by_fold.values()]
        spread = [
            statistics.variance([r[m] for r in rows]) for rows in by_fold.values() if len(rows) > 1
        ]
        out[m] = {
            "mean": statistics.mean(means),
            "sd": statistics.stdev(means) if len(means) > 1 else 0.0,
            "seed_sd": statistics.mean(spread) ** 0.5 if spread else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("preset", type=Path, help="a kseg params file (e.g. kseg/presets/...)")
    parser.add_argument("--data", type=Path, required=True, help="local copy of the dataset")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=1, help="folds trained at once")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per fold (0: all)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="train each fold once per seed (default: the preset's)"
    )
    args = parser.parse_args()

    from kseg.data.splits import patient_folds

    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    preset, data = args.preset.resolve(), args.data.resolve()
    tiles, patients = _patients(preset, data, args.out / "patients", env)
    where = dict(zip(tiles, patients, strict=True))
    runs = []  # (fold index, seed, folder)
    for i, (_, held_out) in enumerate(patient_folds(tiles, patients, args.folds)):
        for seed in args.seeds or [None]:
            fold = args.out / (f"fold{i}" if seed is None else f"fold{i}_seed{seed}")
            _write_params(preset, data, fold, sorted({where[t] for t in held_out}), seed=seed)
            runs.append((i, seed, fold))
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda run: _run_fold(run[2], env), runs))
    for (i, seed, _), r in zip(runs, results, strict=True):
        r["fold"], r["seed"] = i, seed

    head = f"{'fold':<6}{'seed':<6}{'held-out patients':<22}{'val':<10}"
    print(head + "".join(f"{m:>11}" for m in METRICS))
    for r in results:
        held = " ".join(r["held_out_patients"])
        val = " ".join(r["val_patients"])
        seed = "-" if r["seed"] is None else str(r["seed"])
        row = f"{r['fold']:<6}{seed:<6}{held:<22}{val:<10}"
        print(row + "".join(f"{r['held_out'][m]:>11.4f}" for m in METRICS))
    summary = summarize(results)
    pad = len(head)
    print(f"{'mean':<{pad}}" + "".join(f"{summary[m]['mean']:>11.4f}" for m in METRICS))
    print(f"{'sd (folds)':<{pad}}" + "".join(f"{summary[m]['sd']:>11.4f}" for m in METRICS))
    if summary[METRICS[0]]["seed_sd"] is not None:
        sd = "".join(f"{summary[m]['seed_sd']:>11.4f}" for m in METRICS)
        print(f"{'sd (seeds, within folds)':<{pad}}" + sd)
    out = {"preset": str(args.preset), "folds": results, "held_out_mean_sd": summary}
    atomic_write_text(args.out / "cv.json", json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
