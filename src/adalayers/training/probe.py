"""Choosing the hidden states worth caching: a training-free ridge probe per state.

``cache.layers: N`` keeps the N states this probe scores best (:mod:`.cache_prep`), so a store
holds only what the mixer is likely to use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from adalayers.core.backbone import Backbone
from adalayers.training.cache import token_batches


@torch.inference_mode()
def probe_layers(
    backbone: Backbone,
    ds: Any,
    task_type: str,
    num_labels: int,
    max_examples: int = 2000,
    seed: int = 0,
) -> dict[int, float]:
    """A training-free score per hidden state: held-out quality of a ridge probe.

    Sequence tasks probe the masked mean of the tokens, token tasks each word's first sub-token.
    Classification scores accuracy, regression the Pearson correlation; 80% fit / 20% score.
    """
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(ds))[:max_examples].tolist()
    feats: dict[int, list[torch.Tensor]] = {i: [] for i in range(backbone.num_states)}
    targets: list[torch.Tensor] = []
    lengths = ds["length"][:]
    pad_id = backbone.tokenizer.pad_token_id
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in ds.column_names]
    for batch in token_batches(lengths, picks, 8192):
        rows = ds.select(batch)
        width = max(lengths[p] for p in batch)
        inputs = {}
        for column in columns:
            pad = pad_id if column == "input_ids" else 0
            inputs[column] = torch.tensor([r + [pad] * (width - len(r)) for r in rows[column][:]])
        states = backbone.hidden_states({k: v.to(backbone.device) for k, v in inputs.items()})
        labels = rows["labels"][:]
        mask = inputs["attention_mask"].float()
        if task_type == "token_classification":
            lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
            keep = lab != -100
            targets.append(lab[keep])
            for i, z in enumerate(states):
                feats[i].append(z.float().cpu()[keep])
        else:
            targets.append(torch.tensor(labels, dtype=torch.float32))
            for i, z in enumerate(states):
                pooled = (z.float().cpu() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                feats[i].append(pooled)
    y = torch.cat(targets)
    n = len(y)
    split = int(0.8 * n)
    order = torch.from_numpy(rng.permutation(n))
    fit_idx, test_idx = order[:split], order[split:]
    scores = {}
    for i, chunks in feats.items():
        x = torch.cat(chunks).double()
        x = (x - x[fit_idx].mean(0)) / (x[fit_idx].std(0) + 1e-6)
        x = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
        if task_type == "regression":
            target = y.double()[:, None]
        else:
            target = torch.nn.functional.one_hot(y.long(), num_labels).double()
        a = x[fit_idx]
        w = torch.linalg.solve(
            a.T @ a + 10.0 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ target[fit_idx]
        )
        pred = x[test_idx] @ w
        if task_type == "regression":
            p, t = pred[:, 0], y.double()[test_idx]
            scores[i] = float(torch.corrcoef(torch.stack([p, t]))[0, 1])
        else:
            scores[i] = float((pred.argmax(-1) == y[test_idx].long()).double().mean())
    return scores
