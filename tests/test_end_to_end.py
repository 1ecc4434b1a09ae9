"""End to end, per user format (issue 25): write a small file, train on a tiny base (8 epochs
of 24 examples, under 2 s: after one epoch every answer is the same label, which would make
the comparison empty), then ``evaluate``, ``predict --input`` and the server on the same inputs
give the same labels, sentence pairs included; and a task given the other kind of input (pairs,
single texts) is refused by every path."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from adalayers.cli import main
from adalayers.core.task import PairMismatchError
from adalayers.report import write_report
from adalayers.serving.runtime import load_runs
from adalayers.training import train as train_module
from adalayers.training.config import load_config
from adalayers.training.data import load_task_data

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from adalayers.serving.app import create_app  # noqa: E402

GOOD = ["the movie was good", "a great story", "mary read the book", "they love this film"]
BAD = ["the plot was bad", "a terrible actor", "we hate this movie", "not a good story"]
SENTENCES = [
    [("john", "B-PER"), ("read", "O"), ("a", "O"), ("book", "O")],
    [("mary", "B-PER"), ("said", "O"), ("in", "O"), ("new", "B-LOC"), ("york", "I-LOC")],
    [("acme", "B-ORG"), ("corp", "I-ORG"), ("said", "O"), ("it", "O")],
    [("she", "O"), ("was", "O"), ("in", "O"), ("paris", "B-LOC")],
]
SIZES = (("train", 24, 0), ("validation", 8, 1), ("test", 8, 2))
MODEL = {
    "mixer": {"dim": 8, "alpha": 16, "positional": "learned", "max_positions": 32},
    "head": {"num_heads": 2, "num_layers": 1, "ff_dim": 16},
}


# -- the four formats: (data section, test inputs as the server takes them) ---------------------
def write_csv(folder: Path) -> dict:
    """Single texts in a CSV with its own column names."""
    for split, n, seed in SIZES:
        rng = random.Random(seed)
        rows = ["review,sentiment"]
        for i in range(n):
            rows.append(f"{rng.choice(GOOD if i % 2 else BAD)},{'pos' if i % 2 else 'neg'}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return {"task": "csv", "columns": {"text": "review", "label": "sentiment"}}


def write_jsonl(folder: Path) -> dict:
    for split, n, seed in SIZES:
        rng = random.Random(seed)
        lines = []
        for i in range(n):
            text = rng.choice(GOOD if i % 2 else BAD)
            lines.append(json.dumps({"sentence": text, "label": "pos" if i % 2 else "neg"}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return {"task": "jsonl", "columns": {"text": "sentence", "label": "label"}}


def write_conll(folder: Path) -> dict:
    for split, n, seed in SIZES:
        rng = random.Random(seed)
        lines = []
        for _ in range(n):
            lines += [f"{w} {t}" for w, t in rng.choice(SENTENCES)] + [""]
        (folder / f"{split}.conll").write_text("\n".join(lines))
    return {"task": "conll"}


def write_pairs(folder: Path) -> dict:
    """Sentence pairs in a CSV, labels 0/1 named."""
    for split, n, seed in SIZES:
        rng = random.Random(seed)
        rows = ["sentence1,sentence2,label"]
        for i in range(n):
            label = i % 2
            rows.append(f"{rng.choice(GOOD)},{rng.choice(GOOD if label else BAD)},{label}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return {
        "task": "csv",
        "columns": {"text": "sentence1", "text_pair": "sentence2", "label": "label"},
        "label_names": {0: "different", 1: "same"},
    }


WRITERS = {"csv": write_csv, "jsonl": write_jsonl, "conll": write_conll, "pairs": write_pairs}
SUFFIX = {"csv": "csv", "jsonl": "jsonl", "conll": "conll", "pairs": "csv"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """``runs(format)`` -> ``(run folder, test file)``: each format trained once a module."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(fmt: str) -> tuple[Path, Path]:
        if fmt not in done:
            folder = tmp_path_factory.mktemp(fmt)
            data = WRITERS[fmt](folder)
            files = {split: str(folder / f"{split}.{SUFFIX[fmt]}") for split, _, _ in SIZES}
            config = {
                "base": str(tiny_model_dir("bert")),
                "data": {"max_length": 32, **data, "files": files},
                "task": MODEL,
                # the plain settings: the size-chosen ones (regularised, early stopping after
                # 4 epochs) leave this tiny random base at one answer for every input
                "train": {"epochs": 8, "batch_size": 8, "lr": 3e-3, "size_defaults": False},
            }
            (folder / "config.yaml").write_text(yaml.safe_dump(config))
            run = folder / "run"
            train_module.fit(load_config(folder / "config.yaml"), run, quiet=True)
            done[fmt] = run, Path(files["test"])
        return done[fmt]

    return get


def cli(capsys, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def rows_of(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def serve(run: Path, payload: dict) -> tuple[int, dict]:
    with TestClient(create_app(load_runs({"task": run}))) as client:
        response = client.post("/predict", json=payload)
        return response.status_code, response.json()


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_evaluate_predict_and_serve_give_the_same_labels(runs, fmt, tmp_path, capsys):
    run, test_file = runs(fmt)
    token = fmt == "conll"
    # evaluate: the test split, every prediction written
    records = tmp_path / "evaluated.jsonl"
    code, _, err = cli(capsys, "evaluate", run, "--predictions", records, "--quiet")
    assert code == 0, err
    evaluated = [json.loads(line) for line in records.read_text().splitlines()]
    evaluated = [r["predicted_tags" if token else "prediction"] for r in evaluated]

    # predict --input: the very test file (the run's column names), CoNLL as JSONL of tokens
    d = load_config(run / "config.yaml").data
    split = load_task_data(d.task, files=d.files, columns=d.columns, label_names=d.label_names)
    split = split.splits["test"].to_dict()  # column -> list
    if token:
        test_file = tmp_path / "test.jsonl"
        test_file.write_text("".join(json.dumps({"tokens": t}) + "\n" for t in split["tokens"]))
    code, out, err = cli(capsys, "predict", run, "--input", test_file)
    assert code == 0, err
    rows = rows_of(out)
    predicted = [r["labels" if token else "label"] for r in rows]

    # serve: the same inputs over HTTP (pairs as [text, text_pair])
    if token:
        payload = {"texts": [" ".join(t) for t in split["tokens"]]}
    elif fmt == "pairs":
        payload = {"pairs": [list(p) for p in zip(split["text"], split["text_pair"])]}
    else:
        payload = {"texts": split["text"]}
    status, body = serve(run, payload)
    assert status == 200, body
    served = [p["task"]["labels" if token else "label"] for p in body["predictions"]]

    assert len(evaluated) == 8
    assert len({json.dumps(labels) for labels in evaluated}) > 1  # not one answer for all
    assert predicted == evaluated
    assert served == evaluated
    if not token:  # the scores too: the pair's second text was read by both
        scores = [p["task"]["score"] for p in body["predictions"]]
        assert [r["score"] for r in rows] == pytest.approx(scores, abs=1e-5)
    if fmt == "pairs":
        assert [r["input_pair"] for r in rows] == split["text_pair"]
        assert set(evaluated) <= {"different", "same"}


def test_a_pair_task_refuses_single_texts_everywhere(runs, tmp_path, capsys):
    pairs_run, _ = runs("pairs")
    saved = json.loads((pairs_run / "model" / "config.json").read_text())
    assert saved["text_pair"] is True  # training recorded it
    # predict: --text alone, or a file without the pair column
    code, out, err = cli(capsys, "predict", pairs_run, "--text", "the movie was good")
    assert code == 2 and out == ""
    assert "was trained on sentence pairs, and got no --text-pair" in err
    single = tmp_path / "single.csv"
    single.write_text("sentence1\nthe movie was good\n")
    code, _, err = cli(capsys, "predict", pairs_run, "--input", single)
    assert code == 2 and "has no 'sentence2'" in err and "sentence1,sentence2" in err
    code, out, err = cli(
        capsys, "predict", pairs_run, "--text", "the movie was good", "--text-pair", "a film"
    )
    assert code == 0 and rows_of(out)[0]["input_pair"] == "a film", err
    # the server: 422 naming the task and what to send
    status, body = serve(pairs_run, {"texts": ["the movie was good"]})
    assert status == 422
    assert "'task' was trained on sentence pairs: send 'pairs'" in body["detail"]
    # the Python API
    runtime = load_runs({"task": pairs_run})
    with pytest.raises(PairMismatchError, match="'task' was trained on sentence pairs"):
        runtime.predict(["the movie was good"])
    # the report shows both texts of the examples
    report = write_report([pairs_run], tmp_path / "report.html").read_text()
    assert "<h4>Examples (test)</h4>" in report and "<th>text pair</th>" in report
    sample = json.loads((pairs_run / "metrics.json").read_text())["samples"]["test"][0]
    assert f"<td>{sample['text']}</td><td>{sample['text_pair']}</td>" in report


def test_a_single_text_task_refuses_pairs_everywhere(runs, tmp_path, capsys):
    single_run, _ = runs("csv")
    saved = json.loads((single_run / "model" / "config.json").read_text())
    assert saved["text_pair"] is False
    code, _, err = cli(capsys, "predict", single_run, "--text", "a", "--text-pair", "b")
    assert code == 2 and "was trained on single texts, not sentence pairs" in err
    status, body = serve(single_run, {"pairs": [["the movie", "a film"]]})
    assert status == 422 and "send 'texts' instead of 'pairs'" in body["detail"]
    with pytest.raises(PairMismatchError, match="trained on single texts"):
        load_runs({"task": single_run}).predict(["the movie"], ["a film"])

    # a task saved before text_pair existed takes either, as it did
    old = tmp_path / "old"
    shutil.copytree(single_run / "model", old)
    config = json.loads((old / "config.json").read_text())
    del config["text_pair"]
    (old / "config.json").write_text(json.dumps(config))
    runtime = load_runs({"old": old})
    assert runtime.tasks["old"].text_pair is None
    assert len(runtime.predict(["the movie"], ["a film"])) == len(runtime.predict(["a"])) == 1
