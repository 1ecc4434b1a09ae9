"""The AdaLayers layer mixer.

For hidden states ``Z_0 .. Z_L`` of a frozen base (each (B, T, d)) and the chosen layers ``S``:

    f_i = LN(GELU(Z_i) W_i^T)                 W_i: d -> k, no bias; LN without affine parameters
    p~  = softmax(alpha * p)                  p: one learned logit per layer in S
    p~  <- p~ * [p~ > c] / sum(p~ * [p~ > c]) optional cutoff c (the largest weight is always kept)
    F   = sum_i p~_i f_i  (+ positional embeddings, then dropout)          F: (B, T, k)

and the regulariser ``lambda * H(p~)`` with ``H(p~) = -sum_i p~_i log p~_i`` (the entropy of the
distribution actually used), returned by :meth:`LayerMixer.regularization` for the caller to add
to its loss.

The mixer runs in two forms that give the same numbers: *stacked* (:meth:`LayerMixer.forward`,
all states at hand) and *streaming* (:meth:`LayerMixer.accumulate` called by a tap as each state
appears, then :meth:`LayerMixer.finish`), which only ever holds one (B, T, k) buffer.

``mode: scalar_mix`` is the ELMo-style baseline (Peters et al., 2018): mix the *raw* states, then
project once,

    s = gamma * sum_i softmax(w)_i Z_i        w: one learned logit per layer, gamma: a learned
                                              scalar (init 1); (B, T, d)
    F = LN(GELU(s) W^T)                       W: d -> k, no bias; LN without affine parameters

then the same positions, dropout and head. Its streaming buffer holds ``softmax(w)_i Z_i`` and
is therefore ``d`` wide, not ``k`` (the projection runs once, in :meth:`LayerMixer.finish`).

``mode: dynamic`` gives every token its own layer weights: a learned query ``q`` (k,) scores each
layer's feature, the static distribution is the prior,

    s_i = q . f_i + log p~_i                  (B, T); log p~_i = alpha p_i - const, so the prior
                                              is the static mix's alpha p_i (after the cutoff)
    F   = sum_i softmax_i(s) f_i              a softmax over the layers, per token  (B, T, k)

``q`` starts at zero, where the dynamic mixer is the static one. Streaming keeps the property of
one buffer: an *online softmax* (as flash attention's over keys, :class:`DynamicState`) holds the
mix of the layers seen so far (B, T, k), their largest score ``m`` and the sum ``l`` of
``exp(s_j - m)`` (B, T each), and folds in each layer as it appears
(:meth:`LayerMixer.accumulate_dynamic`). Layers the prior cuts (weight 0) are not tapped, as in
the static mixer, so the cutoff and the base's early stop still apply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from adalayers.core.dropout import Dropout


def layer_norm(h: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dimension without affine parameters, as ``F.layer_norm(h, (k,))``.

    It runs torch's affine kernel with a weight of ones: the same values bit for bit and the same
    gradients within rounding (``tests/test_mixer.py`` checks), at about half the time on a CPU,
    where the kernel without a weight takes a slower path (1.85 against 0.87 ms on
    (32, 128, 4, 64), one thread).
    """
    k = h.shape[-1]
    return F.layer_norm(h, (k,), weight=torch.ones(k, dtype=h.dtype, device=h.device))


@dataclass
class MixerConfig:
    """Hyper-parameters of the layer mixer.

    Attributes:
        dim: ``k``, the width every layer is projected to.
        alpha: temperature-like factor in ``softmax(alpha * p)``; larger values let the
            distribution move faster. With Adam each logit ``alpha * p_i`` moves by about
            ``alpha * lr`` per step whatever its gradient, so alpha sets the distribution's
            speed: the reference used 64-128; on short budgets (a few hundred to a few
            thousand steps) 1-4 did better on validation here (BENCHMARKS.md).
        cutoff: weights ``<= cutoff`` are zeroed and the rest renormalised; 0 disables.
        entropy_weight: ``lambda`` in the ``lambda * H(p~)`` loss term; 0 disables.
        dropout: dropout on the mixed features ``F``.
        positional: add ``"learned"`` or ``"sinusoidal"`` position embeddings to ``F``, or
            ``"none"``.
        max_positions: table size for learned positions.
        layers: indices of the hidden states to use (``None``: all ``L + 1``).
        single_layer: use only this state (p fixed to one-hot): the single-layer baseline.
        freeze_distribution: keep ``p`` fixed at its initial (uniform) value.
        layer_dropout: in training, each layer's weight is dropped with this probability at
            every step and the kept weights renormalised (all are kept when every one was
            drawn for dropping), as in the scalar mix of Kondratyuk & Straka (2019, "75
            Languages, 1 Model"); 0 disables. Evaluation always mixes with ``p~``. A mixer of
            one layer draws nothing.
        mode: ``"adalayers"`` (project every layer, then mix) or ``"scalar_mix"`` (the ELMo
            baseline: mix the raw states with ``gamma * softmax(w)``, then one projection;
            ``alpha`` is not used, ``cutoff`` and ``entropy_weight`` must be 0) or
            ``"dynamic"`` (per-token layer weights ``softmax_i(q . f_i + log p~_i)``: a learned
            query ``q`` of size ``dim`` scores each layer's features, the static distribution
            ``p~`` is the prior; cutoff, entropy and layer dropout act on the prior).
        heads: ``mode: dynamic`` only: ``h`` per-token softmaxes over the layers, one for each
            of ``h`` equal groups of the ``dim`` channels (``dim`` must divide by it), each with
            its own query of size ``dim`` reading the whole ``f_i``; so different features of
            one token can come from different layers. 1 is the single softmax. The other modes
            have one weight per layer and do not use it (as ``scalar_mix`` does not use
            ``alpha``), so one config can give a comparison its dynamic row's heads.
    """

    dim: int = 64
    alpha: float = 64.0
    cutoff: float = 0.0
    entropy_weight: float = 0.0
    dropout: float = 0.0
    positional: Literal["none", "learned", "sinusoidal"] = "none"
    max_positions: int = 512
    layers: list[int] | None = field(default=None)
    single_layer: int | None = None
    freeze_distribution: bool = False
    layer_dropout: float = 0.0
    mode: Literal["adalayers", "scalar_mix", "dynamic"] = "adalayers"
    heads: int = 1

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"mixer.dim must be positive, got {self.dim}")
        if self.alpha <= 0:
            raise ValueError(f"mixer.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.cutoff < 1.0:
            raise ValueError(f"mixer.cutoff must be in [0, 1), got {self.cutoff}")
        if self.entropy_weight < 0:
            raise ValueError(f"mixer.entropy_weight must be >= 0, got {self.entropy_weight}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"mixer.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.layer_dropout < 1.0:
            raise ValueError(f"mixer.layer_dropout must be in [0, 1), got {self.layer_dropout}")
        if self.positional not in ("none", "learned", "sinusoidal"):
            raise ValueError(
                f"mixer.positional must be none, learned or sinusoidal, got {self.positional!r}"
            )
        if self.mode not in ("adalayers", "scalar_mix", "dynamic"):
            raise ValueError(
                f"mixer.mode must be adalayers, scalar_mix or dynamic, got {self.mode!r}"
            )
        if self.heads < 1:
            raise ValueError(f"mixer.heads must be >= 1, got {self.heads}")
        if self.dim % self.heads:
            raise ValueError(
                f"mixer.dim={self.dim} does not divide into mixer.heads={self.heads} groups: "
                "choose heads that divide dim"
            )
        if self.mode == "scalar_mix" and (self.cutoff > 0 or self.entropy_weight > 0):
            raise ValueError(
                "mixer.mode=scalar_mix has no cutoff or entropy term: set mixer.cutoff and "
                "mixer.entropy_weight to 0"
            )
        if self.single_layer is not None and self.layers is not None:
            raise ValueError(
                "mixer.single_layer and mixer.layers contradict each other: set only one"
            )
        if self.layers is not None:
            self.layers = [int(i) for i in self.layers]
            if not self.layers or len(set(self.layers)) != len(self.layers):
                raise ValueError(
                    f"mixer.layers must be a non-empty list of distinct indices, got {self.layers}"
                )

    def layer_indices(self, num_states: int) -> list[int]:
        """The state indices this mixer reads from a base with ``num_states`` states."""
        if self.single_layer is not None:
            chosen = [self.single_layer]
        elif self.layers is not None:
            chosen = list(self.layers)
        else:
            chosen = list(range(num_states))
        normalized = [i + num_states if i < 0 else i for i in chosen]
        for original, i in zip(chosen, normalized):
            if not 0 <= i < num_states:
                raise ValueError(
                    f"mixer layer index {original} is out of range for a base "
                    f"with {num_states} hidden states (0..{num_states - 1})"
                )
        return normalized

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MixerConfig:
        """Build from a mapping; unknown keys and wrong types raise a ``ValueError``."""
        from adalayers.core._schema import build

        return build(cls, values, "mixer")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sinusoidal_positions(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention is all you need": (num_positions, dim)."""
    position = torch.arange(num_positions, dtype=torch.float32)[:, None]  # (P, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim)  # (P, k)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


class StackedStates(dict):
    """State index -> (B, T, d) views of one stacked (n, B, T, d) tensor (``.stacked``), so a
    mixer that reads them all needs no copy (a feature store hands its batches over this way).
    """

    def __init__(self, layers: Sequence[int], stacked: torch.Tensor) -> None:
        super().__init__({layer: stacked[j] for j, layer in enumerate(layers)})
        self.layers = list(layers)
        self.stacked = stacked  # (n, B, T, d)


@dataclass
class DynamicState:
    """The running online softmax over layers of one streamed ``mode: dynamic`` mix.

    After the layers ``j`` seen so far (scores ``s_j`` (B, T), features ``f_j`` (B, T, k)); with
    ``h > 1`` heads every (B, T) below is (B, T, h) and each head mixes its k / h channels:

        m     = max_j s_j                              (B, T)
        l     = sum_j exp(s_j - m)                     (B, T)
        mixed = sum_j exp(s_j - m) f_j / l             (B, T, k): the mix of those layers

    Adding a layer ``(f, s)`` rescales what is held to the new maximum ``m' = max(m, s)``:

        l'     = l exp(m - m') + exp(s - m')
        mixed' = (mixed l exp(m - m') + f exp(s - m')) / l'

    so ``mixed`` is at every step the softmax-weighted mean of the layers seen, and after the last
    one it is ``F`` (the form of flash attention's first version, which keeps its output
    normalised). The scores, ``m`` and ``l`` are float32 whatever the features' dtype.

    Attributes:
        mixed: (B, T, k) the mix so far.
        max: (B, T) ``m``, or (B, T, h).
        total: (B, T) ``l``, or (B, T, h).
    """

    mixed: torch.Tensor
    max: torch.Tensor
    total: torch.Tensor

    @classmethod
    def start(cls, f: torch.Tensor, s: torch.Tensor) -> DynamicState:
        """The state after one layer: ``mixed = f``, ``m = s``, ``l = 1``."""
        return cls(f if f.is_contiguous() else f.contiguous(), s, torch.ones_like(s))

    def add(self, f: torch.Tensor, s: torch.Tensor) -> DynamicState:
        """Fold in one more layer's features ``f`` (B, T, k) and scores ``s`` (B, T) (or
        (B, T, h) for ``h`` heads).

        Without a graph to keep (inference) it updates this state in place and returns it; in
        training it returns a new state.
        """
        m = torch.maximum(self.max, s)  # (B, T[, h])
        old = self.total * torch.exp(self.max - m)  # (B, T[, h])
        new = torch.exp(s - m)  # (B, T[, h])
        total = old + new  # (B, T[, h])
        keep = (old / total).unsqueeze(-1).to(self.mixed.dtype)  # (B, T[, h], 1)
        take = (new / total).unsqueeze(-1).to(f.dtype)  # (B, T[, h], 1)
        mixed, grouped = self.mixed, s.dim() == f.dim()  # grouped: h heads, (B, T, h)
        if grouped:  # each head scales its k / h channels: (B, T, h, k / h) views
            mixed, f = _groups(mixed, s.shape[-1]), _groups(f, s.shape[-1])
        if torch.is_grad_enabled() and (mixed.requires_grad or f.requires_grad):
            out = mixed * keep + f * take
            return DynamicState(out.flatten(-2, -1) if grouped else out, m, total)
        mixed.mul_(keep).addcmul_(f, take)  # in place in self.mixed: no second buffer
        self.max, self.total = m, total
        return self


def _groups(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., k) -> (..., h, k / h): the channels of each head (a view)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


class LayerMixer(nn.Module):
    """Projects chosen hidden states to ``k`` dims and mixes them with learned weights.

    Args:
        config: the mixer hyper-parameters.
        num_states: ``L + 1``, the number of hidden states of the base.
        hidden_size: ``d``, their width.
    """

    def __init__(self, config: MixerConfig, num_states: int, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.num_states = num_states
        self.hidden_size = hidden_size
        self.layer_indices = config.layer_indices(num_states)
        n, k = len(self.layer_indices), config.dim
        if config.mode == "scalar_mix":
            self.projection = nn.Parameter(torch.empty(k, hidden_size))  # (k, d): the one W
            nn.init.kaiming_uniform_(self.projection, a=math.sqrt(5))
            self.gamma = nn.Parameter(torch.ones(()))  # ()
        else:
            self.weight = nn.Parameter(torch.empty(n, k, hidden_size))  # (n, k, d): W_i per layer
            nn.init.kaiming_uniform_(self.weight.view(n * k, hidden_size), a=math.sqrt(5))
        if config.mode == "dynamic":  # q, zero at first: the static mix
            shape = (k,) if config.heads == 1 else (config.heads, k)  # one query per head
            self.query = nn.Parameter(torch.zeros(shape))
        self.p = nn.Parameter(torch.zeros(n), requires_grad=not config.freeze_distribution)
        if config.positional == "learned":
            self.positions = nn.Parameter(torch.zeros(config.max_positions, k))
            nn.init.normal_(self.positions, std=0.02)
        elif config.positional == "sinusoidal":
            self.register_buffer(
                "positions", sinusoidal_positions(config.max_positions, k), persistent=False
            )
        else:
            self.positions = None
        self.dropout = Dropout(config.dropout)
        self._local = {layer: i for i, layer in enumerate(self.layer_indices)}

    @property
    def stream_width(self) -> int:
        """The width of the per-token sum the taps stream (what :meth:`finish` takes): the raw
        states' ``d`` for ``mode: scalar_mix``, else ``k``."""
        return self.hidden_size if self.config.mode == "scalar_mix" else self.config.dim

    def distribution(self) -> torch.Tensor:
        """``p~``: softmax(alpha * p) after the cutoff, shape (n,). Never modifies ``p``.

        ``mode: scalar_mix``: ``softmax(w)`` (``w`` is stored in ``p``; no alpha, no cutoff).
        """
        if self.config.mode == "scalar_mix":
            return torch.softmax(self.p, dim=0)  # (n,)
        logits = self.config.alpha * self.p  # (n,)
        weights = torch.softmax(logits, dim=0)  # (n,)
        if self.config.cutoff > 0:
            keep = (weights > self.config.cutoff) | (weights == weights.max())  # keep >= 1 layer
            # renormalising the kept weights == a softmax over the kept logits only; written
            # this way the cut layers get exactly zero gradient
            weights = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=0)
        return weights

    def mixing_weights(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The weights one forward mixes with, shape (n,): :meth:`distribution` (or
        ``weights``, its value), and in training with ``layer_dropout`` each non-zero weight
        dropped with that probability and the rest renormalised. Call it once per forward:
        every call in training draws a new mask."""
        weights = self.distribution() if weights is None else weights  # (n,)
        rate = self.config.layer_dropout
        if not self.training or rate == 0:
            return weights
        live = weights > 0  # (n,)
        if int(live.sum()) < 2:
            return weights
        keep = live & (torch.rand(weights.shape, device=weights.device) >= rate)  # (n,)
        if not bool(keep.any()):
            return weights
        kept = weights * keep  # (n,)
        return kept / kept.sum()

    def entropy(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``H(p~) = -sum p~ log p~`` (zero weights contribute 0, with a zero gradient)."""
        w = self.distribution() if weights is None else weights
        positive = w > 0
        logs = torch.log(torch.where(positive, w, torch.ones_like(w)))
        return -(w * logs).sum()

    def regularization(self) -> torch.Tensor:
        """The loss term ``lambda * H(p~)`` (a zero tensor when lambda is 0)."""
        if self.config.entropy_weight == 0:
            return self.p.new_zeros(())
        return self.config.entropy_weight * self.entropy()

    def layer_weights(self) -> dict[int, float]:
        """State index -> its weight in ``p~`` (plain floats, for reports)."""
        with torch.no_grad():
            w = self.distribution().tolist()
        return dict(zip(self.layer_indices, w))

    def active_layers(self) -> list[tuple[int, torch.Tensor]]:
        """(state index, weight) for the states with a non-zero weight: the ones to tap."""
        w = self.distribution()
        nonzero = (w > 0).tolist()
        return [(layer, w[i]) for i, layer in enumerate(self.layer_indices) if nonzero[i]]

    def project(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """``f_i = LN(GELU(Z_i) W_i^T)`` for state index ``layer``: (B, T, d) -> (B, T, k)."""
        if self.config.mode == "scalar_mix":
            raise ValueError("a scalar_mix mixer has no per-layer projection; see finish()")
        w = self.weight[self._local[layer]]  # (k, d)
        h = F.linear(F.gelu(z.to(w.dtype)), w)  # (B, T, k)
        return layer_norm(h)  # (B, T, k)

    def accumulate(
        self, buffer: torch.Tensor | None, layer: int, weight: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """Streaming step: ``buffer + p~_i f_i`` (buffer ``None`` starts the sum).

        ``mode: scalar_mix``: ``buffer + softmax(w)_i Z_i``, a (B, T, d) buffer.

        Raises:
            ValueError: ``mode: dynamic``, which streams with :meth:`accumulate_dynamic`.
        """
        if self.config.mode == "dynamic":
            raise ValueError("a dynamic mixer streams with accumulate_dynamic (an online softmax)")
        if self.config.mode == "scalar_mix":
            term = weight * z.to(self.projection.dtype)  # (B, T, d)
        else:
            term = weight * self.project(layer, z)  # (B, T, k)
        if buffer is None:
            return term
        if torch.is_grad_enabled() and (buffer.requires_grad or term.requires_grad):
            return buffer + term
        return buffer.add_(term)  # no graph to keep: add in place, no second buffer

    def scores(self, f: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``mode: dynamic``: ``s_i = q . f_i + log p~_i`` (float32) of one layer's features
        ``f`` (..., k) and its prior weight ``p~_i`` (broadcast against (..., 1)): shape (..., h),
        one score per head (h = 1: the single query)."""
        q = self.query.to(f.dtype).view(-1, f.shape[-1])  # (h, k)
        return (f @ q.t()).float() + torch.log(weight).float()

    def accumulate_dynamic(
        self,
        state: DynamicState | None,
        layer: int,
        weight: torch.Tensor,
        z: torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
    ) -> DynamicState:
        """Streaming step of ``mode: dynamic``: fold state ``layer`` into the online softmax.

        Args:
            state: the running state (``None`` starts it).
            layer: the state index.
            weight: its prior weight ``p~_i`` (> 0).
            z: the state (B, T, d), projected here; or
            features: its ``f_i`` (B, T, k) already projected (the fused taps).

        Returns:
            The state with this layer in (``state`` itself, updated in place, in inference).
            :meth:`finish` takes it, or its ``mixed`` buffer.
        """
        f = features if features is not None else self.project(layer, z)  # (B, T, k)
        s = self.scores(f, weight)  # (B, T, h)
        return DynamicState.start(f, s) if state is None else state.add(f, s)

    def finish(self, mixed: torch.Tensor | DynamicState) -> torch.Tensor:
        """Add positions and apply dropout to the mixed features ``F`` (B, T, k).

        ``mode: scalar_mix``: the buffer is ``sum_i softmax(w)_i Z_i`` (B, T, d); this first
        computes ``F = LN(GELU(gamma * buffer) W^T)`` (B, T, k). ``mode: dynamic``: the buffer
        is the :class:`DynamicState`'s ``mixed`` (or the state itself).
        """
        if isinstance(mixed, DynamicState):
            mixed = mixed.mixed
        return self._positions(self._complete(mixed))

    def _complete(self, mixed: torch.Tensor) -> torch.Tensor:
        """The streamed sum -> ``F`` before positions: ``scalar_mix`` projects it here."""
        if self.config.mode == "scalar_mix":
            s = self.gamma * mixed  # (..., d)
            h = F.linear(F.gelu(s), self.projection)  # (..., k)
            mixed = layer_norm(h)  # (..., k)
        return mixed

    def _positions(self, mixed: torch.Tensor) -> torch.Tensor:
        if self.positions is not None:
            length = mixed.shape[1]
            if length > self.positions.shape[0]:
                raise ValueError(
                    f"input of {length} tokens is longer than the mixer's "
                    f"max_positions={self.positions.shape[0]}"
                )
            mixed = mixed + self.positions[:length].to(mixed.dtype)  # (B, T, k)
        return self.dropout(mixed)

    def forward(
        self, hidden_states: Sequence[torch.Tensor] | Mapping[int, torch.Tensor]
    ) -> torch.Tensor:
        """Stacked form: mix from the states. Returns ``F`` (B, T, k).

        Args:
            hidden_states: all ``L + 1`` states, or a mapping state index -> state holding at
                least this mixer's layers (e.g. read from a feature cache).
        """
        return self._positions(self.mix(hidden_states))

    def forward_rows(
        self,
        layers: Sequence[int],
        rows: torch.Tensor,
        index: torch.Tensor,
        shape: tuple[int, int],
    ) -> torch.Tensor:
        """Packed form (the feature cache): the states of the real tokens only, no padding.

        Every step of the mixture before the positions is per token, so it runs on the ``N``
        stored rows and only the ``k``-wide result is scattered into the padded batch. Padding
        tokens get exactly what the padded form gives them (zero states mix to zero features).

        Args:
            layers: the state index of each of the ``n`` slices of ``rows``.
            rows: (n, N, d) the states of the N real tokens of the batch (any float dtype).
            index: (2, N) every row's example and token position in the batch.
            shape: the padded batch's (B, T).

        Returns:
            ``F`` (B, T, k), equal to :meth:`forward` on the padded states.
        """

        mixed = self.mix(StackedStates(layers, rows.unsqueeze(1)))[0]  # (N, k)
        padded = mixed.new_zeros(*shape, mixed.shape[-1])  # (B, T, k)
        padded = padded.index_put((index[0], index[1]), mixed)
        return self._positions(padded)

    def mix(
        self, hidden_states: Sequence[torch.Tensor] | Mapping[int, torch.Tensor]
    ) -> torch.Tensor:
        """``sum_i p~_i f_i`` (B, T, k) from the states: :meth:`forward` without positions and
        dropout."""
        if isinstance(hidden_states, Mapping):
            missing = [i for i, _ in self.active_layers() if i not in hidden_states]
            if missing:
                raise ValueError(
                    f"the mixer needs hidden state(s) {missing}, which were not "
                    f"given (have {sorted(hidden_states)})"
                )
        elif len(hidden_states) != self.num_states:
            raise ValueError(
                f"the mixer was built for {self.num_states} hidden states, got {len(hidden_states)}"
            )
        weights = self.mixing_weights()  # (n,): layers cut or dropped this step weigh 0
        live = (weights > 0).tolist()  # the streaming taps skip the same layers
        active = [(layer, weights[i]) for i, layer in enumerate(self.layer_indices) if live[i]]
        dynamic = self.config.mode == "dynamic"
        if self.config.mode == "scalar_mix" or (len(active) == 1 and not dynamic):
            mixed = None
            for layer, weight in active:
                mixed = self.accumulate(mixed, layer, weight, hidden_states[layer])
            return self._complete(mixed)
        # all states at hand: one batched projection instead of one per layer
        wanted = [layer for layer, _ in active]
        stacked = getattr(hidden_states, "layers", None)  # already stacked (feature cache)
        if stacked == wanted:
            z = hidden_states.stacked  # (n, B, T, d)
        elif stacked is not None:  # some stored states are cut or dropped this step
            z = hidden_states.stacked[[stacked.index(layer) for layer in wanted]]  # (n, B, T, d)
        else:
            z = torch.stack([hidden_states[layer] for layer in wanted])  # (n, B, T, d)
        w = self.weight[[self._local[layer] for layer, _ in active]]  # (n, k, d)
        n, b, t, d = z.shape
        h = torch.bmm(F.gelu(z.to(w.dtype)).reshape(n, b * t, d), w.transpose(1, 2))  # (n, BT, k)
        f = layer_norm(h).reshape(n, b, t, -1)  # (n, B, T, k)
        mixing = torch.stack([weight for _, weight in active])  # (n,)
        if dynamic:  # per token: softmax over the layers of q . f_i + log p~_i
            s = self.scores(f, mixing[:, None, None, None])  # (n, B, T, h)
            a = torch.softmax(s, dim=0).to(f.dtype)  # (n, B, T, h)
            # elementwise, not einsum: that is one tiny (1 x n) @ (n x k) product per token
            grouped = _groups(f, self.config.heads)  # (n, B, T, h, k / h)
            return (a.unsqueeze(-1) * grouped).sum(0).flatten(-2, -1)  # (B, T, k)
        return torch.einsum("n,nbtk->btk", mixing, f)  # (B, T, k)
