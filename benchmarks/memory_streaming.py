"""Extra peak memory of streaming taps vs ``output_hidden_states=True``.

Each variant runs in a fresh process: load the base, warm up, reset the kernel's peak-RSS
counter (``/proc/self/clear_refs``), run one forward, read the peak (``VmHWM``) minus the
resident size before the forward. glibc is told to serve every large allocation with mmap
(``MALLOC_MMAP_THRESHOLD_``) so that freed memory leaves the resident set at once. The extra
memory of a variant is its peak minus the bare base's peak.

    python benchmarks/memory_streaming.py [--batch 32 --length 256 --dim 64 --repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = ("bare", "hidden_states", "stream_1", "stream_4")
# stream_N: N tasks (mixer + sequence head) tapped on the forward that also returns the base's
# own output, as in production (the base keeps doing its main job).


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


class _Mallinfo:
    """Bytes glibc has handed out (arena + mmapped), sampled at every module boundary."""

    def __init__(self) -> None:
        import ctypes

        class Info(ctypes.Structure):
            _fields_ = [
                (n, ctypes.c_size_t)
                for n in (
                    "arena",
                    "ordblks",
                    "smblks",
                    "hblks",
                    "hblkhd",
                    "usmblks",
                    "fsmblks",
                    "uordblks",
                    "fordblks",
                    "keepcost",
                )
            ]

        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = Info
        self.peak = 0

    def now(self) -> int:
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def sample(self, *args) -> None:
        self.peak = max(self.peak, self.now())


def child(variant: str, batch: int, length: int, dim: int) -> None:
    import torch

    from adalayers.core.backbone import load_backbone
    from adalayers.core.multitask import AdaLayers
    from adalayers.core.task import Task, TaskConfig

    torch.manual_seed(0)
    backbone = load_backbone("all-MiniLM-L6-v2")
    n_tasks = int(variant.split("_")[1]) if variant.startswith("stream") else 0
    tasks = {
        f"t{i}": Task(
            TaskConfig(
                "sequence_classification", ["a", "b"], mixer={"dim": dim}, head={"num_heads": 8}
            ),
            backbone.info(),
        )
        for i in range(n_tasks)
    }
    runtime = AdaLayers(backbone, tasks).eval()
    ids = torch.randint(1000, 20000, (batch, length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def run():
        if variant == "bare":
            return backbone(inputs)
        if variant == "hidden_states":
            return backbone.hidden_states(inputs)
        return runtime(inputs, return_base_output=True)  # taps + one (B, T, k) buffer per task

    small = {k: v[:2, :16] for k, v in inputs.items()}
    with torch.inference_mode():
        saved = inputs
        inputs = small
        run()
        inputs = saved
    gc.collect()
    malloc = _Mallinfo()
    for module in list(backbone.modules()) + list(runtime.tasks.modules()):
        module.register_forward_pre_hook(malloc.sample)
        module.register_forward_hook(malloc.sample)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    allocated_before = malloc.now()
    malloc.peak = allocated_before
    with torch.inference_mode():
        out = run()
        peak = _status("VmHWM")
        malloc.sample()
    del out
    print(
        json.dumps(
            {
                "variant": variant,
                "peak_extra_bytes": peak - before,
                "allocated_peak_extra_bytes": malloc.peak - allocated_before,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=VARIANTS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch, args.length, args.dim)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import write_result

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    peaks: dict[str, list[int]] = {v: [] for v in VARIANTS}
    allocated: dict[str, list[int]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    variant,
                    "--batch",
                    str(args.batch),
                    "--length",
                    str(args.length),
                    "--dim",
                    str(args.dim),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[variant].append(row["peak_extra_bytes"])
            allocated[variant].append(row["allocated_peak_extra_bytes"])
    median = {v: statistics.median(p) for v, p in peaks.items()}
    b, t, k, d, states = args.batch, args.length, args.dim, 384, 7
    extra = {v: median[v] - median["bare"] for v in VARIANTS if v != "bare"}
    alloc_median = {v: statistics.median(p) for v, p in allocated.items()}
    alloc_extra = {v: alloc_median[v] - alloc_median["bare"] for v in VARIANTS if v != "bare"}
    result = {
        "benchmark": "memory_streaming",
        "base": "all-MiniLM-L6-v2 (6 blocks, 7 states, d=384)",
        "batch": b,
        "length": t,
        "dim": k,
        "repeats": args.repeats,
        "method": "peak RSS (VmHWM after clear_refs) and peak bytes allocated by malloc "
        "(mallinfo2, sampled at every module boundary), each minus the bare forward's",
        "allocated_peak_bytes_per_run": allocated,
        "allocated_extra_peak_bytes_vs_bare": alloc_extra,
        "ratio_allocated_hidden_states_over_stream_1": alloc_extra["hidden_states"]
        / max(alloc_extra["stream_1"], 1),
        "ratio_allocated_hidden_states_over_stream_4": alloc_extra["hidden_states"]
        / max(alloc_extra["stream_4"], 1),
        "peak_bytes_per_run": peaks,
        "peak_bytes_median": median,
        "extra_peak_bytes_vs_bare": extra,
        "theory_bytes": {
            "one_buffer_B_T_k": b * t * k * 4,
            "all_states_B_T_d_x_states": b * t * d * states * 4,
        },
        "ratio_hidden_states_over_stream_1": extra["hidden_states"] / max(extra["stream_1"], 1),
        "ratio_hidden_states_over_stream_4": extra["hidden_states"] / max(extra["stream_4"], 1),
        "roberta_large_on_paper": {
            "all_states_bytes": b * t * 1024 * 25 * 4,
            "one_buffer_bytes": b * t * k * 4,
            "ratio": 1024 * 25 / k,
        },
    }
    path = write_result("memory_streaming", result)
    mib = 2**20
    print(f"extra peak vs bare forward (median of {args.repeats}), batch {b} x {t}, k={k}:")
    for v, e in extra.items():
        print(f"  {v:14s} RSS {e / mib:8.1f} MiB   allocated {alloc_extra[v] / mib:8.1f} MiB")
    print(
        f"  theory: one buffer {b * t * k * 4 / mib:.1f} MiB, all states "
        f"{b * t * d * states * 4 / mib:.1f} MiB"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
