"""Inference cost of ``mixer.mode: dynamic`` against the static mixer (embedded MiniLM, CPU).

Variants, each one call on the same batch (B x T random token ids), timed in interleaved rounds
(the order shuffled every round, so drift and noise from other processes hit every variant
alike); each figure is the median over rounds of a ratio taken *within* a round:

* ``bare``: the base's own forward (every block, no task).
* ``static_1`` / ``dynamic_1``: one sequence-classification task (k = 64, every state tapped),
  static or dynamic mixer, streamed on one forward (the base's output not asked for).
* ``static_4`` / ``dynamic_4``: four such tasks on one forward.
* ``work_static`` / ``work_dynamic``: the taps and the head of one task on stored states, no
  base forward: the mixers' own cost, apart from the base's.

The dynamic tasks are the static ones with a random query ``q`` (same ``W_i``, ``p``, head), so
their per-token weights are far from the static mix. Also records max |streaming - stacked| of
the dynamic tasks' logits on this batch.

    python benchmarks/dynamic_mixer.py [--batch 32 --length 128 --rounds 15 --threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

MODES = {"static": "adalayers", "dynamic": "dynamic"}
VARIANTS = (
    "bare",
    "static_1",
    "dynamic_1",
    "static_4",
    "dynamic_4",
    "work_static",
    "work_dynamic",
)


def build(batch: int, length: int, dim: int, heads: int = 1):
    from adalayers.core.backbone import load_backbone
    from adalayers.core.multitask import AdaLayers
    from adalayers.core.taps import stream_taps
    from adalayers.core.task import Task, TaskConfig

    torch.manual_seed(0)
    backbone = load_backbone("all-MiniLM-L6-v2")

    def tasks(n: int, mode: str) -> dict[str, Task]:
        out = {}
        for i in range(n):
            torch.manual_seed(i)
            task = Task(
                TaskConfig(
                    "sequence_classification",
                    ["a", "b", "c"],
                    mixer={"dim": dim, "alpha": 4.0, "mode": MODES[mode], "heads": heads},
                    head={"num_heads": 8},
                ),
                backbone.info(),
            )
            torch.nn.init.normal_(task.mixer.p, std=0.3)
            if mode == "dynamic":
                torch.nn.init.normal_(task.mixer.query, std=0.3)
            out[f"task{i}"] = task
        return out

    runtimes = {
        f"{mode}_{n}": AdaLayers(backbone, tasks(n, mode)).eval()
        for mode in ("static", "dynamic")
        for n in (1, 4)
    }
    ids = torch.randint(1000, 20000, (batch, length))  # (B, T)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        states = backbone.hidden_states(inputs)

    def work(runtime: AdaLayers) -> dict[str, torch.Tensor]:
        """The taps and heads of ``runtime`` on stored states: the tasks' work alone."""
        buffers: dict[str, torch.Tensor | None] = dict.fromkeys(runtime.tasks)
        mixers = {name: task.mixer for name, task in runtime.tasks.items()}
        for index, taps in stream_taps(mixers, buffers).items():
            for tap in taps:
                tap(index, states[index])
        mask = inputs["attention_mask"]
        return {
            name: task.head(task.mixer.finish(buffers[name]), mask)
            for name, task in runtime.tasks.items()
        }

    calls = {
        "bare": lambda: backbone(inputs),
        **{name: (lambda r=runtime: r(inputs)) for name, runtime in runtimes.items()},
        "work_static": lambda: work(runtimes["static_1"]),
        "work_dynamic": lambda: work(runtimes["dynamic_1"]),
    }
    with torch.inference_mode():
        dynamic = runtimes["dynamic_4"]
        streamed, stacked = dynamic(inputs).logits, dynamic(inputs, stream=False).logits
        diff = max((streamed[k] - stacked[k]).abs().max().item() for k in streamed)
    return calls, backbone, runtimes["dynamic_1"], diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--heads", type=int, default=1, help="the dynamic mixer's mixer.heads")
    parser.add_argument(
        "--name", default=None, help="results file (default dynamic_mixer[-heads<h>])"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import interleaved_rounds, write_result

    calls, backbone, dynamic, diff = build(args.batch, args.length, args.dim, args.heads)
    times, cpu = interleaved_rounds(calls, VARIANTS, args.rounds, args.warmup)

    # With one torch thread every op runs in this thread, so its CPU time is the work done,
    # whatever time the scheduler gives other processes on a shared machine; with more threads
    # only the wall time counts them all.
    one_thread = torch.get_num_threads() == 1
    measure = cpu if one_thread else times

    def ratio(a: str, b: str, series: dict[str, list[float]] = measure) -> float:
        return statistics.median(x / y for x, y in zip(series[a], series[b]))

    def over_bare(a: str, b: str, series: dict[str, list[float]] = measure) -> float:
        """(a - bare) / (b - bare) per round: the extra cost of the dynamic tasks over that of
        the static ones."""
        return statistics.median(
            (x - z) / (y - z) for x, y, z in zip(series[a], series[b], series["bare"])
        )

    def figures(series: dict[str, list[float]]) -> dict[str, float]:
        return {
            "forward_1_task": round(ratio("dynamic_1", "static_1", series), 4),
            "forward_4_tasks": round(ratio("dynamic_4", "static_4", series), 4),
            "tasks_overhead_1_task": round(over_bare("dynamic_1", "static_1", series), 3),
            "tasks_overhead_4_tasks": round(over_bare("dynamic_4", "static_4", series), 3),
            "work_alone": round(ratio("work_dynamic", "work_static", series), 3),
        }

    result = {
        "benchmark": "dynamic_mixer",
        "base": f"all-MiniLM-L6-v2 ({backbone.num_blocks} blocks, {backbone.num_states} states, "
        f"d={backbone.hidden_size})",
        "batch": args.batch,
        "length": args.length,
        "dim": args.dim,
        "heads": args.heads,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "measure": "thread CPU time" if one_thread else "wall time",
        "task": "sequence_classification, every state tapped, SequenceHead with 8 heads",
        "parameters_per_task": {
            "static": dynamic.parameters_added()["task0"]["parameters"] - args.dim * args.heads,
            "dynamic": dynamic.parameters_added()["task0"]["parameters"],
        },
        "dynamic_over_static": figures(measure),
        "dynamic_over_static_wall": figures(times),
        "seconds_median": {v: round(statistics.median(measure[v]), 4) for v in VARIANTS},
        "target_ratio": 1.5,
        "max_abs_diff_streaming_vs_stacked_dynamic_4": diff,
    }
    for key, value in result["dynamic_over_static"].items():
        print(f"{key:24s} {value:.3f}")
    name = args.name or ("dynamic_mixer" if args.heads == 1 else f"dynamic_mixer-heads{args.heads}")
    print(write_result(name, result))


if __name__ == "__main__":
    main()
