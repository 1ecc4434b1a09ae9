"""Load test of ``adalayers serve`` on loopback: throughput, latency, deliberate overload.

Starts the server in a subprocess on 127.0.0.1 (the embedded MiniLM with 4 saved tasks), then:

1. steady: ``--clients`` concurrent clients send requests of 1-4 texts until ``--requests`` are
   answered or ``--seconds`` pass; reports throughput and p50 / p99 latency. Every answer must
   be 200.
2. overload: ``--burst`` requests at once against a queue of ``--max-queue``; the server must
   answer each with 200 or a deliberate 503 (nothing else), and stay up.
3. shutdown: SIGTERM; the server must exit cleanly.

    python benchmarks/load_test.py [--clients 16 --requests 400 --seconds 120 --burst 256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

WORDS = (
    "the film was great and the actors were wonderful but the plot felt slow in the middle "
    "john met mary in london before they flew to paris for a meeting with acme corp"
).split()


def make_tasks(folder: Path, n: int) -> list[str]:
    import torch

    from adalayers.backbone import load_backbone
    from adalayers.model import Task, TaskConfig

    torch.manual_seed(0)
    backbone = load_backbone("all-MiniLM-L6-v2")
    runs = []
    for i in range(n):
        kind = "token_classification" if i == n - 1 else "sequence_classification"
        labels = ["O", "PER", "LOC", "ORG"] if kind == "token_classification" else ["neg", "pos"]
        task = Task(
            TaskConfig(kind, labels, mixer={"dim": 64}, head={"num_heads": 8, "ff_dim": 256}),
            backbone.info(),
        )
        runs.append(f"task{i}={task.save_pretrained(folder / f'task{i}')}")
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))


async def steady(url: str, clients: int, requests: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: Counter = Counter()
    texts_done = 0
    deadline = time.perf_counter() + seconds
    sent = 0

    async def client(i: int, http: httpx.AsyncClient) -> None:
        nonlocal sent, texts_done
        rng = random.Random(i)
        while sent < requests and time.perf_counter() < deadline:
            sent += 1
            batch = [text(rng) for _ in range(rng.randint(1, 4))]
            start = time.perf_counter()
            try:
                r = await http.post(f"{url}/predict", json={"texts": batch})
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                    texts_done += len(batch)
            except httpx.HTTPError as err:
                statuses[type(err).__name__] += 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "clients": clients,
        "requests_answered": sum(statuses.values()),
        "statuses": {str(k): v for k, v in statuses.items()},
        "wall_seconds": wall,
        "requests_per_second": len(latencies) / wall,
        "texts_per_second": texts_done / wall,
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p99_ms": 1000 * q[98],
        "latency_max_ms": 1000 * max(latencies),
    }


async def overload(url: str, burst: int) -> dict:
    import httpx

    rng = random.Random(1)
    limits = httpx.Limits(max_connections=burst)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:

        async def one() -> str:
            try:
                r = await http.post(f"{url}/predict", json={"texts": [text(rng), text(rng)]})
                return str(r.status_code)
            except httpx.HTTPError as err:
                return type(err).__name__

        statuses = Counter(await asyncio.gather(*(one() for _ in range(burst))))
        health = await http.get(f"{url}/health")
    return {
        "burst": burst,
        "statuses": dict(statuses),
        "only_200_or_503": set(statuses) <= {"200", "503"},
        "health_after": health.status_code,
        "server_stats": health.json()["stats"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--burst", type=int, default=256)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-queue", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import httpx
    from _common import write_result

    with tempfile.TemporaryDirectory() as tmp:
        runs = make_tasks(Path(tmp), args.tasks)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "adalayers.serve", *runs, "--host", "127.0.0.1"]
        command += ["--port", str(port), "--log-level", "warning"]
        command += ["--max-batch-size", str(args.max_batch_size)]
        command += ["--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(args.max_queue)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        server = subprocess.Popen(command, env=env)
        try:
            deadline = time.perf_counter() + 120
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError("the server did not start")
                time.sleep(0.2)
            tasks = httpx.get(f"{url}/tasks").json()
            asyncio.run(steady(url, 2, 8, 30))  # warm-up
            first = asyncio.run(steady(url, args.clients, args.requests, args.seconds))
            second = asyncio.run(overload(url, args.burst))
            alive = server.poll() is None
            start = time.perf_counter()
            server.send_signal(signal.SIGTERM)
            code = server.wait(60)
            shutdown = {
                "exit_code": code,
                "seconds": time.perf_counter() - start,
                "note": "uvicorn finishes its graceful shutdown, then re-raises SIGTERM: -15",
            }
        finally:
            if server.poll() is None:
                server.kill()
    stats = second["server_stats"]
    result = {
        "benchmark": "load_test",
        "base": tasks["base"]["name_or_path"],
        "tasks": {n: t["task_type"] for n, t in tasks["tasks"].items()},
        "server": {
            "host": "127.0.0.1",
            "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms,
            "max_queue": args.max_queue,
        },
        "steady": first,
        "overload": second,
        "server_up_after_overload": alive and second["health_after"] == 200,
        "mean_texts_per_forward": stats["texts"] / max(stats["batches"], 1),
        "shutdown": shutdown,
        "note": "client and server share this machine's cores (loopback)",
    }
    path = write_result("load_test", result)
    print(
        f"steady, {args.clients} clients: {first['requests_per_second']:.1f} req/s, "
        f"{first['texts_per_second']:.1f} texts/s, p50 {first['latency_p50_ms']:.0f} ms, "
        f"p99 {first['latency_p99_ms']:.0f} ms, statuses {first['statuses']}"
    )
    print(
        f"overload, burst of {args.burst} (queue {args.max_queue}): {second['statuses']}; "
        f"server up after: {result['server_up_after_overload']}"
    )
    print(f"mean texts per forward: {result['mean_texts_per_forward']:.1f}; shutdown {shutdown}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
