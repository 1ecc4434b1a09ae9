"""Load test of ``adalayers serve`` on loopback with locust (headless): throughput, latency,
overload and the drain on SIGTERM.

Starts the server in a subprocess on 127.0.0.1 (the embedded MiniLM with ``--tasks`` saved
tasks: sequence tasks and one token task), then runs three phases, each a headless locust run
in its own process (locust patches the standard library with gevent):

1. steady: ``--users`` clients send requests of 1-4 short texts, each as soon as its previous
   one is answered, for ``--seconds`` (or until ``--requests`` are answered). Every answer must
   be 200.
2. overload: ``--burst`` clients against a queue of ``--max-queue`` for ``--overload-seconds``.
   The server must answer each with 200 or a deliberate 503 (nothing else), and stay up.
3. drain: ``--drain-users`` clients send long token-task requests; after ``--drain-after`` s
   the server gets SIGTERM. It must answer what it accepted with 200 (finished) or 503 (queue
   full, or not finished within ``--drain-seconds``), never 500, and exit.

Each phase reports requests per second, p50 / p99 latency and the answers by status (a 503 by
its reason); the server's resident memory (RSS, and its peak) is read before and after.

    python benchmarks/load_test.py [--users 16 --seconds 60 --burst 256 --overload-seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the film was great and the actors were wonderful but the plot felt slow in the middle "
    "john met mary in london before they flew to paris for a meeting with acme corp"
).split()


# -- one locust phase (its own process) ---------------------------------------------------------
def run_phase(spec: dict) -> dict:
    """Run one headless locust phase against ``spec["url"]``; the answers and latencies.

    ``spec``: ``users``, ``seconds``, ``texts`` (min, max per request), ``words`` (min, max per
    text), ``tasks`` (or None: all), ``requests`` (stop after this many answers, or None),
    ``stop_on_error`` (a user stops at its first connection error: the server is gone).
    """
    import gevent
    from locust import FastHttpUser, constant, task
    from locust.env import Environment
    from locust.exception import StopUser

    answers: dict[str, list[float]] = {}

    class Client(FastHttpUser):
        host = spec["url"]
        wait_time = constant(0)
        network_timeout = 600.0
        connection_timeout = 60.0

        def on_start(self) -> None:
            import random

            self.rng = random.Random(id(self))

        def text(self) -> str:
            return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(*spec["words"])))

        @task
        def predict(self) -> None:
            body = {"texts": [self.text() for _ in range(self.rng.randint(*spec["texts"]))]}
            if spec.get("tasks"):
                body["tasks"] = spec["tasks"]
            with self.client.post("/predict", json=body, catch_response=True) as r:
                if r.status_code in (200, 503):
                    r.success()  # a 503 is a deliberate answer; the phase checks the counts
                else:
                    r.failure(f"status {r.status_code}")
            if r.status_code == 0 and spec.get("stop_on_error"):
                raise StopUser()

    env = Environment(user_classes=[Client])

    def on_request(response_time: float, response=None, exception=None, **_: object) -> None:
        status = getattr(response, "status_code", 0) or 0
        if status == 503:
            text = response.text or ""
            key = "503 queue full" if "queue full" in text else "503 shutting down"
        elif status:
            key = str(status)
        else:  # no answer: the connection failed (FastHttpUser keeps the error on the response)
            error = getattr(response, "error", None) or exception
            key = type(error).__name__ if error else "no answer"
        answers.setdefault(key, []).append(response_time)
        if spec.get("requests") and sum(map(len, answers.values())) == spec["requests"]:
            gevent.spawn(runner.quit)  # not from this request's own greenlet

    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    start = time.perf_counter()
    runner.start(spec["users"], spawn_rate=spec["users"])
    gevent.spawn_later(spec["seconds"], runner.quit)
    runner.greenlet.join()
    wall = time.perf_counter() - start
    total = env.stats.total
    return {
        "users": spec["users"],
        "wall_seconds": wall,
        "answers": {k: len(v) for k, v in sorted(answers.items())},
        "requests_per_second": sum(map(len, answers.values())) / wall,
        "ok_per_second": len(answers.get("200", [])) / wall,
        "latency_ms": {k: _percentiles(v) for k, v in sorted(answers.items())},
        "locust": {
            "num_requests": total.num_requests,
            "num_failures": total.num_failures,
            "p50_ms": total.get_response_time_percentile(0.5),
            "p99_ms": total.get_response_time_percentile(0.99),
        },
    }


def _percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p99": at(0.99), "max": ordered[-1]}


def phase_process(spec: dict) -> subprocess.Popen:
    """Start ``run_phase(spec)`` in a fresh process (its JSON answer comes on stdout)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", json.dumps(spec)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def phase_result(process: subprocess.Popen, timeout: float) -> dict:
    out, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"the locust phase failed (exit {process.returncode})")
    return json.loads(out.strip().splitlines()[-1])


# -- the server ---------------------------------------------------------------------------------
def make_tasks(folder: Path, n: int, base: str) -> list[str]:
    import torch

    from adalayers.core.backbone import load_backbone
    from adalayers.core.task import Task, TaskConfig

    torch.manual_seed(0)
    backbone = load_backbone(base)
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


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now and its peak so far (Linux ``/proc``)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mib": fields.get("VmRSS"), "peak_rss_mib": fields.get("VmHWM")}


def get_json(url: str) -> dict:
    from urllib.request import urlopen

    with urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_until_up(url: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.perf_counter() + timeout
    while True:
        try:
            get_json(f"{url}/health")
            return
        except OSError:
            pass
        if server.poll() is not None or time.perf_counter() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


def wait_for_queue(url: str, done: object, timeout: float = 300.0) -> float:
    """Poll ``/health`` until ``done(queue length)``; the seconds it took."""
    start = time.perf_counter()
    while not done(get_json(f"{url}/health")["queue"]):
        if time.perf_counter() - start > timeout:
            raise RuntimeError("the server's queue did not reach the expected length")
        time.sleep(0.05)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one locust phase
    parser.add_argument("--base", default="all-MiniLM-L6-v2", help="the base model")
    parser.add_argument("--tasks", type=int, default=4, help="saved tasks (the last a token task)")
    parser.add_argument("--users", type=int, default=16, help="steady: concurrent clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="steady: duration")
    parser.add_argument("--requests", type=int, default=None, help="steady: stop after these")
    parser.add_argument("--burst", type=int, default=256, help="overload: concurrent clients")
    parser.add_argument("--overload-seconds", type=float, default=20.0)
    parser.add_argument("--drain-users", type=int, default=32, help="drain: concurrent clients")
    parser.add_argument("--drain-words", type=int, default=300, help="drain: words per text")
    parser.add_argument("--drain-after", type=float, default=5.0, help="drain: SIGTERM after")
    parser.add_argument("--drain-seconds", type=float, default=5.0, help="the server's drain")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-queue", type=int, default=32)
    args = parser.parse_args(argv)
    if args.phase:
        result = run_phase(json.loads(args.phase))
        print(json.dumps(result))
        return result
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import write_result

    load_average = {"start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        runs = make_tasks(Path(tmp), args.tasks, args.base)
        token_task = runs[-1].split("=")[0]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "adalayers.cli", "serve", *runs, "--host", "127.0.0.1"]
        command += ["--port", str(port), "--log-level", "warning", "--quiet"]
        command += ["--max-batch-size", str(args.max_batch_size)]
        command += ["--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(args.max_queue)]
        command += ["--drain-seconds", str(args.drain_seconds)]
        if args.base != "all-MiniLM-L6-v2":
            command += ["--base", args.base]
        server = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        memory = {}
        try:
            wait_until_up(url, server)
            tasks = get_json(f"{url}/tasks")
            short = {"url": url, "texts": [1, 4], "words": [6, 30]}
            warm = {**short, "users": 2, "seconds": 3}
            phase_result(phase_process(warm), 120)
            memory["before"] = memory_mib(server.pid)
            steady = {**short, "users": args.users, "seconds": args.seconds}
            steady["requests"] = args.requests
            first = phase_result(phase_process(steady), args.seconds + 120)
            memory["after_steady"] = memory_mib(server.pid)
            overload = {**short, "users": args.burst, "seconds": args.overload_seconds}
            second = phase_result(phase_process(overload), args.overload_seconds + 120)
            health = get_json(f"{url}/health")
            # requests of clients that left when the phase ended are still computed
            second["backlog_seconds"] = wait_for_queue(url, lambda n: n == 0)
            memory["after_overload"] = memory_mib(server.pid)
            words = [args.drain_words, args.drain_words]
            drain = {"url": url, "users": args.drain_users, "texts": [4, 4], "words": words}
            drain.update(tasks=[token_task], stop_on_error=True)
            drain["seconds"] = args.drain_after + args.drain_seconds + 30
            load = phase_process(drain)
            wait_for_queue(url, lambda n: n > 0, timeout=120)  # the load has arrived
            time.sleep(args.drain_after)
            memory["at_sigterm"] = memory_mib(server.pid)
            start = time.perf_counter()
            server.send_signal(signal.SIGTERM)
            code = server.wait(args.drain_seconds + 60)
            exit_seconds = time.perf_counter() - start
            third = phase_result(load, drain["seconds"] + 120)
        finally:
            if server.poll() is None:
                server.kill()
    load_average["end"] = os.getloadavg()[0]
    refused = {k: v for k, v in third["answers"].items() if not k[0].isdigit()}
    drained = {k: v for k, v in third["answers"].items() if k[0].isdigit()}
    result = {
        "benchmark": "load_test",
        "client": "locust (headless, FastHttpUser), one process per phase",
        "base": tasks["base"]["name_or_path"],
        "tasks": {n: t["task_type"] for n, t in tasks["tasks"].items()},
        "server": {
            "host": "127.0.0.1",
            "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms,
            "max_queue": args.max_queue,
            "drain_seconds": args.drain_seconds,
        },
        "steady": {**first, "only_200": set(first["answers"]) == {"200"}},
        "overload": {
            **second,
            "only_200_or_503": all(k == "200" or k.startswith("503") for k in second["answers"]),
            "health_after": health["status"],
            "server_stats": health["stats"],
        },
        "drain": {
            **third,
            "texts_per_request": 4,
            "words_per_text": args.drain_words,
            "sigterm_after_seconds": args.drain_after,
            "exit_code": code,
            "exit_seconds": exit_seconds,
            "answered_while_draining": drained,
            "no_5xx_but_503": not any(k.startswith("5") and k[:3] != "503" for k in drained),
            "connection_errors_after_exit": refused,
            "note": "uvicorn finishes its graceful shutdown, then re-raises SIGTERM: -15",
        },
        "server_memory_mib": memory,
        "mean_texts_per_forward": health["stats"]["texts"] / max(health["stats"]["batches"], 1),
        "load_average_1min": load_average,
        "note": "client and server share this machine's cores (loopback)",
    }
    path = write_result("load_test", result)
    for name in ("steady", "overload", "drain"):
        phase = result[name]
        ok = phase["latency_ms"].get("200", {})
        print(
            f"{name}: {phase['users']} users, {phase['requests_per_second']:.1f} req/s, "
            f"200 p50 {ok.get('p50', 0):.0f} ms p99 {ok.get('p99', 0):.0f} ms, {phase['answers']}"
        )
    print(f"drain: exit {code} after {exit_seconds:.1f} s; server memory {memory}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
