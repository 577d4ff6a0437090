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
#: Exit status of a command that failed for a passing reason (sysexits.h): retry later.
EX_TEMPFAIL = 75

DeviceOpt = Annotated[
    str | None,
    typer.Option(help="auto, cpu, cuda or cuda:N (default: train.device of the params)."),
]


def _fail(message: str, code: int = 2) -> None:
    """Prints ``message`` to stderr in red and exits with ``code``."""
    from rich.console import Console
    from rich.text import Text

    from kseg.safety import redact_text

    # Text() keeps the message literal: config errors contain brackets like "[0, inf]".
    line = Text("error: ", style="bold red") + Text(redact_text(message))
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
    from kseg.data.download import DownloadError
    from kseg.data.fetch import fetch as run_fetch

    try:
        out = run_fetch(cfg)
    except (OSError, ValueError) as err:
        # 75 (EX_TEMPFAIL): a passing network error, worth retrying later (the Prefect flow
        # does); 2: a configuration or data error that a retry cannot fix.
        transient = isinstance(err, DownloadError) and err.transient
        code = EX_TEMPFAIL if transient else 2
        _fail(f"fetch failed, {cfg.data.dir}/ left unchanged: {err}", code)
    typer.echo(f"dataset ({cfg.data.source}) written to {out}/")


#: What ``kseg params --stamp`` writes: constant, so that a valid params edit changes nothing
#: downstream of the ``check_params`` stage (only the stages that read the edited params rerun).
PARAMS_STAMP = "params.yaml passed kseg's validation\n"


@app.command("params")
def show_params(
    params: ParamsOpt = Path("params.yaml"),
    stamp: Annotated[
        Path | None,
        typer.Option(
            help="Only validate (also that path keys match dvc.yaml next to params.yaml), then "
            "write this file (constant content): DVC's check_params stage, which runs before any "
            "stage can delete its outputs."
        ),
    ] = None,
) -> None:
    """Validate params.yaml and print the resolved parameters (defaults filled in) as YAML."""
    import yaml

    from kseg.config import params_hash, to_dict
    from kseg.fsutil import atomic_write_text

    cfg = _load(params)
    if stamp is not None:
        from kseg.dvc_paths import check_dvc_paths

        dvc_yaml = params.parent / "dvc.yaml"
        if dvc_yaml.is_file():
            try:
                check_dvc_paths(cfg, dvc_yaml)
            except ValueError as err:
                _fail(f"{params}: {err}")
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(stamp, PARAMS_STAMP)
        except OSError as err:
            _fail(f"cannot write {stamp}: {err}")
        typer.echo(f"{params}: valid")
        return
    typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False), nl=False)
    for note in cfg.model.inert_options():
        typer.echo(f"# note: {note}")
    typer.echo(f"# params hash: {params_hash(cfg)}")


# --- data commands ---


@app.command()
def prepare(params: ParamsOpt = Path("params.yaml")) -> None:
    """Convert data/ into canonical tiles, labels, distance targets, manifest and patient split."""
    cfg = _load(params)
    _setup_logging()
    from kseg.data.prepare import prepare as run_prepare

    try:
        summary = run_prepare(cfg)
    except (OSError, ValueError) as err:
        _fail(f"prepare failed: {err}")
    tiles = summary["tiles"]
    typer.echo(
        f"{summary['n_tiles']} tiles, {summary['n_patients']} patients, {summary['n_nuclei']} "
        f"nuclei -> {cfg.prepare.out_dir}/ (train {tiles['train']}, val {tiles['val']}, "
        f"test {tiles['test']} tiles)"
    )


@app.command()
def validate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Check the prepared manifest and split with Great Expectations; fail naming the tiles."""
    cfg = _load(params)
    _setup_logging()
    from kseg.validate import ValidationFailed
    from kseg.validate import validate as run_validate

    try:
        summary = run_validate(cfg)
    except ValidationFailed as err:
        _fail(str(err), code=1)
    except (OSError, ValueError) as err:
        _fail(f"validate failed: {err}")
    typer.echo(
        f"data validation passed: {summary['n_expectations']} expectations, "
        f"{summary['n_tiles']} tiles (report: {cfg.validate.report})"
    )


# --- stain commands ---


@app.command()
def normalize(params: ParamsOpt = Path("params.yaml")) -> None:
    """Fit stain normalization on the training split; write normalized tiles, stain.json, report."""
    cfg = _load(params)
    _setup_logging()
    from kseg.normalize import run_normalize

    try:
        m = run_normalize(cfg)
    except (OSError, ValueError) as err:
        _fail(f"normalize failed, {cfg.stain.out_dir}/ left unchanged: {err}")
    typer.echo(
        f"{m['n_tiles']} tiles normalized ({cfg.stain.method}) into {cfg.stain.out_dir}/; "
        f"{m['n_passed_through']} passed through unchanged; per-patient stain spread H "
        f"{m['spread_h_deg_before']:.2f} -> {m['spread_h_deg_after']:.2f} deg, E "
        f"{m['spread_e_deg_before']:.2f} -> {m['spread_e_deg_after']:.2f} deg"
    )


# --- model commands ---


@app.command("model-info")
def model_info_cmd(
    params: ParamsOpt = Path("params.yaml"),
    arch: Annotated[
        str | None, typer.Option(help="kidney_segnet or unet (default: params)")
    ] = None,
    nfeat: Annotated[int | None, typer.Option(help="first-level width (default: params)")] = None,
    tile_size: Annotated[int | None, typer.Option(help="tile edge (default: params)")] = None,
    original: Annotated[bool, typer.Option(help="original-compatible config (fixes off)")] = False,
) -> None:
    """Print parameters (total / used in forward) and multiply-accumulates per tile."""
    from rich.console import Console
    from rich.table import Table

    from kseg.model.config import ModelConfig

    base = _load(params).model if params.is_file() else ModelConfig()
    if original:
        base = ModelConfig.original_compatible(base.nfeat, base.mid_channels)
    changes = {k: v for k, v in (("arch", arch), ("nfeat", nfeat), ("tile_size", tile_size)) if v}
    import typing

    allowed = typing.get_args(ModelConfig.model_fields["arch"].annotation)
    if arch is not None and arch not in allowed:
        _fail(f"--arch {arch!r}: expected one of {', '.join(allowed)}")
    try:
        cfg = base.with_(**changes)
    except (TypeError, ValueError) as err:
        _fail(str(err))
    from kseg.model import model_info

    info = model_info(cfg)
    title = f"{cfg.arch}, nfeat={cfg.nfeat}, tile {info['tile_size']}"
    if cfg.input_scale != 1.0:  # the cost a user pays per tile of their own images
        title += f" = {info['input_tile']} input px (input_scale {cfg.input_scale:g})"
    table = Table(title=title)
    for col in ("params total", "params used", "GMACs / tile", "GMACs Conv2d only"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{info['params_total']:,}",
        f"{info['params_used']:,}",
        f"{info['macs'] / 1e9:.3f}",
        f"{info['macs_conv2d'] / 1e9:.3f}",
    )
    Console().print(table)


@app.command("export")
def export_cmd(
    model: Annotated[
        str,
        typer.Argument(help="Model folder, MLflow URI or pretrained[:name] (as for predict)."),
    ],
    out: Annotated[Path, typer.Option("--out", help="File to write.", dir_okay=False)],
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    size: Annotated[
        int | None,
        typer.Option(help="Fixed window edge (default: dynamic H, W where the network allows)."),
    ] = None,
    exporter: Annotated[
        str,
        typer.Option(
            help="ONNX exporter: legacy (TorchScript-based, seconds), dynamo (torch.export-based, "
            "slower) or auto (legacy while torch has it)."
        ),
    ] = "auto",
) -> None:
    """Export the network (BatchNorm folded) to ONNX or TorchScript, with its metadata.

    Kidney-SegNet with per-position DiCE kernels is exported at its tile size only (dynamic H and
    W otherwise); docs/model.md, "Export and runtimes".
    """
    _setup_logging()
    from kseg.export import export_model, sidecar_path
    from kseg.predict import resolve_model

    try:
        meta = export_model(resolve_model(model), fmt, out, size=size, exporter=exporter)
    except (OSError, ValueError) as err:
        _fail(str(err))
    shape = meta["input"]["shape_note"]
    typer.echo(f"{fmt} written to {out} ({shape}); metadata also in {sidecar_path(out)}")


@app.command("convert-original")
def convert_original_cmd(
    src: Annotated[Path, typer.Argument(help="original checkpoint (.pt)", dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="kseg model folder to write")],
    mean_from: Annotated[
        Path | None,
        typer.Option(
            "--mean-from",
            help="folder of the training images: the input mean is computed from "
            "them as the original did (per-image min-max to 0..255)",
            file_okay=False,
        ),
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option(help="the input mean as R,G,B on the 0..255 scale, instead of --mean-from"),
    ] = None,
) -> None:
    """Convert an original Kidney-SegNet checkpoint into a model folder predict can use.

    The folder gets ``preprocess.json`` (the training input mean, which the original's checkpoint
    does not hold: give --mean-from or --mean) and the original's post-processing (dist head,
    h 7 / threshold 28, the kseg defaults), so ``kseg predict --model OUT`` runs it.
    """
    from kseg.infer import Preprocess
    from kseg.model import convert_original
    from kseg.model.compat import original_input_mean

    if (mean_from is None) == (mean is None):
        _fail(
            "give exactly one of --mean-from DIR or --mean R,G,B: the original subtracts the mean "
            "of its training images, which its checkpoint does not store"
        )
    try:
        if mean is not None:
            values = tuple(float(v) for v in mean.split(","))
            if len(values) != 3 or not all(0.0 <= v <= 255.0 for v in values):
                raise ValueError(f"--mean {mean!r}: expected R,G,B in 0..255")
            rgb = (values[0], values[1], values[2])
        else:
            from kseg.predict import IMAGE_SUFFIXES, read_image

            files = sorted(p for p in mean_from.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"--mean-from {mean_from}: no image ({', '.join(IMAGE_SUFFIXES)})")
            rgb = original_input_mean(read_image(p) for p in files)
        folder = convert_original(src, out, extra={"input_mean": list(rgb)})
        Preprocess(mean=rgb, std=(1.0, 1.0, 1.0)).save(folder)
    except (OSError, ValueError) as err:
        _fail(str(err))
    typer.echo(
        f"model folder written to {folder}/ (input mean {', '.join(f'{v:.1f}' for v in rgb)})"
    )


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
    from mlflow.exceptions import MlflowException

    from kseg.train import TrainingDiverged
    from kseg.train import train as run_train

    try:
        summary = run_train(cfg, resume=resume)
    except TrainingDiverged as err:
        _fail(str(err), code=1)
    except (OSError, ValueError, MlflowException) as err:
        _fail(f"train failed (the last checkpoint is kept; run it again to resume): {err}")
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
    device: DeviceOpt = None,
) -> None:
    """Segment the held-out test patients; write metrics/eval.json, per-tile table, overlays."""
    cfg = _load(params)
    _setup_logging()
    from mlflow.exceptions import MlflowException

    from kseg.evaluate import evaluate as run_evaluate

    try:
        summary = run_evaluate(cfg, model, device)
    except (OSError, ValueError, MlflowException) as err:
        _fail(f"evaluate failed: {err}")
    keys = ("pixel_f1", "object_f1", "aji", "pq")
    typer.echo(
        "test: "
        + "  ".join(f"{k} {summary[k]:.4f}" for k in keys)
        + f"  ({summary['n_tiles']} tiles)"
    )


@app.command()
def register(
    params: ParamsOpt = Path("params.yaml"),
    model: Annotated[
        Path | None, typer.Option(help="Model folder (default: train.out_dir).")
    ] = None,
    metrics: Annotated[
        Path, typer.Option(help="Test metrics of that model.", dir_okay=False)
    ] = Path("metrics/eval.json"),
    device: DeviceOpt = None,
) -> None:
    """Register the model in MLflow; move the champion alias only if it beats the champion."""
    cfg = _load(params)
    _setup_logging()
    from mlflow.exceptions import MlflowException

    from kseg.registry import register as run_register

    try:
        report = run_register(cfg, model, metrics, device)
    except (OSError, ValueError, MlflowException) as err:
        _fail(f"register failed: {err}")
    typer.echo(f"{report['model_uri']}: {report['decision']} ({report['reason']})")


@app.command()
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="Image files and/or folders of images.")],
    model: Annotated[
        str,
        typer.Option(
            help="Model folder, MLflow URI (models:/kseg@champion) or a shipped model "
            "(pretrained = the TNBC model in the package, no training or network needed)."
        ),
    ] = "pretrained",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("predictions"),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward pass.")] = 4,
    dtype: Annotated[
        str, typer.Option(help="float32, or float16 / bfloat16 (autocast, GPU).")
    ] = "float32",
    max_pixels: Annotated[
        int | None,
        typer.Option(min=1, help="Refuse larger images (default: KSEG_MAX_PIXELS or 100,000,000)."),
    ] = None,
    mpp: Annotated[
        float | None,
        typer.Option(
            min=0.01,
            help="µm per pixel of the inputs. Images: resampled to the model's pixel size "
            "(the shipped model: 0.25) and the labels back (default: taken to be at it). Whole "
            "slides: level-0 pixel size, overriding (or supplying) the slide's.",
        ),
    ] = None,
    block: Annotated[
        int, typer.Option(min=64, help="Whole slides: block edge in pixels at the model's mpp.")
    ] = 2048,
    margin: Annotated[
        int, typer.Option(min=0, help="Whole slides: context read around each block, pixels.")
    ] = 128,
    runtime: Annotated[
        str | None,
        typer.Option(
            help="torch, compiled (torch.compile'd DiCE kernels; compiles once, about a minute), "
            "onnx (pip install 'kseg[onnx]'), openvino ('kseg[openvino]') or auto = the fastest "
            "installed one except compiled, measured once on this CPU (default: $KSEG_RUNTIME or "
            "auto)."
        ),
    ] = None,
    tta: Annotated[
        str | None,
        typer.Option(
            help="Test-time augmentation: none, flips (4x the network's time) or dihedral (8x) "
            "(default: the model's; the shipped model uses flips). Its post-processing "
            "thresholds were fitted with the model's own.",
        ),
    ] = None,
) -> None:
    """Segment images of any size: labels TIFF, overlay PNG, per-nucleus CSV, QuPath GeoJSON.

    Whole slides (SVS, NDPI, pyramidal or OME-TIFF) are read at the model's pixel size, glass is
    skipped, blocks are streamed and resumed after an interruption (docs/wsi.md).
    """
    _setup_logging()
    import os

    from kseg.predict import predict as run_predict

    try:
        report = run_predict(
            inputs,
            model,
            out,
            device=device,
            progress=sys.stderr.isatty(),
            batch_size=batch_size,
            dtype=dtype,
            max_pixels=max_pixels,
            mpp=mpp,
            slide_options={"block": block, "margin": margin},
            runtime=runtime or os.environ.get("KSEG_RUNTIME") or "auto",
            tta=tta,
        )
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
