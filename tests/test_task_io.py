"""Saving and loading a task without its base; mismatched bases and files."""

from __future__ import annotations

import json

import pytest
import torch

from adalayers import model as model_module
from adalayers.backbone import load_backbone
from adalayers.model import AdaLayers, BaseMismatchError, Task, TaskConfig


@pytest.fixture
def setup(tiny_model_dir):
    backbone = load_backbone(tiny_model_dir("bert"))
    torch.manual_seed(1)
    task = Task(
        TaskConfig(
            "sequence_classification",
            ["neg", "pos", "mixed"],
            mixer={"dim": 8, "positional": "learned", "max_positions": 64},
            head={"num_heads": 2},
        ),
        backbone.info(),
    )
    torch.nn.init.normal_(task.mixer.p)
    return backbone, task


def test_save_load_gives_identical_outputs(setup, tmp_path):
    backbone, task = setup
    folder = task.save_pretrained(tmp_path / "sentiment")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "labels.json",
        "model.safetensors",
    ]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["base"]["num_states"] == 4 and meta["base"]["hidden_size"] == 32
    assert meta["base"]["fingerprint"] == backbone.fingerprint()
    assert json.loads((folder / "labels.json").read_text()) == ["neg", "pos", "mixed"]
    loaded = Task.from_pretrained(folder, backbone)
    inputs = dict(backbone.tokenizer(["a good film", "bad"], padding=True, return_tensors="pt"))
    a = AdaLayers(backbone, {"t": task}).eval()(inputs).logits["t"]
    b = AdaLayers(backbone, {"t": loaded}).eval()(inputs).logits["t"]
    assert torch.equal(a, b)
    # saving over an existing folder replaces it
    task.save_pretrained(folder)
    assert Task.from_pretrained(folder).labels == ["neg", "pos", "mixed"]


def test_wrong_base_is_refused_naming_both(setup, tmp_path, tiny_model_dir):
    _, task = setup
    folder = task.save_pretrained(tmp_path / "t")
    for other in (
        load_backbone(tiny_model_dir("bert", seed=1)),
        load_backbone(tiny_model_dir("gpt2")),
    ):
        with pytest.raises(BaseMismatchError) as err:
            Task.from_pretrained(folder, other)
        assert str(tiny_model_dir("bert")) in str(err.value)
        assert other.name_or_path in str(err.value)
        with pytest.raises(BaseMismatchError):
            AdaLayers(other, {"t": Task.from_pretrained(folder)})


def test_labels_that_do_not_match_the_head(setup, tmp_path):
    _, task = setup
    folder = task.save_pretrained(tmp_path / "t")
    meta = json.loads((folder / "config.json").read_text())
    meta["labels"] = ["neg", "pos"]
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="lists 2 output"):
        Task.from_pretrained(folder)
    with pytest.raises(ValueError, match="'great' is not one of"):
        task.label_ids(["pos", "great"])
    with pytest.raises(ValueError, match="at least 2 label"):
        TaskConfig("sequence_classification", ["only"])
    with pytest.raises(ValueError, match="unknown key.*lables"):
        TaskConfig.from_dict({"task_type": "regression", "lables": []})


def test_not_a_task_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Task.from_pretrained(tmp_path)


def test_failed_save_leaves_nothing_behind(setup, tmp_path, monkeypatch):
    _, task = setup

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        task.save_pretrained(tmp_path / "t")
    assert list(tmp_path.iterdir()) == []


def test_parameters_added(setup):
    backbone, task = setup
    report = AdaLayers(backbone, {"t": task}).parameters_added()["t"]
    assert (
        report["parameters"] == task.num_parameters() == sum(p.numel() for p in task.parameters())
    )
    assert report["percent_of_base"] == pytest.approx(
        100 * task.num_parameters() / backbone.num_parameters()
    )
