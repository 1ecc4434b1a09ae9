"""Training end to end on tiny data: the run folder, interrupt and resume, token tasks, SIGINT
and two processes through the CLI."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    StopAfter,
    check_token_predictions,
    child_env,
    read_jsonl,
    train_args,
    write_config,
    write_conll,
)

from adalayers.cli import main
from adalayers.core.task import Task
from adalayers.training import train as train_module


def test_train_writes_a_complete_run(cola, tmp_path, capsys):
    config, data = cola
    run = tmp_path / "run"
    assert main(train_args(config, data, run)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["metric"] == "mcc" and 1 <= summary["best_epoch"] <= 3
    names = {p.name for p in run.iterdir()}
    assert {
        "config.yaml",
        "model",
        "checkpoint",
        "history.jsonl",
        "metrics.json",
        "predictions_validation.jsonl",
        "predictions_test.jsonl",
        "layer_weights.png",
    } <= names
    assert not [n for n in names if n.startswith(".")], "temporary files left behind"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(sum(h["layer_weights"].values()) == pytest.approx(1.0) for h in history)
    assert all("lr" in h and "mcc" in h["validation"] for h in history)
    metrics = json.loads((run / "metrics.json").read_text())
    # CoLA: validation is 10% of train (8 of 80), test is the GLUE dev set (30)
    assert metrics["validation"]["examples"] == 8 and metrics["test"]["examples"] == 30
    assert 0 < metrics["percent_of_base"] < 100
    best = max(h["score"] for h in history)
    assert metrics["validation"]["mcc"] == pytest.approx(best, abs=1e-9)

    # the predictions: every test example once, in the file's order, scoring as metrics.json
    records = read_jsonl(run / "predictions_test.jsonl")
    assert [r["index"] for r in records] == list(range(30))
    gold = [line.split("\t")[1] for line in (data / "glue/CoLA/dev.tsv").read_text().splitlines()]
    names = ["unacceptable", "acceptable"]
    assert [r["label"] for r in records] == [names[int(g)] for g in gold]
    assert {r["prediction"] for r in records} <= set(names)
    from adalayers.core.metrics import compute_metrics

    again = compute_metrics(
        "sequence_classification",
        [r["label"] for r in records],
        [r["prediction"] for r in records],
    )
    assert again["mcc"] == pytest.approx(metrics["test"]["mcc"], abs=1e-12)
    assert again["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1e-12)
    assert len(read_jsonl(run / "predictions_validation.jsonl")) == 8

    written = tmp_path / "evaluated.jsonl"
    assert main(["evaluate", str(run), "--split", "test", "--quiet"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert main(["evaluate", str(run), "--quiet", "--predictions", str(written)]) == 0
    capsys.readouterr()
    assert read_jsonl(written) == records

    assert main(["predict", str(run), "--text", "the movie was good .", "--text", "bad"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["input"] for x in lines] == ["the movie was good .", "bad"]
    assert all(x["label"] in ("acceptable", "unacceptable") for x in lines)

    assert main(["info", str(run)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["labels"] == ["unacceptable", "acceptable"] and len(info["layer_weights"]) == 4


def test_existing_run_is_not_overwritten(cola, tmp_path, capsys):
    config, data = cola
    run = tmp_path / "run"
    run.mkdir()
    (run / "something").write_text("x")
    code = main(train_args(config, data, run))
    assert code == 2
    assert "--resume" in capsys.readouterr().err


def test_interrupt_then_resume_loses_nothing(cola_run, tmp_path, monkeypatch):
    from contextlib import contextmanager

    config, straight = cola_run.config, cola_run.folder  # this config's uninterrupted run

    @contextmanager
    def interrupt_after_13_steps():
        yield StopAfter(13)

    with monkeypatch.context() as m:
        m.setattr(train_module, "_stop_on_signals", interrupt_after_13_steps)
        with pytest.raises(train_module.TrainingInterrupted, match="--resume"):
            train_module.fit(config, tmp_path / "cut", quiet=True)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["step_in_epoch"] == 5  # 9 steps an epoch, stop at 14
    resumed = train_module.fit(config, tmp_path / "cut", resume=True, quiet=True)
    assert resumed["test"] == cola_run.results["test"]
    a = Task.from_pretrained(straight / "model").state_dict()
    b = Task.from_pretrained(tmp_path / "cut" / "model").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # every epoch, the ones after the cut included, is the straight run's: the same dropout
    # masks give the same losses, scores and layer weights (the best epoch may come early, so
    # comparing the kept head alone would not see a shifted random stream)
    whole, cut = (read_jsonl(r / "history.jsonl") for r in (straight, tmp_path / "cut"))
    assert [h["epoch"] for h in cut] == [1, 2, 3]
    for h in whole + cut:
        h.pop("seconds")
    assert cut == whole


def test_token_task_end_to_end(tmp_path, tiny_model_dir):
    data = write_conll(tmp_path / "data")
    config = write_config(
        tmp_path / "cfg.yaml", tiny_model_dir("roberta"), task="conll2003", epochs=2
    )
    from adalayers.training.config import load_config

    results = train_module.fit(
        load_config(config, data_dir=str(data)), tmp_path / "run", quiet=True
    )
    assert results["metric"] == "f1"
    assert set(results["test"]["per_type"]) <= {"PER", "LOC", "ORG"}
    assert results["test"]["examples"] == 9
    check_token_predictions(tmp_path / "run", results["test"])


def test_token_task_with_bio_decoding_predicts_valid_tags(tmp_path, tiny_model_dir):
    from adalayers.core.multitask import AdaLayers
    from adalayers.training.config import load_config

    data = write_conll(tmp_path / "data")
    config = write_config(
        tmp_path / "cfg.yaml", tiny_model_dir("roberta"), task="conll2003", epochs=1
    )
    run = tmp_path / "run"
    results = train_module.fit(
        load_config(config, ["task.head.decoding=bio"], data_dir=str(data)), run, quiet=True
    )
    assert results["metric"] == "f1"
    again = train_module.evaluate_run(run, "test", data_dir=str(data), quiet=True)
    assert again["f1"] == results["test"]["f1"]
    argmax = train_module.evaluate_run(
        run, "test", data_dir=str(data), decoding="argmax", quiet=True
    )
    assert argmax["examples"] == again["examples"]
    # a bio run also reports the per-word reading of the same scores
    assert results["test"]["argmax"]["f1"] == argmax["f1"]
    assert "argmax" not in argmax
    _, backbone, task = train_module.load_run(run)
    assert task.decoding == "bio"  # saved with the task
    model = AdaLayers(backbone)
    model.add_task("ner", task)
    words = [["Peter", "Blackburn", "went", "to", "Rome", "and", "Paris", "today"]] * 3
    for out in model.predict(words):
        tags = out["ner"]["labels"]
        assert len(tags) == 8
        for previous, tag in zip(["O", *tags], tags):
            assert not tag.startswith("I-") or previous[2:] == tag[2:], tags


def test_sigint_leaves_a_checkpoint_and_resume_finishes(cola, tmp_path):
    config, data = cola
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "adalayers.cli",
        "train",
        "--config",
        str(config),
        "--data-dir",
        str(data),
        "--output-dir",
        str(run),
        "--set",
        "train.epochs=400",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
    )
    deadline = time.time() + 120
    while not (run / "history.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    assert 1 <= state["epoch"] < 400
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "adalayers.cli",
            "train",
            "--resume",
            "--output-dir",
            str(run),
            "--set",
            f"train.epochs={state['epoch'] + 1}",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert (run / "metrics.json").is_file()


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_count_every_example_once(cola, tmp_path):
    config, data = cola
    run = tmp_path / "run2"
    # 30 test examples do not split evenly into 2 processes x batches of 4
    out = subprocess.run(
        [
            "torchrun",
            "--standalone",  # a free port: runs beside other tests
            "--nproc_per_node",
            "2",
            "-m",
            "adalayers.cli",
            *train_args(config, data, run, "--set", "train.epochs=1"),
            "--set",
            "train.eval_batch_size=4",
        ],
        capture_output=True,
        text=True,
        env=child_env(cpu_world=True),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["test"]["examples"] == 30 and metrics["validation"]["examples"] == 8
