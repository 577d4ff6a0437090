from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from kseg.cli import app
from tests.conftest import run_kseg

runner = CliRunner()


def _commands() -> dict:
    group = typer.main.get_command(app)
    return dict(group.commands)


def _stage_commands() -> list[str]:
    """Commands that read params.yaml (they all take --params)."""
    return sorted(
        name for name, cmd in _commands().items() if any("--params" in p.opts for p in cmd.params)
    )


def test_every_subcommand_has_help() -> None:
    commands = _commands()
    assert "fetch" in commands
    for name in commands:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage" in result.output


def test_cli_import_is_light() -> None:
    # `kseg --help` answers fast because no heavy library is imported by the CLI module.
    code = (
        "import sys, kseg.cli; heavy = {'torch', 'mlflow', 'prefect', 'great_expectations', "
        "'skimage', 'albumentations', 'dvc', 'numpy', 'pandas', 'sklearn', 'scipy'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", _stage_commands())
def test_misspelled_key_stops_every_stage(name: str, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  sorce: tnbc\n")
    result = runner.invoke(app, [name, "--params", str(params)])
    assert result.exit_code != 0
    assert "data.sorce" in result.output


def test_fetch_in_a_real_process_and_module_entry(project: Path) -> None:
    (project / "params.yaml").write_text("data:\n  sorce: tnbc\n")
    proc = run_kseg("fetch", cwd=project)
    assert proc.returncode == 2
    assert "unknown key data.sorce" in proc.stderr
    assert not (project / "data").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "kseg", "--help"], capture_output=True, text=True, check=True
    )
    assert "fetch" in proc.stdout


def test_params_command_prints_resolved_defaults(project: Path) -> None:
    result = runner.invoke(app, ["params", "--params", str(project / "params.yaml")])
    assert result.exit_code == 0
    assert "foreground_threshold: 28" in result.output
    assert "# params hash:" in result.output


@pytest.mark.parametrize(
    ("model", "note"),
    [
        ({"fix_decoder_concat_upsampled": True, "fix_drop_unused_upconv": True}, "no effect while"),
        ({"fix_decoder_concat_upsampled": False, "fix_drop_unused_upconv": True}, None),
        ({"arch": "unet"}, "shape Kidney-SegNet only"),
    ],
)
def test_params_command_notes_options_without_effect(
    project: Path, model: dict, note: str | None
) -> None:
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text()) or {}
    params.setdefault("model", {}).update(model)
    path = project / "noted.yaml"
    path.write_text(yaml.safe_dump(params))
    result = runner.invoke(app, ["params", "--params", str(path)])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("# note:")]
    assert (note is None and not notes) or (len(notes) == 1 and note in notes[0]), notes
