"""Cost of side tasks on one base forward (embedded MiniLM, CPU), as ratios measured in one run.

Variants, each one call on the same batch (B x T random token ids), timed in interleaved rounds
(the order shuffled every round, so drift and noise from other processes hit every variant
alike); each figure is the median over rounds of a ratio taken *within* a round:

* ``bare``: the base's own forward.
* ``tasks_1`` / ``tasks_4``: one forward returning the base's output plus 1 / 4 tasks
  (sequence classification, k = 64, every state tapped).
* ``separate_4``: 4 separately fine-tuned copies of the base = 4 base forwards, each with one
  task (the same work a copy with its own head does).
* ``lower_full`` / ``lower_early``: 4 tasks reading only states 0..3 (the lower half of the 6
  blocks), with the base's output (every block runs) and without it (the base stops after
  block 3).
* ``work_1`` / ``work_4``: only the tasks' own work (the same taps and heads, fed the stored
  hidden states, no base forward): a second estimate of the overhead that does not subtract
  two noisy base forwards (the base's own time varies by a few % between calls on a shared
  machine, as much as the effect measured).

    python benchmarks/runtime_overhead.py [--batch 16 --length 128 --rounds 15 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

VARIANTS = (
    "bare",
    "tasks_1",
    "tasks_4",
    "separate_4",
    "lower_full",
    "lower_early",
    "work_1",
    "work_4",
)


def build(batch: int, length: int, dim: int):
    from adalayers.core.backbone import load_backbone
    from adalayers.core.multitask import AdaLayers
    from adalayers.core.taps import stream_taps
    from adalayers.core.task import Task, TaskConfig

    torch.manual_seed(0)
    backbone = load_backbone("all-MiniLM-L6-v2")

    def tasks(n: int, layers: list[int] | None = None) -> dict[str, Task]:
        return {
            f"task{i}": Task(
                TaskConfig(
                    "sequence_classification",
                    ["a", "b", "c"],
                    mixer={"dim": dim, "layers": layers},
                    head={"num_heads": 8},
                ),
                backbone.info(),
            )
            for i in range(n)
        }

    one, four = AdaLayers(backbone, tasks(1)).eval(), AdaLayers(backbone, tasks(4)).eval()
    copies = [AdaLayers(backbone, tasks(1)).eval() for _ in range(4)]
    lower = AdaLayers(backbone, tasks(4, layers=[0, 1, 2, 3])).eval()
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
        "tasks_1": lambda: one(inputs, return_base_output=True),
        "tasks_4": lambda: four(inputs, return_base_output=True),
        "separate_4": lambda: [c(inputs, return_base_output=True) for c in copies],
        "lower_full": lambda: lower(inputs, return_base_output=True),
        "lower_early": lambda: lower(inputs),
        "work_1": lambda: work(one),
        "work_4": lambda: work(four),
    }
    # the outputs are right: the base's output is bit-identical with tasks attached
    with torch.inference_mode():
        same = torch.equal(
            calls["bare"]().last_hidden_state, calls["tasks_4"]().base_output.last_hidden_state
        )
    return calls, backbone, four, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import interleaved_rounds, write_result

    calls, backbone, four, same = build(args.batch, args.length, args.dim)
    times, cpu = interleaved_rounds(calls, VARIANTS, args.rounds, args.warmup)

    # With one torch thread every op runs in this thread, so its CPU time is the work done,
    # unaffected by time the scheduler gives to other processes on a shared machine: the
    # primary measure then. With more threads only wall time is meaningful.
    primary = cpu if torch.get_num_threads() == 1 else times

    def ratio(a: str, b: str, source: dict[str, list[float]] = primary) -> float:
        return statistics.median(x / y for x, y in zip(source[a], source[b]))

    def figures(source: dict[str, list[float]]) -> dict[str, float]:
        over_1 = ratio("tasks_1", "bare", source) - 1
        over_4 = ratio("tasks_4", "bare", source) - 1
        return {
            "overhead_1_task": over_1,
            "overhead_4_tasks": over_4,
            "overhead_per_task_with_1": over_1,
            "overhead_per_task_with_4": over_4 / 4,
            "throughput_4_tasks_one_forward_vs_4_copies": ratio("separate_4", "tasks_4", source),
            "early_stop_speedup_lower_half": ratio("lower_full", "lower_early", source),
            "early_stop_vs_bare_forward": ratio("bare", "lower_early", source),
            "tasks_work_alone_1_task": ratio("work_1", "bare", source),
            "tasks_work_alone_per_task_with_4": ratio("work_4", "bare", source) / 4,
        }

    main_figures = figures(primary)
    over_1 = main_figures["overhead_per_task_with_1"]
    over_4 = main_figures["overhead_4_tasks"]
    d, k, layers = backbone.hidden_size, args.dim, backbone.num_blocks
    result = {
        "benchmark": "runtime_overhead",
        "base": f"all-MiniLM-L6-v2 ({layers} blocks, {backbone.num_states} states, d={d})",
        "batch": args.batch,
        "length": args.length,
        "dim": k,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "measure": "thread CPU time" if primary is cpu else "wall time",
        "task": "sequence_classification, every state tapped, SequenceHead with 8 heads",
        "parameters_per_task": next(iter(four.tasks.values())).num_parameters(),
        "base_output_bit_identical_with_4_tasks": same,
        **main_figures,
        "target_overhead_per_task": 0.03,
        "compute_floor_per_task_k_over_12d": k / (12 * d),
        "target_throughput_ratio": 3.6,
        "wall_time_figures": figures(times),
        "seconds_median": {v: statistics.median(t) for v, t in times.items()},
        "cpu_seconds_median": {v: statistics.median(t) for v, t in cpu.items()},
        "seconds_per_round": times,
        "cpu_seconds_per_round": cpu,
    }
    path = write_result("runtime_overhead", result)
    ms = {v: 1000 * s for v, s in result["seconds_median"].items()}
    cpu_ms = {v: 1000 * s for v, s in result["cpu_seconds_median"].items()}
    print(
        f"MiniLM, batch {args.batch} x {args.length}, k={k}, {result['threads']} thread(s), "
        f"{args.rounds} interleaved rounds (median):"
    )
    for v in VARIANTS:
        print(f"  {v:12s} {ms[v]:8.1f} ms wall {cpu_ms[v]:8.1f} ms cpu")
    print(f"figures from {result['measure']} (median of per-round ratios):")
    print(
        f"overhead per task: {100 * over_1:.2f}% (1 task), {100 * over_4 / 4:.2f}% (4 tasks); "
        f"floor k/(12d) = {100 * k / (12 * d):.2f}%"
    )
    print(
        f"tasks' work alone, per task: {100 * result['tasks_work_alone_1_task']:.2f}% (1 task), "
        f"{100 * result['tasks_work_alone_per_task_with_4']:.2f}% (4 tasks)"
    )
    print(
        "4 tasks, one forward vs 4 copies: "
        f"{result['throughput_4_tasks_one_forward_vs_4_copies']:.2f}x"
    )
    print(
        f"early stop (lower half, no base output): {result['early_stop_speedup_lower_half']:.2f}x "
        f"vs the full forward with the same tasks"
    )
    print(f"base output bit-identical with 4 tasks: {same}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
