"""Dropout whose random mask is cheap on a CPU.

On a CPU, ``torch.nn.functional.dropout`` draws one ``bernoulli_`` sample per element, and in the
small heads this library trains that draw costs more than the matrix products around it (about
a sixth of a cached CoNLL-2003 training step on 2 cores, six dropouts per step). Here every
64-bit draw of torch's generator gives four 16-bit uniforms ``r`` and an element is dropped when
``r < t`` with ``t = round(p * 2**16)``:

    P(drop) = t / 2**16          (= p for p a multiple of 2**-16, within 2**-17 otherwise)
    y = x * [r >= t] / (1 - t / 2**16)           so that E[y] = x exactly

It follows ``torch.manual_seed`` like any torch sampler. On other devices, and for ``p`` of 0
or 1, it is ``torch.nn.functional.dropout``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16  # 16-bit uniforms


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask of ``shape``, each element ``False`` with probability ``round(p·2¹⁶)/2¹⁶``."""
    n = math.prod(shape)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    draws.random_(-(1 << 63), (1 << 63) - 1)  # (ceil(n/4),) every bit uniform
    r = draws.view(torch.int16)[:n].view(shape)  # four signed 16-bit uniforms per draw
    return r >= round(p * _LEVELS) - _LEVELS // 2


def keep_scale(p: float) -> float | None:
    """``1 / P(keep)`` of :func:`keep_mask`'s mask for ``p``, or ``None`` where ``p`` rounds to
    0 or 1 in 16 bits and :func:`dropout` falls back to ``torch.nn.functional.dropout``."""
    threshold = round(p * _LEVELS)
    return None if threshold in (0, _LEVELS) else _LEVELS / (_LEVELS - threshold)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero each element of ``x`` with probability ``p`` and scale the rest to keep the mean."""
    if not training or p == 0.0:
        return x
    scale = keep_scale(p)
    if x.device.type != "cpu" or scale is None:
        return F.dropout(x, p, training=True)
    keep = keep_mask(x.shape, p, x.device)
    return x * (keep.to(x.dtype) * scale)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with :func:`dropout`'s cheap CPU mask (same ``p``, no state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
