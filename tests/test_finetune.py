"""Fine-tuning the whole base as a baseline (training/finetune.py)."""

from __future__ import annotations

import json

import pytest
from helpers import check_token_predictions, write_config, write_conll

from adalayers.training.config import load_config


def test_finetune_token_task_writes_a_run(tmp_path, tiny_model_dir):
    from adalayers.training.finetune import finetune

    data = write_conll(tmp_path / "data")
    path = write_config(
        tmp_path / "cfg.yaml", tiny_model_dir("roberta"), task="conll2003", epochs=2
    )
    run = tmp_path / "ft"
    results = finetune(load_config(path, data_dir=str(data)), run, lr=1e-3, quiet=True)
    assert results["baseline"] == "finetune" and results["metric"] == "f1"
    assert set(results["test"]["per_type"]) <= {"PER", "LOC", "ORG"}
    assert results["test"]["examples"] == 9
    assert results["parameters_added"] > results["base_parameters"]  # base + a token head
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert results["validation"]["f1"] == pytest.approx(max(h["score"] for h in history))
    assert load_config(run / "config.yaml").train.lr == pytest.approx(1e-3)
    check_token_predictions(run, results["test"])
    with pytest.raises(FileExistsError):
        finetune(load_config(path, data_dir=str(data)), run, quiet=True)
