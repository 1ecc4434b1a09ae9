"""The layer mixer against an independent NumPy computation, and its options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adalayers.core.mixer import LayerMixer, MixerConfig, layer_norm, sinusoidal_positions

_erf = np.vectorize(math.erf)


def numpy_mixer(states, weight, p, alpha, cutoff, layers, positions=None):
    """Reference: F = sum_i p~_i LN(GELU(Z_i) W_i^T), written from the formula."""
    e = np.exp(alpha * p - np.max(alpha * p))
    dist = e / e.sum()
    if cutoff > 0:
        keep = (dist > cutoff) | (dist == dist.max())
        dist = dist * keep / (dist * keep).sum()
    out = 0.0
    for j, layer in enumerate(layers):
        z = states[layer].astype(np.float64)
        g = 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
        h = g @ weight[j].T.astype(np.float64)
        mu = h.mean(-1, keepdims=True)
        var = h.var(-1, keepdims=True)
        out = out + dist[j] * (h - mu) / np.sqrt(var + 1e-5)
    if positions is not None:
        out = out + positions[: out.shape[1]]
    return out, dist


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 16, 4, 64), (3, 7, 6), (2, 5, 256)])
def test_layer_norm_is_plain_layer_norm_bit_for_bit(shape, dtype):
    """The faster kernel (a weight of ones) gives F.layer_norm's values exactly, and its
    gradients within rounding (float64 with k = 6 differs in the last bit)."""
    torch.manual_seed(0)
    h = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(dtype).requires_grad_()
    grad = torch.randn(shape).to(dtype)
    fast = layer_norm(h)
    plain = torch.nn.functional.layer_norm(h, (shape[-1],))
    assert torch.equal(fast, plain)
    (fast_grad,) = torch.autograd.grad(fast, h, grad)
    (plain_grad,) = torch.autograd.grad(plain, h, grad)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=0, atol=torch.finfo(dtype).eps * 4)


def make(num_states=5, d=12, **kw):
    torch.manual_seed(0)
    mixer = LayerMixer(MixerConfig(dim=6, **kw), num_states, d).eval()
    with torch.no_grad():
        mixer.p.copy_(torch.randn_like(mixer.p) * 0.05)
    states = [torch.randn(2, 7, d) for _ in range(num_states)]
    return mixer, states


@pytest.mark.parametrize(
    "kw",
    [
        {"alpha": 64.0},
        {"alpha": 100.0, "cutoff": 0.1},
        {"alpha": 10.0, "layers": [1, 3, 4]},
        {"alpha": 64.0, "positional": "sinusoidal", "max_positions": 16},
        {"alpha": 64.0, "single_layer": -1},
    ],
)
def test_mixer_matches_numpy(kw):
    mixer, states = make(**kw)
    got = mixer([s for s in states]).detach().numpy()
    positions = mixer.positions.numpy() if mixer.positions is not None else None
    want, dist = numpy_mixer(
        [s.numpy() for s in states],
        mixer.weight.detach().numpy(),
        mixer.p.detach().numpy(),
        mixer.config.alpha,
        mixer.config.cutoff,
        mixer.layer_indices,
        positions,
    )
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(mixer.distribution().detach().numpy(), dist, atol=1e-6)
    if kw.get("cutoff"):
        assert (dist == 0).any(), "test setup should cut at least one layer"


def test_cutoff_keeps_gradient_and_never_writes_p():
    mixer, _ = make(alpha=100.0, cutoff=0.1)
    with torch.no_grad():
        mixer.p.copy_(torch.tensor([0.0, 0.01, 0.02, -0.05, 0.015]))
    before = mixer.p.detach().clone()
    dist = mixer.distribution()
    kept = dist > 0
    assert kept.tolist() == [False, True, True, False, True]
    (dist * torch.arange(len(dist), dtype=dist.dtype)).sum().backward()
    grad = mixer.p.grad
    assert torch.all(grad[~kept] == 0)
    assert torch.any(grad[kept] != 0)
    assert torch.equal(mixer.p.detach(), before)


def test_entropy_is_true_entropy_and_finite_under_cutoff():
    mixer, _ = make(alpha=100.0, cutoff=0.1, entropy_weight=0.5)
    dist = mixer.distribution().detach().numpy()
    nz = dist[dist > 0]
    assert mixer.entropy().item() == pytest.approx(float(-(nz * np.log(nz)).sum()), abs=1e-6)
    reg = mixer.regularization()
    assert reg.item() == pytest.approx(0.5 * mixer.entropy().item(), abs=1e-6)
    reg.backward()
    assert torch.isfinite(mixer.p.grad).all()
    uniform = LayerMixer(MixerConfig(dim=4), 4, 8)
    assert uniform.entropy().item() == pytest.approx(math.log(4), abs=1e-6)
    assert uniform.regularization().item() == 0.0


def test_only_weighted_layers_are_active():
    mixer, _ = make(alpha=100.0, cutoff=0.1)
    active = [layer for layer, _ in mixer.active_layers()]
    weights = mixer.layer_weights()
    assert active == [layer for layer, w in weights.items() if w > 0]
    assert sum(weights.values()) == pytest.approx(1.0)


def test_single_layer_and_frozen_distribution():
    mixer = LayerMixer(MixerConfig(dim=4, single_layer=2), 5, 8)
    assert mixer.layer_indices == [2]
    assert mixer.layer_weights() == {2: 1.0}
    frozen = LayerMixer(MixerConfig(dim=4, freeze_distribution=True), 5, 8)
    assert not frozen.p.requires_grad
    assert all(w == pytest.approx(0.2) for w in frozen.layer_weights().values())


def test_layer_dropout_drops_whole_layers_and_renormalises():
    mixer, states = make(alpha=4.0, layer_dropout=0.3)
    dist = mixer.distribution().detach()
    assert torch.equal(mixer.mixing_weights(), mixer.distribution())  # eval: p~ itself
    mixer.train()
    torch.manual_seed(3)
    dropped = torch.zeros(len(dist))
    draws = 2000
    for _ in range(draws):
        w = mixer.mixing_weights().detach()
        kept = w > 0
        dropped += ~kept
        assert w.sum().item() == pytest.approx(1.0)
        torch.testing.assert_close(w[kept], dist[kept] / dist[kept].sum())
    # each layer dropped with probability 0.3, less the draws that would drop all five
    assert torch.allclose(dropped / draws, torch.full_like(dist, 0.3 * (1 - 0.3**4)), atol=0.04)
    # the mixture is the same sum over the kept layers
    torch.manual_seed(5)
    got = mixer(states)
    torch.manual_seed(5)
    w = mixer.mixing_weights()
    want = sum(w[i] * mixer.project(i, z) for i, z in enumerate(states))
    torch.testing.assert_close(got, want)
    assert (w == 0).any()  # this seed drops at least one layer


def test_dropped_layers_are_not_projected_and_the_mix_is_unchanged(monkeypatch):
    """In training with layer dropout, the stacked form projects only the layers kept this
    step (as the streaming taps read only those); the result is the mix over every live layer
    with the dropped ones weighing 0."""
    from adalayers.core.mixer import StackedStates

    mixer, states = make(alpha=4.0, layer_dropout=0.5)
    mixer.train()
    for seed in range(100):  # a seed whose mask drops some layers, not all
        torch.manual_seed(seed)
        weights = mixer.mixing_weights()
        kept = [i for i, w in enumerate(weights.tolist()) if w > 0]
        if 1 < len(kept) < len(weights):
            break
    projected = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: (projected.append(a.shape[0]), bmm(a, b))[1])
    for form in (states, StackedStates(list(range(len(states))), torch.stack(states))):
        torch.manual_seed(seed)
        got = mixer.mix(form)
        assert projected.pop() == len(kept)
        full = sum(weights[i] * mixer.project(i, states[i]) for i in range(len(states)))
        torch.testing.assert_close(got, full, atol=1e-6, rtol=1e-5)


def test_layer_dropout_of_one_layer_draws_nothing():
    single = LayerMixer(MixerConfig(dim=4, single_layer=2, layer_dropout=0.5), 5, 8).train()
    state = torch.get_rng_state()
    assert single.mixing_weights().tolist() == [1.0]
    assert torch.equal(torch.get_rng_state(), state)  # sweeps are unchanged by the setting


def test_positional_embeddings():
    table = sinusoidal_positions(10, 6)
    assert table[3, 0].item() == pytest.approx(math.sin(3.0))
    assert table[3, 1].item() == pytest.approx(math.cos(3.0))
    assert table[3, 2].item() == pytest.approx(math.sin(3.0 / 10000 ** (2 / 6)), abs=1e-6)
    learned = LayerMixer(MixerConfig(dim=4, positional="learned", max_positions=8), 3, 8)
    assert learned.positions.requires_grad
    with pytest.raises(ValueError, match="max_positions=8"):
        learned([torch.randn(1, 9, 8)] * 3)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"layers": [0, 9]}, "out of range"),
        ({"single_layer": 7}, "out of range"),
    ],
)
def test_bad_layer_indices(kw, match):
    with pytest.raises(ValueError, match=match):
        LayerMixer(MixerConfig(dim=4, **kw), 5, 8)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"dim": 0}, "mixer.dim"),
        ({"cutoff": 1.5}, "mixer.cutoff"),
        ({"positional": "rotary"}, "mixer.positional"),
        ({"layers": [1], "single_layer": 1}, "contradict"),
        ({"layers": [1, 1]}, "distinct"),
        ({"layer_dropout": 1.0}, "mixer.layer_dropout"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        MixerConfig(**kw)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="alhpa"):
        MixerConfig.from_dict({"alhpa": 3})
