"""training/headline.py: the line `adalayers train` ends with, score beside the obvious baseline."""

from __future__ import annotations

from helpers import train_args, write_cola, write_config

from adalayers.cli import main
from adalayers.training.headline import headline


def test_classification_prints_the_majority_beside_the_score():
    results = {
        "task": "imdb",
        "task_type": "sequence_classification",
        "base": "all-MiniLM-L6-v2",
        "metric": "accuracy",
        "percent_of_base": 0.85,
        "test": {"accuracy": 0.853, "majority": {"label": "negative", "accuracy": 0.5}},
    }
    line = headline(results, "runs/sentiment")
    assert (
        "imdb on all-MiniLM-L6-v2: test accuracy 85.3% (always answering 'negative': 50.0%)" in line
    )
    assert "runs/sentiment" in line and "0.85%" in line


def test_a_non_accuracy_metric_also_shows_accuracy():
    results = {
        "task": "cola",
        "task_type": "sequence_classification",
        "base": "b",
        "metric": "mcc",
        "test": {
            "mcc": 0.219,
            "accuracy": 0.696,
            "majority": {"label": "acceptable", "mcc": 0.0, "accuracy": 0.691},
        },
    }
    line = headline(results, "r")
    assert "Matthews correlation 0.219 (always answering 'acceptable': 0.000)" in line
    assert "accuracy 69.6% (always 'acceptable': 69.1%)" in line


def test_token_tasks_name_the_all_o_baseline_and_regression_has_none():
    token = {"task": "ner", "task_type": "token_classification", "base": "b", "metric": "f1"}
    assert "entity F1 81.5% (tagging every word O: 0.0%)" in headline(
        {**token, "test": {"f1": 0.815}}, "r"
    )
    regression = {"task": "stsb", "task_type": "regression", "base": "b", "metric": "pearson"}
    line = headline({**regression, "validation": {"pearson": 0.8}}, "r")
    assert "validation Pearson correlation 0.800" in line and "always" not in line


def test_train_ends_with_the_headline_on_stderr(tmp_path, tiny_model_dir, capsys):
    data = write_cola(tmp_path / "data")
    config = write_config(tmp_path / "c.yaml", tiny_model_dir("bert"), epochs=1)
    assert main(train_args(config, data, tmp_path / "run")) == 0
    out, err = capsys.readouterr()
    assert out.lstrip().startswith("{")  # stdout stays the JSON summary
    assert "cola on " in err and "(always answering" in err and str(tmp_path / "run") in err
