"""Taps on every family: state count, streaming == stacked, untouched base, early stop."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
import transformers
from helpers import FAMILIES

from adalayers.core import models
from adalayers.core.backbone import (
    Backbone,
    fingerprint_files,
    load_backbone,
    resolve_model_path,
    weights_fingerprint,
)
from adalayers.core.multitask import AdaLayers
from adalayers.core.task import Task, TaskConfig

CASES = [(f, "encoder") for f in FAMILIES if f != "gpt2" and f != "llama"]
CASES += [("bart", "decoder"), ("t5", "decoder"), ("gpt2", None), ("llama", None)]
TEXTS = ["the movie was very good", "bad plot", "john read a book in london ."]


def tasks_for(backbone, seed=0, layers=None):
    torch.manual_seed(seed)
    seq = Task(
        TaskConfig(
            "sequence_classification",
            ["neg", "pos"],
            mixer={
                "dim": 8,
                "alpha": 10.0,
                "layers": layers,
                "positional": "learned",
                "max_positions": 64,
            },
            head={"num_heads": 2},
        ),
        backbone.info(),
    )
    tok = Task(
        TaskConfig(
            "token_classification",
            ["O", "B-PER", "I-PER"],
            mixer={"dim": 8, "alpha": 10.0, "layers": layers},
            head={"num_heads": 2, "num_layers": 1, "ff_dim": 16},
        ),
        backbone.info(),
    )
    reg = Task(
        TaskConfig("regression", [], mixer={"dim": 8, "single_layer": 1}, head={"num_heads": 2}),
        backbone.info(),
    )
    for task in (seq, tok):
        torch.nn.init.normal_(task.mixer.p)
    return {"seq": seq, "tok": tok, "reg": reg}


@pytest.fixture
def encode():
    def run(backbone, texts=TEXTS):
        return dict(backbone.tokenizer(texts, padding=True, return_tensors="pt"))

    return run


@pytest.mark.parametrize(("family", "states"), CASES)
def test_streaming_equals_stacked(tiny_model_dir, encode, family, states):
    backbone = load_backbone(tiny_model_dir(family), states=states)
    inputs = encode(backbone)
    hidden = backbone.hidden_states(inputs)
    blocks = 3 if states != "decoder" or family not in ("bart", "t5") else 2
    assert backbone.num_blocks == blocks
    assert len(hidden) == backbone.num_states == blocks + 1  # every state, the last included
    runtime = AdaLayers(backbone, tasks_for(backbone)).eval()
    streamed = runtime(inputs).logits
    stacked = runtime(inputs, stream=False).logits
    for name in streamed:
        torch.testing.assert_close(streamed[name], stacked[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("family", "states"), CASES)
def test_taps_see_exactly_the_reported_hidden_states(tiny_model_dir, encode, family, states):
    backbone = load_backbone(tiny_model_dir(family), states=states)
    inputs = encode(backbone)
    seen = {}
    taps = {i: [lambda i, z: seen.__setitem__(i, z.clone())] for i in range(backbone.num_states)}
    backbone.run(inputs, taps)
    for i, reference in enumerate(backbone.hidden_states(inputs)):
        assert torch.equal(seen[i], reference), f"state {i}"


@pytest.mark.parametrize(("family", "states"), CASES)
def test_base_output_bit_identical_with_heads(tiny_model_dir, encode, family, states):
    backbone = load_backbone(tiny_model_dir(family), states=states)
    inputs = encode(backbone)
    bare = backbone(inputs)
    runtime = AdaLayers(backbone, tasks_for(backbone)).eval()
    out = runtime(inputs, return_base_output=True)
    assert torch.equal(out.base_output.last_hidden_state, bare.last_hidden_state)
    assert set(out.logits) == {"seq", "tok", "reg"}
    for block in backbone.blocks:  # no taps left behind
        assert not block._forward_hooks and not block._forward_pre_hooks


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_early_stop_gives_heads_the_same_result(tiny_model_dir, encode, family):
    backbone = load_backbone(tiny_model_dir(family))
    inputs = encode(backbone)
    runtime = AdaLayers(backbone, tasks_for(backbone, layers=[0, 1])).eval()
    calls = []
    handle = backbone.blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    early = runtime(inputs).logits
    assert calls == [], "the last block ran although no task needs it"
    full = runtime(inputs, return_base_output=True).logits
    assert calls == [1]
    handle.remove()
    for name in early:
        assert torch.equal(early[name], full[name])


def test_base_is_frozen_and_only_tasks_learn(tiny_model_dir, encode):
    backbone = load_backbone(tiny_model_dir("bert"))
    assert not any(p.requires_grad for p in backbone.parameters())
    tasks = tasks_for(backbone)
    runtime = AdaLayers(backbone, tasks).train()
    assert not backbone.model.training  # stays in eval mode
    inputs = encode(backbone)
    logits = runtime(inputs).logits
    loss = tasks["seq"].loss(logits["seq"], torch.tensor([0, 1, 1]))
    loss.backward()
    assert tasks["seq"].mixer.weight.grad is not None and tasks["seq"].mixer.p.grad is not None
    assert tasks["seq"].head.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())
    # the streaming training graph gives the same gradients as the stacked one
    grads = [p.grad.clone() for p in tasks["seq"].parameters()]
    tasks["seq"].zero_grad()
    stacked = runtime(inputs, stream=False).logits["seq"]
    tasks["seq"].loss(stacked, torch.tensor([0, 1, 1])).backward()
    for g, p in zip(grads, tasks["seq"].parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_states_option_is_checked(tiny_model_dir):
    with pytest.raises(ValueError, match="encoder-decoder"):
        load_backbone(tiny_model_dir("bert"), states="decoder")


def test_missing_model_error_is_clear(tmp_path):
    with pytest.raises(OSError, match="could not load base model"):
        load_backbone(tmp_path / "nope")


def test_zero_weight_layers_are_not_tapped(tiny_model_dir, encode, monkeypatch):
    backbone = load_backbone(tiny_model_dir("bert"))
    task = Task(
        TaskConfig(
            "sequence_classification",
            ["a", "b"],
            mixer={"dim": 8, "alpha": 100.0, "cutoff": 0.1},
            head={"num_heads": 2},
        ),
        backbone.info(),
    )
    with torch.no_grad():
        task.mixer.p.copy_(torch.tensor([0.0, 0.03, -0.05, 0.02]))
    weights = task.mixer.layer_weights()
    assert weights[0] == 0 and weights[2] == 0 and weights[1] > 0 and weights[3] > 0
    seen = []
    real_run = backbone.run

    def spy(inputs, taps, **kwargs):
        seen.append(sorted(taps))
        return real_run(inputs, taps, **kwargs)

    monkeypatch.setattr(backbone, "run", spy)
    runtime = AdaLayers(backbone, {"t": task}).eval()
    streamed = runtime(encode(backbone)).logits["t"]
    assert seen == [[1, 3]]
    torch.testing.assert_close(streamed, runtime(encode(backbone), stream=False).logits["t"])


def test_embedded_name_resolves_to_the_package(minilm_path, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="adalayers.core.backbone"):
        assert resolve_model_path("all-MiniLM-L6-v2") == str(minilm_path)
    assert caplog.text == ""


def test_local_folder_under_the_embedded_name_is_loaded_with_a_warning(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    shadow = tmp_path / "all-MiniLM-L6-v2"
    shutil.copytree(tiny_model_dir("bert"), shadow)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="adalayers.core.backbone"):
        backbone = load_backbone("all-MiniLM-L6-v2")  # a local path is a path, as in HF
    assert backbone.name_or_path == "all-MiniLM-L6-v2"
    assert backbone.info().path == str(shadow.resolve())
    assert backbone.info().to_dict().keys() == {
        "name_or_path",
        "num_states",
        "hidden_size",
        "states",
        "fingerprint",
        "fingerprint_version",
    }
    (record,) = caplog.records
    assert str(shadow.resolve()) in record.getMessage()
    assert "not the embedded base" in record.getMessage()


def test_smollm2_conversion_modes_follow_the_umask(tiny_model_dir, tmp_path, monkeypatch):
    """The converted cache folder is shared like any other (mkdtemp alone would give 0700)."""
    source = tiny_model_dir("llama")
    monkeypatch.setattr(models, "smollm2_gguf", lambda: source / "model.gguf")
    for auto in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = auto.from_pretrained
        monkeypatch.setattr(auto, "from_pretrained", lambda path, gguf_file, real=real: real(path))
    old = os.umask(0o022)
    try:
        target = models.smollm2_path(tmp_path / "cache")
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o755
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (target / "config.json").stat().st_mode & 0o777 == 0o644


# -- the fingerprint: the weights, not the loader -------------------------------------------------
WRAPPERS = {
    "bert": transformers.AutoModelForTokenClassification,
    "roberta": transformers.AutoModelForSequenceClassification,
    "bart": transformers.AutoModelForSeq2SeqLM,
    "t5": transformers.AutoModelForSeq2SeqLM,
    "gpt2": transformers.AutoModelForCausalLM,
    "llama": transformers.AutoModelForCausalLM,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fingerprint_of_the_files_is_that_of_the_loaded_model(tiny_model_dir, family, tmp_path):
    folder = tiny_model_dir(family)
    backbone = load_backbone(folder)
    assert fingerprint_files(folder) == backbone.fingerprint()
    assert len(backbone.fingerprint()) == 16
    if family in WRAPPERS:  # a *ForXxx wrapper: its head is no part of the base
        wrapper = WRAPPERS[family].from_pretrained(folder)
        assert Backbone(wrapper).fingerprint() == backbone.fingerprint()
        wrapper.save_pretrained(tmp_path / "wrapper")  # `bert.`/`model.` names, tied copies
        assert fingerprint_files(tmp_path / "wrapper") == backbone.fingerprint()


def test_fingerprint_ignores_names_dtype_and_config_but_not_the_weights(tiny_model_dir):
    folder = tiny_model_dir("bert")
    backbone = load_backbone(folder)
    state = backbone.model.state_dict()
    expected = backbone.fingerprint()
    assert weights_fingerprint((f"0.auto_model.{k}", v) for k, v in state.items()) == expected
    assert load_backbone(folder, dtype=torch.bfloat16).fingerprint() == expected
    other = transformers.BertModel.from_pretrained(
        folder, use_cache=False, attn_implementation="eager"
    )
    assert Backbone(other).fingerprint() == expected  # loader settings are not the weights
    assert load_backbone(tiny_model_dir("bert", seed=1)).fingerprint() != expected
    nudged = dict(state)
    key = "encoder.layer.1.attention.self.query.weight"
    nudged[key] = state[key] + 1e-2
    assert weights_fingerprint(nudged.items()) != expected
    with pytest.raises(ValueError, match="no weight tensors"):
        weights_fingerprint([("embeddings.position_ids", torch.arange(4))])


def test_fingerprint_files_reads_the_index_of_a_sharded_checkpoint(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    model = transformers.AutoModel.from_pretrained(folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # a stray copy beside the shards (e.g. consolidated.safetensors) is not read
    shutil.copy(folder / "model.safetensors", tmp_path / "sharded" / "consolidated.safetensors")
    assert fingerprint_files(tmp_path / "sharded") == load_backbone(folder).fingerprint()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        fingerprint_files(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        fingerprint_files(tmp_path / "bad")


def test_fingerprint_files_hashes_again_when_the_files_change(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    first = fingerprint_files(folder)
    assert fingerprint_files(folder) == first  # unchanged files: remembered
    model = transformers.AutoModel.from_pretrained(folder)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(folder)  # the same path and size, other weights
    assert fingerprint_files(folder) != first
    assert fingerprint_files(folder) == load_backbone(folder).fingerprint()
