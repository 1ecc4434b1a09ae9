"""Plots of a run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def plot_layer_weights(
    weights: Mapping[int, float], path: str | os.PathLike, title: str = ""
) -> Path:
    """Bar chart of the learned layer distribution ``p~`` (state index -> weight)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    layers = sorted(int(k) for k in weights)
    values = [float(weights[k] if k in weights else weights[str(k)]) for k in layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(layers) + 2), 3))
    ax.bar([str(i) for i in layers], values, color="#4C72B0")
    ax.set_xlabel("hidden state (0 = embeddings)")
    ax.set_ylabel("weight p~")
    ax.set_ylim(0, max(values + [1e-6]) * 1.15)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
