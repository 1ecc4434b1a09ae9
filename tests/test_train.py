"""End-to-end training on tiny data through the CLI: run folder, resume, predict, 2 processes."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from adalayers.cli import main
from adalayers.core.task import Task
from adalayers.training import train as train_module

GOOD = "the movie was good . a great story . mary read the book .".split(" . ")
BAD = "movie the was . good a the of . the the the and".split(" . ")


def write_cola(root: Path, n_train: int = 80, n_dev: int = 30, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder = root / "glue" / "CoLA"
    folder.mkdir(parents=True)

    def rows(n):
        out = []
        for i in range(n):
            label = i % 2
            words = (GOOD if label else BAD)[rng.randrange(3)].split()
            out.append(f"src\t{label}\t{'' if label else '*'}\t{' '.join(words)} .")
        return "\n".join(out) + "\n"

    (folder / "train.tsv").write_text(rows(n_train))
    (folder / "dev.tsv").write_text(rows(n_dev))
    return root


def write_conll(root: Path) -> Path:
    folder = root / "conll2003"
    folder.mkdir(parents=True)
    sents = [
        [("john", "B-PER"), ("read", "O"), ("a", "O"), ("book", "O")],
        [("mary", "B-PER"), ("said", "O"), ("in", "O"), ("london", "B-LOC")],
        [("acme", "B-ORG"), ("corp", "I-ORG"), ("said", "O")],
    ]
    for split, n in (("train", 30), ("valid", 9), ("test", 9)):
        lines = ["-DOCSTART- -X- -X- O", ""]
        for i in range(n):
            lines += [f"{w} NN O {t}" for w, t in sents[i % 3]] + [""]
        (folder / f"{split}.txt").write_text("\n".join(lines))
    return root


def write_config(path: Path, base: Path, task: str = "cola", **train) -> Path:
    config = {
        "base": str(base),
        "data": {"task": task, "max_length": 32},
        "task": {
            "mixer": {
                "dim": 8,
                "alpha": 16,
                "dropout": 0.1,
                "positional": "learned",
                "max_positions": 32,
            },
            "head": {"num_heads": 2, "num_layers": 1, "ff_dim": 16, "dropout": 0.1},
        },
        "train": {"epochs": 3, "batch_size": 8, "lr": 3e-3, "early_stopping": 0, **train},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def cola(tmp_path, tiny_model_dir):
    data = write_cola(tmp_path / "data")
    return write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert")), data


def test_train_writes_a_complete_run(cola, tmp_path, capsys):
    config, data = cola
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--data-dir",
                str(data),
                "--output-dir",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )
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
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--data-dir",
            str(data),
            "--output-dir",
            str(run),
            "--quiet",
        ]
    )
    assert code == 2
    assert "--resume" in capsys.readouterr().err


class _StopAfter(dict):
    """A signal flag that turns on after ``n`` checks (a Ctrl-C in the middle of an epoch)."""

    def __init__(self, n):
        super().__init__(stop=False)
        self.n = n

    def __getitem__(self, key):
        self.n -= 1
        return self.n < 0


def test_interrupt_then_resume_loses_nothing(cola, tmp_path, monkeypatch):
    config_path, data = cola
    from contextlib import contextmanager

    from adalayers.training.config import load_config

    config = load_config(config_path, data_dir=str(data))
    reference = train_module.fit(config, tmp_path / "straight", quiet=True)

    @contextmanager
    def interrupt_after_13_steps():
        yield _StopAfter(13)

    with monkeypatch.context() as m:
        m.setattr(train_module, "_stop_on_signals", interrupt_after_13_steps)
        with pytest.raises(train_module.TrainingInterrupted, match="--resume"):
            train_module.fit(config, tmp_path / "cut", quiet=True)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["step_in_epoch"] == 5  # 9 steps an epoch, stop at 14
    resumed = train_module.fit(config, tmp_path / "cut", resume=True, quiet=True)
    assert resumed["test"] == reference["test"]
    a = Task.from_pretrained(tmp_path / "straight" / "model").state_dict()
    b = Task.from_pretrained(tmp_path / "cut" / "model").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # every epoch, the ones after the cut included, is the straight run's: the same dropout
    # masks give the same losses, scores and layer weights (the best epoch may come early, so
    # comparing the kept head alone would not see a shifted random stream)
    straight, cut = (read_jsonl(tmp_path / r / "history.jsonl") for r in ("straight", "cut"))
    assert [h["epoch"] for h in cut] == [1, 2, 3]
    for h in straight + cut:
        h.pop("seconds")
    assert cut == straight


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_token_predictions(run: Path, test: dict) -> None:
    """The run's test predictions: one record a sentence with its gold tags (those of
    ``write_conll``), a predicted tag a word, and the run's test F1."""
    from adalayers.core.metrics import compute_metrics

    records = read_jsonl(run / "predictions_test.jsonl")
    sents = [["B-PER", "O", "O", "O"], ["B-PER", "O", "O", "B-LOC"], ["B-ORG", "I-ORG", "O"]]
    assert [r["tags"] for r in records] == [sents[i % 3] for i in range(9)]
    assert [len(r["predicted_tags"]) for r in records] == [len(r["tags"]) for r in records]
    again = compute_metrics(
        "token_classification",
        [r["tags"] for r in records],
        [r["predicted_tags"] for r in records],
    )
    assert again["f1"] == pytest.approx(test["f1"], abs=1e-12)


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
    from adalayers.core.task import AdaLayers
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


def _env(cpu_world: bool = False):
    """The environment of a child ``adalayers`` process; ``cpu_world``: a torchrun world of CPU
    processes (gloo) even where a GPU is visible, which one GPU could not hold two ranks of."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent)] + sys.path)
    if cpu_world:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


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
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
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
        env=_env(),
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
            "train",
            "--config",
            str(config),
            "--data-dir",
            str(data),
            "--output-dir",
            str(run),
            "--quiet",
            "--set",
            "train.epochs=1",
            "--set",
            "train.eval_batch_size=4",
        ],
        capture_output=True,
        text=True,
        env=_env(cpu_world=True),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["test"]["examples"] == 30 and metrics["validation"]["examples"] == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=0.1", "train.lrr"),
        ("train.epochs=many", "train.epochs"),
        ("data.task=imbd", "imbd"),
    ],
)
def test_cli_config_errors_are_one_line(cola, tmp_path, capsys, override, message):
    config, data = cola
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--data-dir",
            str(data),
            "--output-dir",
            str(tmp_path / "run"),
            "--set",
            override,
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model").exists()


def test_cli_missing_data_names_the_file(cola, tmp_path, capsys):
    config, _ = cola
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--data-dir",
            str(tmp_path / "nowhere"),
            "--output-dir",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "train.tsv" in err


def test_cli_label_outside_the_set(cola, tmp_path, capsys):
    config, data = cola
    train = data / "glue" / "CoLA" / "train.tsv"
    train.write_text(train.read_text() + "src\t7\t\tthe movie .\n")
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--data-dir",
            str(data),
            "--output-dir",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "7" in err and "train.tsv" in err


def test_cli_predict_bad_input_file(cola, tmp_path, capsys):
    config, data = cola
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--data-dir",
                str(data),
                "--output-dir",
                str(run),
                "--quiet",
                "--set",
                "train.epochs=1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    assert main(["predict", str(run), "--input", str(bad)]) == 2
    assert "in.jsonl:2" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["predict", str(run), "--input", str(empty)]) == 2
    assert "no inputs" in capsys.readouterr().err
    # a sequence task has no tag sequence to decode
    assert main(["evaluate", str(run), "--data-dir", str(data), "--decoding", "bio"]) == 2
    assert "head.decoding=bio is for token-classification" in capsys.readouterr().err


def test_cli_has_every_command():
    from adalayers.cli import build_parser, cmd_serve

    parser = build_parser()
    args = parser.parse_args(["serve", "runs/a", "runs/b", "--port", "8123"])
    assert args.func is cmd_serve and args.runs == ["runs/a", "runs/b"] and args.port == 8123
    commands = parser._subparsers._group_actions[0].choices
    assert {
        "train",
        "evaluate",
        "predict",
        "info",
        "cache",
        "serve",
        "compare",
        "report",
        "inspect",
    } <= set(commands)
