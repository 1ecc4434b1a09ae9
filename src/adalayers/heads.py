"""Small task heads on the mixed features ``F`` (B, T, k)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown head key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

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

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, k), (B, T) -> (B, num_outputs)."""
        pad = attention_mask == 0  # (B, T) True where padding
        h, _ = self.attention(
            features, features, features, key_padding_mask=pad, need_weights=False
        )  # (B, T, k)
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
