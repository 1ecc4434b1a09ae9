"""The sequence head's attention with dropout, fused against op by op, in one run.

    python benchmarks/head_attention.py [--batch 32] [--lengths 128 512] [--repeats 5]

Times forward + backward of :func:`adalayers.core.heads.dropout_attention` (the CPU path, one
autograd function), of :func:`adalayers.core.heads.dropout_attention_by_ops` (the same expression op
by op, what the head ran before) and of ``scaled_dot_product_attention`` without dropout (what
evaluation runs), on (batch, 8 heads, T, 8) as in the IMDB config (mixer dim 64, 8 heads),
a quarter of the batch padded to 3/4 of T. The three are interleaved and each figure is the
median of ``--repeats``. Writes ``benchmarks/results/<--name>.json`` (default head_attention).
``--device cuda`` times the same on a GPU, where the fused path is SDPA's own dropout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from adalayers.core.heads import dropout_attention, dropout_attention_by_ops  # noqa: E402


def step(fn, q, k, v, keep) -> float:
    """Seconds for one forward and backward."""
    for x in (q, k, v):
        x.grad = None
    if q.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(q, k, v, keep).square().sum().backward()
    if q.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--dropout", type=float, default=0.03)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="head_attention")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the fused path is SDPA's)")
    args = parser.parse_args()
    p = args.dropout
    paths = {
        "fused": lambda q, k, v, keep: dropout_attention(q, k, v, keep, p),
        "by_ops": lambda q, k, v, keep: dropout_attention_by_ops(q, k, v, keep, p),
        "sdpa_no_dropout": lambda q, k, v, keep: F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep
        ),
    }
    results = {}
    torch.manual_seed(0)
    for t in args.lengths:
        shape = (args.batch, args.heads, t, args.head_dim)
        q, k, v = (torch.randn(shape, device=args.device, requires_grad=True) for _ in range(3))
        keep = torch.ones(args.batch, 1, 1, t, dtype=torch.bool, device=args.device)
        keep[: args.batch // 4, ..., (3 * t) // 4 :] = False
        times: dict[str, list[float]] = {name: [] for name in paths}
        for fn in paths.values():  # warm-up
            step(fn, q, k, v, keep)
        for _ in range(args.repeats):
            for name, fn in paths.items():
                times[name].append(step(fn, q, k, v, keep))
        median = {name: statistics.median(ts) for name, ts in times.items()}
        results[str(t)] = {
            "shape": list(shape),
            "median_seconds": {name: round(s, 6) for name, s in median.items()},
            "all_seconds": {name: [round(s, 6) for s in ts] for name, ts in times.items()},
            "fused_speedup_over_by_ops": round(median["by_ops"] / median["fused"], 2),
            "fused_over_sdpa_no_dropout": round(median["fused"] / median["sdpa_no_dropout"], 2),
        }
        print(t, results[str(t)]["median_seconds"], flush=True)
    path = write_result(
        args.name,
        {
            "benchmark": "head_attention",
            "device": args.device,
            "dropout": p,
            "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(),
            "lengths": results,
        },
    )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
