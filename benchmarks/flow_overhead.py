"""What the Prefect ``retrain`` flow costs on top of plain DVC, per stage.

A scratch git + DVC project with a chain of N trivial stages (each a ``python -c`` that writes one
file) is driven three ways, all measured in the same run (the machine is shared, so only the
ratios are comparable):

* ``dvc repro``: one DVC process for the whole pipeline (the baseline);
* ``dvc repro --single-item`` once per stage: what each flow task runs, without Prefect;
* the ``retrain`` flow (in-process, on Prefect's temporary local API, started once beforehand).

Each is timed on a cold pipeline (every stage runs) and on an up-to-date one (every stage is
skipped). The stage work is ~0, so the numbers are pure orchestration overhead.

Run: ``.venv/bin/python benchmarks/flow_overhead.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

for _key, _value in {
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows.retrain import retrain, stage_order  # noqa: E402 (after the env block)


def make_project(folder: Path, n: int) -> Path:
    stages = {}
    for i in range(n):
        out = f"out/s{i}.txt"
        cmd = f"{sys.executable} -c \"open('{out}', 'w').write('{i}')\""
        stages[f"s{i}"] = {"cmd": cmd, "deps": [f"out/s{i - 1}.txt"] if i else [], "outs": [out]}
    folder.mkdir(parents=True)
    (folder / "out").mkdir()
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (folder / "params.yaml").write_text("seed: 1\n")
    shutil.copytree(REPO / ".dvc", folder / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    return folder


def reset(project: Path) -> None:
    """Forgets every built stage (lock, outputs, cache and run cache): the next run is cold."""
    (project / "dvc.lock").unlink(missing_ok=True)
    shutil.rmtree(project / "out")
    (project / "out").mkdir()
    shutil.rmtree(project / ".dvc" / "cache", ignore_errors=True)


def dvc(project: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, check=True, capture_output=True
    )


def timed(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 stages, 1 repeat")
    args = parser.parse_args()
    n, repeat = (3, 1) if args.quick else (7, 3)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PREFECT_HOME"] = str(Path(tmp) / "prefect_home")
        project = make_project(Path(tmp) / "p", n)
        order = stage_order(project)
        t0 = time.perf_counter()
        retrain(project_dir=str(project))  # starts the temporary API (+ DB migrations)
        startup = time.perf_counter() - t0

        def whole() -> None:
            dvc(project, "repro")

        def per_stage() -> None:
            for stage in order:
                dvc(project, "repro", "--single-item", stage)

        def flow() -> None:
            retrain(project_dir=str(project))

        rows = []
        for name, fn in (("dvc repro", whole), ("dvc repro --single-item x N", per_stage)):
            rows.append((name, *_cold_warm(project, fn, repeat)))
        rows.append(("retrain flow", *_cold_warm(project, flow, repeat)))
    base_cold, base_warm = rows[0][1], rows[0][2]
    print(f"\n{n} trivial stages, median of {repeat}; first flow run (API start): {startup:.1f} s")
    print(f"{'driver':<28} {'cold s':>7} {'ratio':>6} {'up-to-date s':>13} {'ratio':>6}")
    for name, cold, warm in rows:
        ratios = cold / base_cold, warm / base_warm
        print(f"{name:<28} {cold:7.2f} {ratios[0]:6.2f} {warm:13.2f} {ratios[1]:6.2f}")
    flow_warm, single_warm = rows[2][2], rows[1][2]
    print(f"Prefect's own cost per stage (up to date): {(flow_warm - single_warm) / n:.2f} s")


def _cold_warm(project: Path, fn: Callable[[], None], repeat: int) -> tuple[float, float]:
    def cold() -> None:
        reset(project)
        fn()

    cold_s = timed(cold, repeat)  # includes reset(), a few ms
    fn()  # make sure everything is built
    return cold_s, timed(fn, repeat)


if __name__ == "__main__":
    main()
