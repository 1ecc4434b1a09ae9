"""The sequence head's attention equals ``nn.MultiheadAttention`` with a key padding mask."""

from __future__ import annotations

import torch

from adalayers.heads import HeadConfig, SequenceHead


def test_fast_attention_equals_multihead_attention():
    torch.manual_seed(0)
    head = SequenceHead(16, 3, HeadConfig(num_heads=4)).eval()
    features = torch.randn(3, 7, 16)  # (B, T, k)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    for m in (mask, torch.ones_like(mask)):
        reference, _ = head.attention(
            features, features, features, key_padding_mask=m == 0, need_weights=False
        )
        got = head._attend(features, m)
        real = m.bool()
        torch.testing.assert_close(got[real], reference[real], atol=1e-6, rtol=1e-5)
    # gradients flow to the attention weights through the fast path
    head.train()
    head(features, mask).sum().backward()
    assert head.attention.in_proj_weight.grad.abs().sum() > 0
