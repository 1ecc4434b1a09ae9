"""Saving and loading a task without its base; mismatched bases and files."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import pickle
import resource
import shutil
import time

import pytest
import torch

from adalayers.core import task as model_module
from adalayers.core.backbone import load_backbone
from adalayers.core.multitask import AdaLayers
from adalayers.core.task import BaseMismatchError, Task, TaskConfig


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
    assert "text_pair" not in meta and loaded.text_pair is None  # not known: takes both


def test_text_pair_is_saved_and_checked(setup, tmp_path):
    backbone, task = setup
    pairs = Task(dataclasses.replace(task.config, text_pair=True), backbone.info())
    folder = pairs.save_pretrained(tmp_path / "nli")
    assert json.loads((folder / "config.json").read_text())["text_pair"] is True
    assert Task.from_pretrained(folder).text_pair is True
    with pytest.raises(ValueError, match="text_pair=true contradicts task_type token"):
        TaskConfig("token_classification", ["O", "B-X"], text_pair=True)
    with pytest.raises(ValueError, match="task.text_pair: expected bool"):
        TaskConfig.from_dict({"task_type": "regression", "text_pair": "yes"})


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


@contextlib.contextmanager
def address_space_cap(extra_bytes: int):
    """Cap the process's address space at its present size plus ``extra_bytes``: should the
    loader regress and allocate what a crafted config asks for, it fails at once with an
    allocation error instead of taking the test machine's memory."""
    statm = pathlib.Path("/proc/self/statm")
    if not statm.is_file():
        pytest.skip("needs /proc/self/statm (Linux) to cap memory")
    size = int(statm.read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + extra_bytes if hard == resource.RLIM_INFINITY else min(hard, size + extra_bytes)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def edit_config(folder, **sections):
    meta = json.loads((folder / "config.json").read_text())
    for section, values in sections.items():
        if values is None:
            del meta[section]
        elif isinstance(values, dict):
            meta[section].update(values)
        else:
            meta[section] = values
    (folder / "config.json").write_text(json.dumps(meta))


def test_crafted_config_is_refused_from_the_header_at_once(setup, tmp_path, monkeypatch):
    backbone, _ = setup
    token = Task(
        TaskConfig(
            "token_classification",
            ["O", "B-PER", "I-PER"],
            mixer={"dim": 8, "positional": "learned", "max_positions": 64},
            head={"num_heads": 2, "num_layers": 1, "ff_dim": 16},
        ),
        backbone.info(),
    )
    folder = token.save_pretrained(tmp_path / "t")
    # the config: 16 GB of positions and a 65536-wide feed-forward layer
    edit_config(folder, mixer={"dim": 4096, "max_positions": 1_000_000}, head={"ff_dim": 65536})

    def no_data(*args, **kwargs):
        raise AssertionError("tensor data read before the config was checked")

    monkeypatch.setattr(model_module, "load_file", no_data)
    start = time.perf_counter()
    with address_space_cap(2**30), pytest.raises(ValueError) as err:
        Task.from_pretrained(folder)
    assert time.perf_counter() - start < 1.0
    message = str(err.value)
    assert str(folder / "model.safetensors") in message and str(folder / "config.json") in message
    assert "head.encoder.layers.0.linear1.bias has shape (16,)" in message
    assert "expects (65536,)" in message


def test_position_table_too_large_is_refused(setup, tmp_path):
    backbone, _ = setup
    config = TaskConfig(
        "regression",
        [],
        mixer={"dim": 512, "positional": "sinusoidal", "max_positions": 8},
        head={"num_heads": 2},
    )
    folder = Task(config, backbone.info()).save_pretrained(tmp_path / "t")
    # a computed table is not in model.safetensors: only a bound keeps it from taking 2 GiB
    edit_config(folder, mixer={"max_positions": 2**20})
    with address_space_cap(2**30), pytest.raises(ValueError, match="sinusoidal") as err:
        Task.from_pretrained(folder)
    assert str(folder / "config.json") in str(err.value)
    assert "lower mixer.max_positions" in str(err.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"base": {"num_states": "4"}}, "base.num_states: expected an integer"),
        ({"base": {"num_states": 10**9}}, "base.num_states must be in 1..4096"),
        ({"base": {"hidden_size": -1}}, "base.hidden_size must be in"),
        ({"base": {"states": "both"}}, "base.states must be"),
        ({"base": {"path": "/elsewhere"}}, "unknown key.*base.path"),
        ({"base": None}, "base: expected a mapping"),
        ({"base": {"fingerprint": None}}, "base.fingerprint: expected str"),
        ({"head": {"num_layers": 10**6}}, "head.num_layers=1000000 is larger than"),
        ({"mixer": {"dim": 8.5}}, "mixer.dim: expected an integer"),
        ({"mixer": {"dim": 10**9}}, "mixer.dim=1000000000 is larger than"),
        ({"mixer": {"alpha": float("nan")}}, "not valid JSON: NaN is not a number"),
    ],
)
def test_config_values_are_checked_naming_file_and_key(setup, tmp_path, edit, message):
    _, task = setup
    folder = task.save_pretrained(tmp_path / "t")
    edit_config(folder, **edit)
    with address_space_cap(2**30), pytest.raises(ValueError, match=message) as err:
        Task.from_pretrained(folder)
    assert str(folder / "config.json") in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [("[1, 2]", "must hold a JSON object"), ('{"mixer": {', "not valid JSON")],
)
def test_config_that_is_not_a_task_object(setup, tmp_path, text, message):
    _, task = setup
    folder = task.save_pretrained(tmp_path / "t")
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        Task.from_pretrained(folder)


def test_task_config_bounds():
    with pytest.raises(ValueError, match="mixer.alpha must be a finite number"):
        TaskConfig("regression", mixer={"alpha": float("inf")})
    sinusoidal = {"positional": "sinusoidal", "max_positions": 2**20}
    TaskConfig("regression", mixer={"dim": 64, **sinusoidal})  # 256 MiB: allowed
    with pytest.raises(ValueError, match="needs a table of 2.0 GiB"):
        TaskConfig("regression", mixer={"dim": 512, **sinusoidal})
    with pytest.raises(ValueError, match="head.ff_dim=2097152 is larger than"):
        TaskConfig("regression", head={"ff_dim": 2**21})


class _Payload:
    """Unpickling this creates a marker file: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_loading_never_unpickles(setup, tmp_path):
    _, task = setup
    folder = task.save_pretrained(tmp_path / "t")
    marker = tmp_path / "code-ran"
    # a pickle beside the weights is never opened
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    Task.from_pretrained(folder)
    # a pickle in place of the weights is refused as not safetensors, unread
    torch.save({"w": _Payload(marker)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Task.from_pretrained(folder)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("umask", "folder_mode", "file_mode"),
    [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640), (0o077, 0o700, 0o600)],
)
def test_saved_task_modes_follow_the_umask(setup, tmp_path, umask, folder_mode, file_mode):
    _, task = setup
    old = os.umask(umask)
    try:
        folder = task.save_pretrained(tmp_path / "t")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == folder_mode
    for name in ("config.json", "labels.json", "model.safetensors"):
        assert (folder / name).stat().st_mode & 0o777 == file_mode, name


def test_shadowed_base_mismatch_names_paths_and_fingerprints(
    setup, tmp_path, tiny_model_dir, monkeypatch, caplog
):
    backbone, task = setup
    task.base = dataclasses.replace(task.base, name_or_path="all-MiniLM-L6-v2")
    folder = task.save_pretrained(tmp_path / "t")
    shadow = tmp_path / "cwd" / "all-MiniLM-L6-v2"  # another model under the embedded name
    shutil.copytree(tiny_model_dir("bert", seed=1), shadow)
    monkeypatch.chdir(tmp_path / "cwd")
    with caplog.at_level(logging.WARNING, logger="adalayers.core.backbone"):
        other = load_backbone("all-MiniLM-L6-v2")
    assert str(shadow.resolve()) in caplog.text
    with pytest.raises(BaseMismatchError) as err:
        Task.from_pretrained(folder, other)
    message = str(err.value)
    assert f"loaded from {shadow.resolve()}" in message
    assert "shadows the embedded base" in message
    assert backbone.fingerprint() in message and other.fingerprint() in message
