"""Evaluation: metrics of a task on a tokenised split, every example counted once across
processes, and the prediction records of a run folder.

:func:`evaluate_split` scores one split, :func:`evaluate_splits` the final validation and test
scores of a run, :func:`evaluate_run` a finished run's best task on any split of its data.
:func:`selection_metric` names the validation metric that picks the best epoch.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from adalayers.core.decoding import decode_words
from adalayers.core.encoding import IGNORE_INDEX
from adalayers.core.kinds import TaskKind
from adalayers.core.metrics import primary_metric
from adalayers.core.task import Task, TaskConfig
from adalayers.training.batches import batch_loader, ensure_states, tokenize
from adalayers.training.build import TaskModel, load_data, make_accelerator, max_tokens
from adalayers.training.cache import FeatureStore
from adalayers.training.config import RunConfig
from adalayers.training.data import BENCHMARKS, TaskData
from adalayers.training.progress import progress_bar
from adalayers.training.run import load_run, write_predictions

NESTED = ("per_type", "confusion_matrix", "majority")
"""Tables among the metrics, kept out of ``history.jsonl`` and comparison rows."""


def _gather(accelerator: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather per-process batches that may differ in size (index -1 marks padding rows)."""
    if accelerator.num_processes == 1:
        return tensors
    padded = [accelerator.pad_across_processes(t, dim=0, pad_index=-1) for t in tensors]
    return tuple(accelerator.gather(t) for t in padded)


def _token_predictions(logits: torch.Tensor, labels: torch.Tensor, task: Any) -> torch.Tensor:
    """(B, T) tag ids at the labelled (first sub-)tokens, ``IGNORE_INDEX`` elsewhere, read
    from the logits (B, T, C) the way ``task.decoding`` says (each word, or each sentence's
    best valid IOB2 sequence)."""
    scored = labels != IGNORE_INDEX  # (B, T)
    if task.decoding == "argmax":
        return logits.argmax(-1).masked_fill(~scored, IGNORE_INDEX)
    pred = torch.full_like(labels, IGNORE_INDEX)
    for row in range(logits.shape[0]):
        tags, _ = decode_words(logits[row][scored[row]], task.labels, task.decoding)
        pred[row, scored[row]] = torch.tensor(tags, dtype=pred.dtype, device=pred.device)
    return pred


@torch.no_grad()
def evaluate_split(
    accelerator: Any,
    model: nn.Module,
    task: Task | TaskConfig,
    data: TaskData,
    ds: Any,
    split: str,
    batch_size: int,
    pad_id: int,
    progress: bool = False,
    store: FeatureStore | None = None,
    predictions: list[dict[str, Any]] | None = None,
    metrics: Sequence[str] | None = None,
    positive_label: str | None = None,
    outputs: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Metrics of ``task`` on one tokenised split; every example is counted exactly once.

    ``task`` is a :class:`Task` run by ``model``, or the :class:`TaskConfig` of the head that
    ``model`` ends in (fine-tuning). Its kind turns logits into decisions and scores them
    (:meth:`~adalayers.core.kinds.TaskKind.predict`, ``compute_metrics``, ``tables``).
    With a feature ``store`` the states come from the cache and the base does not run. A
    ``predictions`` list is filled with one record per example, in the split's order
    (:func:`prediction_records`). ``metrics`` names the metrics to report (``task.metrics``;
    default all of the task type's) and ``positive_label`` the class of ``f1_positive``
    (default the second of two labels). A classification also reports ``majority``: the
    same metrics of always answering the training split's most frequent label. ``outputs``
    (tasks with a prediction per input) receives ``logits`` (N, C) and ``targets`` in the
    split's order.
    """
    model.eval()
    kind = task.kind
    loader = batch_loader(
        accelerator,
        ds,
        batch_size,
        pad_id,
        shuffle=False,
        seed=0,
        store=store,
        task=task if store is not None else None,
        kind=kind,
    )
    token_task = kind.per_token
    decoded = token_task and task.decoding != "argmax"
    indices, preds, golds, argmax = [], [], [], []
    for batch in progress_bar(loader, total=len(loader), desc=f"eval {split}", enabled=progress):
        ensure_states(batch, store, task)
        index = batch.pop("index")
        labels = batch.pop("labels")
        logits = model(**batch)
        if token_task:
            pred = _token_predictions(logits, labels, task)
            if decoded:  # also per word, to report what the decoding changed
                both = torch.stack(
                    [pred, logits.argmax(-1).masked_fill(pred == IGNORE_INDEX, IGNORE_INDEX)], 1
                )
                both = accelerator.pad_across_processes(both, dim=2, pad_index=IGNORE_INDEX)
                index, both = _gather(accelerator, index, both)
                preds.extend(both[:, 0].tolist())
                argmax.extend(both[:, 1].tolist())
            else:
                pred = accelerator.pad_across_processes(pred, dim=1, pad_index=IGNORE_INDEX)
                index, pred = _gather(accelerator, index, pred)
                preds.extend(pred.tolist())
        else:
            index, values, labels = _gather(accelerator, index, logits.float(), labels)
            preds.append(values)  # (B, C)
            golds.append(labels)  # (B,) or (B, C)
        indices.extend(index.tolist())
    first: dict[int, int] = {}
    for position, i in enumerate(indices):  # padding and duplicates of the last batch dropped
        if i >= 0:
            first.setdefault(i, position)
    if len(first) != len(ds):
        raise RuntimeError(f"evaluation saw {len(first)} of {len(ds)} examples")
    order = [first[i] for i in range(len(ds))]
    raw = data.splits[split]
    if token_task:
        gold_column = raw["tags"][:]
        true_tags = [list(gold_column[i]) for i in range(len(order))]

        def tags(rows: list[list[int]]) -> list[list[str]]:
            out = []
            for gold, position in zip(true_tags, order):
                words = [task.labels[p] for p in rows[position] if p != IGNORE_INDEX]
                out.append(words + ["O"] * (len(gold) - len(words)))
            return out

        pred_tags = tags(preds)
        scores = kind.compute_metrics(true_tags, pred_tags, names=metrics)
        if predictions is not None:
            predictions.extend(prediction_records(kind, true_tags, pred_tags))
        if decoded:
            per_word = kind.compute_metrics(true_tags, tags(argmax))
            scores["argmax"] = {k: per_word[k] for k in ("precision", "recall", "f1")}
    else:
        logits = torch.cat(preds)[order].cpu()  # (N, C), the split's order
        targets = torch.cat(golds)[order].cpu()  # (N,) or (N, C)
        if outputs is not None:
            outputs.update(logits=logits, targets=targets)
        y_true, y_pred = targets.tolist(), kind.predict(task, logits).tolist()
        positive = kind.positive_id(task.labels, positive_label)
        scores = kind.compute_metrics(y_true, y_pred, names=metrics, positive=positive)
        scores.update(
            kind.tables(
                task,
                y_true,
                y_pred,
                names=metrics,
                positive=positive,
                train_labels=data.splits["train"]["label"],
            )
        )
        if predictions is not None:
            named = kind.named(task, y_true), kind.named(task, y_pred)
            predictions.extend(prediction_records(kind, *named))
    scores["examples"] = len(ds)
    return scores


def calibrated_options(
    accelerator: Any,
    model: nn.Module,
    task: Task | TaskConfig,
    data: TaskData,
    ds: Any,
    batch_size: int,
    pad_id: int,
    progress: bool = False,
    store: FeatureStore | None = None,
) -> dict[str, Any] | None:
    """The options a kind learns on the validation split ``ds`` at the end of training (a
    multi-label task's thresholds, :meth:`~adalayers.core.kinds.TaskKind.calibrate`), or
    ``None`` for a kind that learns none."""
    if not task.kind.calibrates:
        return None
    seen: dict[str, torch.Tensor] = {}
    evaluate_split(
        accelerator,
        model,
        task,
        data,
        ds,
        "validation",
        batch_size,
        pad_id,
        progress,
        store=store,
        outputs=seen,
    )
    return task.kind.calibrate(task, seen["logits"], seen["targets"])


def selection_metric(config: RunConfig, data: TaskData) -> str:
    """The validation metric that picks the best epoch: ``train.metric``, else the first of
    ``task.metrics``, else the task's primary metric
    (:func:`~adalayers.core.metrics.primary_metric`).

    Raises:
        ValueError: a metric the task does not report, or a bad ``task.positive_label``,
            before any training.
    """
    kind = data.kind
    names = kind.check_metrics(config.task.metrics, data.label_names)
    kind.positive_id(data.label_names, config.task.positive_label)
    benchmark = config.data.task if config.data.task in BENCHMARKS else data.task_type
    metric = config.train.metric or (names[0] if config.task.metrics else primary_metric(benchmark))
    if metric not in names:
        raise ValueError(
            f"train.metric={metric!r} is not a metric of this task; choose from {list(names)}"
        )
    return metric


def prediction_records(
    kind: TaskKind, gold: Sequence[Any], predicted: Sequence[Any]
) -> list[dict[str, Any]]:
    """One JSON-ready record per example, ``index`` its position in the evaluated split (after
    ``data.sample`` / ``data.limit``): ``label`` and ``prediction`` (label names; numbers for
    regression; lists of names for multi-label), or for token tasks ``tags`` and
    ``predicted_tags`` (one per word)."""
    if kind.per_token:
        keys = ("tags", "predicted_tags")
    else:
        keys = ("label", "prediction")
    return [{"index": i, keys[0]: g, keys[1]: p} for i, (g, p) in enumerate(zip(gold, predicted))]


SAMPLES = 8
"""Examples of each split kept in ``metrics.json`` (``samples``), for the report."""
_SAMPLE_CHARS = 300


def sample_records(
    data: TaskData, split: str, records: Sequence[Mapping[str, Any]], size: int = SAMPLES
) -> list[dict[str, Any]]:
    """A few of ``records`` (:func:`prediction_records` of ``split``) with their inputs, for the
    report: the first wrong predictions, then the first right ones, ``size`` in all, in split
    order. Each gets ``text`` (and ``text_pair`` for sentence pairs; texts cut at 300
    characters) or, for token tasks, ``tokens``."""
    keys = ("tags", "predicted_tags") if "tags" in (records[0] if records else {}) else None
    keys = keys or ("label", "prediction")
    wrong = [r for r in records if r[keys[0]] != r[keys[1]]]
    right = [r for r in records if r[keys[0]] == r[keys[1]]]
    chosen = sorted(wrong[:size] + right[: max(0, size - len(wrong))], key=lambda r: r["index"])
    rows = data.splits[split]
    out = []
    for record in chosen:
        example = rows[record["index"]]
        inputs = {}
        for column in ("text", "text_pair", "tokens"):
            if column in example:
                value = example[column]
                if isinstance(value, str) and len(value) > _SAMPLE_CHARS:
                    value = value[:_SAMPLE_CHARS] + "..."
                inputs[column] = value
        out.append({**inputs, **record})
    return out


def evaluate_splits(
    accelerator: Any,
    model: nn.Module,
    task: Task,
    data: TaskData,
    tokenized: dict[str, Any],
    tokenizer: Any,
    max_length: int,
    batch_size: int,
    pad_id: int,
    progress: bool = False,
    stores: dict[str, FeatureStore] | None = None,
    predictions: dict[str, list[dict[str, Any]]] | None = None,
    metrics: Sequence[str] | None = None,
    positive_label: str | None = None,
    stats: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_split` on each evaluation split the data has (validation, test), the
    final scores of a run. A split already in ``tokenized`` is not tokenised again; one in
    ``stores`` is read from the feature cache. A ``predictions`` dict receives each split's
    records under the split's name; ``metrics`` and ``positive_label`` go to
    :func:`evaluate_split`; ``stats`` receives the :func:`tokenize` statistics of a split
    tokenised here."""
    results: dict[str, dict[str, Any]] = {}
    for split in ("validation", "test"):
        if split not in data.splits or len(data.splits[split]) == 0:
            continue
        found = None if stats is None else stats.setdefault(split, {})
        ds = tokenized.get(split) or tokenize(data, split, tokenizer, task, max_length, found)
        records = None if predictions is None else predictions.setdefault(split, [])
        results[split] = evaluate_split(
            accelerator,
            model,
            task,
            data,
            ds,
            split,
            batch_size,
            pad_id,
            progress,
            store=(stores or {}).get(split),
            predictions=records,
            metrics=metrics,
            positive_label=positive_label,
        )
    return results


def evaluate_run(
    run_dir: str | os.PathLike,
    split: str = "test",
    *,
    data_dir: str | None = None,
    decoding: str | None = None,
    quiet: bool = False,
    predictions: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate a finished run's best task on one split of its data.

    Args:
        decoding: token tasks: ``argmax`` or ``bio`` instead of the saved ``head.decoding``
            (the same trained weights, read another way).
        predictions: also write every example's prediction here as JSON lines
            (:func:`prediction_records`).
    """
    config, backbone, task = load_run(run_dir)
    if data_dir is not None:
        config.data.data_dir = data_dir
    if decoding is not None:
        head = dataclasses.replace(task.config.head, decoding=decoding)
        task.config = dataclasses.replace(task.config, head=head)  # checks it
    data = load_data(config)
    if split not in data.splits or len(data.splits[split]) == 0:
        raise ValueError(
            f"split {split!r} is empty or unknown for {data.name}; "
            f"choose from {sorted(data.splits)}"
        )
    accelerator = make_accelerator(config)
    ds = tokenize(data, split, backbone.tokenizer, task, max_tokens(config, backbone))
    model = accelerator.prepare(TaskModel(backbone, task))
    progress = not quiet and sys.stderr.isatty()
    records: list[dict[str, Any]] | None = None if predictions is None else []
    metrics = evaluate_split(
        accelerator,
        model,
        task,
        data,
        ds,
        split,
        config.train.eval_batch_size,
        backbone.tokenizer.pad_token_id,
        progress,
        predictions=records,
        metrics=config.task.metrics,
        positive_label=config.task.positive_label,
    )
    if records is not None and accelerator.is_main_process:
        write_predictions(predictions, records)
    return metrics
