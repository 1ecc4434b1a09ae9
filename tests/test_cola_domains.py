"""benchmarks/cola_domains.py: CoLA test scores by domain, from runs' predictions files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cola_domains.py"
NAMES = ("unacceptable", "acceptable")


@pytest.fixture
def script(benchmark_script):
    return benchmark_script("cola_domains")


def write_data(root: Path) -> tuple[Path, list[int]]:
    """train from sources a and b; dev: 4 sentences from a (in-domain), 4 from c (out)."""
    folder = root / "glue" / "CoLA"
    folder.mkdir(parents=True)
    train = [f"{s}\t{i % 2}\t\tx ." for i, s in enumerate("abab")]
    gold = [1, 0, 1, 0, 1, 1, 0, 0]
    dev = [f"{'a' if i < 4 else 'c'}\t{g}\t\ty ." for i, g in enumerate(gold)]
    (folder / "train.tsv").write_text("\n".join(train) + "\n")
    (folder / "dev.tsv").write_text("\n".join(dev) + "\n")
    return root, gold


def write_run(folder: Path, gold: list[int], predicted: list[int], validation: float) -> Path:
    folder.mkdir(parents=True)
    metrics = {"task": "cola", "validation": {"mcc": validation}, "test": {"mcc": 0.0}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    records = [
        {"index": i, "label": NAMES[g], "prediction": NAMES[p]}
        for i, (g, p) in enumerate(zip(gold, predicted))
    ]
    (folder / "predictions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_scores_split_by_source_and_rows_chosen_on_validation(script, tmp_path, monkeypatch):
    data, gold = write_data(tmp_path / "data")
    right_in = gold[:4] + [1 - g for g in gold[4:]]  # right in-domain, wrong out-of-domain
    for seed in (0, 1):
        compare = tmp_path / f"seed{seed}"
        write_run(compare / "mixer", gold, right_in, 0.5)
        write_run(compare / "mixer_alpha1", gold, gold, 0.3 + seed * 0.2)  # mean 0.4 < 0.5
        write_run(compare / "layer_0", gold, [1] * 8, 0.3)
        write_run(compare / "layer_1", gold, gold, 0.1 if seed else 0.6)
        (compare / "finetune").mkdir()  # neither predictions nor a model: skipped
    argv = ["cola_domains.py", "--data-dir", str(data)]
    argv += ["--seed-runs", f"0={tmp_path / 'seed0'}", "--seed-runs", f"1={tmp_path / 'seed1'}"]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()

    result = json.loads((tmp_path / "results" / "cola_domains.json").read_text())
    assert result["dev_sentences"] == {"in_domain": 4, "out_of_domain": 4}
    mixer = result["seeds"]["0"]["mixer"]
    assert mixer["in_domain"] == {"mcc": 100.0, "accuracy": 100.0, "sentences": 4}
    assert mixer["out_of_domain"]["mcc"] == pytest.approx(-100.0)
    assert mixer["all"]["accuracy"] == pytest.approx(50.0)
    assert "finetune" not in result["seeds"]["0"]
    # best single layer per seed on validation: layer_1 for seed 0, layer_0 for seed 1
    assert result["seeds"]["0"]["best_single_layer"]["chosen"] == "layer_1"
    assert result["seeds"]["1"]["best_single_layer"]["chosen"] == "layer_0"
    best = result["mean_over_seeds"]["best_single_layer"]["all"]["accuracy"]
    assert best["values"] == [100.0, pytest.approx(100 * 4 / 8)]
    # the mixer setting with the best mean validation over seeds, not the best test
    assert result["seeds"]["1"]["mixer_chosen"]["chosen"] == "mixer"
    assert "command" in result and "machine" in result


def test_predictions_of_other_sentences_are_refused(script, tmp_path):
    data, gold = write_data(tmp_path / "data")
    run = write_run(tmp_path / "run", gold[::-1], gold[::-1], 0.5)
    records, _ = script.predictions(run, data)
    with pytest.raises(SystemExit, match="not those of the 8 dev sentences"):
        script.scores(records, script.read_dev(data))
