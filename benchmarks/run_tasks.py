"""Train and evaluate tasks on the full official splits; one results JSON per run.

    python benchmarks/run_tasks.py configs/minilm-cola.yaml configs/minilm-conll2003.yaml \
        [--data-dir ../shared/datasets] [--runs-dir runs/bench] [--set key=value ...]

Each config runs as ``adalayers train`` in a subprocess (the command the README documents);
the wall time covers everything: loading, training, model selection and the final evaluation.
Results go to ``benchmarks/results/task_<config name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_offline, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument(
        "--data-dir", default=os.environ.get("ADALAYERS_DATA_DIR", "../shared/datasets")
    )
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per run")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args()
    for config in args.configs:
        name = Path(config).stem + (f"-{args.tag}" if args.tag else "")
        run = Path(args.runs_dir) / name
        launcher = [sys.executable, "-m", "adalayers.cli"]
        if args.nproc > 1:
            launcher = ["torchrun", "--nproc_per_node", str(args.nproc), "-m", "adalayers.cli"]
        cmd = [
            *launcher,
            "train",
            "--config",
            config,
            "--data-dir",
            args.data_dir,
            "--output-dir",
            str(run),
            "--overwrite",
            "--quiet",
        ]
        for item in args.set:
            cmd += ["--set", item]
        code, wall = run_offline(cmd)
        if code != 0:
            print(f"{config}: failed with exit code {code}", file=sys.stderr)
            continue
        metrics = json.loads((run / "metrics.json").read_text())
        history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
        path = write_result(
            f"task_{name}",
            {
                "benchmark": "task",
                "config": config,
                "train_command": " ".join(cmd),
                "task": metrics["task"],
                "base": metrics["base"],
                "metric": metrics["metric"],
                "validation": metrics.get("validation"),
                "test": metrics.get("test"),
                "parameters_added": metrics["parameters_added"],
                "percent_of_base": metrics["percent_of_base"],
                "best_epoch": metrics["best_epoch"],
                "epochs_run": metrics["epochs_run"],
                "wall_seconds": round(wall, 1),
                "train_seconds": metrics["train_seconds"],
                "train_tokens_per_second": metrics["train_tokens_per_second"],
                "processes": metrics.get("processes", 1),
                "layer_weights": metrics["layer_weights"],
                "history": history,
            },
        )
        print(
            f"{config}: {metrics['metric']} test={metrics.get('test', {}).get(metrics['metric'])}"
            f" wall {wall:.0f}s -> {path}"
        )


if __name__ == "__main__":
    main()
