"""Streaming taps shared by many mixers: one tap per hidden state, whoever reads it.

When several tasks read the same state ``Z_i``, computing each one's ``f_i = LN(GELU(Z_i) W_i^T)``
on its own repeats ``GELU(Z_i)`` (as wide as the base) and runs one small matrix product per
task. :func:`stream_taps` computes ``GELU(Z_i)`` once, every reader's projection in one product
(their ``W_i`` stacked), and the LayerNorms in one call, then adds ``p~_i f_i`` into each
reader's buffer: the numbers of :meth:`~adalayers.core.mixer.LayerMixer.accumulate` up to float
rounding, at about two thirds of the cost for four readers.

A dynamic mixer (``mode: dynamic``) reads its ``f_i`` from the same fused product and folds it into
an online softmax (:class:`~adalayers.core.mixer.DynamicState`): its buffer is the state's
``mixed`` (B, T, k), always the mix of the layers seen so far, beside two (B, T, h) scalars
(h: ``mixer.heads``) held by the taps. A static reader's path is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from adalayers.core.mixer import DynamicState, LayerMixer, layer_norm

Reader = tuple[str, LayerMixer, int, torch.Tensor]  # (name, mixer, local index, weight p~_i)


def _add(
    buffers: dict[str, torch.Tensor | None], name: str, weight: torch.Tensor, f: torch.Tensor
) -> None:
    """``buffers[name] += weight * f``."""
    buffer = buffers[name]
    if buffer is None:
        buffers[name] = weight * f
    elif torch.is_grad_enabled() and (
        buffer.requires_grad or f.requires_grad or weight.requires_grad
    ):
        buffers[name] = buffer + weight * f
    else:
        buffer.addcmul_(f, weight)  # no graph to keep: in place, no temporary term


def stream_taps(
    mixers: Mapping[str, LayerMixer],
    buffers: dict[str, torch.Tensor | None],
    *,
    grad: bool = False,
    enabled: Callable[[], bool] | None = None,
) -> dict[int, list[Callable[[int, torch.Tensor], None]]]:
    """Taps that stream every mixer's sum ``sum_i p~_i f_i`` into ``buffers``.

    Args:
        mixers: name -> mixer; only the states each gives a non-zero weight are tapped.
        buffers: name -> running sum (``None`` before the first term); updated in place. A
            dynamic mixer's is its mix so far; setting it back to ``None`` starts a new input.
        grad: build a graph for the mixers' parameters (training).
        enabled: optional ``() -> bool``; the taps do nothing while it returns ``False``.

    Returns:
        State index -> callbacks, as :meth:`adalayers.core.backbone.Backbone.run` takes them.
    """
    shared: dict[int, list[Reader]] = {}
    taps: dict[int, list[Callable[[int, torch.Tensor], None]]] = {}
    states: dict[str, DynamicState] = {}  # the dynamic mixers' online softmax
    for name, mixer in mixers.items():
        weights = mixer.mixing_weights()  # (n,): p~, minus the layers dropped this step
        nonzero = (weights > 0).tolist()
        for local, layer in enumerate(mixer.layer_indices):
            if not nonzero[local]:
                continue
            if getattr(mixer.config, "mode", None) == "scalar_mix":  # mixes raw states: alone
                taps.setdefault(layer, []).append(
                    _single(name, mixer, weights[local], buffers, grad, enabled)
                )
            else:
                shared.setdefault(layer, []).append((name, mixer, local, weights[local]))
    for layer, readers in shared.items():
        taps.setdefault(layer, []).append(_fused(readers, buffers, grad, enabled, states))
    return taps


def _single(
    name: str,
    mixer: LayerMixer,
    weight: torch.Tensor,
    buffers: dict[str, torch.Tensor | None],
    grad: bool,
    enabled: Callable[[], bool] | None,
) -> Callable[[int, torch.Tensor], None]:
    def tap(index: int, z: torch.Tensor) -> None:
        if enabled is None or enabled():
            with torch.set_grad_enabled(grad):
                buffers[name] = mixer.accumulate(buffers[name], index, weight, z)

    return tap


def _step(
    buffers: dict[str, torch.Tensor | None],
    states: dict[str, DynamicState],
    reader: Reader,
    index: int,
    f: torch.Tensor,
) -> None:
    """Fold ``f`` into a dynamic reader's online softmax; its buffer is the state's mix."""
    name, mixer, _, weight = reader
    state = states.get(name)
    if state is not None and buffers[name] is not state.mixed:
        state = None  # the caller reset the buffer: a new input
    state = mixer.accumulate_dynamic(state, index, weight, features=f)
    states[name], buffers[name] = state, state.mixed


def _fused(
    readers: list[Reader],
    buffers: dict[str, torch.Tensor | None],
    grad: bool,
    enabled: Callable[[], bool] | None,
    states: dict[str, DynamicState],
) -> Callable[[int, torch.Tensor], None]:
    dims = [mixer.config.dim for _, mixer, _, _ in readers]
    dynamic = [getattr(mixer.config, "mode", None) == "dynamic" for _, mixer, _, _ in readers]

    cache: dict[str, Any] = {}

    def projections() -> torch.Tensor:
        """Every reader's ``W_i`` stacked (sum k, d); without a graph, kept until a weight
        changes (an optimiser step bumps its version; ``.to()`` gives it new storage)."""
        if grad:
            return torch.cat([m.weight[i] for _, m, i, _ in readers])
        try:
            key = [
                (m.weight.data_ptr(), m.weight._version, m.weight.dtype) for _, m, _, _ in readers
            ]
        except RuntimeError:  # inference tensors keep no version: stack them every time
            return torch.cat([m.weight[i] for _, m, i, _ in readers])
        if cache.get("key") != key:
            with torch.no_grad():
                cache["stacked"] = torch.cat([m.weight[i] for _, m, i, _ in readers])
            cache["key"] = key
        return cache["stacked"]

    def tap(index: int, z: torch.Tensor) -> None:
        if enabled is not None and not enabled():
            return
        with torch.set_grad_enabled(grad):
            stacked = projections()  # (sum k, d)
            h = F.linear(F.gelu(z.to(stacked.dtype)), stacked)  # (B, T, sum k)
            if len(set(dims)) == 1:
                k = dims[0]
                parts: Any = layer_norm(h.unflatten(-1, (len(dims), k))).unbind(-2)
            else:
                parts = [layer_norm(p) for p in h.split(dims, -1)]
            for reader, f, online in zip(readers, parts, dynamic):
                name, _, _, weight = reader
                if online:
                    _step(buffers, states, reader, index, f)
                else:
                    _add(buffers, name, weight, f)  # (B, T, k)

    return tap
