"""Hyper-parameter search on CoLA × MiniLM from the feature cache, against the α grid.

    python benchmarks/tune_cola.py [--trials 30] [--jobs 2] [--data-dir ../shared/datasets] \
        [--runs-dir runs/tune] [--set key=value ...] [--collect]

Writes ``configs/minilm-cola.yaml`` with the ``tune`` section :data:`SPACE` (the mixer's and
training's settings) beside the study folder, runs ``adalayers tune`` on it in a subprocess with
the feature cache (train, validation and test stored, as the α grid's comparisons were), and
writes ``benchmarks/results/tune_cola.json``: the command, its wall time and the machine's load
average, the trials (complete, pruned), the best trial's settings, validation and test score,
and, for comparison, the row chosen on validation by the α grid of
``results/compare_minilm-cola-alphagrid.json`` (same config, seed and cache; α = 1, 4, 16 and
the config's 64). Repeating the command resumes the study (finished trials are not trained
again); ``--collect`` runs nothing and writes the results file from the study folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import run_offline, write_result  # noqa: E402

CONFIG = "configs/minilm-cola.yaml"
SPACE = {
    "task.mixer.alpha": {"low": 1, "high": 128, "log": True},
    "train.lr": {"low": 1.0e-4, "high": 3.0e-3, "log": True},
    "task.mixer.dim": {"choices": [32, 64, 128]},
    "task.mixer.dropout": {"low": 0.0, "high": 0.3},
    "task.mixer.cutoff": {"low": 0.0, "high": 0.05},
    "task.mixer.entropy_weight": {"low": 0.0, "high": 0.05},
    "task.mixer.layer_dropout": {"low": 0.0, "high": 0.3},
}
CACHE = ["train.cache=true", "cache.dir=runs/cache-cola", "cache.splits=[train,validation,test]"]
GRID = "compare_minilm-cola-alphagrid"


def alpha_grid() -> dict | None:
    """The α grid's chosen row (validation and test) from its results file."""
    path = _common.RESULTS / f"{GRID}.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    comparison = result["comparison"]
    metric, rows = comparison["metric"], comparison["rows"]
    mixers = {n: r for n, r in rows.items() if r["baseline"] in ("mixer", "mixer_grid")}
    chosen = comparison["mixer_chosen"]
    return {
        "source": f"benchmarks/results/{GRID}.json",
        "command": result.get("compare_command"),
        "runs": len(mixers),
        "alphas": sorted(r["settings"]["alpha"] for r in mixers.values()),
        "chosen": chosen,
        "settings": rows[chosen]["settings"],
        "validation": rows[chosen]["validation"][metric],
        "test": rows[chosen]["test"][metric],
        "wall_seconds": result.get("wall_seconds_this_call"),
        "train_seconds": round(sum(r["train_seconds"] for r in mixers.values()), 1),
    }


def study_span(rows: list[dict]) -> float | None:
    """Seconds from the first trial's start to the last one's end (over resumed calls too)."""
    starts = [datetime.fromisoformat(r["started"]) for r in rows if r.get("started")]
    ends = [datetime.fromisoformat(r["finished"]) for r in rows if r.get("finished")]
    if not starts or not ends:
        return None
    return round((max(ends) - min(starts)).total_seconds(), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=2, help="passed on to adalayers tune")
    parser.add_argument(
        "--data-dir", default=os.environ.get("ADALAYERS_DATA_DIR", "../shared/datasets")
    )
    parser.add_argument("--runs-dir", default="runs/tune")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--collect", action="store_true", help="run nothing: write the results")
    args = parser.parse_args()
    out = Path(args.runs_dir) / "minilm-cola"
    config_path = Path(args.runs_dir) / "minilm-cola-tune.yaml"
    config = yaml.safe_load(Path(CONFIG).read_text())
    config["tune"] = SPACE
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    overrides = [*CACHE, *args.set]
    cmd = [sys.executable, "-m", "adalayers.cli", "tune", "--config", str(config_path)]
    cmd += ["--data-dir", args.data_dir, "--output-dir", str(out)]
    cmd += ["--trials", str(args.trials), "--jobs", str(args.jobs)]
    for item in overrides:
        cmd += ["--set", item]
    wall, load = None, {"start": list(os.getloadavg())}
    if not args.collect:
        code, wall = run_offline(cmd)
        load["end"] = list(os.getloadavg())
        if code != 0:
            sys.exit(f"adalayers tune failed with exit code {code}")
    source = out / "tune.json"
    if not source.is_file():
        sys.exit(f"{source} not found: run the study first (without --collect)")
    summary = json.loads(source.read_text())
    best = summary.get("best") or {}
    payload = {
        "benchmark": "tune",
        "config": CONFIG,
        "space": SPACE,
        "overrides": overrides,
        "tune_command": " ".join(cmd[2:]).replace("adalayers.cli", "adalayers", 1),
        "folder": str(out),
        "jobs": args.jobs,
        "trials_asked": args.trials,
        "trials": summary["trials"],
        "collected": args.collect,
        "wall_seconds_this_call": None if wall is None else round(wall, 1),
        "load_average_1_5_15_min": load,
        "study_seconds": study_span(summary["rows"]),
        "trial_wall_seconds_sum": round(sum(r["wall_seconds"] or 0 for r in summary["rows"]), 1),
        "metric": summary.get("metric"),
        "best": {
            "trial": best.get("trial"),
            "params": best.get("params"),
            "validation": best.get("validation"),
            "test": best.get("test"),
        },
        "alpha_grid": alpha_grid(),
        "rows": summary["rows"],
    }
    path = write_result("tune_cola", payload)
    print(json.dumps({k: payload[k] for k in ("trials", "best", "alpha_grid")}, indent=1))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
