"""Small task heads on the mixed features ``F`` (B, T, k)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class HeadConfig:
    """Hyper-parameters of a task head.

    Attributes:
        num_heads: attention heads (must divide the mixer's ``dim``).
        num_layers: token tasks: pre-LayerNorm transformer encoder layers before the per-token
            linear layer (0: linear only). Sequence tasks always use one attention layer.
        ff_dim: feed-forward width of those encoder layers.
        dropout: dropout inside the head.
    """

    num_heads: int = 8
    num_layers: int = 1
    ff_dim: int = 2048
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.num_layers < 0 or self.ff_dim <= 0:
            raise ValueError(
                f"head.num_heads and head.ff_dim must be positive and "
                f"head.num_layers >= 0, got {self}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"head.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HeadConfig:
        """Build from a mapping; unknown keys and wrong types raise a ``ValueError``."""
        from adalayers._schema import build

        return build(cls, values, "head")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_heads(dim: int, num_heads: int) -> None:
    if dim % num_heads:
        raise ValueError(f"head.num_heads={num_heads} must divide mixer.dim={dim}")


class SequenceHead(nn.Module):
    """Self-attention over ``F`` with the padding mask, masked mean pooling, then a linear layer.

    Used for classification (``num_outputs`` = classes) and regression (``num_outputs`` = 1).
    """

    def __init__(self, dim: int, num_outputs: int, config: HeadConfig) -> None:
        super().__init__()
        _check_heads(dim, config.num_heads)
        self.attention = nn.MultiheadAttention(
            dim, config.num_heads, dropout=config.dropout, batch_first=True
        )
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(dim, num_outputs)

    def _attend(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``self.attention`` (same weights, same result) through ``scaled_dot_product_attention``.

        ``nn.MultiheadAttention`` with a key padding mask takes a masked-softmax path that is
        about 3x slower on CPU; this head is most of a task's serving cost, so it matters.
        """
        att = self.attention
        b, t, k = features.shape
        heads = att.num_heads
        qkv = F.linear(features, att.in_proj_weight, att.in_proj_bias)  # (B, T, 3k)
        q, key, v = qkv.view(b, t, 3, heads, k // heads).permute(2, 0, 3, 1, 4)  # (B, H, T, k/H)
        keep = attention_mask != 0  # (B, T) True for real tokens
        mask = None if bool(keep.all()) else keep[:, None, None, :]  # (B, 1, 1, T)
        drop = att.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, key, v, attn_mask=mask, dropout_p=drop)
        return att.out_proj(h.transpose(1, 2).reshape(b, t, k))  # (B, T, k)

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, k), (B, T) -> (B, num_outputs)."""
        h = self._attend(features, attention_mask)  # (B, T, k)
        mask = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, k)
        return self.out(self.dropout(pooled))  # (B, num_outputs)


class TokenHead(nn.Module):
    """``num_layers`` pre-LayerNorm transformer encoder layers, then a linear layer per token."""

    def __init__(self, dim: int, num_outputs: int, config: HeadConfig) -> None:
        super().__init__()
        _check_heads(dim, config.num_heads)
        self.encoder = None
        if config.num_layers > 0:
            layer = nn.TransformerEncoderLayer(
                dim,
                config.num_heads,
                config.ff_dim,
                config.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.encoder = nn.TransformerEncoder(
                layer, config.num_layers, enable_nested_tensor=False
            )
        self.dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(dim, num_outputs)

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, k), (B, T) -> (B, T, num_outputs)."""
        h = features
        if self.encoder is not None:
            h = self.encoder(h, src_key_padding_mask=attention_mask == 0)  # (B, T, k)
        return self.out(self.dropout(h))  # (B, T, num_outputs)
