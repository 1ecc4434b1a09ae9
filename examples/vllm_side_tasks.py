"""SmolLM2-135M generates in vLLM while two side tasks label every prompt from its prefill.

The tasks are ordinary adalayers runs on the same base: a sentiment task (IMDB) and an NER
task (CoNLL-2003). If their run folders are missing, this script trains small ones first, on
samples of the real datasets (``ADALAYERS_DATA_DIR``; about 5 minutes on 2 CPU cores)::

    adalayers train --config configs/smollm2-imdb.yaml --output-dir runs/smollm2-imdb-small \\
        --set data.sample=400 --set data.max_length=128 --set train.epochs=3 \\
        --set train.cache=true
    adalayers train --config configs/smollm2-conll2003.yaml --output-dir runs/smollm2-conll-small \\
        --set data.sample=600 --set train.epochs=4 --set train.cache=true --set cache.layers=8

Then vLLM (CPU build: ``make install-vllm``) loads SmolLM2, the tasks are attached inside its
worker, and ``generate`` returns each completion with its prompt's labels::

    .venv-vllm/bin/python examples/vllm_side_tasks.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

RUNS = {
    "sentiment": (
        "runs/smollm2-imdb-small",
        "configs/smollm2-imdb.yaml",
        [
            "data.sample=400",
            "data.max_length=128",
            "train.epochs=3",
            "train.cache=true",
        ],
    ),
    "ner": (
        "runs/smollm2-conll-small",
        "configs/smollm2-conll2003.yaml",
        ["data.sample=600", "train.epochs=4", "train.cache=true", "cache.layers=8"],
    ),
}
PROMPTS = [
    "The film was a delight from start to finish, and Meryl Streep was wonderful.",
    "John Smith flew from London to Berlin to meet the Siemens board.",
    "The hotel in Paris was dirty, the staff were rude and the food was awful.",
    "Write one sentence about the weather in Tokyo.",
]


def train_missing() -> dict[str, str]:
    folders = {}
    for name, (run, config, overrides) in RUNS.items():
        if not (Path(run) / "model" / "config.json").is_file():
            command = [sys.executable, "-m", "adalayers.cli", "train", "--config", config]
            command += ["--output-dir", run]
            for item in overrides:
                command += ["--set", item]
            print(f"training {name}: {' '.join(command[2:])}", flush=True)
            subprocess.run(command, check=True)
        folders[name] = run
    return folders


def spans(ner: dict) -> list[tuple[str, str]]:
    """Entity spans from the per-token labels: words are runs of byte-level BPE tokens (a new
    word starts with 'Ġ'), labelled by their first token as the task was trained; a B- tag
    starts a span and I- tags of the same type continue it."""
    words: list[list[str]] = []
    for token, label in zip(ner["tokens"], ner["labels"]):
        if token.startswith("Ġ") or not words:
            words.append([token.lstrip("Ġ"), label])
        else:
            words[-1][0] += token
    found: list[list[str]] = []
    for word, label in words:
        if label.startswith("I-") and found and found[-1][1] == label[2:]:
            found[-1][0] += " " + word
        elif label != "O":
            found.append([word, label[2:]])
    return [(text, kind) for text, kind in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    folders = train_missing()

    from vllm import LLM, SamplingParams

    from adalayers.core.models import smollm2_path
    from adalayers.serving.integrations.vllm import SideTasks, engine_args

    start = time.perf_counter()
    llm = LLM(str(smollm2_path()), **engine_args(dtype="bfloat16", max_model_len=512))
    side = SideTasks(llm, [f"{name}={run}" for name, run in folders.items()])
    print(f"engine and tasks ready in {time.perf_counter() - start:.0f} s", flush=True)

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    for output in side.generate(PROMPTS, params):
        tasks = output.side_tasks
        sentiment = tasks["sentiment"]
        ner = tasks["ner"]
        entities = ", ".join(f"{text}:{kind}" for text, kind in spans(ner)) or "-"
        print(f"\nPROMPT    {output.prompt}")
        print(f"SENTIMENT {sentiment['label']} ({sentiment['score']:.2f})")
        print(f"ENTITIES  {entities}")
        print(f"ANSWER    {output.outputs[0].text.strip()[:200]}")


if __name__ == "__main__":  # vLLM's engine core spawns processes
    main()
