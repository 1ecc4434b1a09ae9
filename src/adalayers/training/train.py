"""Training and evaluation: plain functions over a run folder, on Hugging Face Accelerate.

A run folder holds::

    config.yaml        the resolved configuration
    model/             the best-on-validation task (config.json, labels.json, model.safetensors)
    checkpoint/        the latest resumable state (task, optimiser, scheduler, RNG, counters)
                       as safetensors plus JSON: resuming never unpickles (:mod:`.checkpoint`)
    history.jsonl      one line per epoch: loss, metrics, learning rate, layer distribution
    metrics.json       final validation and test metrics, parameters added, timings, and
                       a few examples of each split with their inputs (:func:`sample_records`)
    predictions_validation.jsonl, predictions_test.jsonl
                       the best task's prediction for every example of the split, in its
                       order (:func:`prediction_records`)
    layer_weights.png  the learned layer distribution

``accelerate launch`` / ``torchrun`` run :func:`fit` data-parallel; every process holds the frozen
base and the task, gradients of the task are all-reduced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from adalayers.core.backbone import Backbone, load_backbone
from adalayers.core.decoding import decode_words, resolve_decoding
from adalayers.core.encoding import IGNORE_INDEX, align_labels, tokenize_words
from adalayers.core.metrics import check_metrics, compute_metrics, confusion_matrix, primary_metric
from adalayers.core.task import AdaLayers, Task, TaskConfig
from adalayers.training.cache import FeatureStore, open_or_build, probe_layers
from adalayers.training.checkpoint import (
    CheckpointError,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)
from adalayers.training.config import RunConfig, load_config, save_config
from adalayers.training.data import BENCHMARKS, TaskData, load_task_data
from adalayers.training.progress import ProgressLog

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoint"
HISTORY = "history.jsonl"
METRICS = "metrics.json"
CONFIG = "config.yaml"


_NESTED = ("per_type", "confusion_matrix", "majority")  # tables kept out of history.jsonl


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after writing a checkpoint; ``--resume`` continues it."""


# -- data ------------------------------------------------------------------------------------
def tokenize(
    data: TaskData,
    split: str,
    tokenizer: Any,
    task: Task,
    max_length: int,
    stats: dict[str, Any] | None = None,
) -> Any:
    """Tokenise one split: ``input_ids``, ``attention_mask``, ``labels``, ``index``, ``length``.

    Token tasks: the first sub-token of a word carries its label, the others are ignored. A
    word beyond ``max_length`` is cut, and a word the tokenizer turns into no token at all
    (a variation selector ``U+FE0F``, a stray byte-order mark) has no token to carry its
    label: both are scored as ``O`` in evaluation, and a warning tells them apart (raising
    ``data.max_length`` keeps only the first). Examples longer than ``max_length`` are cut
    with a warning; the longest example's length in tokens is logged.

    Args:
        stats: filled with ``longest`` (tokens of the longest example, before cutting),
            ``cut_examples``, and for token tasks ``cut_words`` and ``empty_words``.
    """
    ds = data.splits[split]
    ds = ds.add_column("index", list(range(len(ds))))
    found = {"longest": 0, "cut_examples": 0, "cut_words": 0, "empty_words": 0}
    empty_examples: list[str] = []

    def encode(batch: dict[str, list]) -> dict[str, list]:
        if task.task_type == "token_classification":
            enc, rows, _ = tokenize_words(
                tokenizer, batch["tokens"], truncation=True, max_length=max_length
            )
            full = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) >= max_length]
            uncut: dict[int, tuple[int, set[int]]] = {}  # full row -> (tokens, words seen)
            if full:
                again, again_rows, _ = tokenize_words(tokenizer, [batch["tokens"][i] for i in full])
                for i, ids, word_ids in zip(full, again["input_ids"], again_rows):
                    uncut[i] = (len(ids), {w for w in word_ids if w is not None})
            labels = []
            for i, (word_ids, words, tags) in enumerate(zip(rows, batch["tokens"], batch["tags"])):
                seen = {w for w in word_ids if w is not None}
                missing = set(range(len(tags))) - seen
                tokens, seen_uncut = uncut.get(i, (len(enc["input_ids"][i]), seen))
                cut = missing & seen_uncut
                found["cut_words"] += len(cut)
                found["cut_examples"] += bool(cut)
                found["empty_words"] += len(missing - cut)
                found["longest"] = max(found["longest"], tokens)
                if len(empty_examples) < 20:
                    empty_examples.extend(words[w] for w in sorted(missing - cut))
                labels.append(align_labels(word_ids, task.label_ids(tags)))
        else:
            pairs = batch.get("text_pair")
            enc = tokenizer(batch["text"], pairs, truncation=True, max_length=max_length)
            lengths = [len(ids) for ids in enc["input_ids"]]
            full = [i for i, n in enumerate(lengths) if n >= max_length]
            if full:
                again = tokenizer(
                    [batch["text"][i] for i in full],
                    None if pairs is None else [pairs[i] for i in full],
                )
                for i, ids in zip(full, again["input_ids"]):
                    lengths[i] = len(ids)
            found["cut_examples"] += sum(n > max_length for n in lengths)
            found["longest"] = max([found["longest"], *lengths])
            if task.task_type == "regression":
                labels = [float(v) for v in batch["label"]]
            else:
                labels = task.label_ids(batch["label"])
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        out["labels"] = labels
        out["length"] = [len(ids) for ids in enc["input_ids"]]
        return out

    keep = {"index"}
    ds = ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names if c not in keep])
    where = f"{data.name}/{split}"
    logger.info(
        "%s: the longest example has %d tokens (max_length %d)", where, found["longest"], max_length
    )
    if found["cut_words"]:
        logger.warning(
            "%s: %d word(s) of %d sentence(s) beyond max_length=%d were cut; they are scored "
            "as 'O' in evaluation. The longest sentence has %d tokens: raise data.max_length "
            "to keep them.",
            where,
            found["cut_words"],
            found["cut_examples"],
            max_length,
            found["longest"],
        )
    elif found["cut_examples"]:
        logger.warning(
            "%s: %d example(s) longer than max_length=%d tokens were cut (the longest has %d); "
            "raise data.max_length to keep more of them.",
            where,
            found["cut_examples"],
            max_length,
            found["longest"],
        )
    if found["empty_words"]:
        shown = ", ".join(ascii(w) for w in dict.fromkeys(empty_examples).keys())
        logger.warning(
            "%s: %d word(s) become no token at all with this tokenizer (%s); they get no "
            "prediction of their own and are scored as 'O'. Raising data.max_length does not "
            "change this: remove such words from the data if they should not count.",
            where,
            found["empty_words"],
            shown[:200],
        )
    if stats is not None:
        stats.update(found)
    return ds


def collate(
    features: list[dict[str, Any]],
    pad_id: int,
    store: FeatureStore | None = None,
    layers: Callable[[], Sequence[int] | None] | None = None,
) -> dict[str, Any]:
    """Pad a list of tokenised examples into tensors.

    With a feature ``store`` the batch holds the cached hidden states of the real tokens,
    packed without padding, instead of token ids: ``states`` (n, N, d), ``state_layers`` (n,)
    and ``state_rows`` (2, N), each row's example and position (see
    :meth:`~adalayers.core.mixer.LayerMixer.forward_rows`). ``layers`` (called per batch) names the
    states to read, e.g. only those the mixer still gives a weight; default: all stored.
    """
    width = max(f["length"] for f in features)
    batch: dict[str, Any] = {}
    if store is not None:
        wanted = layers() if layers is not None else None
        batch.update(_read_states(store, [f["index"] for f in features], wanted))
        lengths = torch.tensor([f["length"] for f in features])  # (B,)
        batch["attention_mask"] = (torch.arange(width) < lengths[:, None]).long()  # (B, T)
    else:
        for key, pad in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in features[0]:
                batch[key] = torch.tensor(
                    [f[key] + [pad] * (width - len(f[key])) for f in features]
                )
    labels = [f["labels"] for f in features]
    if isinstance(labels[0], list):
        batch["labels"] = torch.tensor(
            [lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels]
        )
    else:
        batch["labels"] = torch.tensor(labels)
    batch["index"] = torch.tensor([f["index"] for f in features])
    return batch


def length_batches(
    lengths: list[int], batch_size: int, *, shuffle: bool, seed: int
) -> list[list[int]]:
    """Batches of similar length (less padding). Shuffled: random order, sorted within pools of
    50 batches, batches shuffled; not shuffled: sorted by length."""
    order = np.argsort(lengths, kind="stable").tolist()
    if shuffle:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(lengths)).tolist()
        pool = batch_size * 50
        order = [
            i
            for s in range(0, len(order), pool)
            for i in sorted(order[s : s + pool], key=lambda i: lengths[i])
        ]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


class CachedExamples(torch.utils.data.Dataset):
    """The columns a cached batch needs (``index``, ``length``, ``labels``), held as lists.

    A batch from the feature cache needs no token ids, and reading these three from the Arrow
    table for every batch costs more than reading the states from the store. Indexing with a
    column name returns the column, like a ``datasets.Dataset``.
    """

    COLUMNS = ("index", "length", "labels")

    def __init__(self, ds: Any) -> None:
        self.columns = ds.select_columns(list(self.COLUMNS)).to_dict()

    def __len__(self) -> int:
        return len(self.columns["index"])

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self.columns[key]
        return {name: values[key] for name, values in self.columns.items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self[i] for i in indices]


# -- the model being trained -----------------------------------------------------------------
class TaskModel(nn.Module):
    """The frozen base and one task behind a single ``forward`` (what DDP wraps)."""

    def __init__(self, backbone: Backbone, task: Task) -> None:
        super().__init__()
        self.runtime = AdaLayers(backbone, {"task": task})

    @property
    def task(self) -> Task:
        return self.runtime.tasks["task"]

    def forward(self, **inputs: Any) -> torch.Tensor:
        """Logits from token ids (runs the base) or from cached ``states`` (does not)."""
        if "states" in inputs:
            task = self.task
            mask = inputs["attention_mask"]  # (B, T)
            states = inputs["states"]  # packed rows (n, N, d), or state index -> (B, T, d)
            if "state_rows" in inputs:
                layers = inputs["state_layers"].tolist()
                features = task.mixer.forward_rows(
                    layers, states, inputs["state_rows"], tuple(mask.shape)
                )
            else:
                features = task.mixer(states)
            return task.head(features, mask)
        return self.runtime(inputs).logits["task"]


def build_task(config: RunConfig, data: TaskData, backbone: Backbone) -> Task:
    """A new task for ``data`` on ``backbone`` (``head.decoding`` as :func:`head_decoding`;
    ``text_pair`` records whether the data are sentence pairs)."""
    head = dataclasses.replace(config.task.head, decoding=head_decoding(config, data))
    token = data.task_type == "token_classification"
    task_config = TaskConfig(
        data.task_type,
        list(data.label_names),
        config.task.mixer,
        head,
        text_pair=not token and "text_pair" in data.splits["train"].column_names,
    )
    return Task(task_config, backbone.info())


def head_decoding(config: RunConfig, data: TaskData) -> str:
    """``task.head.decoding`` for ``data``: ``auto`` is ``bio`` where the tags are IOB2 and the
    training tags follow it (no ``I-X`` opening an entity, as IOB1 has), else ``argmax``."""
    tags = data.splits["train"]["tags"] if data.task_type == "token_classification" else None
    chosen = resolve_decoding(config.task.head.decoding, data.task_type, data.label_names, tags)
    if config.task.head.decoding == "auto" and data.task_type == "token_classification":
        logger.info("task.head.decoding: auto -> %s", chosen)
    return chosen


def _accelerator(config: RunConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    precision = config.train.mixed_precision
    if precision != "no" and not torch.cuda.is_available():
        logger.warning("train.mixed_precision=%s needs CUDA; training in float32", precision)
        precision = "no"
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # a CPU world of N processes under torchrun
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.grad_accumulation,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _loader(
    accelerator: Any,
    ds: Any,
    batch_size: int,
    pad_id: int,
    *,
    shuffle: bool,
    seed: int,
    store: FeatureStore | None = None,
    task: Task | None = None,
) -> Any:
    """Batches of ``ds``; with a ``store`` they read only the states ``task``'s mixer uses."""
    if store is not None and not isinstance(ds, CachedExamples):
        ds = CachedExamples(ds)
    batches = length_batches(ds["length"][:], batch_size, shuffle=shuffle, seed=seed)
    layers = None if task is None else (lambda: _active_layers(task))
    # the loader's own generator: iterating it then draws nothing from the global one, so a
    # run resumed mid-epoch (a new iterator after the RNG is restored) sees the same dropout
    # masks as the run that was not cut
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=batches,
        collate_fn=lambda f: collate(f, pad_id, store, layers),
        generator=torch.Generator().manual_seed(seed),
    )
    return accelerator.prepare_data_loader(loader)


def _read_states(
    store: FeatureStore, indices: Sequence[int], wanted: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """The batch entries holding the cached states of ``indices``: ``states`` (n, N, d),
    ``state_layers`` (n,), ``state_rows`` (2, N); only the ``wanted`` states (default all)."""
    layers = store.layers if wanted is None else [i for i in store.layers if i in wanted]
    rows, index = store.rows(indices, layers)
    # plain tensors: they travel through Accelerate
    return {"states": rows, "state_layers": torch.tensor(layers), "state_rows": index}


def _active_layers(task: Task) -> list[int]:
    """The states ``task``'s mixer gives a non-zero weight now (cut layers are not read)."""
    with torch.no_grad():
        return [layer for layer, _ in task.mixer.active_layers()]


def _ensure_states(batch: dict[str, Any], store: FeatureStore | None, task: Task) -> None:
    """Read a cached batch's states again if the mixer now weighs a state it lacks.

    Batches are collated one step ahead (the loader looks ahead), and a state the cutoff had
    removed can come back after an optimizer step: then this batch reads all it needs.
    """
    if store is None or "state_layers" not in batch:
        return
    wanted = _active_layers(task)
    if set(wanted) <= set(batch["state_layers"].tolist()):
        return
    device = batch["states"].device
    fresh = _read_states(store, batch["index"].tolist(), wanted)
    batch.update({key: value.to(device) for key, value in fresh.items()})


def _progress(iterable: Any, *, total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True
    )


def _gather(accelerator: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather per-process batches that may differ in size (index -1 marks padding rows)."""
    if accelerator.num_processes == 1:
        return tensors
    padded = [accelerator.pad_across_processes(t, dim=0, pad_index=-1) for t in tensors]
    return tuple(accelerator.gather(t) for t in padded)


# -- evaluation ------------------------------------------------------------------------------
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
    task: Task,
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
) -> dict[str, Any]:
    """Metrics of ``task`` on one tokenised split; every example is counted exactly once.

    With a feature ``store`` the states come from the cache and the base does not run. A
    ``predictions`` list is filled with one record per example, in the split's order
    (:func:`prediction_records`). ``metrics`` names the metrics to report (``task.metrics``;
    default all of the task type's) and ``positive_label`` the class of ``f1_positive``
    (default the second of two labels). A classification also reports ``majority``: the
    same metrics of always answering the training split's most frequent label.
    """
    model.eval()
    loader = _loader(
        accelerator, ds, batch_size, pad_id, shuffle=False, seed=0, store=store, task=task
    )
    token_task = task.task_type == "token_classification"
    decoded = token_task and task.decoding != "argmax"
    indices, preds, golds, argmax = [], [], [], []
    for batch in _progress(loader, total=len(loader), desc=f"eval {split}", enabled=progress):
        _ensure_states(batch, store, task)
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
            pred = logits.squeeze(-1) if task.task_type == "regression" else logits.argmax(-1)
            index, pred, labels = _gather(accelerator, index, pred, labels)
            preds.extend(pred.tolist())
            golds.extend(labels.tolist())
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
        scores = compute_metrics(task.task_type, true_tags, pred_tags, names=metrics)
        if predictions is not None:
            predictions.extend(prediction_records(task.task_type, true_tags, pred_tags))
        if decoded:
            per_word = compute_metrics(task.task_type, true_tags, tags(argmax))
            scores["argmax"] = {k: per_word[k] for k in ("precision", "recall", "f1")}
    else:
        y_pred = [preds[p] for p in order]
        y_true = [golds[p] for p in order]
        positive = _positive_id(task, positive_label)
        scores = compute_metrics(task.task_type, y_true, y_pred, names=metrics, positive=positive)
        if task.task_type == "sequence_classification":
            majority = _majority_label(data, task)
            scores["majority"] = {
                "label": majority,
                **compute_metrics(
                    task.task_type,
                    y_true,
                    [task.labels.index(majority)] * len(y_true),
                    names=metrics,
                    positive=positive,
                ),
            }
        if predictions is not None:
            if task.task_type == "sequence_classification":
                named = [task.labels[i] for i in y_true], [task.labels[i] for i in y_pred]
            else:
                named = y_true, y_pred
            predictions.extend(prediction_records(task.task_type, *named))
        if task.task_type == "sequence_classification":
            scores["confusion_matrix"] = {
                "labels": list(task.labels),  # rows: gold label, columns: predicted label
                "counts": confusion_matrix(y_true, y_pred, len(task.labels)),
            }
    scores["examples"] = len(ds)
    return scores


def _positive_id(task: Any, positive_label: str | None) -> int | None:
    """The id of a two-label task's positive class (default the second label), else None.

    ``task`` is anything with ``task_type`` and ``labels``.
    """
    labels = list(task.labels)
    if task.task_type != "sequence_classification" or len(labels) != 2:
        if positive_label is not None:
            raise ValueError(
                f"task.positive_label={positive_label!r} is for two-label classification; "
                f"this task has labels {labels}: remove the setting"
            )
        return None
    if positive_label is None:
        return 1
    if positive_label not in labels:
        raise ValueError(
            f"task.positive_label={positive_label!r} is not one of the labels {labels}"
        )
    return labels.index(positive_label)


def selection_metric(config: RunConfig, data: TaskData) -> str:
    """The validation metric that picks the best epoch: ``train.metric``, else the first of
    ``task.metrics``, else the task's primary metric
    (:func:`~adalayers.core.metrics.primary_metric`).

    Raises:
        ValueError: a metric the task does not report, or a bad ``task.positive_label``,
            before any training.
    """
    names = check_metrics(data.task_type, config.task.metrics, data.label_names)
    _positive_id(
        SimpleNamespace(task_type=data.task_type, labels=data.label_names),
        config.task.positive_label,
    )
    benchmark = config.data.task if config.data.task in BENCHMARKS else data.task_type
    metric = config.train.metric or (names[0] if config.task.metrics else primary_metric(benchmark))
    if metric not in names:
        raise ValueError(
            f"train.metric={metric!r} is not a metric of this task; choose from {list(names)}"
        )
    return metric


def _majority_label(data: TaskData, task: Any) -> str:
    """The most frequent label of the training split (ties: the first in label order)."""
    counts = Counter(data.splits["train"]["label"])
    return max(task.labels, key=lambda name: (counts[name], -task.labels.index(name)))


def prediction_records(
    task_type: str, gold: Sequence[Any], predicted: Sequence[Any]
) -> list[dict[str, Any]]:
    """One JSON-ready record per example, ``index`` its position in the evaluated split (after
    ``data.sample`` / ``data.limit``): ``label`` and ``prediction`` (label names; numbers for
    regression), or for token tasks ``tags`` and ``predicted_tags`` (one per word)."""
    if task_type == "token_classification":
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


def write_predictions(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``records`` as JSON lines to ``path`` (through a temporary file: a crash leaves
    the old file or none, never half of one)."""
    path = Path(path)
    _write_text(path, "".join(json.dumps(record) + "\n" for record in records))
    return path


def predictions_file(split: str) -> str:
    """The name of a run folder's predictions file for ``split``."""
    return f"predictions_{split}.jsonl"


def save_predictions(run: Path, by_split: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Write each split's records to the run folder's :func:`predictions_file`."""
    for split, records in by_split.items():
        write_predictions(run / predictions_file(split), records)


# -- checkpoints -----------------------------------------------------------------------------
@dataclass
class _State:
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimiser batches done in the current epoch
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    global_step: int = 0
    train_seconds: float = 0.0
    tokens: int = 0
    loss_sum: float = 0.0  # over the current epoch's steps, so a resumed epoch reports its mean
    loss_steps: int = 0


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


def _save_checkpoint(
    run: Path,
    task: Task,
    optimizer: Any,
    scheduler: Any,
    state: _State,
) -> None:
    save_state(
        run / CHECKPOINT_DIR,
        {
            "task": task.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        },
        state.__dict__,
    )


def _load_checkpoint(run: Path, task: Task, optimizer: Any, scheduler: Any) -> _State:
    """Restore a checkpoint written by :func:`_save_checkpoint` (tensors and JSON, no pickle)."""
    folder = run / CHECKPOINT_DIR
    blob, counters = load_state(folder)
    try:
        task.load_state_dict(blob["task"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        state = _State(**counters)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{folder} does not match this run's task and optimiser ({type(err).__name__}: "
            f"{str(err)[:300]}); delete {folder} to train {run} again from the start"
        ) from err
    return state


def _truncate_history(path: Path, epochs: int) -> None:
    """Keep the first ``epochs`` records of ``history.jsonl``: a run that stopped after
    writing an epoch's record but before its checkpoint trains that epoch again on resume."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().split("\n") if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epochs]
    if len(kept) != len(lines):
        logger.info("history: dropping %d record(s) after epoch %d", len(lines) - len(kept), epochs)
        _write_text(path, "".join(line + "\n" for line in kept))


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    """SIGINT / SIGTERM set a flag the loop checks between steps (a second SIGINT aborts)."""
    flag = {"stop": False}
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        logger.warning("signal %d: saving a checkpoint after this step", signum)

    in_main = __import__("threading").current_thread() is __import__("threading").main_thread()
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# -- training --------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _optimizer(config: RunConfig, task: Task) -> torch.optim.Optimizer:
    decay = [p for n, p in task.named_parameters() if p.requires_grad and n != "mixer.p"]
    no_decay = [p for n, p in task.named_parameters() if p.requires_grad and n == "mixer.p"]
    groups = [
        {"params": decay, "weight_decay": config.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    # one fused kernel over all parameters (CPU and CUDA) instead of a Python loop per tensor:
    # the step of a small head is otherwise a visible share of its training time
    fused = {"fused": True} if _fused_optimizers() else {}
    if config.train.optimizer == "adam":  # L2 through the gradient, as classic Adam
        return torch.optim.Adam(groups, lr=config.train.lr, **fused)
    return torch.optim.AdamW(groups, lr=config.train.lr, **fused)


def _fused_optimizers() -> bool:
    """Whether this torch has fused Adam/AdamW for CPU tensors (2.4 and later)."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 4)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` through a temporary file beside it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_json(path: Path, payload: Any) -> None:
    _write_text(path, json.dumps(payload, indent=2) + "\n")


def fit(
    config: RunConfig,
    output_dir: str | os.PathLike,
    *,
    resume: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a task on the frozen base, keep the best-on-validation head, evaluate on test.

    Args:
        config: the run configuration.
        output_dir: the run folder (created).
        resume: continue from ``output_dir/checkpoint``.
        quiet: no progress bars.
        overwrite: replace an existing run folder.

    Returns:
        The final metrics (also written to ``metrics.json``).

    Raises:
        FileExistsError: ``output_dir`` holds a run and neither ``resume`` nor ``overwrite``.
        TrainingInterrupted: a signal stopped training after a checkpoint was written.
    """
    run = Path(output_dir)
    accelerator = _accelerator(config)
    main = accelerator.is_main_process
    if resume:
        if not (run / CONFIG).is_file():
            raise FileNotFoundError(f"{run / CONFIG} not found: nothing to resume in {run}")
    elif run.exists() and any(run.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{run} already holds a run; pass --resume to continue it, "
                f"--overwrite to replace it, or choose another --output-dir"
            )
        if main:
            shutil.rmtree(run)
    accelerator.wait_for_everyone()
    if main:
        run.mkdir(parents=True, exist_ok=True)
        if not resume:
            save_config(config, run / CONFIG)
    progress = main and not quiet and sys.stderr.isatty()

    _seed_everything(config.train.seed)
    data = _load_data(config)
    for split in ("train", "validation"):
        if len(data.splits[split]) == 0:
            raise ValueError(f"the {split} split of {data.name} is empty")
    backbone = load_backbone(
        config.base, states=config.base_states, gguf_file=config.gguf_file, dtype=config.dtype
    )
    tokenizer = backbone.tokenizer
    max_length = _max_length(config, backbone)
    task = build_task(config, data, backbone)
    metric = selection_metric(config, data)
    scoring = {"metrics": config.task.metrics, "positive_label": config.task.positive_label}
    lengths: dict[str, dict[str, Any]] = {"train": {}, "validation": {}}
    with accelerator.main_process_first():
        train_ds = tokenize(data, "train", tokenizer, task, max_length, lengths["train"])
        val_ds = tokenize(data, "validation", tokenizer, task, max_length, lengths["validation"])
    pad_id = tokenizer.pad_token_id
    stores: dict[str, FeatureStore] = {}
    tokenized = {"train": train_ds, "validation": val_ds}
    if config.train.cache:
        task, stores = _prepare_cache(
            config, accelerator, backbone, data, task, tokenized, max_length, progress
        )
        if main:
            save_config(config, run / CONFIG)  # with the layers the probe chose

    # the epochs of a cached split read labels and lengths only, not token ids
    if "train" in stores:
        train_ds = CachedExamples(train_ds)
    if "validation" in stores:
        val_ds = CachedExamples(val_ds)
    model = TaskModel(backbone, task)
    optimizer = _optimizer(config, task)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=config.train.lr_factor, patience=config.train.lr_patience
    )
    state = _State()
    if resume:
        state = _load_checkpoint(run, task, optimizer, scheduler)
        if main:
            _truncate_history(run / HISTORY, state.epoch)
        logger.info("resuming %s at epoch %d, step %d", run, state.epoch, state.step_in_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: TaskModel = accelerator.unwrap_model(model)
    task = unwrapped.task
    history = run / HISTORY
    logger.info(
        "task %s: %d parameters (%.3f%% of the base's %d)",
        data.name,
        task.num_parameters(),
        100 * task.num_parameters() / backbone.num_parameters(),
        backbone.num_parameters(),
    )

    with _stop_on_signals() as signals:
        while state.epoch < config.train.epochs:
            epoch = state.epoch
            model.train()
            loader = _loader(
                accelerator,
                train_ds,
                config.train.batch_size,
                pad_id,
                shuffle=True,
                seed=config.train.seed * 100_003 + epoch,
                store=stores.get("train"),
                task=task,
            )
            batches = loader
            if state.step_in_epoch:
                batches = accelerator.skip_first_batches(loader, state.step_in_epoch)
            losses = []
            start = time.perf_counter()
            bar = _progress(
                batches,
                total=len(loader) - state.step_in_epoch,
                desc=f"epoch {epoch + 1}/{config.train.epochs}",
                enabled=progress,
            )
            log = ProgressLog(  # where there is no bar (nohup, CI, a scheduler): a log line
                f"epoch {epoch + 1}/{config.train.epochs}",
                len(loader),
                logger,
                every_seconds=config.train.log_every_seconds,
                enabled=main and not progress,
                initial=state.step_in_epoch,
            )
            for batch in bar:
                _ensure_states(batch, stores.get("train"), task)
                batch.pop("index")
                labels = batch.pop("labels")
                with accelerator.accumulate(model):
                    logits = model(**batch)
                    loss = task.loss(logits, labels)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.train.grad_clip > 0:
                        accelerator.clip_grad_norm_(task.parameters(), config.train.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad()
                losses.append(loss.item())
                state.loss_sum += losses[-1]
                state.loss_steps += 1
                state.step_in_epoch += 1
                state.global_step += 1
                state.tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
                log.update(1, len(labels) * accelerator.num_processes)
                if progress:
                    bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
                every = config.train.checkpoint_every
                stop = signals["stop"]
                if accelerator.num_processes > 1:
                    flag = torch.tensor([float(stop)], device=accelerator.device)
                    stop = bool(accelerator.reduce(flag, reduction="sum").item())
                if stop or (every and state.global_step % every == 0):
                    state.train_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    if main:
                        _save_checkpoint(run, task, optimizer, scheduler, state)
                    accelerator.wait_for_everyone()
                    if stop:
                        raise TrainingInterrupted(
                            f"stopped at epoch {epoch + 1}, step {state.step_in_epoch}; "
                            f"checkpoint saved. Continue with: adalayers train --resume "
                            f"--output-dir {run}"
                        )
            state.train_seconds += time.perf_counter() - start
            val = evaluate_split(
                accelerator,
                model,
                task,
                data,
                val_ds,
                "validation",
                config.train.eval_batch_size,
                pad_id,
                progress,
                store=stores.get("validation"),
                **scoring,
            )
            if metric not in val:
                raise ValueError(
                    f"train.metric={metric!r} is not a metric of this task; "
                    f"choose from {sorted(k for k in val if k not in _NESTED)}"
                )
            score = float(val[metric])
            scheduler.step(score)
            improved = score > state.best
            if improved:
                state.best, state.best_epoch, state.bad_epochs = score, epoch + 1, 0
                if main:
                    task.save_pretrained(run / MODEL_DIR)
            else:
                state.bad_epochs += 1
            state.epoch += 1
            state.step_in_epoch = 0
            train_loss = state.loss_sum / state.loss_steps if state.loss_steps else None
            state.loss_sum, state.loss_steps = 0.0, 0
            if main:
                _append_jsonl(
                    history,
                    {
                        "epoch": epoch + 1,
                        "train_loss": train_loss,
                        "validation": {k: v for k, v in val.items() if k not in _NESTED},
                        "metric": metric,
                        "score": score,
                        "improved": improved,
                        "lr": optimizer.param_groups[0]["lr"],
                        "layer_weights": task.mixer.layer_weights(),
                        "entropy": task.mixer.entropy().item(),
                        "seconds": round(state.train_seconds, 2),
                    },
                )
                _save_checkpoint(run, task, optimizer, scheduler, state)
            accelerator.wait_for_everyone()
            logger.info(
                "epoch %d: loss %.4f, validation %s %.4f%s",
                epoch + 1,
                float("nan") if train_loss is None else train_loss,
                metric,
                score,
                " (best)" if improved else "",
            )
            if config.train.early_stopping and state.bad_epochs >= config.train.early_stopping:
                logger.info("early stopping after %d epochs without improvement", state.bad_epochs)
                break

    # final evaluation of the best head
    best = Task.from_pretrained(run / MODEL_DIR, backbone)
    unwrapped.runtime.tasks["task"].load_state_dict(best.state_dict())
    results: dict[str, Any] = {
        "task": data.name,
        "task_type": data.task_type,
        "base": config.base,
        "metric": metric,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
    }
    if data.task_type == "token_classification":
        results["decoding"] = task.decoding
    results.update(
        evaluate_splits(
            accelerator,
            model,
            task,
            data,
            tokenized,
            tokenizer,
            max_length,
            config.train.eval_batch_size,
            pad_id,
            progress,
            stores=stores,
            predictions=(predictions := {}),
            stats=lengths,
            **scoring,
        )
    )
    results["samples"] = {
        split: sample_records(data, split, records) for split, records in predictions.items()
    }
    results["max_length"] = max_length
    results["longest_example_tokens"] = {  # before cutting: to choose data.max_length
        split: found["longest"] for split, found in lengths.items() if "longest" in found
    }
    results.update(
        {
            "parameters_added": task.num_parameters(),
            "base_parameters": backbone.num_parameters(),
            "percent_of_base": 100 * task.num_parameters() / backbone.num_parameters(),
            "layer_weights": task.mixer.layer_weights(),
            "train_seconds": round(state.train_seconds, 2),
            "train_tokens": state.tokens,
            "train_tokens_per_second": round(state.tokens / max(state.train_seconds, 1e-9), 1),
            "processes": accelerator.num_processes,
            "cache": {
                split: {"bytes": store.size_bytes(), "layers": store.layers, "dtype": store.dtype}
                for split, store in stores.items()
            },
        }
    )
    if main:
        save_predictions(run, predictions)  # before metrics.json, which marks the end
        _write_json(run / METRICS, results)
        from adalayers.report import plot_layer_weights

        plot_layer_weights(
            task.mixer.layer_weights(),
            run / "layer_weights.png",
            title=f"{data.name} on {Path(config.base).name}",
        )
    accelerator.wait_for_everyone()
    return results


def _prepare_cache(
    config: RunConfig,
    accelerator: Any,
    backbone: Backbone,
    data: TaskData,
    task: Task,
    tokenized: dict[str, Any],
    max_length: int,
    progress: bool,
    verify: bool = False,
) -> tuple[Task, dict[str, FeatureStore]]:
    """Choose the layers worth caching (probe), rebuild the task on them, open the stores.

    ``tokenized`` (split -> tokenised dataset) gains the cached splits it lacked. ``verify``
    reads every checksum of a finished store (:func:`adalayers.training.cache.open_or_build`).
    """
    cache, mixer = config.cache, config.task.mixer
    layers = task.mixer.layer_indices
    if (
        cache.layers is not None
        and cache.layers < len(layers)
        and mixer.layers is None
        and mixer.single_layer is None
    ):
        scores = probe_layers(
            backbone,
            tokenized["train"],
            task.task_type,
            len(task.labels),
            cache.probe_examples,
            seed=config.train.seed,
        )
        layers = sorted(sorted(scores, key=scores.get, reverse=True)[: cache.layers])
        logger.info(
            "probe score per hidden state: %s; caching %s",
            {i: round(v, 4) for i, v in scores.items()},
            layers,
        )
        mixer.layers = layers  # recorded in the run's config.yaml
        torch.manual_seed(config.train.seed)
        task = build_task(config, data, backbone)
    stored = list(range(backbone.num_states)) if cache.all_layers else layers
    stores = {}
    for split in cache.splits:
        if split not in data.splits or len(data.splits[split]) == 0:
            continue
        if split not in tokenized:
            tokenized[split] = tokenize(data, split, backbone.tokenizer, task, max_length)
        stores[split] = open_or_build(
            backbone,
            tokenized[split],
            split,
            stored,
            dtype=cache.dtype,
            root=cache.dir,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            chunk_examples=cache.chunk_examples,
            progress_bar=progress,
            barrier=accelerator.wait_for_everyone,
            verify=verify,
        )
        if sorted(layers) != sorted(stored):  # a full store: read only the mixer's states
            stores[split] = stores[split].select(layers)
    return task, stores


def build_cache(config: RunConfig, *, quiet: bool = False, verify: bool = False) -> dict[str, Any]:
    """Run the base once over the configured splits and store their hidden states.

    ``verify`` reads every checksum of stores already built, even of files unchanged since their
    checksums last passed. Returns a summary: the layers stored, and per split the folder,
    examples and bytes.
    """
    accelerator = _accelerator(config)
    data = _load_data(config)
    backbone = load_backbone(
        config.base, states=config.base_states, gguf_file=config.gguf_file, dtype=config.dtype
    )
    max_length = _max_length(config, backbone)
    _seed_everything(config.train.seed)
    task = build_task(config, data, backbone)
    tokenized = {"train": tokenize(data, "train", backbone.tokenizer, task, max_length)}
    progress = accelerator.is_main_process and not quiet and sys.stderr.isatty()
    task, stores = _prepare_cache(
        config, accelerator, backbone, data, task, tokenized, max_length, progress, verify
    )
    return {
        "layers": task.mixer.layer_indices,
        "dtype": config.cache.dtype,
        "splits": {
            split: {
                "folder": str(store.folder),
                "examples": len(store),
                "bytes": store.size_bytes(),
            }
            for split, store in stores.items()
        },
    }


def _load_data(config: RunConfig) -> TaskData:
    d = config.data
    data = load_task_data(
        d.task,
        d.data_dir,
        seed=d.seed,
        files=d.files,
        columns=d.columns,
        limit=d.limit,
        sample=d.sample,
        task_type=d.task_type,
        label_names=d.label_names,
    )
    return dataclasses.replace(data, name=d.name) if d.name else data


def _max_length(config: RunConfig, backbone: Backbone) -> int:
    max_length = min(config.data.max_length, backbone.max_length)
    if config.task.mixer.positional != "none":
        max_length = min(max_length, config.task.mixer.max_positions)
    return max_length


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
    data = _load_data(config)
    if split not in data.splits or len(data.splits[split]) == 0:
        raise ValueError(
            f"split {split!r} is empty or unknown for {data.name}; "
            f"choose from {sorted(data.splits)}"
        )
    accelerator = _accelerator(config)
    ds = tokenize(data, split, backbone.tokenizer, task, _max_length(config, backbone))
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


def read_metrics(run_dir: str | os.PathLike) -> Mapping[str, Any]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has not finished")
    return json.loads(path.read_text())
