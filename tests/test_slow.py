"""Tests on the real embedded MiniLM base (run with ``make test-slow`` / ``pytest -m slow``)."""

from __future__ import annotations

import pytest
import torch

from adalayers.core.backbone import load_backbone
from adalayers.core.multitask import AdaLayers
from adalayers.core.task import Task, TaskConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backbone(minilm_path):
    return load_backbone("all-MiniLM-L6-v2")


def test_embedded_base_has_seven_states(backbone, minilm_path):
    assert backbone.name_or_path == "all-MiniLM-L6-v2"
    assert backbone.num_blocks == 6 and backbone.num_states == 7 and backbone.hidden_size == 384
    inputs = dict(backbone.tokenizer(["A sentence to embed."], return_tensors="pt"))
    assert len(backbone.hidden_states(inputs)) == 7
    assert backbone.max_length == 512


def test_streaming_equals_stacked_on_minilm(backbone):
    torch.manual_seed(0)
    tasks = {
        "seq": Task(
            TaskConfig("sequence_classification", ["a", "b"], mixer={"dim": 64}), backbone.info()
        ),
        "tok": Task(
            TaskConfig(
                "token_classification",
                ["O", "B-PER"],
                mixer={"dim": 64, "alpha": 8.0},
                head={"num_layers": 1},
            ),
            backbone.info(),
        ),
    }
    for task in tasks.values():
        torch.nn.init.normal_(task.mixer.p, std=0.05)
    runtime = AdaLayers(backbone, tasks).eval()
    texts = ["The film was a delight from start to finish.", "John works for Acme in Paris."]
    inputs = dict(backbone.tokenizer(texts, padding=True, return_tensors="pt"))
    streamed, stacked = runtime(inputs).logits, runtime(inputs, stream=False).logits
    for name in tasks:
        assert (streamed[name] - stacked[name]).abs().max().item() < 1e-5
    base = backbone(inputs).last_hidden_state
    assert torch.equal(runtime(inputs, return_base_output=True).base_output.last_hidden_state, base)
    out = runtime.predict(texts)
    assert len(out[1]["tok"]["labels"]) == len(texts[1].split())
