"""``kseg validate``: a Great Expectations suite over the prepared manifest and the split.

Four tables are checked, each built from ``prepared/manifest.csv`` and ``prepared/split.json``:

- ``manifest`` (one row per tile): ids, shapes and dtypes, mask size = image size, labels 1..N,
  duplicate content, blank and near-blank tiles, plausible nucleus size and stain statistics;
- ``tiles`` (one row per tile listed in split.json): each tile in one split, known to the
  manifest, with the same split as the manifest says;
- ``patients`` (one row per distinct patient and split): a patient in two splits is a leak;
- ``splits`` (one row per split): at least ``validate.min_tiles_per_split`` tiles each.

GX runs in an ephemeral context (nothing written to ``gx/``). The stage writes a small HTML report
and ``metrics/validation.json``, and raises :class:`ValidationFailed` naming each failing
expectation and the tiles that break it.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from kseg.config import Params, ValidateConfig
from kseg.fsutil import atomic_write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: Table -> the column that names its rows in error messages.
ID_COLUMNS = {"manifest": "tile_id", "tiles": "tile_id", "patients": "patient", "splits": "split"}


class ValidationFailed(ValueError):
    """At least one expectation failed; the message names each one and its offending tiles."""


def load_tables(prepared: Path) -> dict[str, pd.DataFrame]:
    """Builds the four checked tables from ``manifest.csv`` and ``split.json``."""
    try:
        manifest = pd.read_csv(
            prepared / "manifest.csv", dtype={"tile_id": str, "patient": str, "split": str}
        )
        split = json.loads((prepared / "split.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{prepared}: cannot read manifest/split ({err}); run `kseg prepare`"
        ) from err
    # Mean nucleus area is undefined without nuclei: NaN is skipped by the range expectation.
    manifest["area_mean"] = manifest["area_mean"].where(manifest["n_nuclei"] > 0)
    patient_of = dict(zip(manifest["tile_id"], manifest["patient"], strict=True))
    split_of = dict(zip(manifest["tile_id"], manifest["split"], strict=True))
    rows = [
        {"tile_id": t, "split": s, "patient": patient_of.get(t), "in_manifest": t in patient_of,
         "manifest_split": split_of.get(t, s)}
        for s in SPLITS for t in split.get(s, [])
    ]  # fmt: skip
    listed = {r["tile_id"] for r in rows}
    rows += [
        {"tile_id": t, "split": None, "patient": patient_of[t], "in_manifest": True,
         "manifest_split": split_of[t]}
        for t in manifest["tile_id"] if t not in listed
    ]  # fmt: skip
    tiles = pd.DataFrame(rows, columns=["tile_id", "split", "patient", "in_manifest",
                                        "manifest_split"])  # fmt: skip
    pairs = {(r["patient"], r["split"]) for r in rows if r["patient"] and r["split"]}
    pairs |= {(p, s) for s in SPLITS for p in split.get("patients", {}).get(s, [])}
    patients = pd.DataFrame(sorted(pairs), columns=["patient", "split"])
    splits = pd.DataFrame(
        [{"split": s, "n_tiles": len(split.get(s, [])),
          "n_patients": int(patients["split"].eq(s).sum())} for s in SPLITS]
    )  # fmt: skip
    return {"manifest": manifest, "tiles": tiles, "patients": patients, "splits": splits}


def expectations(cfg: ValidateConfig) -> dict[str, list[Any]]:
    """The suite, per table. Every expectation carries a ``meta.why`` shown in the report."""
    import great_expectations.expectations as gxe

    def why(text: str) -> dict[str, str]:
        return {"why": text}

    m = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, meta=why("at least one tile")),
        gxe.ExpectColumnValuesToNotBeNull(column="patient", meta=why("every tile has a patient")),
        gxe.ExpectColumnValuesToBeUnique(column="tile_id", meta=why("tile ids are unique")),
        gxe.ExpectColumnValuesToBeUnique(
            column="content_hash", meta=why("duplicate tile: the same pixels under two ids")
        ),
        gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"], meta=why("RGB uint8")),
        gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=[3], meta=why("RGB")),
        gxe.ExpectColumnValuesToBeInSet(
            column="label_dtype", value_set=["uint16"], meta=why("uint16 instance labels")
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="height", min_value=cfg.min_tile_size, meta=why("tile not too small")
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="width", min_value=cfg.min_tile_size, meta=why("tile not too small")
        ),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="height", column_B="mask_height", meta=why("mask of the wrong size")
        ),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="width", column_B="mask_width", meta=why("mask of the wrong size")
        ),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="n_nuclei", column_B="max_label", meta=why("labels numbered 1..N, no gap")
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="max_label", min_value=0, max_value=65535, meta=why("labels fit uint16")
        ),
        gxe.ExpectColumnValuesToBeInSet(column="blank", value_set=[False], meta=why("blank tile")),
        gxe.ExpectColumnValuesToBeInSet(
            column="near_blank", value_set=[False], meta=why("near-blank tile (little tissue)")
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="tissue_fraction", min_value=cfg.min_tissue_fraction, max_value=1.0,
            meta=why("enough tissue in the tile"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="area_mean", min_value=cfg.mean_nucleus_area[0],
            max_value=cfg.mean_nucleus_area[1], meta=why("plausible nucleus size (pixels)"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="od_mean", min_value=cfg.od_mean[0], max_value=cfg.od_mean[1],
            meta=why("plausible H&E optical density of tissue"),
        ),
        *[
            gxe.ExpectColumnValuesToBeBetween(
                column=f"mean_{c}", min_value=cfg.rgb_mean[0], max_value=cfg.rgb_mean[1],
                meta=why("plausible colour (not black, not white)"),
            )
            for c in "rgb"
        ],
        gxe.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(SPLITS), meta=why("every tile is in a split")
        ),
    ]  # fmt: skip
    t = [
        gxe.ExpectColumnValuesToBeUnique(column="tile_id", meta=why("a tile in one split only")),
        gxe.ExpectColumnValuesToNotBeNull(column="split", meta=why("tile missing from split.json")),
        gxe.ExpectColumnValuesToBeInSet(
            column="in_manifest", value_set=[True], meta=why("split.json names an unknown tile")
        ),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="split", column_B="manifest_split", meta=why("split.json agrees with manifest")
        ),
    ]
    p = [
        gxe.ExpectColumnValuesToBeUnique(
            column="patient", meta=why("patient leakage: a patient in two splits")
        )
    ]
    s = [
        gxe.ExpectColumnValuesToBeBetween(
            column="n_tiles", min_value=cfg.min_tiles_per_split, meta=why("tiles per split")
        )
    ]
    return {"manifest": m, "tiles": t, "patients": p, "splits": s}


def _offenders(table: str, result: dict[str, Any], tables: dict[str, pd.DataFrame]) -> list[str]:
    """Ids of the rows that break an expectation (tile ids where possible)."""
    id_col = ID_COLUMNS[table]
    ids = [str(r.get(id_col)) for r in result.get("unexpected_index_list") or [] if id_col in r]
    if table == "patients":  # a leaking patient -> all of its tiles
        df = tables["tiles"]
        return sorted(set(df.loc[df["patient"].isin(ids), "tile_id"]))
    return sorted(set(ids))


def run_suite(tables: dict[str, pd.DataFrame], cfg: ValidateConfig) -> list[dict[str, Any]]:
    """Runs the suite on the tables; one result row per expectation."""
    # GX logs its own set-up at INFO (hundreds of lines at import); keep warnings only.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # This module pins its own logger at INFO ("Created temporary directory ...").
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas("kseg")
    out: list[dict[str, Any]] = []
    for table, exps in expectations(cfg).items():
        batch_def = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"{table}_suite", expectations=exps))
        vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=f"{table}_checks", data=batch_def, suite=suite)
        )
        fmt = {"result_format": "COMPLETE", "unexpected_index_column_names": [ID_COLUMNS[table]]}
        res = vd.run(batch_parameters={"dataframe": tables[table]}, result_format=fmt)
        for r in res.results:
            kwargs = {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"}
            result = r.result or {}
            out.append({
                "table": table,
                "expectation": r.expectation_config.type,
                "kwargs": kwargs,
                "why": (r.expectation_config.meta or {}).get("why", ""),
                "success": bool(r.success),
                "unexpected_count": int(result.get("unexpected_count") or 0),
                "observed": result.get("observed_value"),
                "offenders": [] if r.success else _offenders(table, result, tables),
            })  # fmt: skip
    return out


def _describe(row: dict[str, Any]) -> str:
    cols = ", ".join(str(v) for k, v in row["kwargs"].items() if k.startswith("column"))
    head = f"{row['expectation']}({cols}) on {row['table']}: {row['why']}"
    if row["offenders"]:
        shown = ", ".join(row["offenders"][:10])
        more = f" (+{len(row['offenders']) - 10} more)" if len(row["offenders"]) > 10 else ""
        return f"{head}; offending: {shown}{more}"
    return f"{head}; observed {row['observed']}"


def write_report(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """A self-contained HTML page: the summary and one table row per expectation."""
    e = html.escape
    lines = [
        "<!doctype html><html><head><meta charset='utf-8'><title>kseg data validation</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:90%}"
        ".ok{background:#e6f4e6}.bad{background:#fbe3e3}</style></head><body>",
        f"<h1>Data validation: {'PASSED' if summary['success'] else 'FAILED'}</h1>",
        f"<p>{summary['n_tiles']} tiles, {summary['n_patients']} patients, "
        f"{summary['n_nuclei']} nuclei; tiles per split {e(json.dumps(summary['tiles']))}; "
        f"{summary['n_failed']} of {summary['n_expectations']} expectations failed.</p>",
        "<table><tr><th>status</th><th>table</th><th>expectation</th><th>arguments</th>"
        "<th>why</th><th>unexpected</th><th>offending rows</th></tr>",
    ]
    for r in sorted(rows, key=lambda r: r["success"]):
        cls, status = ("ok", "pass") if r["success"] else ("bad", "FAIL")
        lines.append(
            f"<tr class='{cls}'><td>{status}</td><td>{e(r['table'])}</td>"
            f"<td>{e(r['expectation'])}</td><td>{e(json.dumps(r['kwargs'], default=str))}</td>"
            f"<td>{e(r['why'])}</td><td>{r['unexpected_count']}</td>"
            f"<td>{e(', '.join(r['offenders']))}</td></tr>"
        )
    lines.append("</table></body></html>")
    atomic_write_text(path, "\n".join(lines) + "\n")


def validate(params: Params) -> dict[str, Any]:
    """Runs the validate stage; writes the report and the metrics file either way.

    Returns:
        The summary written to ``metrics/validation.json``.

    Raises:
        ValidationFailed: one or more expectations failed (named with their offending tiles).
        ValueError: the prepared folder cannot be read.
    """
    cfg = params.validate
    tables = load_tables(Path(params.prepare.out_dir))
    rows = run_suite(tables, cfg)
    failed = [r for r in rows if not r["success"]]
    man = tables["manifest"]
    summary = {
        "success": not failed,
        "n_expectations": len(rows),
        "n_failed": len(failed),
        "n_tiles": len(man),
        "n_patients": int(man["patient"].nunique()),
        "n_nuclei": int(man["n_nuclei"].sum()),
        "tiles": {s: int(v) for s, v in zip(tables["splits"]["split"], tables["splits"]["n_tiles"],
                                            strict=True)},
        "near_blank_tiles": int(man["near_blank"].sum()),
        "failures": [
            {"expectation": r["expectation"], "table": r["table"], "why": r["why"],
             "kwargs": r["kwargs"], "offenders": r["offenders"]}
            for r in failed
        ],
    }  # fmt: skip
    write_report(rows, summary, Path(cfg.report))
    atomic_write_text(Path(cfg.metrics), json.dumps(summary, indent=2, default=str) + "\n")
    if failed:
        details = "\n".join(f"  - {_describe(r)}" for r in failed)
        raise ValidationFailed(
            f"data validation failed: {len(failed)} of {len(rows)} expectations "
            f"(report: {cfg.report})\n{details}"
        )
    log.info("data validation passed: %d expectations, %d tiles", len(rows), len(man))
    return summary
