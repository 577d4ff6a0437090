"""The ``kseg`` command line: one subcommand per pipeline stage.

Only Typer, Rich and the light config module are imported at start-up; each command imports the
heavy libraries it needs (torch, scikit-image, mlflow, ...) inside its body, so ``kseg --help``
answers at once.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from kseg.config import ConfigError, Params, load_params

app = typer.Typer(
    name="kseg",
    help="Nuclei segmentation in H&E histopathology with Kidney-SegNet: "
    "fetch -> prepare -> validate -> normalize -> train -> evaluate -> register, and predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="Parameters file (params.yaml).", dir_okay=False)
]


def _fail(message: str, code: int = 2) -> None:
    """Prints ``message`` to stderr in red and exits with ``code``."""
    from rich.console import Console
    from rich.text import Text

    # Text() keeps the message literal: config errors contain brackets like "[0, inf]".
    line = Text("error: ", style="bold red") + Text(message)
    Console(stderr=True, soft_wrap=True).print(line, highlight=False)
    raise typer.Exit(code)


def _load(path: Path) -> Params:
    """Loads params.yaml or exits with the key that is wrong."""
    try:
        return load_params(path)
    except ConfigError as err:
        _fail(str(err))
        raise  # unreachable: _fail exits


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


@app.command()
def fetch(params: ParamsOpt = Path("params.yaml")) -> None:
    """Fetch (or generate) the raw dataset named by data.source into data.dir."""
    cfg = _load(params)
    _setup_logging()
    from kseg.data.fetch import fetch as run_fetch

    try:
        out = run_fetch(cfg)
    except (OSError, ValueError) as err:
        _fail(f"fetch failed, {cfg.data.dir}/ left unchanged: {err}")
    typer.echo(f"dataset ({cfg.data.source}) written to {out}/")


@app.command("params")
def show_params(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate params.yaml and print the resolved parameters (defaults filled in) as YAML."""
    import yaml

    from kseg.config import params_hash, to_dict

    cfg = _load(params)
    typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
    typer.echo(f"# params hash: {params_hash(cfg)}")


# --- data commands ---

# --- stain commands ---

# --- model commands ---

# --- pipeline commands ---


@app.command()
def train(
    params: ParamsOpt = Path("params.yaml"),
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--fresh",
            help="Continue from a checkpoint of the same params and data (default) or start over.",
        ),
    ] = True,
) -> None:
    """Train the distance-map regressor, pick the best epoch on validation patients, log to MLflow.

    Runs under torchrun too (DDP: NCCL on GPUs, gloo on CPU; only rank 0 writes and logs).
    """
    cfg = _load(params)
    _setup_logging()
    from kseg.train import TrainingDiverged
    from kseg.train import train as run_train

    try:
        summary = run_train(cfg, resume=resume)
    except TrainingDiverged as err:
        _fail(str(err), code=1)
    except (OSError, ValueError) as err:
        _fail(f"train failed: {err}")
    if summary:
        typer.echo(
            f"model written to {cfg.train.out_dir}/ (best epoch {summary['best_epoch']}, "
            f"{summary['select_metric']} {summary['best_score']:.4f})"
        )


@app.command()
def evaluate(
    params: ParamsOpt = Path("params.yaml"),
    model: Annotated[
        Path | None, typer.Option(help="Model folder (default: train.out_dir).")
    ] = None,
) -> None:
    """Segment the held-out test patients; write metrics/eval.json, per-tile table, overlays."""
    cfg = _load(params)
    _setup_logging()
    from kseg.evaluate import evaluate as run_evaluate

    try:
        summary = run_evaluate(cfg, model)
    except (OSError, ValueError) as err:
        _fail(f"evaluate failed: {err}")
    keys = ("pixel_f1", "object_f1", "aji", "pq")
    typer.echo(
        "test: "
        + "  ".join(f"{k} {summary[k]:.4f}" for k in keys)
        + f"  ({summary['n_tiles']} tiles)"
    )


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="Image files and/or folders of images.")],
    model: Annotated[
        str, typer.Option(help="Model folder or MLflow URI, e.g. models:/kseg@champion.")
    ] = "models/kseg",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("predictions"),
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Segment images of any size: labels TIFF, overlay PNG, per-nucleus CSV, QuPath GeoJSON."""
    _setup_logging()
    from kseg.predict import predict as run_predict

    try:
        report = run_predict(inputs, model, out, device=device, progress=sys.stderr.isatty())
    except (OSError, ValueError) as err:
        _fail(str(err))
    for path in report.skipped:
        typer.echo(f"skipped (not an image): {path}", err=True)
    n_ok = len(report.written) // 4
    typer.echo(f"{n_ok} image(s) segmented into {out}/")
    if report.failed:
        for msg in report.failed.values():
            typer.echo(f"failed: {msg}", err=True)
        raise typer.Exit(1)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
