"""Evaluate a run's best head on one split and write a results JSON (for runs stopped early).

    python benchmarks/evaluate_run.py runs/bench/minilm-imdb --split test [--data-dir DIR]

Writes ``benchmarks/results/task_<run name>.json`` with the same fields as run_tasks.py (the
metrics of the split under ``test``), the run's training state (epochs done, best epoch, training
seconds and tokens) and the evaluation's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from adalayers.core.metrics import primary_metric  # noqa: E402
from adalayers.training.train import evaluate_run, load_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--data-dir", default=os.environ.get("ADALAYERS_DATA_DIR", "../shared/datasets")
    )
    args = parser.parse_args()
    run = Path(args.run)
    start = time.perf_counter()
    metrics = evaluate_run(run, args.split, data_dir=args.data_dir, quiet=True)
    seconds = time.perf_counter() - start
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    config, backbone, task = load_run(run)
    best = next(h for h in history if h["epoch"] == state["best_epoch"])
    path = write_result(
        f"task_{run.name}",
        {
            "benchmark": "task",
            "evaluated_by": "benchmarks/evaluate_run.py (run stopped before its last epoch)",
            "run": str(run),
            "task": config.data.task,
            "base": config.base,
            "metric": primary_metric(config.data.task),
            "validation": best["validation"],
            "test": metrics if args.split == "test" else None,
            args.split: metrics,
            "parameters_added": task.num_parameters(),
            "percent_of_base": 100 * task.num_parameters() / backbone.num_parameters(),
            "best_epoch": state["best_epoch"],
            "epochs_run": state["epoch"],
            "steps_into_next_epoch": state["step_in_epoch"],
            "wall_seconds": round(state["train_seconds"] + seconds, 1),
            "train_seconds": round(state["train_seconds"], 1),
            "eval_seconds": round(seconds, 1),
            "train_tokens_per_second": round(
                state["tokens"] / max(state["train_seconds"], 1e-9), 1
            ),
            "processes": 1,
            "layer_weights": task.mixer.layer_weights(),
            "history": history,
        },
    )
    print(json.dumps({k: v for k, v in metrics.items() if k != "confusion_matrix"}), path)


if __name__ == "__main__":
    main()
