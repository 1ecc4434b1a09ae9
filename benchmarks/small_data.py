"""Small training sets as a user brings them: the size-chosen settings against a linear probe.

For each shipped set (CoLA, IMDB at 128 tokens, CoNLL-2003), training size ``n`` and seed, a
seeded random ``n`` training examples and 500 validation examples are written as user files
(CSV; CoNLL for the entities), with a fixed test set (CoLA: GLUE dev, 1,043; IMDB: a fixed
random 2,000 of the official test; CoNLL-2003: its test, 3,453 sentences). The config names
only the base, the files, ``max_length`` (IMDB: 128) and, for CoLA, MCC as the metric: every
training setting is the library's choice for that size
(:mod:`adalayers.training.size_defaults`). ``adalayers train`` then trains on the embedded
MiniLM; at its end the run fits the probe (a logistic regression on one cached state, chosen
on validation) and scores it on test, so both figures come from one run on the same files.

``--plain`` trains with ``train.size_defaults=false`` instead (the plain defaults), for the
"before" row.

    python benchmarks/small_data.py [--sets cola,imdb,conll] [--sizes 1000,3000] \
        [--seeds 0,1,2] [--plain] [--tag T] [--set KEY=VALUE ...]

Writes ``benchmarks/results/small_data[-T].json`` (every run's head and probe scores, the
settings chosen, and the means by set and size); finished runs are reused when repeated.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_offline, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {"cola": "cola", "imdb": "imdb", "conll": "conll2003"}
VALIDATION = 500
IMDB_TEST = 2000


def _load(name: str, data_dir: str):
    from adalayers.training.build import load_data
    from adalayers.training.config import load_config

    return load_data(load_config(None, [f"data.task={SHIPPED[name]}"], data_dir))


def _pick(ds, n: int, seed: int) -> list[dict]:
    rows = list(range(len(ds)))
    if n < len(rows):
        rows = sorted(random.Random(seed).sample(rows, n))
    return [ds[i] for i in rows]


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for row in rows:
            writer.writerow([row["text"], row["label"]])
    tmp.replace(path)


def _write_conll(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            for token, tag in zip(row["tokens"], row["tags"]):
                f.write(f"{token} {tag}\n")
            f.write("\n")
    tmp.replace(path)


def make_files(name: str, n: int, seed: int, folder: Path, data_dir: str) -> Path:
    """The user files and config of one (set, n, seed); returns the config's path."""
    config = folder / "config.yaml"
    if config.is_file():
        return config
    folder.mkdir(parents=True, exist_ok=True)
    data = _load(name, data_dir)
    splits = {
        "train": _pick(data.splits["train"], n, seed),
        "validation": _pick(data.splits["validation"], VALIDATION, seed),
        "test": _pick(data.splits["test"], IMDB_TEST if name == "imdb" else 10**9, 0),
    }
    suffix = "conll" if name == "conll" else "csv"
    write = _write_conll if name == "conll" else _write_csv
    files = {}
    for split, rows in splits.items():
        path = folder / f"{split}.{suffix}"
        write(path, rows)
        files[split] = str(path)
    lines = [
        "base: all-MiniLM-L6-v2",
        "data:",
        f"  task: {suffix}",
        f"  name: {name}-{n}",
        f"  files: {json.dumps(files)}",
    ]
    if name == "imdb":
        lines.append("  max_length: 128")
    if name == "cola":
        lines += ["task:", "  metrics: [mcc, accuracy]"]
    lines += ["train:", f"  seed: {seed}"]
    config.write_text("\n".join(lines) + "\n")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="cola,imdb,conll")
    parser.add_argument("--sizes", default="1000,3000")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--plain", action="store_true", help="train.size_defaults=false")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--set", action="append", default=[], help="passed on to train")
    parser.add_argument("--runs-dir", default="runs/small-data")
    parser.add_argument(
        "--data-dir", default=os.environ.get("ADALAYERS_DATA_DIR", "../shared/datasets")
    )
    args = parser.parse_args()
    sets = args.sets.split(",")
    unknown = [s for s in sets if s not in SHIPPED]
    if unknown:
        parser.error(f"--sets: unknown {unknown}; choose from {sorted(SHIPPED)}")
    sizes = [int(x) for x in args.sizes.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    overrides = list(args.set) + (["train.size_defaults=false"] if args.plain else [])
    label = args.tag or ("plain" if args.plain else "size-defaults")
    runs = Path(args.runs_dir)
    records = []
    for name in sets:
        for n in sizes:
            for seed in seeds:
                files = runs / "files" / f"{name}-{n}-seed{seed}"
                config = make_files(name, n, seed, files, args.data_dir)
                run = runs / label / f"{name}-{n}-seed{seed}"
                metrics_path = run / "metrics.json"
                if not metrics_path.is_file():
                    command = [
                        sys.executable,
                        "-m",
                        "adalayers.cli",
                        "train",
                        "--config",
                        str(config),
                        "--output-dir",
                        str(run),
                        "--overwrite",
                        "--quiet",
                    ]
                    for item in overrides:
                        command += ["--set", item]
                    code, _ = run_offline(command)
                    if code:
                        raise SystemExit(f"{' '.join(command)} failed with exit code {code}")
                metrics = json.loads(metrics_path.read_text())
                probe = metrics.get("probe") or {}
                metric = metrics["metric"]
                record = {
                    "set": name,
                    "n": n,
                    "seed": seed,
                    "metric": metric,
                    "head_validation": metrics["validation"][metric],
                    "head_test": metrics["test"][metric],
                    "probe_state": probe.get("state"),
                    "probe_validation": probe.get("validation"),
                    "probe_test": probe.get("test"),
                    "size_defaults": metrics.get("size_defaults"),
                    "epochs_run": metrics.get("epochs_run"),
                    "best_epoch": metrics.get("best_epoch"),
                    "train_seconds": metrics.get("train_seconds"),
                }
                records.append(record)
                print(json.dumps({k: v for k, v in record.items() if k != "size_defaults"}))
    summary = []
    for name in sets:
        for n in sizes:
            rs = [r for r in records if r["set"] == name and r["n"] == n]
            head = [100 * r["head_test"] for r in rs]
            probe = [100 * r["probe_test"] for r in rs if r["probe_test"] is not None]
            entry = {"set": name, "n": n, "metric": rs[0]["metric"], "seeds": len(rs)}
            entry["head_test_mean"] = statistics.mean(head)
            entry["head_test_sd"] = statistics.stdev(head) if len(head) > 1 else 0.0
            if len(probe) == len(head):
                entry["probe_test_mean"] = statistics.mean(probe)
                entry["probe_test_sd"] = statistics.stdev(probe) if len(probe) > 1 else 0.0
                entry["margin"] = entry["head_test_mean"] - entry["probe_test_mean"]
                entry["target_met"] = entry["margin"] >= 2.0
            summary.append(entry)
            print(json.dumps(entry))
    result = {
        "benchmark": "small_data",
        "label": label,
        "base": "all-MiniLM-L6-v2",
        "overrides": overrides,
        "validation_examples": VALIDATION,
        "test": {
            "cola": "GLUE dev, 1043",
            "imdb": f"fixed random {IMDB_TEST} of test",
            "conll": "CoNLL-2003 test, 3453 sentences",
        },
        "target": "head test >= probe test + 2 points, mean over the seeds",
        "runs": records,
        "summary": summary,
    }
    print("wrote", write_result(f"small_data-{label}", result))


if __name__ == "__main__":
    main()
