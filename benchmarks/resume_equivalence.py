"""Does a run cut mid-epoch and resumed equal the run that was not cut?

Trains a config twice into ``runs/resume-equivalence/``: once straight, once stopped after
``--stop-after`` optimiser steps (the flag a SIGINT sets, checked between steps, so the cut is
exactly there) and resumed with ``--resume``. Compares every epoch's history record (loss,
validation metrics, layer weights), the test metrics and the kept head's weights, and writes
``benchmarks/results/resume_equivalence.json``.

    python benchmarks/resume_equivalence.py configs/minilm-cola.yaml \\
        --data-dir ../shared/datasets --set data.sample=3000 --set train.epochs=3 \\
        --set train.checkpoint_every=10 --set train.early_stopping=0 --stop-after 40
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from _common import write_result

from adalayers.core.task import Task
from adalayers.training import train as train_module
from adalayers.training.config import load_config


class _StopAfter(dict):
    """The signal flag of :func:`adalayers.training.train._stop_on_signals`, set after ``n``
    checks."""

    def __init__(self, n: int) -> None:
        super().__init__(stop=False)
        self.n = n

    def __getitem__(self, key: str) -> bool:
        self.n -= 1
        return self.n < 0


def _history(run: Path) -> list[dict]:
    lines = (run / "history.jsonl").read_text().split("\n")
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--data-dir")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--stop-after", type=int, default=40)
    parser.add_argument("--output-dir", default="runs/resume-equivalence")
    parser.add_argument("--name", default="resume_equivalence")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides, data_dir=args.data_dir)
    out = Path(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)

    start = time.perf_counter()
    straight = train_module.fit(config, out / "straight", quiet=True)
    straight_seconds = time.perf_counter() - start

    @contextmanager
    def stop_after():
        yield _StopAfter(args.stop_after)

    original = train_module._stop_on_signals
    train_module._stop_on_signals = stop_after
    try:
        train_module.fit(config, out / "cut", quiet=True)
        raise SystemExit(f"the run finished before step {args.stop_after}: nothing was cut")
    except train_module.TrainingInterrupted as err:
        cut_at = json.loads((out / "cut" / "checkpoint" / "trainer_state.json").read_text())
        print(f"cut: {err}")
    finally:
        train_module._stop_on_signals = original
    resumed = train_module.fit(config, out / "cut", resume=True, quiet=True)

    a, b = _history(out / "straight"), _history(out / "cut")
    weights_a = Task.from_pretrained(out / "straight" / "model").state_dict()
    weights_b = Task.from_pretrained(out / "cut" / "model").state_dict()
    max_diff = max(float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a)
    result = {
        "question": "does a run cut mid-epoch and resumed equal the run that was not cut?",
        "config": args.config,
        "overrides": args.overrides,
        "cut_at": {"epoch": cut_at["epoch"], "step_in_epoch": cut_at["step_in_epoch"]},
        "epochs": len(a),
        "history_identical": a == b,
        "epochs_differing": [x["epoch"] for x, y in zip(a, b) if x != y],
        "test_straight": straight["test"],
        "test_resumed": resumed["test"],
        "test_identical": straight["test"] == resumed["test"],
        "kept_head_max_abs_diff": max_diff,
        "straight_seconds": round(straight_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    path = write_result(args.name, result)
    print(json.dumps({k: result[k] for k in ("cut_at", "history_identical", "test_identical")}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
