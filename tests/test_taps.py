"""core/taps.py: the fused taps equal each mixer's own accumulation, before and after its
weights change (the stacked projection kept between inputs must follow them)."""

from __future__ import annotations

import torch

from adalayers.core.mixer import LayerMixer, MixerConfig
from adalayers.core.taps import stream_taps

STATES, D = 4, 12


def mixers() -> dict[str, LayerMixer]:
    torch.manual_seed(0)
    return {
        "a": LayerMixer(MixerConfig(dim=6), STATES, D).eval(),
        "b": LayerMixer(MixerConfig(dim=6), STATES, D).eval(),
        "c": LayerMixer(MixerConfig(dim=4), STATES, D).eval(),  # another width
    }


def stream(taps, buffers, states) -> dict[str, torch.Tensor]:
    for name in buffers:
        buffers[name] = None
    for index, z in enumerate(states):
        for tap in taps.get(index, []):
            tap(index, z)
    return {name: buffer.clone() for name, buffer in buffers.items()}


def reference(mixer: LayerMixer, states) -> torch.Tensor:
    weights, buffer = mixer.mixing_weights(), None
    for local, layer in enumerate(mixer.layer_indices):
        buffer = mixer.accumulate(buffer, layer, weights[local], states[layer])
    return buffer


def test_fused_taps_follow_weight_changes():
    ms = mixers()
    states = [torch.randn(2, 5, D) for _ in range(STATES)]
    buffers: dict[str, torch.Tensor | None] = dict.fromkeys(ms)
    with torch.no_grad():
        taps = stream_taps(ms, buffers)
        for round_ in range(3):
            got = stream(taps, buffers, states)
            for name, mixer in ms.items():
                torch.testing.assert_close(got[name], reference(mixer, states), msg=f"{round_}")
            if round_ == 0:
                ms["b"].weight.mul_(2.0)  # in place, as an optimiser step or load_state_dict
            else:
                ms["a"].weight.data = torch.randn_like(ms["a"].weight)  # new storage
