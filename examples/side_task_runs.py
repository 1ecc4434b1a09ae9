"""The two side tasks the SmolLM2 examples attach: ordinary adalayers runs on samples of the
real datasets (``ADALAYERS_DATA_DIR``), trained once on first use (about 5 minutes on 2 CPU
cores) and reused after that::

    adalayers train --config configs/smollm2-imdb.yaml --output-dir runs/smollm2-imdb-small \\
        --set data.sample=400 --set data.max_length=128 --set train.epochs=3 \\
        --set train.cache=true
    adalayers train --config configs/smollm2-conll2003.yaml --output-dir runs/smollm2-conll-small \\
        --set data.sample=600 --set train.epochs=4 --set train.cache=true --set cache.layers=8
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUNS = {
    "sentiment": (
        "runs/smollm2-imdb-small",
        "configs/smollm2-imdb.yaml",
        ["data.sample=400", "data.max_length=128", "train.epochs=3", "train.cache=true"],
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
    """Task name -> run folder, training the runs that are not there yet."""
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


def show(prompt: str, tasks: dict, answer: str) -> None:
    """Print one prompt with its side labels and the model's answer."""
    sentiment, ner = tasks["sentiment"], tasks["ner"]
    entities = ", ".join(f"{text}:{kind}" for text, kind in spans(ner)) or "-"
    print(f"\nPROMPT    {prompt}")
    print(f"SENTIMENT {sentiment['label']} ({sentiment['score']:.2f})")
    print(f"ENTITIES  {entities}")
    print(f"ANSWER    {answer.strip()[:200]}")
