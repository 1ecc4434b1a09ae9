"""CoLA test scores split into in-domain and out-of-domain sentences.

The GLUE CoLA dev set (our test split, 1,043 sentences) joins the corpus's in-domain dev set,
sentences from the 17 sources that train also draws on, with its out-of-domain dev set, from 6
sources train never sees. Its first column names each sentence's source, so the two halves can
be told apart: a sentence is in-domain when its source also appears in train.tsv. Validation,
a stratified 10% of train, is all in-domain.

    python benchmarks/cola_domains.py \\
        --seed-runs 0=runs/compare/minilm-cola,runs/compare/minilm-cola-alphagrid \\
        --seed-runs 1=... --seed-runs 2=...

Each ``--seed-runs S=DIR[,DIR...]`` names the folders holding one seed's rows (folders that
``adalayers compare`` wrote, or run folders); a row is a sub-folder with ``metrics.json``. A row
without ``predictions_test.jsonl`` (runs from before runs wrote them) is evaluated again on
test through :func:`adalayers.training.train.evaluate_run`, online, and its overall score is
reported
beside the one in its metrics.json. Writes ``benchmarks/results/cola_domains.json``: per seed
and row the MCC and accuracy on all, in-domain and out-of-domain sentences, and per row the
mean over seeds, with two rows chosen on validation per seed: the best single layer and the
mixer (among ``mixer*`` rows, the setting with the best mean validation MCC over the seeds).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from adalayers.core.metrics import compute_metrics  # noqa: E402
from adalayers.training.run import predictions_file  # noqa: E402
from adalayers.training.train import evaluate_run  # noqa: E402

DOMAINS = ("all", "in_domain", "out_of_domain")


LABELS = ("unacceptable", "acceptable")  # the file's 0 and 1


def read_dev(data_dir: Path) -> tuple[list[str], list[str]]:
    """Each sentence of glue/CoLA/dev.tsv, in order: its domain (``in_domain`` /
    ``out_of_domain``) and its gold label name."""

    def rows(name: str) -> list[list[str]]:
        path = data_dir / "glue" / "CoLA" / name
        if not path.is_file():
            raise SystemExit(f"{path} not found: point --data-dir at the benchmark datasets")
        with path.open(newline="") as fh:
            return [r for r in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if r]

    seen = {r[0] for r in rows("train.tsv")}
    dev = rows("dev.tsv")
    return (
        ["in_domain" if r[0] in seen else "out_of_domain" for r in dev],
        [LABELS[int(r[1])] for r in dev],
    )


def scores(records: list[dict], dev: tuple[list[str], list[str]]) -> dict[str, dict[str, float]]:
    """MCC and accuracy (x 100) and counts on all, in-domain and out-of-domain sentences."""
    domain_of, gold = dev
    if [r["label"] for r in records] != gold:
        raise SystemExit(
            f"{len(records)} predictions whose gold labels are not those of the {len(gold)} "
            "dev sentences in order: was the run trained on a sample of CoLA (data.sample)?"
        )
    out = {}
    for domain in DOMAINS:
        rows = [r for r, d in zip(records, domain_of) if domain in ("all", d)]
        m = compute_metrics(
            "sequence_classification", [r["label"] for r in rows], [r["prediction"] for r in rows]
        )
        out[domain] = {
            "mcc": 100 * m["mcc"],
            "accuracy": 100 * m["accuracy"],
            "sentences": len(rows),
        }
    return out


def predictions(run: Path, data_dir: Path) -> tuple[list[dict], float | None]:
    """The run's test predictions, and the online re-evaluation's MCC when there were none."""
    path = run / predictions_file("test")
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()], None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "test.jsonl"
        metrics = evaluate_run(run, "test", data_dir=str(data_dir), quiet=True, predictions=out)
        return [json.loads(line) for line in out.read_text().splitlines()], 100 * metrics["mcc"]


def mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-runs", action="append", required=True, metavar="S=DIR[,DIR...]")
    parser.add_argument(
        "--data-dir", default=os.environ.get("ADALAYERS_DATA_DIR", "../shared/datasets")
    )
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    dev = read_dev(data_dir)
    start = time.perf_counter()
    seeds: dict[str, dict[str, dict]] = {}
    for spec in args.seed_runs:
        seed, _, folders = spec.partition("=")
        if not folders:
            raise SystemExit(f"--seed-runs {spec!r}: expected S=DIR[,DIR...]")
        rows = seeds.setdefault(seed, {})
        for folder in folders.split(","):
            folder = Path(folder)
            runs = [folder] if (folder / "metrics.json").is_file() else sorted(folder.iterdir())
            for run in runs:
                if not (run / "metrics.json").is_file():
                    continue
                metrics = json.loads((run / "metrics.json").read_text())
                if metrics.get("task") != "cola":
                    raise SystemExit(f"{run} is a {metrics.get('task')!r} run, not CoLA")
                if not (run / predictions_file("test")).is_file() and not (run / "model").is_dir():
                    print(f"skipped {run}: no predictions_test.jsonl and no model/", flush=True)
                    continue
                if run.name in rows:
                    raise SystemExit(f"seed {seed}: two rows named {run.name!r} ({run})")
                records, online = predictions(run, data_dir)
                row = {
                    "run": str(run),
                    "validation_mcc": 100 * metrics["validation"]["mcc"],
                    "test_mcc_in_metrics_json": 100 * metrics["test"]["mcc"],
                    **scores(records, dev),
                }
                if online is not None:
                    row["evaluated_again_online"] = True
                rows[run.name] = row
                print(
                    f"seed {seed} {run.name}: mcc all {row['all']['mcc']:.1f} "
                    f"(metrics.json {row['test_mcc_in_metrics_json']:.1f}), "
                    f"in {row['in_domain']['mcc']:.1f}, out {row['out_of_domain']['mcc']:.1f}",
                    flush=True,
                )

    for rows in seeds.values():  # the best single layer of each seed, chosen on validation
        layers = [name for name in rows if name.startswith("layer_")]
        if layers:
            best = max(layers, key=lambda name: rows[name]["validation_mcc"])
            rows["best_single_layer"] = {**rows[best], "chosen": best}
    mixers = sorted({n for rows in seeds.values() for n in rows if n.startswith("mixer")})
    common = [n for n in mixers if all(n in rows for rows in seeds.values())]
    if common:
        chosen = max(
            common, key=lambda n: statistics.fmean(r[n]["validation_mcc"] for r in seeds.values())
        )
        for rows in seeds.values():
            rows["mixer_chosen"] = {**rows[chosen], "chosen": chosen}
    summary = {}
    for name in sorted({n for rows in seeds.values() for n in rows}):
        if not all(name in rows for rows in seeds.values()):
            continue
        summary[name] = {
            domain: {
                metric: mean_sd([rows[name][domain][metric] for rows in seeds.values()])
                for metric in ("mcc", "accuracy")
            }
            for domain in DOMAINS
        }
    counts = {d: dev[0].count(d) for d in ("in_domain", "out_of_domain")}
    path = write_result(
        "cola_domains",
        {
            "dev_sentences": counts,
            "seeds": seeds,
            "mean_over_seeds": summary,
            "wall_seconds": round(time.perf_counter() - start, 1),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
