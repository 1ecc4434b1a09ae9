"""benchmarks/compare_baselines.py --collect: results files from a comparison folder as it
stands, whole or cut off."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_baselines.py"


@pytest.fixture
def script(benchmark_script):
    return benchmark_script("compare_baselines")


def _row(kind: str, val: float, test: float, layer: int | None = None) -> dict:
    return {
        "baseline": kind,
        "layer": layer,
        "validation": {"accuracy": val},
        "test": {"accuracy": test},
    }


def comparison(pending: list[str]) -> dict:
    rows = {
        "mixer": _row("mixer", 0.90, 0.89),
        "layer_0": _row("single_layer", 0.88, 0.87, 0),
        "layer_1": _row("single_layer", 0.89, 0.86, 1),
        "layer_2": _row("single_layer", 0.91, 0.88, 2),
    }
    rows = {name: row for name, row in rows.items() if name not in pending}
    out = {"metric": "accuracy", "rows": rows, "complete": not pending}
    if pending:
        out["pending"] = pending
    return out


def collect(script, monkeypatch, runs: Path) -> None:
    argv = ["compare_baselines.py", "configs/minilm-imdb.yaml", "--tag", "t", "--collect"]
    monkeypatch.setattr(sys, "argv", [*argv, "--runs-dir", str(runs)])
    script.main()


def test_a_comparison_cut_off_is_collected_apart_without_a_best_single_layer(
    script, tmp_path, monkeypatch
):
    folder = tmp_path / "runs" / "minilm-imdb-t"
    folder.mkdir(parents=True)
    (folder / "comparison.json").write_text(json.dumps(comparison(["layer_2"])))
    collect(script, monkeypatch, tmp_path / "runs")
    results = tmp_path / "results"
    assert not (results / "compare_minilm-imdb-t.json").exists()  # the tables never see it
    partial = json.loads((results / "partial-compare_minilm-imdb-t.json").read_text())
    assert partial["complete"] is False and partial["collected"] is True
    assert partial["wall_seconds_this_call"] is None
    summary = partial["summary"]
    assert "best_single_layer" not in summary  # layer 2, best on validation, is not in yet
    assert summary["single_layers_pending"] == ["layer_2"]
    assert summary["single_layer_test"] == {"0": 0.87, "1": 0.86}
    assert summary["mixer"] == 0.89

    # the whole comparison replaces the partial file
    (folder / "comparison.json").write_text(json.dumps(comparison([])))
    collect(script, monkeypatch, tmp_path / "runs")
    assert not (results / "partial-compare_minilm-imdb-t.json").exists()
    whole = json.loads((results / "compare_minilm-imdb-t.json").read_text())
    assert whole["complete"] is True
    assert whole["summary"]["best_single_layer"] == {"layer": 2, "test": 0.88}


def test_collect_needs_a_comparison(script, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="comparison.json not found"):
        collect(script, monkeypatch, tmp_path / "runs")
