"""What the dynamic mixer's per-token layer weights do on real inputs.

For each trained ``mode: dynamic`` run folder given, reads the first ``--examples`` validation
examples of its task, runs its base once, and measures over every real token and every head:

- the total-variation distance between the token's layer weights and the static prior ``p~``
  (0: the static mix; 1: weights on layers the prior gives nothing);
- the entropy of the token's weights (nats), against the prior's;
- the mean of the largest weight;
- ``|q|``, the norm of each head's query.

Example::

    python benchmarks/dynamic_weights.py --examples 200 \\
        runs/compare/minilm-conll2003-bio-dynamic-alpha4/dynamic \\
        runs/compare/minilm-conll2003-bio-dynamic-alpha4-heads8/dynamic

writes ``benchmarks/results/dynamic_weights.json``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from _common import write_result

from adalayers.training.data.readers import load_task_data
from adalayers.training.run import load_run


def texts_of(data, examples: int, data_dir: str | None) -> list[str]:
    """The first validation examples as text (a token task's words joined by spaces)."""
    loaded = load_task_data(data.task, data_dir or data.data_dir, seed=data.seed)
    split = loaded.splits["validation"]
    rows = split.select(range(min(examples, len(split))))
    if "tokens" in rows.column_names:
        return [" ".join(words) for words in rows["tokens"]]
    return list(rows["text"])


def weights_of(run: Path, examples: int, data_dir: str | None) -> dict:
    config, backbone, task = load_run(run)
    task.eval()
    mixer = task.mixer
    if mixer.config.mode != "dynamic":
        raise SystemExit(f"{run}: task.mixer.mode is {mixer.config.mode}, not dynamic")
    texts = texts_of(config.data, examples, data_dir)
    max_length = config.data.max_length
    tv, entropy, top = [], [], []
    with torch.inference_mode():
        prior = mixer.distribution()  # (n,)
        active = mixer.active_layers()
        weights = torch.stack([w for _, w in active])  # (n,)
        for start in range(0, len(texts), 16):
            enc = backbone.tokenizer(
                texts[start : start + 16],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            states = backbone.model(**enc, output_hidden_states=True).hidden_states
            f = torch.stack([mixer.project(layer, states[layer]) for layer, _ in active])
            s = mixer.scores(f, weights.view(-1, 1, 1, 1))  # (n, B, T, h)
            a = torch.softmax(s, dim=0)[:, enc["attention_mask"].bool()]  # (n, N, h)
            w = weights.view(-1, 1, 1)
            tv.append((a - w).abs().sum(0).div(2).flatten())
            entropy.append(-(a * a.clamp_min(1e-12).log()).sum(0).flatten())
            top.append(a.max(0).values.flatten())
    q = mixer.query.detach().view(-1, mixer.config.dim)
    cat = torch.cat
    return {
        "run": str(run),
        "heads": mixer.config.heads,
        "alpha": mixer.config.alpha,
        "examples": len(texts),
        "tokens": int(cat(tv).numel() // mixer.config.heads),
        "prior": [round(float(x), 4) for x in prior],
        "prior_entropy": float(-(weights * weights.log()).sum()),
        "query_norm": [round(float(x), 3) for x in q.norm(dim=-1)],
        "tv_from_prior": float(cat(tv).mean()),
        "entropy": float(cat(entropy).mean()),
        "max_weight": float(cat(top).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="dynamic run folders (with model/)")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--data-dir", default=None, help="default: $ADALAYERS_DATA_DIR")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="dynamic_weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [weights_of(run, args.examples, args.data_dir) for run in args.runs]
    for row in rows:
        print(
            f"{row['run']}: heads {row['heads']}, |q| {statistics.mean(row['query_norm']):.2f}, "
            f"TV from prior {row['tv_from_prior']:.3f}, entropy {row['entropy']:.3f} "
            f"(prior {row['prior_entropy']:.3f}), max weight {row['max_weight']:.3f}"
        )
    path = write_result(args.name, {"benchmark": "dynamic_weights", "runs": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
