"""core/kinds.py (issue 21 point 3, one TaskKind): each kind's loss, targets, postprocessing and
metrics against hand computations; no task-type string branch left outside kinds.py; the
multi-label kind read from JSONL and CSV, then trained, evaluated, predicted, served and attached
end to end with thresholds tuned on validation."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import yaml

from adalayers.core.encoding import IGNORE_INDEX
from adalayers.core.kinds import KINDS, best_thresholds, kind_of
from adalayers.core.metrics import compute_metrics, multilabel_scores, primary_metric
from adalayers.core.task import Task, TaskConfig
from adalayers.training.config import load_config
from adalayers.training.data import load_task_data

SEQ = kind_of("sequence_classification")
TOK = kind_of("token_classification")
REG = kind_of("regression")
MULTI = kind_of("multilabel_classification")
SRC = Path(__file__).resolve().parents[1] / "src" / "adalayers"


def test_kinds_are_registered_and_unknown_names_list_them():
    assert list(KINDS) == [
        "sequence_classification",
        "token_classification",
        "regression",
        "multilabel_classification",
    ]
    for name, kind in KINDS.items():
        assert kind.name == name and kind.primary_metric in kind.metrics
    with pytest.raises(ValueError, match=r"unknown task type 'ner'; the known kinds are \["):
        kind_of("ner")
    with pytest.raises(ValueError, match="unknown task type 'ner'"):
        TaskConfig("ner", ["a", "b"])
    assert (TOK.per_token, TOK.reads_pairs, REG.has_labels) == (True, False, False)
    assert [k.head_class.__name__ for k in (SEQ, TOK, REG, MULTI)] == [
        "SequenceHead",
        "TokenHead",
        "SequenceHead",
        "SequenceHead",
    ]


def test_no_task_type_branch_outside_kinds():
    """Every module asks the kind; a string comparison of a task type is a bug to move."""
    branch = re.compile(
        r"task_type\s*[!=]=|[!=]=\s*(TOK|REG|SEQ)\b"
        r"|[!=]=\s*\"(sequence_classification|token_classification|regression|multilabel_\w+)\""
    )
    found = [
        f"{path.relative_to(SRC)}:{i}"
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "kinds.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if branch.search(line)
    ]
    assert found == []


# -- losses against hand computations ----------------------------------------------------------
def test_losses():
    ce = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    seq = SEQ.loss(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert seq.item() == pytest.approx(ce, rel=1e-6)
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]]])  # (1, 3, 2)
    tok = TOK.loss(logits, torch.tensor([[0, 1, IGNORE_INDEX]]))  # the third token ignored
    assert tok.item() == pytest.approx(ce, rel=1e-6)
    reg = REG.loss(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0]))
    assert reg.item() == pytest.approx(1.0)
    bce = (math.log(2) + math.log(1 + math.exp(2))) / 2  # -log σ(0), -log(1 - σ(2))
    multi = MULTI.loss(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]]))
    assert multi.item() == pytest.approx(bce, rel=1e-6)


def test_task_loss_is_the_kinds_plus_the_mixer_term():
    from adalayers.core.backbone import BaseInfo

    base = BaseInfo("x", num_states=4, hidden_size=16, states="encoder", fingerprint="f" * 16)
    task = Task(TaskConfig("multilabel_classification", ["a", "b", "c"], mixer={"dim": 8}), base)
    assert task.head.out.out_features == 3
    logits, targets = torch.randn(4, 3), torch.tensor([[1.0, 0, 1]] * 4)
    expected = MULTI.loss(logits, targets) + task.mixer.regularization()
    assert task.loss(logits, targets).item() == pytest.approx(expected.item())


# -- labels and targets ------------------------------------------------------------------------
def test_targets_and_batches():
    labels = TaskConfig("multilabel_classification", ["a", "b", "c"])
    assert MULTI.targets(labels, [["c", "a"], []]) == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    batch = MULTI.batch_targets([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], width=7)
    assert batch.dtype == torch.float32 and batch.shape == (2, 3)
    with pytest.raises(ValueError, match=r"label 'z' is not one of this task's labels"):
        MULTI.targets(labels, [["z"]])

    seq = TaskConfig("sequence_classification", ["neg", "pos"])
    assert SEQ.targets(seq, ["pos", "neg"]) == [1, 0]
    assert SEQ.batch_targets([1, 0], width=7).tolist() == [1, 0]
    assert REG.targets(TaskConfig("regression"), ["1.5", 2]) == [1.5, 2.0]

    tags = TaskConfig("token_classification", ["O", "B-PER", "I-PER"])
    assert TOK.targets(tags, [["B-PER", "I-PER", "O"]]) == [[1, 2, 0]]
    padded = TOK.batch_targets([[1, 2], [0]], width=3)
    assert padded.tolist() == [[1, 2, IGNORE_INDEX], [0, IGNORE_INDEX, IGNORE_INDEX]]

    assert (SEQ.num_outputs(["a", "b"]), REG.num_outputs([]), MULTI.num_outputs("abc")) == (2, 1, 3)
    with pytest.raises(ValueError, match="a regression task has no labels"):
        TaskConfig("regression", ["a", "b"])
    with pytest.raises(ValueError, match="needs at least 2 label names"):
        TaskConfig("multilabel_classification", ["a"])


def test_multilabel_options_are_checked_and_saved_only_for_it():
    config = TaskConfig("multilabel_classification", ["a", "b"])
    assert config.options == {"thresholds": [0.5, 0.5], "tune_thresholds": True}
    assert config.to_dict()["options"] == config.options
    given = TaskConfig("multilabel_classification", ["a", "b"], options={"thresholds": 0.3})
    assert given.options == {"thresholds": [0.3, 0.3], "tune_thresholds": False}
    assert "options" not in TaskConfig("sequence_classification", ["a", "b"]).to_dict()
    assert TaskConfig.from_dict(config.to_dict()) == config
    for options, message in [
        ({"thresholds": [0.5]}, r"options.thresholds has 1 values for the 2 labels"),
        ({"thresholds": [0.5, 1.5]}, r"options.thresholds: 1.5 is not a probability"),
        ({"thresholds": "high"}, r"options.thresholds has 1 values|not a probability"),
        ({"threshold": 0.5}, r"options: unknown key\(s\) \['threshold'\]"),
        ({"tune_thresholds": "yes"}, r"options.tune_thresholds must be true or false"),
    ]:
        with pytest.raises(ValueError, match=message):
            TaskConfig("multilabel_classification", ["a", "b"], options=options)
    with pytest.raises(ValueError, match="a sequence_classification task takes no options"):
        TaskConfig("sequence_classification", ["a", "b"], options={"thresholds": 0.5})


# -- postprocessing: the one prediction format of every entry point -----------------------------
def test_postprocess():
    seq = TaskConfig("sequence_classification", ["neg", "pos"])
    out = SEQ.postprocess(seq, torch.tensor([0.0, math.log(3)]))  # softmax: 0.25, 0.75
    assert list(out) == ["label", "score"] and out["label"] == "pos"
    assert out["score"] == pytest.approx(0.75)
    assert REG.postprocess(TaskConfig("regression"), torch.tensor([1.5])) == {"value": 1.5}

    tags = TaskConfig("token_classification", ["O", "B-PER", "I-PER"], head={"decoding": "argmax"})
    logits = torch.tensor([[0.0, 0.0, math.log(2)], [math.log(3), 0.0, 0.0]])  # (2 words, 3)
    out = TOK.postprocess(tags, logits, words=["john", "read"])
    assert list(out) == ["words", "labels", "scores"]
    assert out["words"] == ["john", "read"] and out["labels"] == ["I-PER", "O"]
    assert out["scores"] == pytest.approx([0.5, 0.6])
    bio = TaskConfig("token_classification", ["O", "B-PER", "I-PER"])  # auto: IOB2 -> bio
    out = TOK.postprocess(bio, logits, tokens=["[CLS]", "john"])
    assert list(out) == ["tokens", "labels", "scores"] and out["labels"][0] != "I-PER"

    multi = TaskConfig(
        "multilabel_classification", ["a", "b", "c"], options={"thresholds": [0.5, 0.9, 0.1]}
    )
    logits = torch.tensor([0.0, math.log(4), -math.log(4)])  # sigmoid: 0.5, 0.8, 0.2
    out = MULTI.postprocess(multi, logits)
    assert out["labels"] == ["a", "c"]  # 0.5 >= 0.5, 0.8 < 0.9, 0.2 >= 0.1
    assert out["scores"] == pytest.approx({"a": 0.5, "b": 0.8, "c": 0.2})
    assert MULTI.predict(multi, logits[None]).tolist() == [[1, 0, 1]]  # evaluation agrees
    assert MULTI.named(multi, [[1, 0, 1], [0.0, 0.0, 0.0]]) == [["a", "c"], []]


# -- metrics -------------------------------------------------------------------------------------
def test_multilabel_metrics_by_hand():
    gold = [[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    pred = [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    # label 0: TP 2 -> F1 1; label 1: TP 1, FN 1 -> 2/3; label 2: FP 1, FN 1 -> 0; label 3 absent
    scores = multilabel_scores(gold, pred)
    assert scores == pytest.approx({"f1_micro": 6 / 9, "f1_macro": 5 / 9, "exact_match": 0.5})
    assert compute_metrics("multilabel_classification", gold, pred, names=["exact_match"]) == {
        "exact_match": 0.5
    }
    assert multilabel_scores([[0, 0]], [[0, 0]]) == {
        "f1_micro": 0.0,
        "f1_macro": 0.0,
        "exact_match": 1.0,
    }
    with pytest.raises(ValueError, match="rows of one value per label"):
        multilabel_scores([[1, 0]], [[1, 0, 0]])
    assert primary_metric("multilabel_classification") == "f1_micro"
    with pytest.raises(ValueError, match="'accuracy' is not a metric of a multilabel"):
        MULTI.check_metrics(["accuracy"], ["a", "b"])


def test_sequence_kind_metrics_and_tables():
    scores = SEQ.compute_metrics([1, 0, 1, 1], [1, 0, 0, 1], positive=1)
    assert scores["accuracy"] == 0.75 and scores["f1_positive"] == pytest.approx(0.8)
    task = TaskConfig("sequence_classification", ["neg", "pos"])
    tables = SEQ.tables(
        task, [1, 0, 1], [1, 1, 1], names=["accuracy"], positive=1, train_labels=["neg"] * 3
    )
    assert tables["majority"] == {"label": "neg", "accuracy": pytest.approx(1 / 3)}
    assert tables["confusion_matrix"] == {"labels": ["neg", "pos"], "counts": [[0, 1], [0, 2]]}
    assert SEQ.positive_id(["neg", "pos"], None) == 1 and SEQ.positive_id(["a", "b"], "a") == 0
    with pytest.raises(ValueError, match="is for two-label classification"):
        MULTI.positive_id(["a", "b"], "a")


def test_thresholds_maximise_each_labels_f1():
    probs = torch.tensor([[0.1, 0.3, 0.2], [0.4, 0.3, 0.9], [0.35, 0.3, 0.2], [0.8, 0.3, 0.9]])
    gold = torch.tensor([[0, 0, 0], [1, 0, 1], [0, 0, 0], [1, 0, 1]]).bool()
    # label 0: at 0.375 (between 0.35 and 0.4) F1 is 1; label 1 has no positive: kept;
    # label 2: 0.55 and the start 0.5 both give F1 1, the start wins the tie
    assert best_thresholds(probs, gold, [0.5, 0.5, 0.5]) == pytest.approx([0.375, 0.5, 0.5])
    task = TaskConfig("multilabel_classification", ["a", "b", "c"])
    options = MULTI.calibrate(task, torch.logit(probs), gold.float())
    assert options["thresholds"] == pytest.approx([0.375, 0.5, 0.5], abs=1e-6)
    fixed = TaskConfig("multilabel_classification", ["a", "b", "c"], options={"thresholds": 0.7})
    assert MULTI.calibrate(fixed, torch.logit(probs), gold.float())["thresholds"] == [0.7] * 3


# -- multi-label data files ----------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_multilabel_jsonl_and_csv(tmp_path):
    rows = [{"text": "a", "label": ["x", "y"]}, {"text": "b", "label": []}, {"text": "c"}]
    rows[2]["label"] = ["z"]
    jsonl = _write(tmp_path / "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows * 4))
    data = load_task_data("jsonl", files={"train": jsonl}, task_type="multilabel_classification")
    assert data.kind is MULTI and data.label_names == ["x", "y", "z"]
    assert len(data.splits["train"]) + len(data.splits["validation"]) == 12  # a random 10% held
    assert data.splits["test"]["label"][0] in (["x", "y"], [], ["z"])
    csv = _write(tmp_path / "t.csv", 'text,label\na,x|y\nb,\n"c, d",z\n' * 4)
    data = load_task_data(
        "csv", files={"train": csv, "validation": csv}, task_type="multilabel_classification"
    )
    assert data.splits["validation"]["label"][:3] == [["x", "y"], [], ["z"]]

    def fails(text: str, message: str, suffix: str = "jsonl", **kwargs) -> None:
        path = _write(tmp_path / f"bad.{suffix}", text)
        with pytest.raises(ValueError, match=message.replace("PATH", re.escape(str(path)))):
            load_task_data(
                suffix, files={"train": path}, task_type="multilabel_classification", **kwargs
            )

    fails(
        '{"text": "a", "label": ["x"]}\n{"text": "b", "label": "x"}\n',
        r"PATH:2: the label of a multi-label example must be a list of label names",
    )
    fails('{"text": "a", "label": [["x"]]}\n', r"PATH:1: a multi-label label must be a list")
    fails(
        '{"text": "a", "label": ["x", "q"]}\n',
        r"label 'q' in PATH:1 is not one of the allowed labels \['x', 'y'\]",
        label_names=["x", "y"],
    )
    fails('{"text": "a", "label": ["x", "x"]}\n', r"PATH:1: label\(s\) \['x'\] listed twice")
    fails("text,label\na,x||y\n", r"PATH:2: label cell 'x\|\|y' has an empty name", "csv")


def test_multilabel_in_a_run_config():
    config = load_config(None, ["data.task=jsonl", "data.task_type=multilabel_classification"])
    assert config.data.task_type == "multilabel_classification"
    with pytest.raises(ValueError, match=r"data.task_type: unknown task type 'multi'"):
        load_config(None, ["data.task_type=multi"])
    config = load_config(None, ["task.options={thresholds: 0.4}", "task.metrics=[f1_macro]"])
    assert config.task.options == {"thresholds": 0.4}


# -- end to end: train, evaluate, predict, serve, attach ------------------------------------------
PHRASES = {
    "praise": ["was good", "was great", "we love it"],
    "blame": ["was bad", "was terrible", "we hate it"],
    "place": ["in london", "in paris", "in new york"],
}
SETS = [["praise"], ["blame"], ["place"], ["praise", "place"], ["blame", "place"], []]
SUBJECTS = ["the movie", "the book", "a story", "the plot"]


def write_multilabel(folder: Path) -> dict[str, str]:
    files = {}
    for split, n, seed in (("train", 48, 0), ("validation", 12, 1), ("test", 12, 2)):
        rng = random.Random(seed)
        lines = []
        for i in range(n):
            labels = SETS[i % len(SETS)]
            words = [rng.choice(SUBJECTS)] + [rng.choice(PHRASES[lab]) for lab in labels]
            lines.append(json.dumps({"text": " ".join(words), "topics": labels}))
        files[split] = str(folder / f"{split}.jsonl")
        Path(files[split]).write_text("\n".join(lines) + "\n")
    return files


def test_multilabel_end_to_end(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from adalayers import attach, load_runs
    from adalayers.cli import main
    from adalayers.serving.app import create_app
    from adalayers.training import train as train_module

    files = write_multilabel(tmp_path)
    config = {
        "base": str(tiny_model_dir("bert")),
        "data": {
            "task": "jsonl",
            "task_type": "multilabel_classification",
            "files": files,
            "columns": {"text": "text", "label": "topics"},
            "max_length": 32,
        },
        "task": {
            "mixer": {"dim": 8, "alpha": 16, "positional": "learned", "max_positions": 32},
            "head": {"num_heads": 2, "num_layers": 1, "ff_dim": 16},
        },
        "train": {"epochs": 10, "batch_size": 8, "lr": 1e-2},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    results = train_module.fit(load_config(tmp_path / "config.yaml"), run, quiet=True)

    # evaluate reports the kind's metrics; thresholds tuned on validation were saved
    assert results["metric"] == "f1_micro"
    test = results["test"]
    assert [k for k in test if isinstance(test[k], float)] == [
        "f1_micro",
        "f1_macro",
        "exact_match",
    ]
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["task_type"] == "multilabel_classification"
    thresholds = saved["options"]["thresholds"]
    assert len(thresholds) == 3 and saved["options"]["tune_thresholds"] is True
    assert results["options"]["thresholds"] == thresholds
    records = tmp_path / "evaluated.jsonl"
    capsys.readouterr()
    assert main(["evaluate", str(run), "--predictions", str(records), "--quiet"]) == 0
    evaluated = [json.loads(line)["prediction"] for line in records.read_text().splitlines()]
    gold = [json.loads(line)["label"] for line in records.read_text().splitlines()]
    assert gold == [sorted(s, key=["blame", "place", "praise"].index) for s in SETS] * 2
    assert len({json.dumps(p) for p in evaluated}) > 1  # not one answer for all

    texts = [json.loads(line)["text"] for line in Path(files["test"]).read_text().splitlines()]
    runtime = load_runs({"task": run})
    predicted = [p["task"] for p in runtime.predict(texts)]
    assert [p["labels"] for p in predicted] == evaluated
    labels = runtime.tasks["task"].labels
    for p in predicted:  # the saved thresholds decide
        assert list(p) == ["labels", "scores"] and list(p["scores"]) == labels
        chosen = [n for n, t in zip(labels, thresholds) if p["scores"][n] >= t]
        assert p["labels"] == chosen

    with TestClient(create_app(runtime)) as client:
        response = client.post("/predict", json={"texts": texts})
    assert response.status_code == 200
    assert [p["task"]["labels"] for p in response.json()["predictions"]] == evaluated

    tokenizer = runtime.backbone.tokenizer
    with attach(runtime.backbone, dict(runtime.tasks)) as side:
        with torch.inference_mode():
            runtime.backbone.model(**tokenizer(texts, padding=True, return_tensors="pt"))
        attached = [row["task"] for row in side.predictions()]
    assert [p["labels"] for p in attached] == evaluated
    for a, p in zip(attached, predicted):
        assert a["scores"] == pytest.approx(p["scores"], abs=1e-5)
