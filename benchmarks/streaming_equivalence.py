"""max |streaming - stacked| over the task logits, for every supported family and MiniLM.

    python benchmarks/streaming_equivalence.py

Tiny random models of each family (as in the tests) plus the real embedded MiniLM; three tasks
(sequence, token, regression) with random layer weights on each, once with the static mixer and
once with ``mixer.mode: dynamic`` (a random query too: per-token weights far from the static).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(Path(__file__).resolve().parent)]
from _common import write_result  # noqa: E402
from conftest import build_tiny  # noqa: E402

from adalayers.core.backbone import load_backbone  # noqa: E402
from adalayers.core.multitask import AdaLayers  # noqa: E402
from adalayers.core.task import Task, TaskConfig  # noqa: E402

TEXTS = ["the movie was very good", "bad plot", "john read a book in london ."]
HEADS = {8: 4, 64: 8}  # mixer.heads of the grouped dynamic tasks, by k


def tasks_for(backbone, dim, mode="adalayers", heads=1):
    torch.manual_seed(0)
    mixer = {"dim": dim, "mode": mode, "heads": heads}
    tasks = {
        "seq": TaskConfig(
            "sequence_classification", ["a", "b"], mixer=mixer, head={"num_heads": 2}
        ),
        "tok": TaskConfig(
            "token_classification",
            ["O", "B", "I"],
            mixer=mixer,
            head={"num_heads": 2, "num_layers": 1, "ff_dim": 32},
        ),
        "reg": TaskConfig("regression", [], mixer=mixer, head={"num_heads": 2}),
    }
    out = {name: Task(cfg, backbone.info()) for name, cfg in tasks.items()}
    for task in out.values():
        torch.nn.init.normal_(task.mixer.p, std=0.05)
        if mode == "dynamic":
            torch.nn.init.normal_(task.mixer.query)
    return out


def max_diff(backbone, dim, mode="adalayers", heads=1):
    runtime = AdaLayers(backbone, tasks_for(backbone, dim, mode, heads)).eval()
    inputs = dict(backbone.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    a, b = runtime(inputs).logits, runtime(inputs, stream=False).logits
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main() -> None:
    results, dynamic, grouped = {}, {}, {}  # grouped: dynamic with HEADS[dim] heads
    cases = [(f, None) for f in ("bert", "roberta", "deberta", "mpnet", "gpt2", "llama")]
    cases += [("bart", "encoder"), ("bart", "decoder"), ("t5", "encoder"), ("t5", "decoder")]
    with tempfile.TemporaryDirectory() as tmp:
        for family, states in cases:
            folder = Path(tmp) / family
            if not folder.exists():
                build_tiny(family, folder)
            backbone = load_backbone(folder, states=states)
            key = f"tiny-{family}" + (f"-{states}" if states else "")
            results[key] = max_diff(backbone, 8)
            dynamic[key] = max_diff(backbone, 8, "dynamic")
            grouped[key] = max_diff(backbone, 8, "dynamic", HEADS[8])
    minilm = load_backbone("all-MiniLM-L6-v2")
    results["all-MiniLM-L6-v2"] = max_diff(minilm, 64)
    dynamic["all-MiniLM-L6-v2"] = max_diff(minilm, 64, "dynamic")
    grouped["all-MiniLM-L6-v2"] = max_diff(minilm, 64, "dynamic", HEADS[64])
    for key, value in results.items():
        print(
            f"{key:22s} max |streaming - stacked| = {value:.3g}, dynamic {dynamic[key]:.3g}, "
            f"with heads {grouped[key]:.3g}"
        )
    print(
        write_result(
            "streaming_equivalence",
            {
                "benchmark": "streaming_equivalence",
                "max_abs_diff": results,
                "max_abs_diff_dynamic": dynamic,
                "dynamic_heads": {"tiny bases, k = 8": HEADS[8], "MiniLM, k = 64": HEADS[64]},
                "max_abs_diff_dynamic_heads": grouped,
                "overall_max": max(results.values()),
                "overall_max_dynamic": max(dynamic.values()),
                "overall_max_dynamic_heads": max(grouped.values()),
            },
        )
    )


if __name__ == "__main__":
    main()
