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

    Console(stderr=True).print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
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


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
