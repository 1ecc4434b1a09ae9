"""Per-epoch training time online vs from the feature cache, measured in one run.

    python benchmarks/cache_speed.py [--data-dir ../shared/datasets] [--tasks cola conll2003]

For each task: one epoch online (the base runs every batch), then building the cache (one pass
of the base over train and validation), then one epoch from the cache, with the same config and
seed. The epoch time is the training loop only (``train_seconds``); validation is timed apart.
Writes ``benchmarks/results/cache_speed.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from adalayers.training.config import load_config  # noqa: E402
from adalayers.training.train import build_cache, fit  # noqa: E402

CONFIGS = {"cola": "configs/minilm-cola.yaml", "conll2003": "configs/minilm-conll2003.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("ADALAYERS_DATA_DIR", "../shared/datasets")
    )
    parser.add_argument("--tasks", nargs="+", default=list(CONFIGS))
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--cache-dir", help="reuse stores from here (default: a fresh temp folder)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for name in args.tasks:
            overrides = ["train.epochs=1", "train.early_stopping=0"]
            online = fit(
                load_config(CONFIGS[name], overrides, args.data_dir),
                Path(tmp) / f"{name}-online",
                quiet=True,
            )
            cache_overrides = [
                *overrides,
                "train.cache=true",
                f"cache.dir={args.cache_dir or tmp + '/cache'}",
                f"cache.dtype={args.dtype}",
            ]
            start = time.perf_counter()
            summary = build_cache(
                load_config(CONFIGS[name], cache_overrides, args.data_dir), quiet=True
            )
            build_seconds = time.perf_counter() - start
            cached = fit(
                load_config(CONFIGS[name], cache_overrides, args.data_dir),
                Path(tmp) / f"{name}-cached",
                quiet=True,
            )
            results[name] = {
                "online_epoch_seconds": online["train_seconds"],
                "cached_epoch_seconds": cached["train_seconds"],
                "speedup": online["train_seconds"] / cached["train_seconds"],
                "cache_build_seconds": round(build_seconds, 1),
                "cache_bytes": sum(s["bytes"] for s in summary["splits"].values()),
                "cache_layers": summary["layers"],
                "cache_dtype": args.dtype,
                "online_validation": online["validation"],
                "cached_validation": cached["validation"],
            }
            print(
                f"{name}: online epoch {online['train_seconds']:.1f}s, cached epoch "
                f"{cached['train_seconds']:.1f}s ({results[name]['speedup']:.1f}x), cache "
                f"{results[name]['cache_bytes'] / 2**20:.0f} MiB built in {build_seconds:.0f}s"
            )
    print(write_result("cache_speed", {"benchmark": "cache_speed", "results": results}))


if __name__ == "__main__":
    main()
