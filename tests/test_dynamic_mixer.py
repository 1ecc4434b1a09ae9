"""``mixer.mode: dynamic``: the online softmax against NumPy, the mixer against its formula,
streaming = stacked on every family, cutoff and early stop, saving and loading."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import FAMILIES

from adalayers.core.backbone import load_backbone
from adalayers.core.mixer import DynamicState, LayerMixer, MixerConfig, StackedStates
from adalayers.core.multitask import AdaLayers
from adalayers.core.task import Task, TaskConfig

CASES = [(f, "encoder") for f in FAMILIES if f != "gpt2" and f != "llama"]
CASES += [("bart", "decoder"), ("t5", "decoder"), ("gpt2", None), ("llama", None)]
TEXTS = ["the movie was very good", "bad plot", "john read a book in london ."]
_erf = np.vectorize(math.erf)


def numpy_softmax_mix(f: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Reference: sum_i softmax_i(s) f_i, all layers at once. f (n, B, T, k), s (n, B, T); or
    s (n, B, T, h), each head weighting its k / h channels."""
    e = np.exp(s - s.max(0, keepdims=True))
    a = e / e.sum(0, keepdims=True)
    if s.ndim == f.ndim:  # heads: the channels of head g are g * k/h ... (g + 1) * k/h - 1
        a = np.repeat(a, f.shape[-1] // s.shape[-1], axis=-1)  # (n, B, T, k)
        return (a * f).sum(0)
    return (a[..., None] * f).sum(0)


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_online_softmax_matches_numpy(scale):
    """One layer at a time (the taps) = the softmax over all layers, also for scores that
    overflow exp() unless rescaled to the running maximum."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 2, 5, 4))  # (n, B, T, k)
    s = scale * rng.normal(size=(6, 2, 5))  # (n, B, T)
    state = None
    with torch.inference_mode():
        for fi, si in zip(torch.tensor(f), torch.tensor(s)):
            state = DynamicState.start(fi.clone(), si) if state is None else state.add(fi, si)
    np.testing.assert_allclose(state.mixed.numpy(), numpy_softmax_mix(f, s), atol=1e-12)
    np.testing.assert_allclose(state.max.numpy(), s.max(0))
    np.testing.assert_allclose(state.total.numpy(), np.exp(s - s.max(0)).sum(0), rtol=1e-12)
    assert np.isfinite(state.mixed.numpy()).all()


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_online_softmax_with_heads_matches_numpy(scale):
    rng = np.random.default_rng(1)
    f = rng.normal(size=(6, 2, 5, 8))  # (n, B, T, k)
    s = scale * rng.normal(size=(6, 2, 5, 4))  # (n, B, T, h)
    state = None
    with torch.inference_mode():
        for fi, si in zip(torch.tensor(f), torch.tensor(s)):
            state = DynamicState.start(fi.clone(), si) if state is None else state.add(fi, si)
    np.testing.assert_allclose(state.mixed.numpy(), numpy_softmax_mix(f, s), atol=1e-12)
    assert state.mixed.shape == (2, 5, 8) and state.total.shape == (2, 5, 4)
    # one head per channel pair differs from one softmax for all: the heads are not tied
    assert not np.allclose(numpy_softmax_mix(f, s), numpy_softmax_mix(f, s[..., 0]))


def test_online_softmax_keeps_the_graph_in_training():
    f = torch.randn(3, 2, 4, 5, requires_grad=True)
    s = torch.randn(3, 2, 4, requires_grad=True)
    state = DynamicState.start(f[0], s[0])
    for i in (1, 2):
        state = state.add(f[i], s[i])
    state.mixed.sum().backward()
    want_f, want_s = torch.autograd.grad(
        torch.einsum("nbt,nbtk->btk", torch.softmax(s, 0), f).sum(), (f, s)
    )
    torch.testing.assert_close(f.grad, want_f)
    torch.testing.assert_close(s.grad, want_s)


def test_online_softmax_with_heads_keeps_the_graph_in_training():
    f = torch.randn(3, 2, 4, 6, requires_grad=True)
    s = torch.randn(3, 2, 4, 3, requires_grad=True)  # 3 heads of 2 channels
    state = DynamicState.start(f[0], s[0])
    for i in (1, 2):
        state = state.add(f[i], s[i])
    state.mixed.sum().backward()
    a = torch.softmax(s, 0).repeat_interleave(2, dim=-1)  # (n, B, T, k)
    want_f, want_s = torch.autograd.grad((a * f).sum(), (f, s))
    torch.testing.assert_close(f.grad, want_f)
    torch.testing.assert_close(s.grad, want_s)


def numpy_dynamic(states, weight, query, p, alpha, layers):
    """Reference: F = sum_i softmax_i(q . f_i + alpha p_i) f_i, f_i = LN(GELU(Z_i) W_i^T)."""
    f = []
    for j, layer in enumerate(layers):
        z = states[layer].astype(np.float64)
        h = (0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))) @ weight[j].T.astype(np.float64)
        f.append((h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5))
    f = np.stack(f)  # (n, B, T, k)
    prior = alpha * p.astype(np.float64)[:, None, None]  # (n, 1, 1)
    if query.ndim == 2:  # (h, k): one query per head
        s = f @ query.T.astype(np.float64) + prior[..., None]  # (n, B, T, h)
    else:
        s = f @ query.astype(np.float64) + prior  # (n, B, T)
    return numpy_softmax_mix(f, s)


def make(num_states=5, d=12, **kw):
    torch.manual_seed(0)
    mixer = LayerMixer(MixerConfig(dim=6, mode="dynamic", **kw), num_states, d).eval()
    with torch.no_grad():
        mixer.p.copy_(torch.randn_like(mixer.p) * 0.1)
        mixer.query.copy_(torch.randn_like(mixer.query))
    states = [torch.randn(2, 7, d) for _ in range(num_states)]
    return mixer, states


@pytest.mark.parametrize(
    "kw",
    [
        {"alpha": 4.0},
        {"alpha": 10.0, "layers": [1, 3, 4]},
        {"alpha": 4.0, "heads": 3},
        {"alpha": 4.0, "heads": 6, "cutoff": 0.1},
    ],
)
def test_dynamic_mixer_matches_numpy(kw):
    mixer, states = make(**kw)
    want = numpy_dynamic(
        [s.numpy() for s in states],
        mixer.weight.detach().numpy(),
        mixer.query.detach().numpy(),
        mixer.p.detach().numpy(),
        mixer.config.alpha,
        mixer.layer_indices,
    )
    np.testing.assert_allclose(mixer(states).detach().numpy(), want, atol=1e-5)
    # streamed one layer at a time: the same numbers
    state = None
    with torch.inference_mode():
        for layer, weight in mixer.active_layers():
            state = mixer.accumulate_dynamic(state, layer, weight, states[layer])
    np.testing.assert_allclose(mixer.finish(state).numpy(), want, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 2])
def test_zero_query_is_the_static_mixer_and_weights_vary_per_token(heads):
    mixer, states = make(alpha=4.0, heads=heads)
    static = LayerMixer(MixerConfig(dim=6, alpha=4.0), 5, 12).eval()
    static.load_state_dict({k: v for k, v in mixer.state_dict().items() if k != "query"})
    with torch.no_grad():
        assert not torch.allclose(mixer(states), static(states), atol=1e-3)
        mixer.query.zero_()
        torch.testing.assert_close(mixer(states), static(states), atol=1e-6, rtol=0)


def test_cutoff_cuts_the_prior_and_static_streaming_step_is_refused():
    mixer, states = make(alpha=100.0, cutoff=0.1)
    with torch.no_grad():
        mixer.p.copy_(torch.tensor([0.0, 0.01, 0.02, -0.05, 0.015]))
    assert [layer for layer, _ in mixer.active_layers()] == [1, 2, 4]
    # a cut state is never read: the mix is the same whatever it holds
    changed = list(states)
    changed[0], changed[3] = torch.full_like(states[0], 1e3), torch.full_like(states[3], -1e3)
    torch.testing.assert_close(mixer(changed), mixer({i: states[i] for i in (1, 2, 4)}))
    with pytest.raises(ValueError, match="accumulate_dynamic"):
        mixer.accumulate(None, 1, torch.tensor(0.5), states[1])


@pytest.mark.parametrize("heads", [1, 3])
def test_packed_rows_equal_the_padded_form(heads):
    mixer, states = make(alpha=4.0, heads=heads)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool()  # (B, T)
    padded = [s * mask[..., None] for s in states]
    index = mask.nonzero().T  # (2, N)
    rows = torch.stack([s[mask] for s in states])  # (n, N, d)
    packed = mixer.forward_rows(list(range(5)), rows, index, (2, 7))
    torch.testing.assert_close(packed, mixer(StackedStates(range(5), torch.stack(padded))))
    assert torch.equal(packed[1, 4:], torch.zeros(3, 6))  # padding tokens mix to zero


def tasks_for(backbone, layers=None, cutoff=0.0, alpha=4.0):
    """A sequence task with one softmax per token, a token task with two heads, a static one."""
    torch.manual_seed(0)
    mixer = {"dim": 8, "alpha": alpha, "layers": layers, "cutoff": cutoff, "mode": "dynamic"}
    seq = Task(
        TaskConfig(
            "sequence_classification",
            ["neg", "pos"],
            mixer={**mixer, "positional": "learned", "max_positions": 64},
            head={"num_heads": 2},
        ),
        backbone.info(),
    )
    tok = Task(
        TaskConfig(
            "token_classification",
            ["O", "B-PER", "I-PER"],
            mixer={**mixer, "heads": 2},
            head={"num_heads": 2, "num_layers": 1, "ff_dim": 16},
        ),
        backbone.info(),
    )
    static = Task(
        TaskConfig("regression", [], mixer={"dim": 8, "alpha": 4.0}, head={"num_heads": 2}),
        backbone.info(),
    )
    for task in (seq, tok, static):
        torch.nn.init.normal_(task.mixer.p)
    for task in (seq, tok):
        torch.nn.init.normal_(task.mixer.query)
    return {"seq": seq, "tok": tok, "static": static}


@pytest.fixture
def encode():
    def run(backbone, texts=TEXTS):
        return dict(backbone.tokenizer(texts, padding=True, return_tensors="pt"))

    return run


@pytest.mark.parametrize(("family", "states"), CASES)
def test_dynamic_streaming_equals_stacked(tiny_model_dir, encode, family, states):
    """Dynamic readers share the fused taps with a static one; the static reader's logits are
    bit-identical to those it gets beside the same readers made static."""
    backbone = load_backbone(tiny_model_dir(family), states=states)
    inputs = encode(backbone)
    tasks = tasks_for(backbone)
    runtime = AdaLayers(backbone, tasks).eval()
    streamed = runtime(inputs).logits
    stacked = runtime(inputs, stream=False).logits
    for name in streamed:
        torch.testing.assert_close(streamed[name], stacked[name], atol=1e-5, rtol=0)
    beside_static = {"static": tasks["static"]}
    for name in ("seq", "tok"):
        config = tasks[name].config
        mixer = {**config.mixer.to_dict(), "mode": "adalayers", "heads": 1}
        beside_static[name] = Task(
            TaskConfig.from_dict({**config.to_dict(), "mixer": mixer}), backbone.info()
        )
        state = {k: v for k, v in tasks[name].state_dict().items() if k != "mixer.query"}
        beside_static[name].load_state_dict(state)
    other = AdaLayers(backbone, beside_static).eval()(inputs).logits
    assert torch.equal(other["static"], streamed["static"])
    for name in ("seq", "tok"):  # the queries changed the others
        assert not torch.allclose(other[name], streamed[name])
    again = runtime(inputs).logits  # the taps' state starts anew with every input
    for name in streamed:
        assert torch.equal(again[name], streamed[name])


@pytest.mark.parametrize("name", ["seq", "tok"])
def test_dynamic_training_graph_gives_the_stacked_gradients(tiny_model_dir, encode, name):
    backbone = load_backbone(tiny_model_dir("bert"))
    task = tasks_for(backbone)[name]  # no dropout: both forwards see the same network
    runtime = AdaLayers(backbone, {name: task}).train()
    inputs = encode(backbone)
    shape = (3,) if name == "seq" else tuple(inputs["input_ids"].shape)
    targets = torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(0))
    task.loss(runtime(inputs).logits[name], targets).backward()
    assert task.mixer.query.grad is not None and task.mixer.query.grad.abs().sum() > 0
    grads = [p.grad.clone() for p in task.parameters()]
    task.zero_grad()
    task.loss(runtime(inputs, stream=False).logits[name], targets).backward()
    for g, p in zip(grads, task.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_cut_layers_are_not_tapped_and_the_base_stops_early(tiny_model_dir, encode, monkeypatch):
    backbone = load_backbone(tiny_model_dir("bert"))
    tasks = tasks_for(backbone, cutoff=0.1, alpha=100.0)
    for task in tasks.values():
        with torch.no_grad():
            task.mixer.p.copy_(torch.tensor([0.01, 0.0, -0.05, -0.04]))  # keeps states 0, 1
    del tasks["static"]
    seen, real_run = [], backbone.run

    def spy(inputs, taps, **kwargs):
        seen.append(sorted(taps))
        return real_run(inputs, taps, **kwargs)

    monkeypatch.setattr(backbone, "run", spy)
    calls = []
    handle = backbone.blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    runtime = AdaLayers(backbone, tasks).eval()
    streamed = runtime(encode(backbone)).logits
    assert seen == [[0, 1]]
    assert calls == [], "the last block ran although the prior cut every state it makes"
    handle.remove()
    stacked = runtime(encode(backbone), stream=False).logits
    for name in streamed:
        torch.testing.assert_close(streamed[name], stacked[name], atol=1e-5, rtol=0)


def test_saved_dynamic_task_loads_and_predicts(tiny_model_dir, tmp_path):
    backbone = load_backbone(tiny_model_dir("bert"))
    tasks = tasks_for(backbone)
    folder = tasks["seq"].save_pretrained(tmp_path / "seq")
    loaded = Task.from_pretrained(folder, backbone)
    assert loaded.config.mixer.mode == "dynamic"
    assert torch.equal(loaded.mixer.query, tasks["seq"].mixer.query)
    before = AdaLayers(backbone, {"t": tasks["seq"]}).predict(TEXTS)
    after = AdaLayers.from_pretrained(backbone, {"t": folder}).predict(TEXTS)
    assert before == after
    folder = tasks["tok"].save_pretrained(tmp_path / "tok")  # two heads: a (2, k) query
    loaded = Task.from_pretrained(folder, backbone)
    assert loaded.config.mixer.heads == 2 and loaded.mixer.query.shape == (2, 8)
    assert torch.equal(loaded.mixer.query, tasks["tok"].mixer.query)


def test_a_folder_whose_config_says_other_heads_is_refused_before_loading(tiny_model_dir, tmp_path):
    """The query's shape follows ``heads``: a config edited to other heads names the tensor."""
    backbone = load_backbone(tiny_model_dir("bert"))
    folder = tasks_for(backbone)["tok"].save_pretrained(tmp_path / "tok")  # two heads
    config = json.loads((folder / "config.json").read_text())
    config["mixer"]["heads"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mixer\.query has shape \(2, 8\).*\(4, 8\)"):
        Task.from_pretrained(folder, backbone)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mode": "dynamic", "heads": 0}, "mixer.heads must be >= 1"),
        ({"mode": "dynamic", "dim": 6, "heads": 4}, "does not divide"),
    ],
)
def test_bad_heads_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        MixerConfig(**kw)


def test_static_modes_do_not_use_heads():
    """A comparison derives its static rows from a config whose heads are the dynamic row's."""
    torch.manual_seed(0)
    one = LayerMixer(MixerConfig(dim=6, alpha=4.0), 5, 12).eval()
    eight = LayerMixer(MixerConfig(dim=6, alpha=4.0, heads=3), 5, 12).eval()
    assert eight.state_dict().keys() == one.state_dict().keys()
    eight.load_state_dict(one.state_dict())
    states = [torch.randn(2, 7, 12) for _ in range(5)]
    assert torch.equal(eight(states), one(states))


def test_attached_dynamic_tasks_read_each_prompt_anew(tiny_model_dir):
    """attach(): persistent taps; each new input (and not the decoding steps) starts the online
    softmax again, and the logits are the ones AdaLayers gives the prompt alone."""
    import transformers as T

    from adalayers.serving.runtime import attach

    folder = tiny_model_dir("llama")
    backbone = load_backbone(folder)
    tasks = tasks_for(backbone)
    lm = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = AdaLayers(backbone, tasks).eval()
    tokenizer = backbone.tokenizer
    with attach(lm, tasks, tokenizer=tokenizer) as side:
        for prompt in (TEXTS[0], TEXTS[2], TEXTS[0]):
            encoded = tokenizer([prompt], return_tensors="pt")
            inputs = {k: encoded[k] for k in ("input_ids", "attention_mask")}
            lm.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
            expected = reference(inputs).logits
            for name in ("seq", "tok"):
                torch.testing.assert_close(side.logits[name], expected[name], atol=1e-5, rtol=0)
