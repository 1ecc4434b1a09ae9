"""The baseline mixers: the ELMo scalar mix against NumPy, layer dropout, one layer alone, and
the full store that every one of them reads. (``adalayers compare``, which trains them side by
side: test_compare.py; fine-tuning: test_finetune.py.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import write_cola

from adalayers.core.backbone import load_backbone
from adalayers.core.mixer import LayerMixer, MixerConfig
from adalayers.core.multitask import AdaLayers
from adalayers.core.task import Task, TaskConfig
from adalayers.training import batches
from adalayers.training import cache as cache_module
from adalayers.training.build import TaskModel
from adalayers.training.config import load_config
from adalayers.training.data import load_task_data

_erf = np.vectorize(math.erf)
COLA = ["unacceptable", "acceptable"]


def numpy_scalar_mix(states, w, gamma, projection, layers, positions=None):
    """Reference: F = LN(GELU(gamma * sum_i softmax(w)_i Z_i) W^T), written from the formula."""
    e = np.exp(w - np.max(w))
    dist = e / e.sum()
    s = gamma * sum(dist[j] * states[layer].astype(np.float64) for j, layer in enumerate(layers))
    g = 0.5 * s * (1.0 + _erf(s / math.sqrt(2.0)))
    h = g @ projection.T.astype(np.float64)
    out = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    if positions is not None:
        out = out + positions[: out.shape[1]]
    return out, dist


def scalar_mixer(num_states=5, d=12, **kw):
    torch.manual_seed(0)
    mixer = LayerMixer(MixerConfig(dim=6, mode="scalar_mix", **kw), num_states, d).eval()
    with torch.no_grad():
        mixer.p.copy_(torch.randn_like(mixer.p))
        mixer.gamma.fill_(1.7)
    return mixer, [torch.randn(2, 7, d) for _ in range(num_states)]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"layers": [1, 3, 4]},
        {"single_layer": -1},
        {"positional": "sinusoidal", "max_positions": 16},
    ],
)
def test_scalar_mix_matches_numpy(kw):
    mixer, states = scalar_mixer(**kw)
    got = mixer(states).detach().numpy()
    positions = mixer.positions.numpy() if mixer.positions is not None else None
    want, dist = numpy_scalar_mix(
        [s.numpy() for s in states],
        mixer.p.detach().numpy(),
        1.7,
        mixer.projection.detach().numpy(),
        mixer.layer_indices,
        positions,
    )
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(mixer.distribution().detach().numpy(), dist, atol=1e-6)
    assert "weight" not in dict(mixer.named_parameters())  # one projection, not one per layer
    assert mixer.projection.shape == (6, 12) and mixer.gamma.shape == ()


def test_scalar_mix_ignores_alpha_and_refuses_cutoff():
    a = LayerMixer(MixerConfig(dim=4, mode="scalar_mix", alpha=1.0), 3, 8)
    b = LayerMixer(MixerConfig(dim=4, mode="scalar_mix", alpha=100.0), 3, 8)
    with torch.no_grad():
        a.p.copy_(torch.tensor([0.1, 0.5, -0.2]))
        b.p.copy_(a.p)
    torch.testing.assert_close(a.distribution(), b.distribution())
    with pytest.raises(ValueError, match="cutoff"):
        MixerConfig(mode="scalar_mix", cutoff=0.1)
    with pytest.raises(ValueError, match="task.mixer.mode"):
        load_config(None, ["task.mixer.mode=elmo"])


@pytest.fixture(scope="module")
def bert(tiny_model_dir):
    return load_backbone(tiny_model_dir("bert"))


def _inputs(backbone):
    texts = ["the movie was very good", "bad plot", "john read a book in london ."]
    return dict(backbone.tokenizer(texts, return_tensors="pt", padding=True))


def _tasks(backbone):
    torch.manual_seed(1)
    info = backbone.info()
    scalar = Task(
        TaskConfig("sequence_classification", COLA, mixer={"dim": 8, "mode": "scalar_mix"}),
        info,
    )
    with torch.no_grad():
        scalar.mixer.p.copy_(torch.randn_like(scalar.mixer.p))
        scalar.mixer.gamma.fill_(0.8)
    plain = Task(TaskConfig("token_classification", ["O", "X", "Y"], mixer={"dim": 8}), info)
    single = Task(
        TaskConfig(
            "sequence_classification",
            COLA,
            mixer={"dim": 8, "mode": "scalar_mix", "single_layer": 2},
        ),
        info,
    )
    return {"scalar": scalar, "plain": plain, "single": single}


def test_scalar_mix_streaming_equals_stacked_and_trains(bert):
    runtime = AdaLayers(bert, _tasks(bert)).eval()
    inputs = _inputs(bert)
    streamed = runtime(inputs).logits
    stacked = runtime(inputs, stream=False).logits
    for name in streamed:
        torch.testing.assert_close(streamed[name], stacked[name], rtol=1e-5, atol=1e-5)
    runtime.train()
    runtime(inputs).logits["scalar"].sum().backward()
    mixer = runtime.tasks["scalar"].mixer
    for param in (mixer.p, mixer.gamma, mixer.projection):
        assert param.grad is not None and param.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["adalayers", "scalar_mix"])
def test_layer_dropout_streaming_equals_stacked_in_training(bert, mode):
    torch.manual_seed(0)
    mixer = {"dim": 8, "mode": mode, "layer_dropout": 0.5}
    task = Task(TaskConfig("sequence_classification", COLA, mixer=mixer), bert.info())
    runtime = AdaLayers(bert, {"t": task}).train()
    inputs = _inputs(bert)
    outputs, grads = [], []
    for stream in (True, False):
        torch.manual_seed(11)  # the same layer mask for both forms
        task.zero_grad()
        logits = runtime(inputs, stream=stream).logits["t"]
        logits.sum().backward()
        outputs.append(logits.detach())
        grads.append([p.grad.clone() for p in task.parameters() if p.grad is not None])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.manual_seed(11)
    dropped = task.mixer.mixing_weights()
    assert (dropped == 0).any() and (dropped > 0).any()  # this seed drops some, not all
    assert len(grads[0]) == len(grads[1]) > 0


def test_scalar_mix_saves_and_loads(bert, tmp_path):
    task = _tasks(bert)["scalar"].eval()
    folder = task.save_pretrained(tmp_path / "task")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["mixer"]["mode"] == "scalar_mix"
    loaded = Task.from_pretrained(folder, bert).eval()
    assert loaded.mixer.gamma.item() == pytest.approx(0.8)
    inputs = _inputs(bert)
    a = AdaLayers(bert, {"t": task})(inputs).logits["t"]
    b = AdaLayers(bert, {"t": loaded})(inputs).logits["t"]
    torch.testing.assert_close(a, b)


def test_one_full_store_serves_every_mixer(bert, tmp_path):
    data = load_task_data("cola", write_cola(tmp_path / "data", n_train=30))
    tasks = _tasks(bert)
    ds = batches.tokenize(data, "train", bert.tokenizer, tasks["scalar"], 32)
    full = cache_module.open_or_build(
        bert, ds, "train", range(bert.num_states), dtype="float32", root=tmp_path / "c"
    )
    rows = [0, 5, 11]
    width = max(ds["length"][i] for i in rows)
    batch = batches.collate([ds[i] for i in rows], bert.tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    for name in ("scalar", "single"):
        task = tasks[name].eval()
        view = full.select(task.mixer.layer_indices)
        states = view.batch(rows, width)
        assert sorted(states) == task.mixer.layer_indices  # reads only its own layers
        model = TaskModel(bert, task).eval()
        with torch.no_grad():
            cached = model(states=states, attention_mask=batch["attention_mask"])
            online = model(**inputs)
        torch.testing.assert_close(cached, online, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="all_layers"):
        cache_module.open_or_build(bert, ds, "train", [1], root=tmp_path / "c").select([2])
    with pytest.raises(ValueError, match="contradict"):
        load_config(None, ["cache.all_layers=true", "cache.layers=2"])
