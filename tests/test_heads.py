"""The heads' own attention and encoder layers equal the torch modules whose weights they use;
the cheap CPU dropout has dropout's distribution."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import adalayers.core.heads as heads_module
from adalayers.core.dropout import Dropout, dropout, keep_mask
from adalayers.core.heads import HeadConfig, SequenceHead, TokenHead, attention


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
    """With attention dropout, the softmax(q k^T) v path with its mask made all-ones (every
    weight kept and scaled by 1 / (1 - p) = 2) gives the module's numbers, times 2."""
    torch.manual_seed(0)
    head = SequenceHead(16, 3, HeadConfig(num_heads=4, dropout=0.5))
    torch.nn.init.normal_(head.attention.out_proj.bias)
    bias = head.attention.out_proj.bias.detach()
    features = torch.randn(3, 7, 16)
    m = _mask()
    monkeypatch.setattr(heads_module, "keep_mask", lambda shape, p, device: torch.ones(shape) > 0)
    got = attention(head.attention, features, m != 0, training=True)
    head.eval()
    reference, _ = head.attention(
        features, features, features, key_padding_mask=m == 0, need_weights=False
    )
    real = m.bool()
    torch.testing.assert_close(got[real] - bias, 2 * (reference[real] - bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_fused_attention_dropout_equals_the_expression_op_by_op(padded, monkeypatch):
    """The CPU path with attention dropout (one autograd function) against
    ``dropout(softmax(q kᵀ/√d + mask)) v`` written op by op: the same mask from the same seed,
    the same output, and the same gradients within float rounding."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 7, 8, requires_grad=True) for _ in range(3))  # (B, H, T, d)
    keep = (_mask() != 0)[:, None, None, :] if padded else None
    calls = []
    fused = heads_module._DropoutAttention.apply
    monkeypatch.setattr(
        heads_module._DropoutAttention, "apply", lambda *a: (calls.append(1), fused(*a))[1]
    )
    results = []
    for fn in (heads_module.dropout_attention_by_ops, heads_module.dropout_attention):
        torch.manual_seed(1)
        out = fn(q, k, v, keep, 0.1)
        (out**2).sum().backward()
        results.append((out.detach(), [x.grad.clone() for x in (q, k, v)]))
        q.grad = k.grad = v.grad = None
    assert calls == [1]  # the fused path ran, once
    (want, want_grads), (got, got_grads) = results
    assert torch.equal(got, want) and got.abs().sum() > 0
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    torch.manual_seed(2)  # another seed draws another mask
    assert not torch.equal(heads_module.dropout_attention(q, k, v, keep, 0.1), got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_attention_dropout_on_cuda_keeps_the_mean_and_drops_at_the_rate():
    """CUDA takes SDPA's own dropout: averaged over many draws it is attention without
    dropout, and gradients reach the inputs; same check for the op-by-op reference."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8, device="cuda", requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 1, 1, 16, dtype=torch.bool, device="cuda")
    keep[1, ..., 10:] = False
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    for fn in (heads_module.dropout_attention, heads_module.dropout_attention_by_ops):
        draws = torch.stack([fn(q, k, v, keep, 0.3) for _ in range(4000)]).detach()
        assert not torch.equal(draws[0], draws[1])  # a fresh mask per call
        error = (draws.mean(0) - plain.detach()).abs()
        assert (error <= 5 * draws.std(0) / 4000**0.5 + 1e-4).all()  # within 5 standard errors
    fn(q, k, v, keep, 0.3).sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v))


def test_the_head_uses_the_fused_attention_dropout_on_a_cpu(monkeypatch):
    calls = []
    fused = heads_module._DropoutAttention.apply
    monkeypatch.setattr(
        heads_module._DropoutAttention, "apply", lambda *a: (calls.append(1), fused(*a))[1]
    )
    head = SequenceHead(16, 3, HeadConfig(num_heads=4, dropout=0.1))
    head(torch.randn(3, 7, 16), _mask()).sum().backward()
    assert calls == [1] and head.attention.in_proj_weight.grad.abs().sum() > 0
    head.eval()
    head(torch.randn(3, 7, 16), _mask())  # evaluation: no dropout, SDPA
    assert calls == [1]


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


def test_head_attention_benchmark_times_the_three_paths(benchmark_script, tmp_path, monkeypatch):
    script = benchmark_script("head_attention")
    argv = ["head_attention.py", "--batch", "4", "--lengths", "16", "24", "--repeats", "2"]
    monkeypatch.setattr("sys.argv", argv)
    script.main()
    result = json.loads((tmp_path / "results" / "head_attention.json").read_text())
    assert set(result["lengths"]) == {"16", "24"}
    row = result["lengths"]["24"]
    assert row["shape"] == [4, 8, 24, 8]
    assert set(row["median_seconds"]) == {"fused", "by_ops", "sdpa_no_dropout"}
    assert all(len(ts) == 2 for ts in row["all_seconds"].values())
    med = row["median_seconds"]
    assert row["fused_speedup_over_by_ops"] == pytest.approx(med["by_ops"] / med["fused"], rel=0.1)
