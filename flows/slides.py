"""The ``segment-slides`` Prefect flow: many whole slides on a Dask cluster (prefect-dask).

One task per slide runs :func:`kseg.slide.segment_slide` on a Dask worker; Prefect's
``DaskTaskRunner`` submits them to a temporary ``LocalCluster`` (default) or to the scheduler a lab
already runs (``dask_address``, e.g. ``tcp://scheduler:8786`` of a dask-jobqueue SLURM or a
Kubernetes cluster). What it guarantees:

- the model is loaded once per Dask worker (cached on the worker), not once per task;
- outputs are written atomically, the summary last; a rerun skips every slide whose summary is
  there (made from the same file), and an interrupted slide resumes from its finished blocks;
- a failed slide (corrupt, no pixel size...) is reported by name and does not stop the others;
  the flow writes ``slides_report.json`` and then fails, naming the failed slides
  (``fail_on_error=False`` returns normally instead);
- two slides with the same file name in different folders get distinct output names.

Run: ``python -m flows.slides /data/slides --out results/`` (see docs/wsi.md).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from kseg.fsutil import atomic_write_text

REPORT_FILE = "slides_report.json"

_LOCAL_CACHE: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


class SlidesFailed(RuntimeError):
    """One or more slides failed; the message names them."""


def _worker_cache() -> tuple[dict, str]:
    """The model cache of the Dask worker running this task (or of the process) and its name."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return _LOCAL_CACHE, f"pid-{os.getpid()}"
    with _LOCK:
        cache = worker.__dict__.setdefault("_kseg_segmenters", {})
    return cache, str(worker.name)


def worker_segmenter(model: str, device: str = "cpu", batch_size: int = 4) -> tuple[Any, str]:
    """The segmenter of ``model`` on this worker, loaded on first use; and the worker's name."""
    from kseg.predict import resolve_model
    from kseg.segmenter import Segmenter

    cache, worker = _worker_cache()
    key = (model, device)
    with _LOCK:
        if key not in cache:
            folder = resolve_model(model)
            cache[key] = (Segmenter.from_folder(folder, device, batch_size), folder)
    return cache[key], worker


@task(name="segment-slide", cache_policy=NO_CACHE)
def segment_slide_task(
    slide: str,
    out_dir: str,
    name: str,
    model: str = "pretrained",
    device: str = "cpu",
    mpp: float | None = None,
    block: int = 2048,
    margin: int = 128,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """Segments one slide on the worker that runs this task; returns its summary."""
    from kseg.slide import model_mpp, segment_slide

    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    (segmenter, folder), worker = worker_segmenter(model, device)
    result = segment_slide(
        Path(slide),
        segmenter,
        Path(out_dir),
        name=name,
        mpp=mpp,
        target_mpp=model_mpp(folder),
        block=block,
        margin=margin,
        model_id=str(folder),
    )
    return {**result.summary, "worker": worker, "segmenter_id": id(segmenter)}


def list_slides(slides: list[str] | str) -> list[Path]:
    """Slide files of a folder (non-recursive) or of a list of files and folders."""
    from kseg.predict import IMAGE_SUFFIXES
    from kseg.slide import SLIDE_SUFFIXES

    items = [slides] if isinstance(slides, str | Path) else list(slides)
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            suffixes = SLIDE_SUFFIXES | (IMAGE_SUFFIXES & {".tif", ".tiff"})
            out += sorted(p for p in item.iterdir() if p.suffix.lower() in suffixes)
        else:
            out.append(item)
    return out


def _task_runner(dask_address: str | None, n_workers: int, processes: bool) -> Any:
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": n_workers,
            "threads_per_worker": 1,
            "processes": processes,
            "dashboard_address": None,
        }
    )


@flow(name="segment-slides-on-dask")
def _run_on_dask(jobs: list[dict[str, Any]], common: dict[str, Any]) -> list[tuple[str, Any]]:
    """Submits one task per slide to the flow's Dask task runner; waits for all of them.

    Returns ``(slide, summary dict)`` per finished slide and ``(slide, error message)`` per failed.
    """
    futures = [(job["slide"], segment_slide_task.submit(**job, **common)) for job in jobs]
    out = []
    for slide, fut in futures:
        fut.wait()
        res = fut.result(raise_on_failure=False)
        # a failure travels as its message: the flow's return value stays plain data
        out.append(
            (slide, f"{type(res).__name__}: {res}" if isinstance(res, BaseException) else res)
        )
    return out


@flow(name="segment-slides")
def segment_slides(
    slides: list[str] | str,
    out_dir: str = "slides_out",
    model: str = "pretrained",
    dask_address: str | None = None,
    n_workers: int = 2,
    processes: bool = True,
    device: str = "cpu",
    mpp: float | None = None,
    block: int = 2048,
    margin: int = 128,
    torch_threads: int | None = None,
    fail_on_error: bool = True,
) -> dict[str, Any]:
    """Segments every slide of ``slides`` (a folder, or a list of files / folders) on Dask.

    Args:
        slides: Folder of slides, or a list of slide files and folders.
        out_dir: Output folder (shared storage when the cluster spans machines).
        model: Model folder, MLflow URI or ``pretrained`` (the shipped TNBC model).
        dask_address: Scheduler of an existing Dask cluster; None starts a LocalCluster.
        n_workers: Workers of the LocalCluster.
        processes: LocalCluster workers as processes (True) or threads in this process.
        device: ``cpu`` or ``cuda`` on the workers.
        mpp: Level-0 µm per pixel for slides that do not state it.
        block: Block core edge in working pixels (kseg.slide.segment_slide).
        margin: Context around each block, working pixels.
        torch_threads: Torch threads per task (default: the cores divided among local workers).
        fail_on_error: Fail the flow run (after every slide ran) when a slide failed.

    Returns:
        ``{"done": [...summaries], "skipped": [...], "failed": {slide: message}, "report": path}``

    Raises:
        SlidesFailed: If a slide failed and ``fail_on_error`` (the report is written first).
    """
    from kseg.slide import claim_name, finished, output_names

    logger = get_run_logger()
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = list_slides(slides)
    names = output_names(paths)
    jobs, skipped = [], []
    for path in paths:
        name = claim_name(out, path, names[path])
        if finished(out, name, path):
            skipped.append(str(path))
            logger.info("%s: finished outputs in %s, skipped", path, out)
        else:
            jobs.append({"slide": str(path), "name": name})
    if torch_threads is None and not dask_address:
        torch_threads = max(1, (os.cpu_count() or 1) // max(1, n_workers))
    common = {
        "out_dir": str(out),
        "model": model,
        "device": device,
        "mpp": mpp,
        "block": block,
        "margin": margin,
        "torch_threads": torch_threads,
    }
    done, failed = [], {}
    if jobs:
        runner = _task_runner(dask_address, n_workers, processes)
        for slide, res in _run_on_dask.with_options(task_runner=runner)(jobs, common):
            if isinstance(res, str):
                failed[slide] = res if slide in res else f"{slide}: {res}"
                logger.error("failed: %s", failed[slide])
            else:
                done.append(res)
    report = {
        "done": done,
        "skipped": skipped,
        "failed": failed,
        "seconds": round(time.perf_counter() - start, 3),
    }
    report_path = atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    report["report"] = str(report_path)
    _artifact(report)
    if failed and fail_on_error:
        raise SlidesFailed(
            f"{len(failed)} of {len(paths)} slide(s) failed (others written to {out}): "
            + "; ".join(failed.values())
        )
    return report


def _artifact(report: dict[str, Any]) -> None:
    lines = ["| slide | nuclei | tissue mm² | seconds | worker |", "|---|---|---|---|---|"]
    for d in report["done"]:
        lines.append(
            f"| {d['name']} | {d['nuclei']} | {d['tissue_mm2']} | {d['seconds']} | {d['worker']} |"
        )
    lines += [f"| {s} (skipped: finished) | | | | |" for s in report["skipped"]]
    lines += [f"| **failed** {m} | | | | |" for m in report["failed"].values()]
    create_markdown_artifact("\n".join(lines), key="segment-slides", description="kseg slides")


def main() -> None:
    """``python -m flows.slides SLIDES... --out DIR [--address tcp://host:8786]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slides", nargs="+", help="slide files and/or folders of slides")
    parser.add_argument("--out", default="slides_out")
    parser.add_argument("--model", default="pretrained")
    parser.add_argument("--address", default=None, help="existing Dask scheduler")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mpp", type=float, default=None)
    args = parser.parse_args()
    segment_slides(
        args.slides,
        out_dir=args.out,
        model=args.model,
        dask_address=args.address,
        n_workers=args.workers,
        device=args.device,
        mpp=args.mpp,
    )


if __name__ == "__main__":
    main()
