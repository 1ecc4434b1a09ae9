"""``train.mixed_precision: bf16`` against float32 on CoLA × MiniLM: the per-epoch speed online and
from the feature cache, and whether the metrics stay within the seed spread.

    python benchmarks/mixed_precision.py [--data-dir ../shared/datasets] [--threads 1]
        [--rounds 30] [--seeds 0 1 2] [--config configs/minilm-cola.yaml]

1. Speed, as in ``runtime_overhead.py``: one training step (forward, loss, backward, clipping,
   AdamW) of the config's task on real batches of the training split, four variants timed in
   interleaved rounds (the order shuffled every round; each round steps the same batch, the
   batches rotate): online (the base runs) and from the cache (the stored float16 states of the
   batch's tokens, the path ``train.cache`` trains on), each in float32 and under bf16 autocast
   (what Accelerate wraps around the model's forward for ``train.mixed_precision: bf16``). Each
   figure is the median over rounds of a ratio taken within a round, in thread CPU time with one
   torch thread (the work done, whatever other processes take of a shared machine); a
   per-epoch time is the median step times the epoch's steps.
2. Metrics: the config's full training from the cache (its epochs, early stopping) for each seed,
   each way, through ``fit``; the test metric over the seeds is the spread the bf16 runs are read
   against.

Writes ``benchmarks/results/mixed_precision.json`` (``--name`` for another file), with whether
the CPU has bfloat16 instructions (AVX-512 BF16 or AMX): without them torch emulates bfloat16.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import random
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from adalayers.core.backbone import load_backbone  # noqa: E402
from adalayers.training.batches import batch_loader, ensure_states, tokenize  # noqa: E402
from adalayers.training.build import (  # noqa: E402
    TaskModel,
    build_task,
    cpu_has_bf16,
    load_data,
    make_accelerator,
    max_tokens,
)
from adalayers.training.cache_prep import prepare_cache  # noqa: E402
from adalayers.training.config import load_config  # noqa: E402
from adalayers.training.train import build_cache, fit  # noqa: E402

PRECISIONS = ("no", "bf16")
VARIANTS = ("online_no", "online_bf16", "cached_no", "cached_bf16")


def step_times(config_path: str, overrides: list[str], data_dir: str, rounds: int, batches: int):
    """Thread CPU and wall seconds of one training step per variant and round."""
    config = load_config(config_path, overrides, data_dir)
    accelerator = make_accelerator(config)
    data = load_data(config)
    backbone = load_backbone(config.base, states=config.base_states, dtype=config.dtype)
    task = build_task(config, data, backbone)
    max_length = max_tokens(config, backbone)
    tokenized = {
        split: tokenize(data, split, backbone.tokenizer, task, max_length)
        for split in ("train", "validation")
    }
    config, task, stores = prepare_cache(
        config, accelerator, backbone, data, task, tokenized, max_length, False
    )
    pad = backbone.tokenizer.pad_token_id
    size = config.train.batch_size

    def take(store):
        loader = batch_loader(
            accelerator, tokenized["train"], size, pad, shuffle=True, seed=0, store=store, task=task
        )
        out = []
        for batch in islice(loader, batches):
            ensure_states(batch, store, task)
            out.append(batch)
        return out

    inputs = {"online": take(None), "cached": take(stores["train"])}
    steps = {}
    for variant in VARIANTS:
        where, precision = variant.split("_")
        own = copy.deepcopy(task).train()
        model = TaskModel(backbone, own)
        optimizer = torch.optim.AdamW(own.parameters(), lr=config.train.lr)
        steps[variant] = (model, own, optimizer, inputs[where], precision)

    def step(variant: str, j: int) -> None:
        model, own, optimizer, batches_, precision = steps[variant]
        batch = batches_[j % len(batches_)]
        features = {k: v for k, v in batch.items() if k not in ("index", "labels")}
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            logits = model(**features)
        loss = own.loss(logits.float(), batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(own.parameters(), config.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad()

    cpu = {v: [] for v in VARIANTS}
    wall = {v: [] for v in VARIANTS}
    rng = random.Random(0)
    for v in VARIANTS:  # warm-up
        step(v, 0)
    for r in range(rounds):
        order = list(VARIANTS)
        rng.shuffle(order)
        for v in order:
            start, start_cpu = time.perf_counter(), time.thread_time()
            step(v, r)
            wall[v].append(time.perf_counter() - start)
            cpu[v].append(time.thread_time() - start_cpu)
    steps_per_epoch = math.ceil(len(tokenized["train"]) / size)
    return cpu, wall, steps_per_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("ADALAYERS_DATA_DIR", "../shared/datasets")
    )
    parser.add_argument("--config", default="configs/minilm-cola.yaml")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batches", type=int, default=8, help="batches the steps rotate over")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache-dir", help="reuse stores from here (default: a fresh temp folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--name",
        default="mixed_precision",
        help="results file benchmarks/results/NAME.json (a second run keeps the first's file)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = load_config(args.config, args.set, args.data_dir)
    started = time.perf_counter()
    fits: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        cache = [
            *args.set,
            "train.cache=true",
            f"cache.dir={args.cache_dir or tmp + '/cache'}",
            "cache.dtype=float16",
            "cache.splits=[train,validation,test]",
        ]
        start = time.perf_counter()
        build_cache(load_config(args.config, cache, args.data_dir), quiet=True)
        build_seconds = time.perf_counter() - start
        cpu, wall, steps_per_epoch = step_times(
            args.config, cache, args.data_dir, args.rounds, args.batches
        )
        print({v: statistics.median(x) for v, x in cpu.items()}, flush=True)
        for seed in args.seeds:
            for p in PRECISIONS:
                overrides = [*cache, f"train.seed={seed}", f"train.mixed_precision={p}"]
                config = load_config(args.config, overrides, args.data_dir)
                results = fit(config, Path(tmp) / f"cached-{p}-{seed}", quiet=True)
                metric = results["metric"]
                fits[p].append(
                    {
                        "seed": seed,
                        "metric": metric,
                        "validation": results["validation"][metric],
                        "test": results["test"][metric],
                        "epochs_run": results["epochs_run"],
                        "train_seconds": results["train_seconds"],
                    }
                )
                print(f"fit {p} seed {seed}: {fits[p][-1]}", flush=True)

    def ratio(a: str, b: str, series: dict[str, list[float]]) -> float:
        return round(statistics.median(x / y for x, y in zip(series[a], series[b])), 3)

    def spread(rows: list[dict], key: str) -> dict[str, float]:
        xs = [100 * row[key] for row in rows]
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return {"mean": round(statistics.mean(xs), 2), "sd": round(sd, 2), "n": len(xs)}

    step_seconds = {v: round(statistics.median(x), 5) for v, x in cpu.items()}
    summary = {
        "step_seconds": step_seconds,
        "epoch_seconds": {v: round(s * steps_per_epoch, 2) for v, s in step_seconds.items()},
        "online_speedup_bf16": ratio("online_no", "online_bf16", cpu),
        "cached_speedup_bf16": ratio("cached_no", "cached_bf16", cpu),
        "cache_ratio": {p: ratio(f"online_{p}", f"cached_{p}", cpu) for p in PRECISIONS},
        "wall": {
            "online_speedup_bf16": ratio("online_no", "online_bf16", wall),
            "cached_speedup_bf16": ratio("cached_no", "cached_bf16", wall),
            "cache_ratio": {p: ratio(f"online_{p}", f"cached_{p}", wall) for p in PRECISIONS},
        },
        "test": {p: spread(fits[p], "test") for p in PRECISIONS},
        "validation": {p: spread(fits[p], "validation") for p in PRECISIONS},
    }
    fp32, bf16 = summary["test"]["no"], summary["test"]["bf16"]
    summary["test_mean_difference"] = round(bf16["mean"] - fp32["mean"], 2)
    # read against the float32 seeds' spread: the reference the bf16 runs should stay within
    summary["within_float32_seed_sd"] = abs(summary["test_mean_difference"]) <= fp32["sd"]
    result = {
        "benchmark": "mixed_precision",
        "config": args.config,
        "overrides": args.set,
        "task": reference.data.task,
        "base": reference.base,
        "metric": fits["no"][0]["metric"],
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "batches": args.batches,
        "steps_per_epoch": steps_per_epoch,
        "measure": "thread CPU time",
        "seeds": args.seeds,
        "cpu_has_bf16_instructions": cpu_has_bf16(),
        "cache_dtype": "float16",
        "cache_build_seconds": round(build_seconds, 1),
        "fits": fits,
        "summary": summary,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_average_at_end": os.getloadavg(),
    }
    print(summary)
    print(write_result(args.name, result))


if __name__ == "__main__":
    main()
