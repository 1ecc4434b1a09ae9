"""Every shipped config parses, and builds and trains one step on a tiny base of its family.

The real bases of the reference setups (RoBERTa-large, BART-large-cnn) cannot be downloaded
here, so each config's ``base`` is swapped for a tiny random model of the same architecture and
the task is built and run exactly as :func:`adalayers.training.train.fit` does. Bad configs
must fail
with a ``ValueError`` naming the offending key.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from adalayers.core.backbone import load_backbone
from adalayers.training.batches import collate, tokenize
from adalayers.training.build import TaskModel, build_task
from adalayers.training.config import load_config, save_config
from adalayers.training.data import BENCHMARKS, TaskData

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIG_DIR.rglob("*.yaml"))
IDS = [str(path.relative_to(CONFIG_DIR)) for path in SHIPPED]

REFERENCE = {
    f"{base}-{task}.yaml"
    for base in ("roberta-large", "bart-large-cnn")
    for task in ("imdb", "cola", "conll2003")
}
CPU = {"minilm-imdb.yaml", "minilm-cola.yaml", "minilm-conll2003.yaml"}

# base of a shipped config -> the tiny random family (tests/conftest.py) that stands in for it
TINY_FAMILY = {
    "roberta-large": "roberta",
    "facebook/bart-large-cnn": "bart",
    "all-MiniLM-L6-v2": "bert",
    "SmolLM2-135M-Instruct": "llama",
}

CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
# dataset -> (task type, label names) as the readers hand them to build_task
TASKS = {
    "imdb": ("sequence_classification", ["negative", "positive"]),
    "cola": ("sequence_classification", ["unacceptable", "acceptable"]),
    "conll2003": ("token_classification", CONLL_TAGS),
}
TEXTS = ["the movie was very good", "bad plot", "john read a book in london ."]
WORDS = [["john", "read", "a", "book", "in", "london"], ["acme", "corp", "said"], ["mary"]]
TAGS = [["B-PER", "O", "O", "O", "O", "B-LOC"], ["B-ORG", "I-ORG", "O"], ["B-PER"]]


def tiny_data(name: str) -> TaskData:
    """A three-example train split of ``name`` in the readers' standard columns."""
    task_type, labels = TASKS[name]
    if task_type == "token_classification":
        train = Dataset.from_dict({"tokens": WORDS, "tags": TAGS})
    else:
        train = Dataset.from_dict({"text": TEXTS, "label": [labels[1], labels[0], labels[1]]})
    return TaskData(name, task_type, labels, DatasetDict({"train": train}))


def test_every_setup_is_shipped():
    names = {path.name for path in SHIPPED}
    assert {path.name for path in (CONFIG_DIR / "reference").glob("*.yaml")} == REFERENCE
    assert CPU <= names


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_table_matches_the_readers(name):
    task_type, labels = TASKS[name]
    assert BENCHMARKS[name].task_type == task_type
    if BENCHMARKS[name].label_names:  # CoNLL's tags come from the data, not the table
        assert list(BENCHMARKS[name].label_names) == labels


@pytest.mark.parametrize("path", SHIPPED, ids=IDS)
def test_config_loads(path, tmp_path):
    config = load_config(path)
    assert config.base in TINY_FAMILY, f"add a tiny stand-in for {config.base} to TINY_FAMILY"
    assert config.data.task in TASKS
    assert config.task.mixer.dim % config.task.head.num_heads == 0
    if config.task.mixer.positional != "none":  # else fit() silently cuts inputs shorter
        assert config.task.mixer.max_positions >= config.data.max_length
    if "bart" in config.base:
        assert config.base_states == "encoder"
    # the resolved copy a run folder keeps reloads to the same config
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("path", SHIPPED, ids=IDS)
def test_config_builds_and_trains_on_a_tiny_base(path, tiny_model_dir):
    config = load_config(path)
    config.base = str(tiny_model_dir(TINY_FAMILY[config.base]))
    backbone = load_backbone(
        config.base, states=config.base_states, gguf_file=config.gguf_file, dtype=config.dtype
    )
    assert backbone.num_states == 4  # 3 blocks: the configs must not assume a deeper base
    data = tiny_data(config.data.task)
    torch.manual_seed(0)
    task = build_task(config, data, backbone)
    max_length = min(config.data.max_length, backbone.max_length)
    if config.task.mixer.positional != "none":
        max_length = min(max_length, config.task.mixer.max_positions)
    ds = tokenize(data, "train", backbone.tokenizer, task, max_length)
    batch = collate(
        [ds[i] for i in range(len(ds))], backbone.tokenizer.pad_token_id, kind=task.kind
    )
    batch.pop("index")
    labels = batch.pop("labels")
    model = TaskModel(backbone, task).train()

    logits = model(**batch)
    loss = task.loss(logits, labels)
    loss.backward()

    size, length = batch["input_ids"].shape
    num_labels = len(data.label_names)
    token_task = data.task_type == "token_classification"
    assert logits.shape == ((size, length, num_labels) if token_task else (size, num_labels))
    assert torch.isfinite(loss)
    per_layer = task.mixer.weight.grad.flatten(1).abs().sum(1)  # (n,)
    assert per_layer.shape == (backbone.num_states,) and (per_layer > 0).all()
    assert task.mixer.p.grad is not None and task.mixer.p.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


BAD_FILES = [
    ("trian: {epochs: 3}\n", "trian"),
    ("train: {lrr: 1.0e-3}\n", "train.lrr"),
    ("task: {mixer: {alpah: 64}}\n", "task.mixer.alpah"),
    ("task: {head: {num_head: 8}}\n", "task.head.num_head"),
    ("data: {taks: cola}\n", "data.taks"),
    ("train: {epochs: ten}\n", "train.epochs"),
    ("train: {epochs: true}\n", "train.epochs"),
    ("train: {batch_size: 32.5}\n", "train.batch_size"),
    ("task: {mixer: {dropout: high}}\n", "task.mixer.dropout"),
    ("task: {mixer: {positional: rotary}}\n", "task.mixer.positional"),
    ("train: {mixed_precision: fp8}\n", "train.mixed_precision"),
    ("data: {max_length: [128]}\n", "data.max_length"),
    ("base_states: [encoder]\n", "base_states"),
    ("train: 5\n", "train"),
    ("train: {lr: -1.0}\n", "train.lr"),
    ("task: {mixer: {layers: [0, 1], single_layer: 2}}\n", "single_layer"),
]


@pytest.mark.parametrize(("text", "key"), BAD_FILES, ids=[key for _, key in BAD_FILES])
def test_bad_config_file_names_the_key(text, key, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(key)) as err:
        load_config(path)
    assert str(path) in str(err.value)


BAD_OVERRIDES = [
    ("train.lrr=1e-3", "train.lrr"),
    ("task.heads.num_heads=8", "task.heads"),
    ("train.epochs=many", "train.epochs"),
    ("task.mixer.dim=6.4", "task.mixer.dim"),
    ("train.lr", "train.lr"),  # no value
]


@pytest.mark.parametrize(("override", "key"), BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        load_config(CONFIG_DIR / "minilm-cola.yaml", overrides=[override])


def test_override_replaces_only_its_key():
    path = CONFIG_DIR / "minilm-cola.yaml"
    plain = load_config(path)
    changed = load_config(path, overrides=["train.lr=3e-4", "task.mixer.dim=32"])
    assert changed.train.lr == pytest.approx(3e-4) and isinstance(changed.train.lr, float)
    assert changed.task.mixer.dim == 32
    changed.train.lr, changed.task.mixer.dim = plain.train.lr, plain.task.mixer.dim
    assert changed == plain
