"""``train.mixed_precision: bf16`` against float32 on CoLA × MiniLM: per-epoch time online and
from the feature cache, and whether the metrics stay within the seed spread.

    python benchmarks/mixed_precision.py [--data-dir ../shared/datasets] [--rounds 2]
        [--seeds 0 1 2] [--config configs/minilm-cola.yaml]

1. Online: ``--rounds`` rounds of one epoch each way (float32, then bf16: the base, the mixer
   and the head under Accelerate's autocast), same config and seed; the epoch time is the
   training loop only (``train_seconds``).
2. From the cache: the store is built once (float16), then the config's full training (its
   epochs, early stopping) for each seed, each way; per-epoch time = ``train_seconds`` /
   epochs run. The test metric over the seeds gives the seed spread the bf16 runs are read
   against.

Writes ``benchmarks/results/mixed_precision.json``; the machine's CPU and whether it has bfloat16
instructions (AVX-512 BF16 or AMX) are recorded: without them torch emulates bfloat16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from adalayers.training.build import cpu_has_bf16  # noqa: E402
from adalayers.training.config import load_config  # noqa: E402
from adalayers.training.train import build_cache, fit  # noqa: E402

PRECISIONS = ("no", "bf16")


def _run(config: str, overrides: list[str], data_dir: str, folder: Path) -> dict:
    results = fit(load_config(config, overrides, data_dir), folder, quiet=True)
    metric = results["metric"]
    return {
        "train_seconds": results["train_seconds"],
        "epochs_run": results["epochs_run"],
        "epoch_seconds": round(results["train_seconds"] / max(results["epochs_run"], 1), 3),
        "validation": results["validation"][metric],
        "test": results["test"][metric],
        "metric": metric,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("ADALAYERS_DATA_DIR", "../shared/datasets")
    )
    parser.add_argument("--config", default="configs/minilm-cola.yaml")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache-dir", help="reuse stores from here (default: a fresh temp folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    online: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    cached: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        one_epoch = [*args.set, "train.epochs=1", "train.early_stopping=0"]
        for r in range(args.rounds):
            for p in PRECISIONS:
                folder = Path(tmp) / f"online-{p}-{r}"
                x = _run(
                    args.config, [*one_epoch, f"train.mixed_precision={p}"], args.data_dir, folder
                )
                online[p].append(x)
                print(f"online {p} round {r}: {x}", flush=True)
        cache = [
            *args.set,
            "train.cache=true",
            f"cache.dir={args.cache_dir or tmp + '/cache'}",
            "cache.dtype=float16",
        ]
        start = time.perf_counter()
        build_cache(load_config(args.config, cache, args.data_dir), quiet=True)
        build_seconds = time.perf_counter() - start
        for seed in args.seeds:
            for p in PRECISIONS:
                overrides = [*cache, f"train.seed={seed}", f"train.mixed_precision={p}"]
                x = _run(args.config, overrides, args.data_dir, Path(tmp) / f"cached-{p}-{seed}")
                cached[p].append({"seed": seed, **x})
                print(f"cached {p} seed {seed}: {x}", flush=True)

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    def spread(rows: list[dict], key: str) -> dict[str, float]:
        xs = [100 * row[key] for row in rows]
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return {"mean": round(statistics.mean(xs), 2), "sd": round(sd, 2), "n": len(xs)}

    summary = {
        "online_epoch_seconds": {p: median(online[p], "epoch_seconds") for p in PRECISIONS},
        "cached_epoch_seconds": {p: median(cached[p], "epoch_seconds") for p in PRECISIONS},
    }
    summary["online_speedup_bf16"] = round(
        summary["online_epoch_seconds"]["no"] / summary["online_epoch_seconds"]["bf16"], 3
    )
    summary["cached_speedup_bf16"] = round(
        summary["cached_epoch_seconds"]["no"] / summary["cached_epoch_seconds"]["bf16"], 3
    )
    summary["cache_ratio"] = {  # online epoch / cached epoch, each precision
        p: round(summary["online_epoch_seconds"][p] / summary["cached_epoch_seconds"][p], 2)
        for p in PRECISIONS
    }
    summary["cached_test"] = {p: spread(cached[p], "test") for p in PRECISIONS}
    summary["cached_validation"] = {p: spread(cached[p], "validation") for p in PRECISIONS}
    summary["online_validation"] = {p: spread(online[p], "validation") for p in PRECISIONS}
    fp32, bf16 = summary["cached_test"]["no"], summary["cached_test"]["bf16"]
    summary["test_mean_difference"] = round(bf16["mean"] - fp32["mean"], 2)
    summary["within_seed_spread"] = abs(summary["test_mean_difference"]) <= max(
        fp32["sd"], bf16["sd"]
    )
    result = {
        "benchmark": "mixed_precision",
        "config": args.config,
        "overrides": args.set,
        "task": "cola",
        "base": "all-MiniLM-L6-v2",
        "metric": cached["no"][0]["metric"],
        "rounds": args.rounds,
        "seeds": args.seeds,
        "cpu_has_bf16_instructions": cpu_has_bf16(),
        "cache_dtype": "float16",
        "cache_build_seconds": round(build_seconds, 1),
        "online": online,
        "cached": cached,
        "summary": summary,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_average_at_end": os.getloadavg(),
    }
    print(summary)
    print(write_result("mixed_precision", result))


if __name__ == "__main__":
    main()
