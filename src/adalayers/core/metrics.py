"""Evaluation metrics as pure functions of gold and predicted labels.

* sequence classification: accuracy, macro F1, F1 of the positive class (two labels: GLUE's
  MRPC and QQP), Matthews correlation (MCC, the GLUE CoLA metric);
* regression: Pearson and Spearman correlation (the GLUE STS-B metrics);
* token classification: entity-level micro precision / recall / F1 the conlleval way (``seqeval``
  in its default, conlleval-compatible mode) plus a per-type table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats
from seqeval import metrics as seqeval
from seqeval.metrics.sequence_labeling import get_entities
from sklearn import metrics as skm

METRICS = {
    "sequence_classification": ("accuracy", "f1_macro", "f1_positive", "mcc"),
    "regression": ("pearson", "spearman"),
    "token_classification": ("precision", "recall", "f1", "accuracy"),
}
"""The metrics of each task type (``task.metrics`` chooses among them)."""

_PRIMARY = {
    "imdb": "accuracy",
    "cola": "mcc",
    "rte": "accuracy",
    "stsb": "pearson",
    "conll2003": "f1",
    "conll": "f1",
    "sequence_classification": "accuracy",
    "token_classification": "f1",
    "regression": "pearson",
}


def _check(y_true: Sequence, y_pred: Sequence) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} gold labels but {len(y_pred)} predictions")
    if len(y_true) == 0:
        raise ValueError("no examples to score")


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Share of examples whose prediction equals the gold label.

    Raises:
        ValueError: If the inputs differ in length or are empty.
    """
    _check(y_true, y_pred)
    return float(skm.accuracy_score(y_true, y_pred))


def f1(y_true: Sequence, y_pred: Sequence, *, average: str = "macro", pos_label: Any = 1) -> float:
    """F1 score, ``2 * P * R / (P + R)``.

    Args:
        y_true: Gold labels (ids or names).
        y_pred: Predicted labels.
        average: ``"macro"`` (unweighted mean over the labels present in either input) or
            ``"binary"`` (F1 of ``pos_label``).
        pos_label: The positive label for ``average="binary"``.

    Returns:
        F1 in [0, 1]; an undefined class score (no gold and no predicted examples) counts as 0.
    """
    _check(y_true, y_pred)
    if average not in ("macro", "binary"):
        raise ValueError(f"average must be 'macro' or 'binary', got {average!r}")
    return float(
        skm.f1_score(y_true, y_pred, average=average, pos_label=pos_label, zero_division=0)
    )


def matthews_corrcoef(y_true: Sequence, y_pred: Sequence) -> float:
    """Matthews correlation coefficient; binary case ``(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)
    (TN+FP)(TN+FN))``, multi-class via the confusion-matrix generalisation; 0 when undefined."""
    _check(y_true, y_pred)
    return float(skm.matthews_corrcoef(y_true, y_pred))


def confusion_matrix(
    y_true: Sequence[int], y_pred: Sequence[int], num_labels: int
) -> list[list[int]]:
    """Counts ``m[i][j]`` of examples with gold label ``i`` predicted as ``j`` (label ids).

    Raises:
        ValueError: If the lengths differ, there are no examples, or an id is outside
            ``0..num_labels-1``.
    """
    _check(y_true, y_pred)
    out = [[0] * num_labels for _ in range(num_labels)]
    for t, p in zip(y_true, y_pred):
        if not (0 <= int(t) < num_labels and 0 <= int(p) < num_labels):
            raise ValueError(f"label ids must be in 0..{num_labels - 1}, got {t} and {p}")
        out[int(t)][int(p)] += 1
    return out


def pearson_spearman(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation of predictions with gold scores.

    Returns:
        ``{"pearson": r, "spearman": rho}``; a correlation with a constant input is undefined
        and reported as 0.0 (as sklearn does for MCC), so model selection never sees NaN.
    """
    _check(y_true, y_pred)
    a, b = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"pearson": 0.0, "spearman": 0.0}
    result = {
        "pearson": stats.pearsonr(a, b).statistic,
        "spearman": stats.spearmanr(a, b).statistic,
    }
    return {k: 0.0 if math.isnan(v) else float(v) for k, v in result.items()}


def ner_scores(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict[str, Any]:
    """Entity-level scores of IOB tag sequences, computed as conlleval does (via ``seqeval``).

    An entity is a maximal chunk of one type (conlleval also starts a chunk at an ``I-`` tag
    that follows ``O`` or another type); it is correct only if type and both boundaries match.
    Precision = correct / predicted entities, recall = correct / gold entities, micro-averaged.

    Args:
        true_tags: Gold tags, one list per sentence.
        pred_tags: Predicted tags, same shape.

    Returns:
        ``{"precision", "recall", "f1", "accuracy" (token level), "per_type": {type:
        {"precision", "recall", "f1", "support" (gold entities)}}}``.

    Raises:
        ValueError: If the number of sentences or any sentence length differs, or no sentences.
    """
    _check(true_tags, pred_tags)
    for i, (t, p) in enumerate(zip(true_tags, pred_tags)):
        if len(t) != len(p):
            raise ValueError(f"sentence {i}: {len(t)} gold tags but {len(p)} predicted tags")
    accuracy_ = float(seqeval.accuracy_score(true_tags, pred_tags))
    if not any(get_entities(t) or get_entities(p) for t, p in zip(true_tags, pred_tags)):
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": accuracy_, "per_type": {}}
    report = seqeval.classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    per_type = {
        name: {
            "precision": float(row["precision"]),
            "recall": float(row["recall"]),
            "f1": float(row["f1-score"]),
            "support": int(row["support"]),
        }
        for name, row in report.items()
        if not name.endswith(" avg")
    }
    micro = report["micro avg"]
    return {
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "accuracy": accuracy_,
        "per_type": per_type,
    }


def check_metrics(
    task_type: str, names: Sequence[str] | None, labels: Sequence[str] = ()
) -> tuple[str, ...]:
    """The metrics a task reports: ``names`` checked against its type and labels, or (``None``)
    all of its type's (``f1_positive`` only where there are two labels).

    Raises:
        ValueError: a metric of another task type, or ``f1_positive`` without two labels; the
            message names ``task.metrics`` and the choices.
    """
    if task_type not in METRICS:
        raise ValueError(f"unknown task type {task_type!r}; use one of {list(METRICS)}")
    binary = len(labels) == 2
    usable = [m for m in METRICS[task_type] if m != "f1_positive" or binary]
    if names is None:
        return tuple(usable)
    for name in names:
        if name == "f1_positive" and task_type == "sequence_classification" and not binary:
            raise ValueError(
                f"task.metrics: f1_positive needs two labels, this task has {len(labels)}; "
                f"use f1_macro"
            )
        if name not in usable:
            raise ValueError(
                f"task.metrics: {name!r} is not a metric of a {task_type} task; choose from "
                f"{usable}"
            )
    return tuple(names)


def compute_metrics(
    task_type: str,
    y_true: Sequence,
    y_pred: Sequence,
    *,
    names: Sequence[str] | None = None,
    positive: Any = None,
) -> dict[str, Any]:
    """The metrics of a task type as a flat dict of floats.

    Args:
        task_type: ``"sequence_classification"`` -> accuracy, f1_macro, mcc, and f1_positive
            when ``positive`` is given; ``"regression"`` -> pearson, spearman;
            ``"token_classification"`` -> precision, recall, f1, accuracy and the nested
            ``"per_type"`` table of :func:`ner_scores`.
        y_true: Gold labels (tag lists for token classification).
        y_pred: Predictions, same shape.
        names: only these metrics, in this order (see :data:`METRICS`; the per-type table of
            a token task is always kept). Default: all of the type's.
        positive: the positive label (as it appears in ``y_true``) of ``f1_positive``.

    Raises:
        ValueError: Unknown task type or metric, ``f1_positive`` without ``positive``, or
            mismatched / empty inputs.
    """
    if task_type == "sequence_classification":
        if names is None:
            names = [m for m in METRICS[task_type] if m != "f1_positive" or positive is not None]
        scores = {
            "accuracy": lambda: accuracy(y_true, y_pred),
            "f1_macro": lambda: f1(y_true, y_pred, average="macro"),
            "f1_positive": lambda: f1(y_true, y_pred, average="binary", pos_label=positive),
            "mcc": lambda: matthews_corrcoef(y_true, y_pred),
        }
        unknown = [name for name in names if name not in scores]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown} of {task_type}; use {list(scores)}")
        if "f1_positive" in names and positive is None:
            raise ValueError("f1_positive needs the positive label of a two-label task")
        _check(y_true, y_pred)
        return {name: scores[name]() for name in names}
    if task_type == "regression":
        result = pearson_spearman(y_true, y_pred)
    elif task_type == "token_classification":
        result = ner_scores(y_true, y_pred)
    else:
        raise ValueError(f"unknown task type {task_type!r}; use one of {list(METRICS)}")
    if names is None:
        return result
    kept = {name: result[name] for name in check_metrics(task_type, names)}
    return {**kept, **{k: v for k, v in result.items() if k == "per_type"}}


def primary_metric(task_name_or_type: str) -> str:
    """The metric used for model selection and headline results of a task (name or type).

    ``accuracy`` for IMDB / RTE / sequence classification, ``mcc`` for CoLA, ``pearson`` for
    STS-B / regression, entity ``f1`` for CoNLL-2003 / token classification.

    Raises:
        ValueError: For an unknown name (e.g. ``"csv"``: pass its task type instead).
    """
    try:
        return _PRIMARY[task_name_or_type]
    except KeyError:
        raise ValueError(
            f"no primary metric for {task_name_or_type!r}; use a task type or one of "
            f"{list(_PRIMARY)}"
        ) from None
