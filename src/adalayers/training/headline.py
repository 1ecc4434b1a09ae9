"""The one line a person reads at the end of ``adalayers train``: the score on the held-out
split beside the obvious baseline, so that a result reads right without knowing the metric.

For classification the baseline is always answering the training split's most frequent label
(``majority`` in ``metrics.json``); for token tasks it is tagging every word ``O``, which finds
no entity (entity F1 0). Fractions print as percentages, correlations as they are.
"""

from __future__ import annotations

from typing import Any

from adalayers.core.kinds import kind_of

PERCENT = {
    "accuracy",
    "f1",
    "f1_macro",
    "f1_positive",
    "precision",
    "recall",
    "micro_f1",
    "macro_f1",
    "exact_match",
}
NAMES = {
    "mcc": "Matthews correlation",
    "f1": "entity F1",
    "f1_macro": "macro F1",
    "f1_positive": "F1 of the positive class",
    "pearson": "Pearson correlation",
    "spearman": "Spearman correlation",
    "micro_f1": "micro F1",
    "macro_f1": "macro F1",
    "exact_match": "exact match",
}


def _per_token(results: dict[str, Any]) -> bool:
    try:
        return kind_of(str(results.get("task_type"))).per_token
    except ValueError:
        return False


def _value(metric: str, value: float) -> str:
    return f"{100 * value:.1f}%" if metric in PERCENT else f"{value:.3f}"


def headline(results: dict[str, Any], run: str) -> str:
    """``results`` as :func:`adalayers.training.train.fit` returns them -> one or two lines."""
    split = "test" if results.get("test") else "validation"
    scores = results.get(split) or {}
    metric = results.get("metric")
    if metric not in scores:
        return f"{results.get('task')}: trained; the run is in {run}"
    name = NAMES.get(metric, metric)
    line = (
        f"{results['task']} on {results['base']}: {split} {name} {_value(metric, scores[metric])}"
    )
    majority = scores.get("majority")
    if isinstance(majority, dict) and metric in majority:
        line += f" (always answering {majority['label']!r}: {_value(metric, majority[metric])})"
        if metric != "accuracy" and "accuracy" in scores and "accuracy" in majority:
            line += (
                f"; accuracy {_value('accuracy', scores['accuracy'])} "
                f"(always {majority['label']!r}: {_value('accuracy', majority['accuracy'])})"
            )
    elif _per_token(results) and metric == "f1":  # tagging every word O finds no entity
        line += " (tagging every word O: 0.0%)"
    probe = results.get("probe")
    if isinstance(probe, dict) and probe.get("head_beats_probe") is False:
        line += (
            f"\nnote: a linear probe on state {probe['state']} alone scores "
            f"{_value(metric, probe['validation'])} on validation, level with or above the trained "
            f"head's {_value(metric, probe['head_validation'])}: with this data the mixer and "
            f"head add nothing over it"
        )
    added = results.get("percent_of_base")
    tail = f"\nthe task adds {added:.2f}% to the base's parameters; " if added else "\n"
    return line + tail + f"run folder: {run} (adalayers predict {run} --text ...)"
