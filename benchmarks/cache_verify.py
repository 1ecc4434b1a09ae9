"""How long opening a feature store takes: reading every checksum vs the check of unchanged files.

    python benchmarks/cache_verify.py FOLDER [FOLDER ...] [--name NAME]

A ``FOLDER`` is a store, ``<cache.dir>/<key>`` (it holds ``meta.json`` and its split's folder),
or a whole ``cache.dir``, whose stores are all taken. For every shard, in one run: first the full
check (every checksum read, as the first open after a build does, or ``adalayers cache
--verify``), then the check that ``adalayers`` makes on every later open
(:meth:`adalayers.training.cache._Shard.verify`: files unchanged since their checksums passed
are not
read). Writes ``benchmarks/results/cache_verify[-NAME].json`` with the bytes and seconds of each;
a store larger than RAM is read from disk by the full check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from adalayers.training.cache import _Shard  # noqa: E402


def time_shard(shard: _Shard) -> dict:
    index = np.load(shard.folder / "index.npy")
    rows = int(index[:, 2].sum()) if len(index) else 0
    size = sum(path.stat().st_size for path, _ in shard.files().values())
    start = time.perf_counter()
    read_full = shard.verify(rows, full=True)
    full = time.perf_counter() - start
    start = time.perf_counter()
    read_again = shard.verify(rows)
    check = time.perf_counter() - start
    return {
        "shard": f"{shard.folder.parent.name}/{shard.folder.name}",
        "examples": len(index),
        "tokens": rows,
        "bytes": size,
        "full_check_seconds": round(full, 3),
        "full_check_read_files": read_full,
        "later_open_seconds": round(check, 6),
        "later_open_read_files": read_again,
        "mib_per_second_full": round(size / 2**20 / full, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folders", nargs="+", type=Path, help="<cache.dir>/<key> (holds meta.json) or cache.dir"
    )
    parser.add_argument("--name", default="", help="suffix of the results file")
    args = parser.parse_args()
    stores = []
    for folder in args.folders:
        found = (
            [folder]
            if (folder / "meta.json").is_file()
            else sorted(p.parent for p in folder.glob("*/meta.json"))
        )
        if not found:
            sys.exit(f"{folder}: no meta.json in it or its subfolders; give a store or cache.dir")
        stores += found
    metas = [json.loads((store / "meta.json").read_text()) for store in stores]
    shards = []
    for store, meta in zip(stores, metas):
        for folder in sorted(store.glob("*/shard-*")):
            if not (folder / "COMPLETE").is_file():
                sys.exit(f"{folder} is not finished (no COMPLETE): build it first")
            shard = _Shard(folder, meta["layers"], meta["hidden_size"], meta["dtype"])
            shards.append(time_shard(shard))
            print(json.dumps(shards[-1]))
    meta = metas[0]
    total = {
        key: round(sum(s[key] for s in shards), 6)
        for key in ("bytes", "full_check_seconds", "later_open_seconds")
    }
    suffix = f"-{args.name}" if args.name else ""
    path = write_result(
        f"cache_verify{suffix}",
        {
            "benchmark": "cache_verify",
            "stores": [str(store) for store in stores],
            "base": meta["base"],
            "layers": meta["layers"],
            "dtype": meta["dtype"],
            "shards": shards,
            "total": total,
        },
    )
    print(json.dumps(total), f"-> {path}", sep="\n")


if __name__ == "__main__":
    main()
