"""Your own data (issue 25): honest CoNLL reading, words that are no tokens, label names and a
task name, the metrics users quote beside the majority class, valid IOB2 output by default,
progress lines where no bar is drawn."""

from __future__ import annotations

import functools
import json
import logging
import random
import re
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict

from adalayers.core.backbone import load_backbone
from adalayers.core.kinds import kind_of
from adalayers.core.metrics import compute_metrics, f1
from adalayers.core.task import Task, TaskConfig
from adalayers.serving.runtime import load_runs
from adalayers.training import cache as cache_module
from adalayers.training import train as train_module
from adalayers.training.config import load_config
from adalayers.training.data import TaskData, load_task_data, read_conll
from adalayers.training.progress import ProgressLog

MODEL = {
    "mixer": {"dim": 8, "alpha": 16, "positional": "learned", "max_positions": 32},
    "head": {"num_heads": 2, "num_layers": 1, "ff_dim": 16},
}


def write_yaml(path: Path, base: Path, data: dict, task: dict | None = None, **train) -> Path:
    config = {
        "base": str(base),
        "data": {"max_length": 32, **data},
        "task": {**MODEL, **(task or {})},
        "train": {"epochs": 1, "batch_size": 8, "lr": 3e-3, **train},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def iob2_valid(tags: list[str]) -> bool:
    return all(
        not tag.startswith("I-") or prev[2:] == tag[2:] for prev, tag in zip(["O", *tags], tags)
    )


# -- point 2: the CoNLL reader ----------------------------------------------------------------
def test_conll_line_without_a_tag_names_file_and_line(tmp_path):
    path = tmp_path / "dev.conll"
    path.write_text("john B-PER\nread\n")
    with pytest.raises(ValueError) as err:
        read_conll(path)  # token column 0, tag column -1: one column is both
    message = str(err.value)
    assert f"{path}:2: malformed CoNLL line 'read'" in message
    assert "two distinct columns" in message and "end a sentence with an empty line" in message


def test_conll_invisible_lines_are_blank(tmp_path):
    path = tmp_path / "dev.conll"
    path.write_text("john B-PER\nread O\n\ufeff\nmary B-PER\n\u200b \u2060\nsaid O\n\ufeff")
    task = load_task_data("conll", files={"train": path, "validation": path})
    assert task.splits["train"]["tokens"] == [["john", "read"], ["mary"], ["said"]]
    assert task.label_names == ["O", "B-PER"]  # no byte-order mark among the labels


def test_conll_tag_outside_the_iob_scheme_is_an_error(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text("taylor B-PER\nswift I-PER\n\ngame B-WORK\nof B_WORK\nthrones PER\n")
    with pytest.raises(ValueError, match=rf"{path}:5: tag 'B_WORK' is not an IOB tag"):
        read_conll(path)
    plain = tmp_path / "pos.conll"  # tags that are not IOB at all are read as they are
    plain.write_text("the DT\ncat NN\n")
    assert read_conll(plain)["tags"] == [["DT", "NN"]]


# -- point 3: words that are no tokens, words beyond the limit, the longest example -----------
def test_tokenize_tells_empty_words_from_cut_words(tiny_model_dir, caplog):
    backbone = load_backbone(tiny_model_dir("bert"))
    labels = ["O", "B-PER"]
    long = ["the"] * 40
    splits = Dataset.from_dict(
        {
            "tokens": [["john", "\ufe0f", "read", "\ufeff", "a", "book"], long],
            "tags": [["B-PER", "O", "O", "O", "O", "O"], ["O"] * 40],
        }
    )
    data = TaskData("ner", "token_classification", labels, DatasetDict({"train": splits}))
    task = Task(TaskConfig("token_classification", labels), backbone.info())
    stats: dict = {}
    with caplog.at_level(logging.INFO, logger="adalayers"):
        train_module.tokenize(data, "train", backbone.tokenizer, task, 16, stats)
    # 40 words + [CLS] + [SEP]; 16 tokens keep 14 words
    assert stats == {"longest": 42, "cut_examples": 1, "cut_words": 26, "empty_words": 2}
    text = caplog.text
    assert "ner/train: 2 word(s) become no token at all" in text
    assert "'\\ufe0f', '\\ufeff'" in text and "Raising data.max_length does not change" in text
    assert "26 word(s) of 1 sentence(s) beyond max_length=16 were cut" in text
    assert "the longest example has 42 tokens" in text

    pairs = Dataset.from_dict({"text": ["john read", " ".join(long)], "label": ["a", "b"]})
    data = TaskData("csv", "sequence_classification", ["a", "b"], DatasetDict({"train": pairs}))
    task = Task(TaskConfig("sequence_classification", ["a", "b"]), backbone.info())
    stats = {}
    train_module.tokenize(data, "train", backbone.tokenizer, task, 16, stats)
    assert stats["longest"] == 42 and stats["cut_examples"] == 1


# -- points 4 and 5 in the config ---------------------------------------------------------------
def test_label_names_task_name_and_metrics_in_the_config():
    config = load_config(
        None,
        [
            "data.task=csv",
            "data.name=paraphrase",
            "data.label_names={0: not_paraphrase, 1: paraphrase}",
            "task.metrics=[accuracy, f1_positive, mcc]",
            "train.log_every_seconds=10",
        ],
    )
    assert config.data.label_names == {"0": "not_paraphrase", "1": "paraphrase"}
    assert config.task.metrics == ["accuracy", "f1_positive", "mcc"]
    assert config.train.log_every_seconds == 10.0
    for override, message in [
        ("task.metrics=[acc]", "task.metrics: unknown or no metric(s) ['acc']"),
        ("data.label_names=[only]", "data.label_names needs at least 2 distinct names"),
        ("train.log_every_seconds=-1", "train.log_every_seconds must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config(None, [override])
    with pytest.raises(ValueError, match=r"train.metric='mcc' is not one of task.metrics"):
        load_config(None, ["task.metrics=[accuracy]", "train.metric=mcc"])


def test_metrics_of_the_task_type_are_checked():
    assert compute_metrics(
        "sequence_classification", [1, 0, 1, 1], [1, 1, 1, 1], names=["f1_positive"], positive=1
    ) == {"f1_positive": pytest.approx(6 / 7)}
    assert compute_metrics("regression", [0.0, 1.0, 2.0], [0.0, 1.0, 2.0], names=["spearman"]) == {
        "spearman": pytest.approx(1.0)
    }
    from adalayers.core.metrics import check_metrics

    with pytest.raises(ValueError, match="f1_positive needs two labels, this task has 3"):
        check_metrics("sequence_classification", ["f1_positive"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="'pearson' is not a metric of a sequence_classification"):
        check_metrics("sequence_classification", ["pearson"], ["a", "b"])


# -- points 4, 5, 7 end to end: a CSV of sentence pairs with labels 0/1 --------------------------
GOOD = ["the movie was good", "a great story", "mary read the book"]
BAD = ["movie the was", "good a the of", "the the the and"]


def write_pairs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = ["sentence1,sentence2,label"]
    for i in range(n):
        label = int(i % 5 != 0)  # 80% paraphrase: the majority class
        second = (GOOD if label else BAD)[rng.randrange(3)]
        rows.append(f"{GOOD[rng.randrange(3)]},{second},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_pairs_with_label_names_task_name_and_metrics(tmp_path, tiny_model_dir, caplog):
    files = {
        split: str(write_pairs(tmp_path / f"{split}.csv", n, seed))
        for split, n, seed in (("train", 40, 0), ("validation", 10, 1), ("test", 15, 2))
    }
    config = write_yaml(
        tmp_path / "pairs.yaml",
        tiny_model_dir("bert"),
        {
            "task": "csv",
            "name": "paraphrase",
            "files": files,
            "columns": {"text": "sentence1", "text_pair": "sentence2", "label": "label"},
            "label_names": {0: "not_paraphrase", 1: "paraphrase"},
        },
        {"metrics": ["accuracy", "f1_positive", "mcc"]},
        log_every_seconds=1e-6,
    )
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="adalayers"):
        results = train_module.fit(load_config(config), run, quiet=True)

    # progress lines where no bar is drawn (quiet, or stderr not a terminal)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1: step")]
    assert lines and "examples/s" in lines[-1] and "elapsed" in lines[-1]
    assert any("left" in line for line in lines)

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "paraphrase" and metrics["metric"] == "accuracy"
    # 40 training examples: what the config left out was chosen for a small set, and recorded
    chosen = metrics["size_defaults"]
    assert chosen["train.cache"] is True and chosen["task.head.dropout"] == 0.1
    assert not {"train.epochs", "train.batch_size", "train.lr"} & set(chosen)  # given
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1 and saved["train"]["weight_decay"] == 0.01
    assert saved["train"]["cache"] is True and saved["task"]["head"]["dropout"] == 0.1
    assert metrics["probe"]["test"] is not None  # the probe check also scored the cached test
    test = metrics["test"]
    assert [k for k in test if isinstance(test[k], float)] == ["accuracy", "f1_positive", "mcc"]
    assert test["confusion_matrix"]["labels"] == ["not_paraphrase", "paraphrase"]
    # the reported F1 is that of the positive class, from the predictions file's keys
    records = [
        json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()
    ]
    gold, predicted = [r["label"] for r in records], [r["prediction"] for r in records]
    assert set(gold) == {"not_paraphrase", "paraphrase"}
    assert test["f1_positive"] == pytest.approx(
        f1(gold, predicted, average="binary", pos_label="paraphrase")
    )
    # the majority class: the most frequent training label, scored the same way
    majority = test["majority"]
    share = gold.count("paraphrase") / len(gold)
    assert majority["label"] == "paraphrase"
    assert majority["accuracy"] == pytest.approx(share)
    assert majority["f1_positive"] == pytest.approx(2 * share / (1 + share))
    assert majority["mcc"] == 0.0
    # the longest example, to choose data.max_length from
    assert metrics["max_length"] == 32
    assert set(metrics["longest_example_tokens"]) >= {"train", "validation", "test"}
    assert 8 <= metrics["longest_example_tokens"]["train"] <= 32
    assert results["test"]["accuracy"] == test["accuracy"]

    # predictions name the labels
    runtime = load_runs([run])
    out = runtime.predict(["the movie was good"], ["a great story"])
    assert out[0]["run"]["label"] in {"not_paraphrase", "paraphrase"}
    assert runtime.tasks["run"].labels == ["not_paraphrase", "paraphrase"]


def test_label_names_as_a_list_name_integer_labels(tmp_path):
    path = write_pairs(tmp_path / "train.csv", 20, 0)
    task = load_task_data(
        "csv",
        files={"train": path},
        columns={"text": "sentence1", "label": "label"},
        label_names=["not_paraphrase", "paraphrase"],
    )
    assert task.label_names == ["not_paraphrase", "paraphrase"]
    assert set(task.splits["train"]["label"]) == {"not_paraphrase", "paraphrase"}


# -- point 6: valid IOB2 output by default --------------------------------------------------------
def test_decoding_auto_is_bio_for_iob2_tags_only():
    iob2 = ["O", "B-PER", "I-PER"]
    assert TaskConfig("token_classification", iob2).head.decoding == "bio"
    assert TaskConfig("token_classification", ["DT", "NN"]).head.decoding == "argmax"
    assert TaskConfig("sequence_classification", ["a", "b"]).head.decoding == "argmax"
    explicit = TaskConfig("token_classification", iob2, head={"decoding": "argmax"})
    assert explicit.head.decoding == "argmax"  # a saved or chosen decoding is kept
    # a task saved before head.decoding existed keeps the argmax it had
    saved = TaskConfig.from_dict({"task_type": "token_classification", "labels": iob2, "head": {}})
    assert saved.head.decoding == "argmax"
    # IOB1 training tags (I-X opens an entity) are scored as they are: argmax
    tokens = kind_of("token_classification")
    assert tokens.resolve_decoding("auto", iob2, [["I-PER", "O"]]) == "argmax"
    assert tokens.resolve_decoding("auto", iob2, [["B-PER", "I-PER"]]) == "bio"


def test_user_conll_predicts_valid_iob2_by_default(tmp_path, tiny_model_dir, monkeypatch, caplog):
    sentences = [
        [("john", "B-PER"), ("read", "O"), ("a", "O"), ("book", "O")],
        [("mary", "B-PER"), ("said", "O"), ("in", "O"), ("new", "B-LOC"), ("york", "I-LOC")],
        [("acme", "B-ORG"), ("corp", "I-ORG"), ("said", "O")],
    ]
    files = {}
    for split, n in (("train", 24), ("validation", 6), ("test", 6)):
        lines = []
        for i in range(n):
            lines += [f"{w} {t}" for w, t in sentences[i % 3]] + [""]
        (tmp_path / f"{split}.conll").write_text("\n".join(lines))
        files[split] = str(tmp_path / f"{split}.conll")
    config = write_yaml(
        tmp_path / "ner.yaml", tiny_model_dir("bert"), {"task": "conll", "files": files}
    )
    config = load_config(config, [f"cache.dir={tmp_path / 'cache'}", "train.cache=true"])
    # the cache build logs its progress too (every 30 s; here at every batch)
    fast = functools.partial(ProgressLog, every_seconds=1e-6)
    monkeypatch.setattr(cache_module, "ProgressLog", fast)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="adalayers"):
        metrics = train_module.fit(config, run, quiet=True)
    assert any(r.getMessage().startswith("cache train: step") for r in caplog.records)

    assert metrics["decoding"] == "bio" and "argmax" in metrics["test"]
    assert "majority" not in metrics["test"]  # a classification's figure, not a tagger's
    records = (run / "predictions_test.jsonl").read_text().split("\n")
    for record in filter(None, records):
        assert iob2_valid(json.loads(record)["predicted_tags"])
    runtime = load_runs([run])
    assert runtime.tasks["run"].decoding == "bio"
    for out in runtime.predict([["john", "said", "new", "york", "acme", "corp"]] * 2):
        assert iob2_valid(out["run"]["labels"])


def test_worked_example_configs_load():
    root = Path(__file__).resolve().parents[1]
    for name in ("pairs", "ner"):
        config = load_config(root / "examples" / "your-data" / f"{name}.yaml")
        for file in config.data.files.values():
            assert (root / file).is_file(), file
    assert config.data.name == "people-and-works"
