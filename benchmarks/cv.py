"""Patient-level k-fold cross-validation of a kseg configuration (issue #13's README table).

Usage::

    python benchmarks/cv.py kseg/presets/tnbc-unet.yaml --data /path/to/TNBC_NucleiSegmentation \\
        --folds 4 --out cv_unet [--jobs 2] [--threads 1]

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
    preset: Path, data: Path, folder: Path, test_patients: list[str], probe: bool = False
) -> None:
    params = yaml.safe_load(preset.read_text())
    params["data"]["path"] = str(data)
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
    args = parser.parse_args()

    from kseg.data.splits import patient_folds

    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    preset, data = args.preset.resolve(), args.data.resolve()
    tiles, patients = _patients(preset, data, args.out / "patients", env)
    where = dict(zip(tiles, patients, strict=True))
    folds = []
    for i, (_, held_out) in enumerate(patient_folds(tiles, patients, args.folds)):
        fold = args.out / f"fold{i}"
        _write_params(preset, data, fold, sorted({where[t] for t in held_out}))
        folds.append(fold)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda f: _run_fold(f, env), folds))

    print(f"{'fold':<6}{'held-out patients':<22}{'val':<10}" + "".join(f"{m:>11}" for m in METRICS))
    for i, r in enumerate(results):
        held = " ".join(r["held_out_patients"])
        val = " ".join(r["val_patients"])
        print(f"{i:<6}{held:<22}{val:<10}" + "".join(f"{r['held_out'][m]:>11.4f}" for m in METRICS))
    summary = {}
    for m in METRICS:
        values = [r["held_out"][m] for r in results]
        summary[m] = {"mean": statistics.mean(values), "sd": statistics.stdev(values)}
    print(f"{'mean':<38}" + "".join(f"{summary[m]['mean']:>11.4f}" for m in METRICS))
    print(f"{'sd':<38}" + "".join(f"{summary[m]['sd']:>11.4f}" for m in METRICS))
    out = {"preset": str(args.preset), "folds": results, "held_out_mean_sd": summary}
    atomic_write_text(args.out / "cv.json", json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
