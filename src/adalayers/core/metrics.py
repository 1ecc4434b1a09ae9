"""Evaluation metrics as pure functions of gold and predicted labels.

* sequence classification: accuracy, macro F1, F1 of the positive class (two labels: GLUE's
  MRPC and QQP), Matthews correlation (MCC, the GLUE CoLA metric);
* regression: Pearson and Spearman correlation (the GLUE STS-B metrics);
* token classification: entity-level micro precision / recall / F1 the conlleval way (``seqeval``
  in its default, conlleval-compatible mode) plus a per-type table;
* multi-label classification: micro and macro F1, exact match (subset accuracy).

Which metrics a task type offers, its primary one and how they are computed belong to its kind
(:mod:`adalayers.core.kinds`); :func:`compute_metrics`, :func:`check_metrics` and
:func:`primary_metric` ask it.
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

from adalayers.core.kinds import KINDS, kind_of

METRICS = {name: kind.metrics for name, kind in KINDS.items()}
"""The metrics of each task type (a view of :data:`~adalayers.core.kinds.KINDS`)."""

_PRIMARY = {
    "imdb": "accuracy",
    "cola": "mcc",
    "rte": "accuracy",
    "stsb": "pearson",
    "conll2003": "f1",
    "conll": "f1",
}
"""Benchmarks whose headline metric is not their task type's primary one (or that name it)."""


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


def multilabel_scores(y_true: Sequence, y_pred: Sequence) -> dict[str, float]:
    """Scores of multi-label predictions: one row of 0 / 1 (or booleans) per example, a column
    per label.

    * ``f1_micro``: ``2 ΣTP / (2 ΣTP + ΣFP + ΣFN)``, counts summed over labels and examples;
    * ``f1_macro``: the mean over labels of ``2 TP / (2 TP + FP + FN)``, over the labels present
      in the gold rows or the predictions (as macro F1 of a classification);
    * ``exact_match``: the share of examples whose predicted label set is the gold set (subset
      accuracy).

    A score with nothing to count (no gold and no predicted label at all) is 0.

    Raises:
        ValueError: If the inputs differ in length or shape, are not rows, or are empty.
    """
    _check(y_true, y_pred)
    gold = np.asarray(y_true, dtype=float) > 0.5  # (N, C)
    pred = np.asarray(y_pred, dtype=float) > 0.5  # (N, C)
    if gold.ndim != 2 or gold.shape != pred.shape:
        raise ValueError(
            f"multi-label scores need rows of one value per label, got shapes {gold.shape} "
            f"and {pred.shape}"
        )
    tp = (gold & pred).sum(0)  # (C,)
    fp = (~gold & pred).sum(0)  # (C,)
    fn = (gold & ~pred).sum(0)  # (C,)
    counted = 2 * tp + fp + fn  # (C,)
    micro = 2 * tp.sum() / counted.sum() if counted.sum() else 0.0
    present = counted > 0
    macro = float(np.mean(2 * tp[present] / counted[present])) if present.any() else 0.0
    return {
        "f1_micro": float(micro),
        "f1_macro": macro,
        "exact_match": float((gold == pred).all(1).mean()),
    }


def check_metrics(
    task_type: str, names: Sequence[str] | None, labels: Sequence[str] = ()
) -> tuple[str, ...]:
    """The metrics a task reports: ``names`` checked against its type and labels, or (``None``)
    all of its type's (``f1_positive`` only where there are two labels); see
    :meth:`~adalayers.core.kinds.TaskKind.check_metrics`.

    Raises:
        ValueError: an unknown task type, a metric of another task type, or ``f1_positive``
            without two labels; the message names ``task.metrics`` and the choices.
    """
    return kind_of(task_type).check_metrics(names, labels)


def compute_metrics(
    task_type: str,
    y_true: Sequence,
    y_pred: Sequence,
    *,
    names: Sequence[str] | None = None,
    positive: Any = None,
) -> dict[str, Any]:
    """The metrics of a task type as a flat dict of floats (see
    :meth:`~adalayers.core.kinds.TaskKind.compute_metrics`).

    Args:
        task_type: ``"sequence_classification"`` -> accuracy, f1_macro, mcc, and f1_positive
            when ``positive`` is given; ``"regression"`` -> pearson, spearman;
            ``"token_classification"`` -> precision, recall, f1, accuracy and the nested
            ``"per_type"`` table of :func:`ner_scores`; ``"multilabel_classification"`` ->
            f1_micro, f1_macro, exact_match (:func:`multilabel_scores`).
        y_true: Gold labels (tag lists for token classification, 0 / 1 rows for multi-label).
        y_pred: Predictions, same shape.
        names: only these metrics, in this order (the per-type table of a token task is always
            kept). Default: all of the type's.
        positive: the positive label (as it appears in ``y_true``) of ``f1_positive``.

    Raises:
        ValueError: Unknown task type or metric, ``f1_positive`` without ``positive``, or
            mismatched / empty inputs.
    """
    return kind_of(task_type).compute_metrics(y_true, y_pred, names=names, positive=positive)


def primary_metric(task_name_or_type: str) -> str:
    """The metric used for model selection and headline results of a task (name or type).

    ``accuracy`` for IMDB / RTE, ``mcc`` for CoLA, ``pearson`` for STS-B, entity ``f1`` for
    CoNLL-2003; for a task type, its kind's primary metric (``accuracy`` for sequence
    classification, ``pearson`` for regression, ``f1`` for token classification, ``f1_micro``
    for multi-label classification).

    Raises:
        ValueError: For an unknown name (e.g. ``"csv"``: pass its task type instead).
    """
    if task_name_or_type in _PRIMARY:
        return _PRIMARY[task_name_or_type]
    if task_name_or_type in KINDS:
        return KINDS[task_name_or_type].primary_metric
    raise ValueError(
        f"no primary metric for {task_name_or_type!r}; use a task type or one of "
        f"{[*_PRIMARY, *KINDS]}"
    )
