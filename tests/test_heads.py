"""The heads' own attention and encoder layers equal the torch modules whose weights they use;
the cheap CPU dropout has dropout's distribution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adalayers.heads as heads_module
from adalayers.dropout import Dropout, dropout, keep_mask
from adalayers.heads import HeadConfig, SequenceHead, TokenHead, attention


def _mask() -> torch.Tensor:
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    return mask


def test_attention_equals_multihead_attention():
    torch.manual_seed(0)
    head = SequenceHead(16, 3, HeadConfig(num_heads=4)).eval()
    features = torch.randn(3, 7, 16)  # (B, T, k)
    for m in (_mask(), torch.ones(3, 7, dtype=torch.long)):
        reference, _ = head.attention(
            features, features, features, key_padding_mask=m == 0, need_weights=False
        )
        got = attention(head.attention, features, m != 0, training=False)
        real = m.bool()
        torch.testing.assert_close(got[real], reference[real], atol=1e-6, rtol=1e-5)
    # gradients flow to the attention weights through the fast path
    head.train()
    head(features, _mask()).sum().backward()
    assert head.attention.in_proj_weight.grad.abs().sum() > 0


def test_attention_dropout_path_is_the_same_product(monkeypatch):
    """With attention dropout, the explicit softmax(q k^T) v path (its mask made all-ones)
    gives the module's numbers."""
    torch.manual_seed(0)
    head = SequenceHead(16, 3, HeadConfig(num_heads=4, dropout=0.5))
    features = torch.randn(3, 7, 16)
    m = _mask()
    monkeypatch.setattr(heads_module, "dropout", lambda x, p, training=True: x)
    got = attention(head.attention, features, m != 0, training=True)
    head.eval()
    reference, _ = head.attention(
        features, features, features, key_padding_mask=m == 0, need_weights=False
    )
    real = m.bool()
    torch.testing.assert_close(got[real], reference[real], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_token_head_equals_transformer_encoder(num_layers):
    torch.manual_seed(0)
    head = TokenHead(16, 5, HeadConfig(num_heads=4, num_layers=num_layers, ff_dim=24)).eval()
    features = torch.randn(3, 7, 16)
    m = _mask()
    reference = head.out(head.encoder(features, src_key_padding_mask=m == 0))
    got = head(features, m)
    real = m.bool()
    torch.testing.assert_close(got[real], reference[real], atol=1e-5, rtol=1e-5)
    # training mode without dropout is the same function, and gradients reach every layer
    head.train()
    torch.testing.assert_close(head(features, m)[real], reference[real], atol=1e-5, rtol=1e-5)
    head(features, m)[real].sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_token_head_loads_weights_saved_by_the_module():
    """The state dict names are those of nn.TransformerEncoder: saved heads still load."""
    head = TokenHead(16, 5, HeadConfig(num_heads=4, num_layers=1, ff_dim=24))
    keys = set(head.state_dict())
    assert "encoder.layers.0.self_attn.in_proj_weight" in keys
    assert "encoder.layers.0.linear1.weight" in keys


@pytest.mark.parametrize("sequence_layers", [1, 2])
def test_sequence_head_encoder_equals_transformer_encoder(sequence_layers):
    """``sequence_layers`` runs nn.TransformerEncoder's function before the attention pooling;
    padded positions do not change the output."""
    torch.manual_seed(0)
    config = HeadConfig(num_heads=4, sequence_layers=sequence_layers, ff_dim=24)
    head = SequenceHead(16, 3, config).eval()
    assert len(head.encoder.layers) == sequence_layers
    features = torch.randn(3, 7, 16)
    m = _mask()
    encoded = head.encoder(features, src_key_padding_mask=m == 0)
    encoded = torch.where(m.bool().unsqueeze(-1), encoded, 0.0)  # padding: masked out below
    pooled, _ = head.attention(
        encoded, encoded, encoded, key_padding_mask=m == 0, need_weights=False
    )
    w = m.unsqueeze(-1).float()
    reference = head.out((pooled * w).sum(1) / w.sum(1))
    torch.testing.assert_close(head(features, m), reference, atol=1e-5, rtol=1e-5)
    changed = features.clone()
    changed[~m.bool()] = 100.0
    torch.testing.assert_close(head(changed, m), reference, atol=1e-5, rtol=1e-5)
    head.train()
    head(features, m).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "encoder.layers.0.linear1.weight" in head.state_dict()


def test_sequence_head_default_has_no_encoder():
    """The default (``sequence_layers=0``) is the attention pooling alone, so heads saved before
    the option existed load unchanged; a negative depth is refused by name."""
    head = SequenceHead(16, 3, HeadConfig(num_heads=4))
    assert head.encoder is None
    assert not any(k.startswith("encoder.") for k in head.state_dict())
    with pytest.raises(ValueError, match="sequence_layers"):
        HeadConfig(sequence_layers=-1)


@pytest.mark.parametrize("p", [0.03, 0.1, 0.5])
def test_dropout_rate_and_mean(p):
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    y = dropout(x, p)
    rate = (y == 0).float().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5 + 2**-17
    assert abs(y.mean().item() - 1.0) < 0.01  # kept elements are scaled by 1 / P(keep)
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, kept[0].item()))


def test_dropout_bits_are_uniform():
    """Every 16-bit slot of the draws is uniform: the drop rate is p in each of the 4 slots."""
    torch.manual_seed(0)
    keep = keep_mask((400_000,), 0.25, torch.device("cpu")).view(-1, 4)
    rates = 1 - keep.float().mean(0)
    assert torch.all((rates - 0.25).abs() < 0.005), rates


def test_dropout_gradient_is_the_mask():
    torch.manual_seed(1)
    x = torch.randn(50, 40, requires_grad=True)
    y = dropout(x, 0.2)
    y.sum().backward()
    kept = y.detach() != 0
    scale = 1 / (1 - round(0.2 * 65536) / 65536)
    torch.testing.assert_close(x.grad, kept.float() * scale)
    torch.testing.assert_close(y[kept], x.detach()[kept] * scale)


def test_dropout_follows_the_seed_and_is_off_in_eval():
    x = torch.randn(30, 30)
    torch.manual_seed(3)
    a = dropout(x, 0.3)
    torch.manual_seed(3)
    b = dropout(x, 0.3)
    assert torch.equal(a, b)
    assert not torch.equal(a, dropout(x, 0.3))
    module = Dropout(0.3).eval()
    assert module(x) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), F.dropout(x, 1.0))  # all dropped
