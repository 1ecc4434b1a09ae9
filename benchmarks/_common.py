"""Shared helpers for the benchmark scripts: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def git_commit() -> str | None:
    """The checked-out commit, with ``+changes`` when the tracked code (``src``, ``benchmarks``
    bar the results files other runs write meanwhile) differs from it."""
    try:
        git = ["git", "-C", str(Path(__file__).resolve().parents[1])]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            [*git, "diff", "--quiet", "HEAD", "--", "src", "benchmarks", ":!benchmarks/results"]
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if changed.returncode else "")


# the code a benchmark runs is the code at its start, not at the commit checked out when it
# writes its results hours later
STARTED_AT = git_commit()


def write_result(name: str, payload: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the machine and the command."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        **payload,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "commit": STARTED_AT,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def run_offline(cmd: list[str]) -> tuple[int, float]:
    """Run a command with ``HF_HUB_OFFLINE=1``; its exit code and wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return proc.returncode, time.perf_counter() - start


def interleaved_rounds(
    calls: dict[str, Callable[[], object]],
    variants: Sequence[str],
    rounds: int,
    warmup: int,
    order: Callable[[random.Random], list[str]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every variant once a round, in an order drawn anew each round (default: shuffled
    with a ``random.Random(0)``), after ``warmup`` untimed rounds, under ``inference_mode``.

    Returns:
        ``(wall, cpu)``: variant -> seconds per round (wall clock, this thread's CPU time).
    """
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    rng = random.Random(0)

    def shuffled(rng: random.Random) -> list[str]:
        drawn = list(variants)
        rng.shuffle(drawn)
        return drawn

    with torch.inference_mode():
        for _ in range(warmup):
            for v in variants:
                calls[v]()
        for _ in range(rounds):
            for v in (order or shuffled)(rng):
                start, start_cpu = time.perf_counter(), time.thread_time()
                calls[v]()
                times[v].append(time.perf_counter() - start)
                cpu[v].append(time.thread_time() - start_cpu)
    return times, cpu
