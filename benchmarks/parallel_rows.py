"""Wall time of one comparison trained one row at a time against ``--jobs N``, in one run.

    python benchmarks/parallel_rows.py [configs/minilm-cola.yaml] [--jobs 2] \
        [--baselines mixer,sweep,last,uniform,scalar_mix] [--data-dir ../shared/datasets] \
        [--name cola] [--set key=value ...]

Builds the config's feature store of every hidden state first (``adalayers cache``, untimed),
then runs ``adalayers compare`` on it twice into fresh folders: ``--jobs 1`` (one process with
every torch thread) and ``--jobs N``, alternating which goes first when ``--repeats`` is above
1. Both read the same store, so the times are training and evaluation only. Writes
``benchmarks/results/parallel_rows-<name>.json``: each call's wall time, their ratio, and each
row's metrics in both calls (the thread count changes float rounding, so they may differ in the
last digits).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_offline, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/minilm-cola.yaml")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--baselines", default="mixer,sweep,last,uniform,scalar_mix")
    parser.add_argument(
        "--data-dir", default=os.environ.get("ADALAYERS_DATA_DIR", "../shared/datasets")
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cache-dir", help="the feature store's folder (default: a temp one)")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of calls")
    parser.add_argument("--name", help="results name suffix (default: the config's name)")
    args = parser.parse_args()
    if args.jobs < 2:
        sys.exit("--jobs must be at least 2 (it is compared against --jobs 1)")
    name = args.name or Path(args.config).stem
    with tempfile.TemporaryDirectory(dir=".", prefix=".parallel_rows-") as tmp:
        cache_dir = args.cache_dir or str(Path(tmp) / "cache")
        common = ["--config", args.config, "--data-dir", args.data_dir]
        common += [x for item in args.set for x in ("--set", item)]
        common += ["--set", "train.cache=true", "--set", f"cache.dir={cache_dir}"]
        adalayers = [sys.executable, "-m", "adalayers.cli"]
        code, build = run_offline([*adalayers, "cache", *common, "--set", "cache.all_layers=true"])
        if code != 0:
            sys.exit(f"adalayers cache failed with exit code {code}")
        calls = []
        for repeat in range(args.repeats):
            order = (1, args.jobs) if repeat % 2 == 0 else (args.jobs, 1)
            for jobs in order:
                out = Path(tmp) / f"jobs{jobs}-{repeat}"
                cmd = [*adalayers, "compare", *common, "--baselines", args.baselines]
                cmd += ["--output-dir", str(out), "--jobs", str(jobs), "--quiet"]
                code, wall = run_offline(cmd)
                if code != 0:
                    sys.exit(f"adalayers compare --jobs {jobs} failed with exit code {code}")
                comparison = json.loads((out / "comparison.json").read_text())
                metric = comparison["metric"]
                calls.append(
                    {
                        "jobs": jobs,
                        "repeat": repeat,
                        "wall_seconds": round(wall, 1),
                        "rows": {
                            row: {
                                "validation": values["validation"][metric],
                                "test": values["test"][metric],
                                "train_seconds": values["train_seconds"],
                            }
                            for row, values in comparison["rows"].items()
                        },
                    }
                )
                shutil.rmtree(out)
                print(f"--jobs {jobs}: {wall:.1f} s", flush=True)
    one = [c["wall_seconds"] for c in calls if c["jobs"] == 1]
    many = [c["wall_seconds"] for c in calls if c["jobs"] == args.jobs]
    first = {c["jobs"]: c["rows"] for c in calls if c["repeat"] == 0}
    differences = {
        row: {
            split: round(first[args.jobs][row][split] - values[split], 6)
            for split in ("validation", "test")
        }
        for row, values in first[1].items()
    }
    path = write_result(
        f"parallel_rows-{name}",
        {
            "benchmark": "parallel_rows",
            "config": args.config,
            "baselines": args.baselines,
            "overrides": args.set,
            "metric": metric,
            "jobs": args.jobs,
            "cache_build_seconds": round(build, 1),
            "calls": calls,
            "wall_seconds_jobs1": one,
            f"wall_seconds_jobs{args.jobs}": many,
            "speedup": round(sum(one) / sum(many), 2),
            "metric_difference_jobsN_minus_jobs1": differences,
        },
    )
    print(f"-> {path}: {sum(one) / sum(many):.2f}x with --jobs {args.jobs}")


if __name__ == "__main__":
    main()
