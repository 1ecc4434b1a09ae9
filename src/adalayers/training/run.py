"""The run folder: its layout, and reading and writing its files.

A run folder holds::

    config.yaml        the configuration that ran (with what the run resolved: the layers the
                       cache probe chose, the cache folder)
    model/             the best-on-validation task (config.json, labels.json, model.safetensors)
    checkpoint/        the latest resumable state (task, optimiser, scheduler, RNG, counters)
                       as safetensors plus JSON: resuming never unpickles (:mod:`.checkpoint`)
    history.jsonl      one line per epoch: loss, metrics, learning rate, layer distribution
    metrics.json       final validation and test metrics, parameters added, timings, and
                       a few examples of each split with their inputs
                       (:func:`~adalayers.training.evaluate.sample_records`)
    predictions_validation.jsonl, predictions_test.jsonl
                       the best task's prediction for every example of the split, in its
                       order (:func:`~adalayers.training.evaluate.prediction_records`)
    layer_weights.png  the learned layer distribution
    trackers/          what the experiment trackers of ``train.report_to`` write
                       (:mod:`.tracking`)

Files are replaced through a temporary file beside them, so a crash leaves the old file or the
new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adalayers.core.backbone import Backbone, load_backbone
from adalayers.core.task import Task
from adalayers.training.config import RunConfig, load_config, save_config

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoint"
HISTORY = "history.jsonl"
METRICS = "metrics.json"
LAYER_WEIGHTS = "layer_weights.png"


def open_run(
    run: Path,
    config: RunConfig,
    accelerator: Any,
    *,
    resume: bool = False,
    overwrite: bool = False,
    taken: str = "pass --resume to continue it, --overwrite to replace it, or choose another "
    "--output-dir",
) -> None:
    """Make ``run`` ready for a run: created (emptied with ``overwrite``), ``config`` saved
    unless resuming. Every process waits for the main one.

    Args:
        taken: what to do when ``run`` already holds a run (the end of the error message).

    Raises:
        FileNotFoundError: ``resume`` and ``run`` holds no config.
        FileExistsError: ``run`` holds a run and neither ``resume`` nor ``overwrite``.
    """
    main = accelerator.is_main_process
    if resume:
        if not (run / CONFIG).is_file():
            raise FileNotFoundError(f"{run / CONFIG} not found: nothing to resume in {run}")
    elif run.exists() and any(run.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{run} already holds a run; {taken}")
        if main:
            shutil.rmtree(run)
    accelerator.wait_for_everyone()
    if main:
        run.mkdir(parents=True, exist_ok=True)
        if not resume:
            save_config(config, run / CONFIG)


def load_run(
    run_dir: str | os.PathLike, *, device: str | None = None
) -> tuple[RunConfig, Backbone, Task]:
    """The config, the frozen base and the best task of a finished run."""
    run = Path(run_dir)
    if not (run / CONFIG).is_file():
        raise FileNotFoundError(f"{run / CONFIG} not found: {run} is not an adalayers run folder")
    config = load_config(run / CONFIG)
    backbone = load_backbone(
        config.base,
        states=config.base_states,
        gguf_file=config.gguf_file,
        dtype=config.dtype,
        device=device,
    )
    task = Task.from_pretrained(run / MODEL_DIR, backbone)
    return config, backbone, task


def read_metrics(run_dir: str | os.PathLike) -> Mapping[str, Any]:
    """A finished run's ``metrics.json``."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has not finished")
    return json.loads(path.read_text())


def push_run(run_dir: str | os.PathLike, repo_id: str, **kwargs: Any) -> Any:
    """Push a run's best task to the Hugging Face Hub repository ``repo_id`` (``org/name``):
    ``RUN/model/`` with a model card holding the scores of ``RUN/metrics.json`` and the figure
    ``RUN/layer_weights.png`` (:func:`adalayers.core.hub.push_to_hub`). A saved task folder is
    pushed alone.

    Args:
        run_dir: a run folder, or a saved task folder.
        repo_id: ``org/name``.
        **kwargs: ``private``, ``token``, ``revision``, ``commit_message``, ``create_pr``.

    Returns:
        The commit (``huggingface_hub.CommitInfo``).
    """
    from adalayers.core.hub import push_to_hub

    run = Path(run_dir)
    folder = run / MODEL_DIR if (run / MODEL_DIR).is_dir() else run
    metrics = None
    if (run / METRICS).is_file():
        metrics = read_metrics(run)
    elif folder != run:
        logger.warning("%s has no %s (unfinished?): the card will show no scores", run, METRICS)
    figure = run / LAYER_WEIGHTS
    return push_to_hub(
        folder, repo_id, metrics=metrics, figure=figure if figure.is_file() else None, **kwargs
    )


def write_results(
    run: Path,
    results: Mapping[str, Any],
    predictions: Mapping[str, Sequence[Mapping[str, Any]]],
) -> None:
    """Write the predictions files, then ``metrics.json``, which marks the end of a run."""
    save_predictions(run, predictions)
    write_json(run / METRICS, results)


# -- predictions -----------------------------------------------------------------------------
def predictions_file(split: str) -> str:
    """The name of a run folder's predictions file for ``split``."""
    return f"predictions_{split}.jsonl"


def write_predictions(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``records`` as JSON lines to ``path`` (through a temporary file: a crash leaves
    the old file or none, never half of one)."""
    path = Path(path)
    write_text(path, "".join(json.dumps(record) + "\n" for record in records))
    return path


def save_predictions(run: Path, by_split: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Write each split's records to the run folder's :func:`predictions_file`."""
    for split, records in by_split.items():
        write_predictions(run / predictions_file(split), records)


# -- history ---------------------------------------------------------------------------------
def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path`` and flush it to the disk."""
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def truncate_history(path: Path, epochs: int) -> None:
    """Keep the first ``epochs`` records of ``history.jsonl``: a run that stopped after
    writing an epoch's record but before its checkpoint trains that epoch again on resume."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().split("\n") if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epochs]
    if len(kept) != len(lines):
        logger.info("history: dropping %d record(s) after epoch %d", len(lines) - len(kept), epochs)
        write_text(path, "".join(line + "\n" for line in kept))


# -- files -----------------------------------------------------------------------------------
def write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` through a temporary file beside it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, payload: Any) -> None:
    """Replace ``path`` with ``payload`` as indented JSON (:func:`write_text`)."""
    write_text(path, json.dumps(payload, indent=2) + "\n")
