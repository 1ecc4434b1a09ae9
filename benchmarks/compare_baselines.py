"""Run ``adalayers compare`` for one config and keep its comparison as a results file.

    python benchmarks/compare_baselines.py configs/minilm-cola.yaml \
        --baselines mixer,sweep,last,uniform,scalar_mix,finetune,probe \
        [--data-dir ../shared/datasets] [--runs-dir runs/compare] [--tag T] [--set key=value ...]

The command is the one the README documents, run in a subprocess; the comparison folder is
``<runs-dir>/<config name>[-<tag>]`` (finished rows are reused when it is repeated, so an
interrupted comparison continues). Writes ``benchmarks/results/compare_<config name>[-<tag>].json``
with every row (metrics, parameters added, training and wall time) and a summary: the mixer
against the best single layer, the last layer, the uniform and the scalar mix, and full
fine-tuning where it ran. ``python benchmarks/tables.py --compare`` prints the table.
``--variant`` marks a run of other hyper-parameters (e.g. ``--baselines mixer --set
task.mixer.alpha=1``), listed apart. ``--mixer-grid alpha=1,4,16`` (passed on to ``adalayers
compare``) trains the mixer at those values too; the summary's ``mixer_chosen`` is the mixer row
best on validation, and tables.py shows it as a row of its own. ``--jobs N`` (passed on) trains
N rows at once.

``--collect`` runs nothing: it writes the results file from the comparison folder as it stands.
A comparison cut off before its last row (``"complete": false`` in ``comparison.json``) goes to
``benchmarks/results/partial-compare_<name>.json`` instead, with its finished rows and the
pending ones, and no best single layer while a layer is pending; the tables leave it out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import run_offline, write_result  # noqa: E402


def headline(comparison: dict) -> dict:
    """The primary test metric of each baseline (the best single layer picked on validation)."""
    metric = comparison["metric"]
    rows = comparison["rows"]

    def test(row: dict) -> float | None:
        return (row.get("test") or {}).get(metric)

    out: dict = {"metric": metric}
    singles = {name: row for name, row in rows.items() if row["baseline"] == "single_layer"}
    pending = [name for name in comparison.get("pending", []) if name.startswith("layer_")]
    if singles and not pending:  # the best of some layers is not the best single layer
        # chosen as a user would: by validation, then reported on test
        best = max(singles.values(), key=lambda r: (r.get("validation") or {}).get(metric, -1e9))
        out["best_single_layer"] = {"layer": best["layer"], "test": test(best)}
    if singles or pending:
        out["single_layer_test"] = {row["layer"]: test(row) for row in singles.values()}
    if pending:
        out["single_layers_pending"] = pending
    for name in ("mixer", "dynamic", "last", "uniform", "scalar_mix", "finetune"):
        if name in rows:
            out[name] = test(rows[name])
    for name in ("probe", "probe_concat"):  # a linear probe; "probe" on the state chosen
        if name in rows:
            out[name] = {"layer": rows[name].get("layer"), "test": test(rows[name])}
    chosen = comparison.get("mixer_chosen")
    if chosen is not None:
        row = rows[chosen]
        out["mixer_chosen"] = {
            "row": chosen,
            "settings": row.get("settings"),
            "validation": (row.get("validation") or {}).get(metric),
            "test": test(row),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--baselines", default="mixer,sweep,last,uniform,scalar_mix,probe")
    parser.add_argument(
        "--data-dir", default=os.environ.get("ADALAYERS_DATA_DIR", "../shared/datasets")
    )
    parser.add_argument("--runs-dir", default="runs/compare")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--mixer-grid", action="append", default=[], metavar="KEY=V1,V2,...")
    parser.add_argument("--tag", default="", help="suffix of the folder and result names")
    parser.add_argument("--jobs", type=int, default=1, help="passed on to adalayers compare")
    parser.add_argument(
        "--variant",
        action="store_true",
        help="a hyper-parameter variant (e.g. of the mixer, chosen on validation): listed "
        "apart from the main comparison by tables.py",
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: write the results file from the comparison folder as it stands",
    )
    args = parser.parse_args()
    name = Path(args.config).stem + (f"-{args.tag}" if args.tag else "")
    out = Path(args.runs_dir) / name
    cmd = [
        sys.executable,
        "-m",
        "adalayers.cli",
        "compare",
        "--config",
        args.config,
        "--data-dir",
        args.data_dir,
        "--baselines",
        args.baselines,
        "--output-dir",
        str(out),
    ]
    for item in args.set:
        cmd += ["--set", item]
    for item in args.mixer_grid:
        cmd += ["--mixer-grid", item]
    if args.jobs != 1:
        cmd += ["--jobs", str(args.jobs)]
    wall = None
    if not args.collect:
        code, wall = run_offline(cmd)
        if code != 0:
            sys.exit(f"{args.config}: adalayers compare failed with exit code {code}")
    source = out / "comparison.json"
    if not source.is_file():
        sys.exit(f"{source} not found: run the comparison first (without --collect)")
    comparison = json.loads(source.read_text())
    complete = comparison.get("complete", True)  # comparisons from before the flag were whole
    partial = _common.RESULTS / f"partial-compare_{name}.json"
    if complete:
        partial.unlink(missing_ok=True)  # superseded by the whole comparison
    path = write_result(
        f"compare_{name}" if complete else partial.stem,
        {
            "benchmark": "compare",
            "config": args.config,
            "compare_command": " ".join(cmd[2:]).replace("adalayers.cli", "adalayers", 1),
            "folder": str(out),
            "variant": args.tag if args.variant else None,
            "overrides": args.set,
            "mixer_grid": args.mixer_grid or None,
            "complete": complete,
            "collected": args.collect,
            "wall_seconds_this_call": None if wall is None else round(wall, 1),
            "summary": headline(comparison),
            "comparison": comparison,
        },
    )
    print(json.dumps(headline(comparison), indent=1))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
