"""Small task heads on the mixed features ``F`` (B, T, k)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from adalayers.core.dropout import Dropout, dropout, keep_mask, keep_scale


@dataclass
class HeadConfig:
    """Hyper-parameters of a task head.

    Attributes:
        num_heads: attention heads (must divide the mixer's ``dim``).
        num_layers: token tasks: pre-LayerNorm transformer encoder layers before the per-token
            linear layer (0: linear only).
        sequence_layers: sequence tasks: pre-LayerNorm transformer encoder layers before the
            attention pooling (0, the default: the attention pooling alone, which is linear in
            the features apart from its softmax).
        ff_dim: feed-forward width of the encoder layers.
        dropout: dropout inside the head.
        decoding: token tasks: how scores become tags. ``argmax`` (each word's best tag),
            ``bio`` (the best valid IOB2 sequence, see :mod:`adalayers.core.decoding`) or ``auto``
            (the default: ``bio`` where the tags are IOB2, else ``argmax``; the task is saved
            with the one chosen). Used in model selection, evaluation, ``predict`` and
            serving; training is the same for all.
    """

    num_heads: int = 8
    num_layers: int = 1
    sequence_layers: int = 0
    ff_dim: int = 2048
    dropout: float = 0.0
    decoding: Literal["auto", "argmax", "bio"] = "auto"

    def __post_init__(self) -> None:
        if (
            self.num_heads <= 0
            or self.num_layers < 0
            or self.sequence_layers < 0
            or self.ff_dim <= 0
        ):
            raise ValueError(
                f"head.num_heads and head.ff_dim must be positive and "
                f"head.num_layers and head.sequence_layers >= 0, got {self}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"head.dropout must be in [0, 1), got {self.dropout}")
        if self.decoding not in ("auto", "argmax", "bio"):
            raise ValueError(f"head.decoding must be auto, argmax or bio, got {self.decoding!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HeadConfig:
        """Build from a mapping; unknown keys and wrong types raise a ``ValueError``."""
        from adalayers.core._schema import build

        return build(cls, values, "head")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_heads(dim: int, num_heads: int) -> None:
    if dim % num_heads:
        raise ValueError(f"head.num_heads={num_heads} must divide mixer.dim={dim}")


class _DropoutAttention(torch.autograd.Function):
    """``dropout(softmax(q kᵀ · scale + bias)) v`` over (N, T, d) with one saved product per
    step (CPU). The mask is :func:`~adalayers.core.dropout.keep_mask`'s, drawn as
    :func:`~adalayers.core.dropout.dropout` draws it, so the output is that of the plain autograd
    expression with the same seed; the gradients equal its own within float rounding.

    What autograd would do op by op takes about eight passes over the (N, T, T) weights
    forward and seven backward (the scale, the mask fill, the mask's conversion and scaling
    are each one); here the scale and the padding mask go into the first product
    (``baddbmm``) and its gradients (``alpha``), and the dropout mask is made once, in the
    weights' dtype, and kept for the backward pass.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale, p, p_scale):  # noqa: ANN001, ANN205 (autograd's)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)  # (N, T, T)
        weights = torch.softmax(scores, dim=-1)  # (N, T, T)
        del scores
        kept = torch.tensor(p_scale, dtype=weights.dtype)  # 1 / P(keep)
        mask = torch.where(keep_mask(weights.shape, p, weights.device), kept, weights.new_zeros(()))
        dropped = weights * mask  # (N, T, T)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, weights, mask, dropped)
        return torch.bmm(dropped, v)  # (N, T, d)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        q, k, v, weights, mask, dropped = ctx.saved_tensors
        grad_v = torch.bmm(dropped.transpose(1, 2), grad)  # (N, T, d)
        grad_weights = torch.bmm(grad, v.transpose(1, 2)).mul_(mask)  # (N, T, T)
        grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
        del grad_weights
        grad_q = torch.bmm(grad_scores, k).mul_(ctx.scale)  # (N, T, d)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q).mul_(ctx.scale)  # (N, T, d)
        return grad_q, grad_k, grad_v, None, None, None, None


def dropout_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, p: float
) -> torch.Tensor:
    """``dropout(softmax(q kᵀ / √d), p) v`` over (B, H, T, d), keys masked where ``keep``
    (B, 1, 1, T) is ``False``, with :func:`~adalayers.core.dropout.dropout`'s mask.

    On a CPU (and ``p`` not below 2⁻¹⁷) this is :class:`_DropoutAttention`, tested against
    :func:`dropout_attention_by_ops`. On CUDA it is ``scaled_dot_product_attention`` with
    ``dropout_p`` (fused kernels that draw their own mask from the CUDA generator, as
    ``F.dropout`` does there); elsewhere, :func:`dropout_attention_by_ops`.
    """
    b, h, t, d = q.shape
    if q.device.type == "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
    p_scale = keep_scale(p)
    if q.device.type != "cpu" or p_scale is None:
        return dropout_attention_by_ops(q, k, v, keep, p)
    bias = torch.zeros(b, 1, 1, t, dtype=q.dtype)  # 0, or -inf on padding keys
    if keep is not None:
        bias.masked_fill_(~keep, float("-inf"))
    n = b * h
    return _DropoutAttention.apply(
        q.reshape(n, t, d),
        k.reshape(n, t, d),
        v.reshape(n, t, d),
        bias.expand(b, h, 1, t).reshape(n, 1, t),
        d**-0.5,
        p,
        p_scale,
    ).view(b, h, t, d)


def dropout_attention_by_ops(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, p: float
) -> torch.Tensor:
    """:func:`dropout_attention` written op by op (autograd keeps every intermediate)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, T)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return dropout(torch.softmax(scores, dim=-1), p) @ v  # (B, H, T, d)


def attention(
    module: nn.MultiheadAttention, features: torch.Tensor, keep: torch.Tensor, training: bool
) -> torch.Tensor:
    """``module`` (an ``nn.MultiheadAttention``) applied to ``features`` with the same weights
    and result, keys masked where ``keep`` (B, T) is ``False``.

    Without attention dropout this is ``scaled_dot_product_attention`` (``nn.MultiheadAttention``
    with a key padding mask takes a masked-softmax path about 3x slower on a CPU); with it,
    :func:`dropout_attention`.
    """
    b, t, k = features.shape
    heads = module.num_heads
    qkv = F.linear(features, module.in_proj_weight, module.in_proj_bias)  # (B, T, 3k)
    q, key, v = qkv.view(b, t, 3, heads, k // heads).permute(2, 0, 3, 1, 4)  # (B, H, T, k/H)
    mask = None if bool(keep.all()) else keep[:, None, None, :]  # (B, 1, 1, T)
    if training and module.dropout > 0:
        h = dropout_attention(q, key, v, mask, module.dropout)  # (B, H, T, k/H)
    else:
        h = F.scaled_dot_product_attention(q, key, v, attn_mask=mask)  # (B, H, T, k/H)
    return module.out_proj(h.transpose(1, 2).reshape(b, t, k))  # (B, T, k)


def encoder(dim: int, num_layers: int, config: HeadConfig) -> nn.TransformerEncoder:
    """``num_layers`` pre-LayerNorm ``nn.TransformerEncoderLayer`` modules (run by
    :func:`encode`)."""
    layer = nn.TransformerEncoderLayer(
        dim,
        config.num_heads,
        config.ff_dim,
        config.dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    return nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)


def encode(
    module: nn.TransformerEncoder, x: torch.Tensor, keep: torch.Tensor, training: bool
) -> torch.Tensor:
    """``module(x, src_key_padding_mask=~keep)`` for pre-LN layers, with the same weights and
    result, through :func:`attention` and :func:`~adalayers.core.dropout.dropout`. Per layer:

        x = x + drop(attention(LN1(x)))
        x = x + drop(W2 drop(GELU(W1 LN2(x))))
    """
    for layer in module.layers:
        h = attention(layer.self_attn, layer.norm1(x), keep, training)  # (B, T, k)
        x = x + dropout(h, layer.dropout1.p, training)  # (B, T, k)
        h = F.gelu(layer.linear1(layer.norm2(x)))  # (B, T, ff)
        h = layer.linear2(dropout(h, layer.dropout.p, training))  # (B, T, k)
        x = x + dropout(h, layer.dropout2.p, training)  # (B, T, k)
    return x


class SequenceHead(nn.Module):
    """``sequence_layers`` encoder layers (:func:`encode`, none by default), self-attention
    over ``F`` with the padding mask, masked mean pooling, then a linear layer.

    Used for classification (``num_outputs`` = classes) and regression (``num_outputs`` = 1).
    """

    def __init__(self, dim: int, num_outputs: int, config: HeadConfig) -> None:
        super().__init__()
        _check_heads(dim, config.num_heads)
        self.encoder = None
        if config.sequence_layers > 0:
            self.encoder = encoder(dim, config.sequence_layers, config)
        self.attention = nn.MultiheadAttention(
            dim, config.num_heads, dropout=config.dropout, batch_first=True
        )
        self.dropout = Dropout(config.dropout)
        self.out = nn.Linear(dim, num_outputs)

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, k), (B, T) -> (B, num_outputs)."""
        keep = attention_mask != 0  # (B, T)
        if self.encoder is not None:
            features = encode(self.encoder, features, keep, self.training)  # (B, T, k)
        h = attention(self.attention, features, keep, self.training)  # (B, T, k)
        mask = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, k)
        return self.out(self.dropout(pooled))  # (B, num_outputs)


class TokenHead(nn.Module):
    """``num_layers`` encoder layers (:func:`encode`), then a linear layer per token."""

    def __init__(self, dim: int, num_outputs: int, config: HeadConfig) -> None:
        super().__init__()
        _check_heads(dim, config.num_heads)
        self.encoder = None
        if config.num_layers > 0:
            self.encoder = encoder(dim, config.num_layers, config)
        self.dropout = Dropout(config.dropout)
        self.out = nn.Linear(dim, num_outputs)

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, k), (B, T) -> (B, T, num_outputs)."""
        h = features
        if self.encoder is not None:
            h = encode(self.encoder, features, attention_mask != 0, self.training)  # (B, T, k)
        return self.out(self.dropout(h))  # (B, T, num_outputs)
