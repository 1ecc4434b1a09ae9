"""Print the BENCHMARKS.md task table from benchmarks/results/task_*.json.

python benchmarks/tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = {"imdb": "96.1 acc", "cola": "83.6 acc", "conll2003": "89.4 F1"}


def fmt(value: float | None, scale: float = 100.0) -> str:
    return "–" if value is None else f"{value * scale:.1f}"


def main() -> None:
    rows = [
        "| task (split) | result on MiniLM | reference (RoBERTa-large) | parameters added "
        "| train wall time | run wall time | train tokens/s | processes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted(RESULTS.glob("task_*.json")):
        r = json.loads(path.read_text())
        test, task = r.get("test") or {}, r["task"]
        if task == "cola":
            result = (
                f"acc {fmt(test.get('accuracy'))}, MCC {fmt(test.get('mcc'))} "
                f"(GLUE dev, {test.get('examples')})"
            )
        elif task == "conll2003":
            result = (
                f"F1 {fmt(test.get('f1'))} (P {fmt(test.get('precision'))}, "
                f"R {fmt(test.get('recall'))}; test, {test.get('examples')})"
            )
        else:
            result = f"acc {fmt(test.get('accuracy'))} (test, {test.get('examples')})"
        rows.append(
            f"| {task} [{path.stem.removeprefix('task_')}] | {result} | {REFERENCE.get(task, '–')} "
            f"| {r['parameters_added']:,} ({r['percent_of_base']:.2f}%) "
            f"| {r['train_seconds'] / 60:.1f} min | {r['wall_seconds'] / 60:.1f} min "
            f"| {r['train_tokens_per_second']:,.0f} | {r.get('processes', 1)} |"
        )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
