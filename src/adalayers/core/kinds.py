"""Task kinds: everything that depends on what a task predicts, in one place.

A task's ``task_type`` (the string its ``config.json`` saves) names a :class:`TaskKind` in
:data:`KINDS`; ``Task.kind``, ``TaskConfig.kind`` and ``TaskData.kind`` return it. The kind owns

* the label space: how many outputs the head has, which label lists are valid, an example's
  label as a data file holds it -> as the task data keep it -> the targets of a batch
  (``IGNORE_INDEX`` where a token carries no label);
* the loss on ``(logits, targets)``;
* the head it builds (:class:`~adalayers.core.heads.SequenceHead` or
  :class:`~adalayers.core.heads.TokenHead`) and the ``transformers`` head that fine-tuning uses;
* decoding: ``head.decoding`` (``argmax`` or ``bio`` for token tasks; the others refuse ``bio``);
* postprocessing, :meth:`TaskKind.postprocess`: the logits of one input -> the prediction dict
  that every entry point returns (``AdaLayers.predict``, ``attach().predictions()``, the HTTP
  server, engine integrations); evaluation reads the same decisions (:meth:`TaskKind.predict`);
* its metrics: their names, the primary one, computing them (the pure functions of
  :mod:`adalayers.core.metrics`).

Nothing outside this module compares ``task_type`` strings: it asks the kind (``kind.per_token``,
``kind.has_labels``, ``kind.loss(...)``, ...).

**Adding a kind touches this file only**: a subclass of :class:`TaskKind` and its entry in
:data:`KINDS`. Settings of its own (a multi-label task's thresholds) go in ``TaskConfig.options``
(a run config's ``task.options``), which the kind checks (:meth:`TaskKind.check_options`) and
the task saves; a kind that learns them on the validation split at the end of training says so
with ``calibrates`` and :meth:`TaskKind.calibrate`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from adalayers.core.decoding import AUTO, check_iob2, decode_words, follows_iob2, is_iob2
from adalayers.core.encoding import IGNORE_INDEX
from adalayers.core.heads import HeadConfig, SequenceHead, TokenHead


class LabelledTask(Protocol):
    """What a kind reads of a task: a :class:`~adalayers.core.task.Task` or its
    :class:`~adalayers.core.task.TaskConfig`."""

    @property
    def labels(self) -> list[str]: ...

    @property
    def decoding(self) -> str: ...

    @property
    def options(self) -> Mapping[str, Any]: ...


def _metrics() -> Any:
    """:mod:`adalayers.core.metrics` (scikit-learn, SciPy, seqeval), imported when first needed:
    loading a task to serve it needs none of them."""
    from adalayers.core import metrics

    return metrics


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of (..., C) logits against label ids, ``IGNORE_INDEX`` left out."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),  # (N, C)
        targets.reshape(-1),  # (N,)
        ignore_index=IGNORE_INDEX,
    )


class TaskKind:
    """What a task type means: labels, loss, head, decoding, predictions and metrics.

    One instance per kind lives in :data:`KINDS`. Methods that need a task's labels, decoding or
    options take it as ``task`` (a :class:`~adalayers.core.task.Task` or a
    :class:`~adalayers.core.task.TaskConfig`).

    Attributes:
        name: the ``task_type`` string saved in a task's ``config.json``.
        per_token: a prediction per token (word) rather than per input.
        has_labels: the task has label names (regression has none).
        reads_pairs: the task may read sentence pairs (``text``, ``text_pair``).
        stratify: the validation split held out of a training file keeps the label proportions.
        label_type: the Python type of one example's label in the task data (``str``: a name,
            ``float``: a value, ``list``: names); a token task's data hold ``tags`` instead.
        label_may_be_empty: an example may have no label at all (an empty CSV label cell).
        calibrates: :meth:`calibrate` learns options on the validation split after training.
        metrics: the metrics it offers (``task.metrics`` chooses among them).
        primary_metric: the one that selects the best epoch unless the config names another.
        head_class: the head it builds on the mixed features.
    """

    name: ClassVar[str] = ""
    per_token: ClassVar[bool] = False
    has_labels: ClassVar[bool] = True
    reads_pairs: ClassVar[bool] = True
    stratify: ClassVar[bool] = False
    label_type: ClassVar[type] = str
    label_may_be_empty: ClassVar[bool] = False
    calibrates: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]] = ()
    primary_metric: ClassVar[str] = ""
    head_class: ClassVar[type[nn.Module]] = SequenceHead

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- the label space -------------------------------------------------------------------
    def num_outputs(self, labels: Sequence[str]) -> int:
        """Outputs of the head for these labels."""
        return len(labels)

    def check_labels(self, labels: Sequence[str]) -> None:
        """Raise a ``ValueError`` unless ``labels`` is a valid label list for this kind."""
        if len(labels) < 2:
            raise ValueError(f"a {self.name} task needs at least 2 label names, got {list(labels)}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"label names must be distinct, got {list(labels)}")

    def check_options(self, options: Mapping[str, Any], labels: Sequence[str]) -> dict[str, Any]:
        """``TaskConfig.options`` checked and completed (a ``ValueError`` names the key).

        The kinds without options refuse any.
        """
        if options:
            raise ValueError(f"options: a {self.name} task takes no options, got {sorted(options)}")
        return {}

    def label_ids(self, labels: Sequence[str], names: Iterable[str]) -> list[int]:
        """Label names -> ids; an unknown name raises a ``ValueError`` listing the known ones."""
        index = {name: i for i, name in enumerate(labels)}
        ids = []
        for name in names:
            if name not in index:
                raise ValueError(f"label {name!r} is not one of this task's labels {list(labels)}")
            ids.append(index[name])
        return ids

    def parse_label(self, value: Any, where: str, name_of: Callable[[Any], str], text: bool) -> Any:
        """One example's label as a data file holds it -> as the task data keep it.

        Args:
            value: the value in the file (a CSV cell, a JSON value).
            where: the file and line, for error messages.
            name_of: maps a raw label (a name, or a number standing for one) to its name and
                raises a ``ValueError`` for one outside the label set.
            text: the value is a CSV / TSV cell (always a string).
        """
        return name_of(value)

    def names_in(self, label: Any) -> list[str]:
        """The label names an example's label (as the task data keep it) holds."""
        return [label]

    def targets(self, task: LabelledTask, labels: Sequence[Any]) -> list[Any]:
        """Examples' labels (as the task data keep them) -> their targets, one per example as a
        tokenised split stores them (a label id; token tasks: one id per word)."""
        return self.label_ids(task.labels, labels)

    def batch_targets(self, rows: Sequence[Any], width: int) -> torch.Tensor:
        """The stored targets of a batch -> one tensor; ``width`` is the batch's token length."""
        return torch.tensor(list(rows))  # (B,)

    # -- training --------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The task loss of a batch (without the mixer's regularisation)."""
        raise NotImplementedError

    def build_head(self, dim: int, labels: Sequence[str], config: HeadConfig) -> nn.Module:
        """A fresh head on ``dim`` mixed features."""
        return self.head_class(dim, self.num_outputs(labels), config)

    def finetune_head(self, labels: Sequence[str]) -> tuple[type, dict[str, Any]]:
        """The ``transformers`` auto class that fine-tuning loads, and its head's arguments."""
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification, _named_outputs(labels)

    # -- decoding --------------------------------------------------------------------------
    def resolve_decoding(
        self,
        decoding: str,
        labels: Sequence[str],
        sequences: Iterable[Sequence[str]] | None = None,
    ) -> str:
        """``head.decoding`` with ``auto`` resolved (``argmax`` but for token tasks)."""
        return "argmax" if decoding == AUTO else decoding

    def check_decoding(self, decoding: str, labels: Sequence[str]) -> None:
        """Raise a ``ValueError`` unless ``decoding`` suits this kind and these labels."""
        if decoding == "bio":
            raise ValueError(
                f"head.decoding=bio is for token-classification tasks; this task is "
                f"{self.name}: remove the setting"
            )

    # -- predictions -----------------------------------------------------------------------
    def postprocess(
        self,
        task: LabelledTask,
        logits: torch.Tensor,
        *,
        words: Sequence[str] | None = None,
        tokens: Sequence[Any] | None = None,
    ) -> dict[str, Any]:
        """The prediction for one input from its logits: (C,) for an input, (T, C) for the
        words (or tokens) of a token task, which are named in the result.

        Every entry point calls this: ``AdaLayers.predict``, ``attach().predictions()``, the
        server, and engine integrations that hold one row of logits.
        """
        raise NotImplementedError

    def predict(self, task: LabelledTask, logits: torch.Tensor) -> torch.Tensor:
        """The decisions of :meth:`postprocess` for (N, C) logits, in the form of the targets
        (what evaluation scores)."""
        raise NotImplementedError(f"{self.name} tasks are decoded per word, not per input")

    def named(self, task: LabelledTask, values: Sequence[Any]) -> list[Any]:
        """Targets or :meth:`predict` decisions (as lists) -> the labels of prediction records."""
        return [task.labels[int(i)] for i in values]

    def calibrate(
        self, task: LabelledTask, logits: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, Any]:
        """The task's options, learnt from the validation split's (N, C) logits and targets at
        the end of training (only called where :attr:`calibrates`)."""
        return dict(task.options)

    # -- metrics ---------------------------------------------------------------------------
    def usable_metrics(self, labels: Sequence[str]) -> tuple[str, ...]:
        """The metrics a task with these labels can report."""
        return self.metrics

    def check_metrics(
        self, names: Sequence[str] | None, labels: Sequence[str] = ()
    ) -> tuple[str, ...]:
        """``names`` (``task.metrics``) checked against this kind and labels, or (``None``) all
        of its usable metrics.

        Raises:
            ValueError: a metric of another kind; the message names ``task.metrics`` and the
                choices.
        """
        usable = self.usable_metrics(labels)
        if names is None:
            return tuple(usable)
        for name in names:
            if name not in usable:
                raise ValueError(
                    f"task.metrics: {name!r} is not a metric of a {self.name} task; choose from "
                    f"{list(usable)}"
                )
        return tuple(names)

    def compute_metrics(
        self,
        y_true: Sequence[Any],
        y_pred: Sequence[Any],
        *,
        names: Sequence[str] | None = None,
        positive: Any = None,
    ) -> dict[str, Any]:
        """The metrics of gold targets and predictions (token tasks: tag lists) as a flat dict
        of floats (token tasks keep a nested ``per_type`` table).

        Args:
            names: only these metrics, in this order; default all of the kind's.
            positive: two-label classification: the positive label of ``f1_positive``.

        Raises:
            ValueError: an unknown metric, or mismatched / empty inputs.
        """
        result = self._all_metrics(y_true, y_pred)
        if names is None:
            return result
        kept = {name: result[name] for name in self.check_metrics(names)}
        return {**kept, **{k: v for k, v in result.items() if k == "per_type"}}

    def _all_metrics(self, y_true: Sequence[Any], y_pred: Sequence[Any]) -> dict[str, Any]:
        raise NotImplementedError

    def positive_id(self, labels: Sequence[str], positive_label: str | None) -> int | None:
        """The id of a two-label classification's positive class (``task.positive_label``,
        default the second label); ``None`` for other tasks, which refuse the setting."""
        if positive_label is not None:
            raise ValueError(
                f"task.positive_label={positive_label!r} is for two-label classification; "
                f"this task has labels {list(labels)}: remove the setting"
            )
        return None

    def tables(
        self,
        task: LabelledTask,
        y_true: Sequence[Any],
        y_pred: Sequence[Any],
        *,
        names: Sequence[str] | None,
        positive: Any,
        train_labels: Iterable[Any],
    ) -> dict[str, Any]:
        """Tables reported beside the metrics of a split (``majority``, ``confusion_matrix``)."""
        return {}

    # -- the layer probe (training-free ridge regression on one state) ------------------------
    def probe_targets(self, targets: torch.Tensor, num_outputs: int) -> torch.Tensor:
        """Targets (N,) or (N, C) -> the (N, K) regression targets of the layer probe."""
        return F.one_hot(targets.long(), num_outputs).double()

    def probe_score(self, predicted: torch.Tensor, targets: torch.Tensor) -> float:
        """The probe's held-out quality from its (n, K) outputs and :meth:`probe_targets`."""
        return float((predicted.argmax(-1) == targets.argmax(-1)).double().mean())


def _named_outputs(labels: Sequence[str]) -> dict[str, Any]:
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


class SequenceClassification(TaskKind):
    """One label per input (or sentence pair), a softmax over the labels.

    Loss: cross entropy. Prediction: ``{"label": name, "score": p}``, the most likely label and
    its softmax probability. Metrics: accuracy (primary), macro F1, F1 of the positive class
    (two labels), Matthews correlation.
    """

    name = "sequence_classification"
    stratify = True
    metrics = ("accuracy", "f1_macro", "f1_positive", "mcc")
    primary_metric = "accuracy"

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _cross_entropy(logits, targets)  # logits (B, C), targets (B,)

    def postprocess(
        self,
        task: LabelledTask,
        logits: torch.Tensor,
        *,
        words: Sequence[str] | None = None,
        tokens: Sequence[Any] | None = None,
    ) -> dict[str, Any]:
        score, index = logits.float().softmax(-1).max(-1)  # () each
        return {"label": task.labels[int(index)], "score": score.item()}

    def predict(self, task: LabelledTask, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)  # (N,)

    def usable_metrics(self, labels: Sequence[str]) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if m != "f1_positive" or len(labels) == 2)

    def check_metrics(
        self, names: Sequence[str] | None, labels: Sequence[str] = ()
    ) -> tuple[str, ...]:
        if names is not None and "f1_positive" in names and len(labels) != 2:
            raise ValueError(
                f"task.metrics: f1_positive needs two labels, this task has {len(labels)}; "
                f"use f1_macro"
            )
        return super().check_metrics(names, labels)

    def compute_metrics(
        self,
        y_true: Sequence[Any],
        y_pred: Sequence[Any],
        *,
        names: Sequence[str] | None = None,
        positive: Any = None,
    ) -> dict[str, Any]:
        m = _metrics()
        if names is None:
            names = [name for name in self.metrics if name != "f1_positive" or positive is not None]
        scores = {
            "accuracy": lambda: m.accuracy(y_true, y_pred),
            "f1_macro": lambda: m.f1(y_true, y_pred, average="macro"),
            "f1_positive": lambda: m.f1(y_true, y_pred, average="binary", pos_label=positive),
            "mcc": lambda: m.matthews_corrcoef(y_true, y_pred),
        }
        unknown = [name for name in names if name not in scores]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown} of {self.name}; use {list(scores)}")
        if "f1_positive" in names and positive is None:
            raise ValueError("f1_positive needs the positive label of a two-label task")
        return {name: scores[name]() for name in names}

    def positive_id(self, labels: Sequence[str], positive_label: str | None) -> int | None:
        labels = list(labels)
        if len(labels) != 2:
            return super().positive_id(labels, positive_label)
        if positive_label is None:
            return 1
        if positive_label not in labels:
            raise ValueError(
                f"task.positive_label={positive_label!r} is not one of the labels {labels}"
            )
        return labels.index(positive_label)

    def tables(
        self,
        task: LabelledTask,
        y_true: Sequence[Any],
        y_pred: Sequence[Any],
        *,
        names: Sequence[str] | None,
        positive: Any,
        train_labels: Iterable[Any],
    ) -> dict[str, Any]:
        """``majority``: the metrics of always answering the training split's most frequent
        label (ties: the first in label order); ``confusion_matrix``: rows gold, columns
        predicted."""
        labels = list(task.labels)
        counts = Counter(train_labels)
        majority = max(labels, key=lambda name: (counts[name], -labels.index(name)))
        always = [labels.index(majority)] * len(y_true)
        return {
            "majority": {
                "label": majority,
                **self.compute_metrics(y_true, always, names=names, positive=positive),
            },
            "confusion_matrix": {
                "labels": labels,
                "counts": _metrics().confusion_matrix(y_true, y_pred, len(labels)),
            },
        }


class Regression(TaskKind):
    """One number per input (or sentence pair).

    Loss: mean squared error. Prediction: ``{"value": y}``. Metrics: Pearson (primary) and
    Spearman correlation.
    """

    name = "regression"
    has_labels = False
    label_type = float
    metrics = ("pearson", "spearman")
    primary_metric = "pearson"

    def num_outputs(self, labels: Sequence[str]) -> int:
        return 1

    def check_labels(self, labels: Sequence[str]) -> None:
        if labels:
            raise ValueError(f"a regression task has no labels, got {list(labels)}")

    def parse_label(
        self, value: Any, where: str, name_of: Callable[[Any], str], text: bool
    ) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"label {value!r} in {where} is not a number") from None

    def names_in(self, label: Any) -> list[str]:
        return []

    def targets(self, task: LabelledTask, labels: Sequence[Any]) -> list[float]:
        return [float(v) for v in labels]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(logits.squeeze(-1).float(), targets.float())  # (B,) against (B,)

    def finetune_head(self, labels: Sequence[str]) -> tuple[type, dict[str, Any]]:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification, {"num_labels": 1, "problem_type": "regression"}

    def postprocess(
        self,
        task: LabelledTask,
        logits: torch.Tensor,
        *,
        words: Sequence[str] | None = None,
        tokens: Sequence[Any] | None = None,
    ) -> dict[str, Any]:
        return {"value": logits.float()[0].item()}

    def predict(self, task: LabelledTask, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 0]  # (N,)

    def named(self, task: LabelledTask, values: Sequence[Any]) -> list[Any]:
        return list(values)

    def _all_metrics(self, y_true: Sequence[Any], y_pred: Sequence[Any]) -> dict[str, Any]:
        return _metrics().pearson_spearman(y_true, y_pred)

    def probe_targets(self, targets: torch.Tensor, num_outputs: int) -> torch.Tensor:
        return targets.double()[:, None]  # (N, 1)

    def probe_score(self, predicted: torch.Tensor, targets: torch.Tensor) -> float:
        pair = torch.stack([predicted[:, 0], targets[:, 0]])  # (2, n)
        return float(torch.corrcoef(pair)[0, 1])


class TokenClassification(TaskKind):
    """A tag per word (the first sub-token of each word carries it; the others are ignored).

    Loss: cross entropy over the labelled tokens. Prediction: ``{"words" | "tokens", "labels",
    "scores"}``, each word's tag as ``head.decoding`` reads the scores (``argmax``, or ``bio``:
    the best valid IOB2 sequence) and its probability. Metrics: entity precision, recall, F1
    (primary) the conlleval way, and token accuracy.
    """

    name = "token_classification"
    per_token = True
    reads_pairs = False
    label_type = list
    metrics = ("precision", "recall", "f1", "accuracy")
    primary_metric = "f1"
    head_class = TokenHead

    def targets(self, task: LabelledTask, labels: Sequence[Any]) -> list[list[int]]:
        """Each example's tags -> its tag ids, one per word (aligned to tokens later)."""
        return [self.label_ids(task.labels, tags) for tags in labels]

    def batch_targets(self, rows: Sequence[Any], width: int) -> torch.Tensor:
        return torch.tensor([list(row) + [IGNORE_INDEX] * (width - len(row)) for row in rows])

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _cross_entropy(logits, targets)  # logits (B, T, C), targets (B, T)

    def finetune_head(self, labels: Sequence[str]) -> tuple[type, dict[str, Any]]:
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification, _named_outputs(labels)

    def resolve_decoding(
        self,
        decoding: str,
        labels: Sequence[str],
        sequences: Iterable[Sequence[str]] | None = None,
    ) -> str:
        """``auto`` is ``bio`` where the tags are IOB2 and ``sequences`` (gold tag sequences, if
        at hand) follow it: tags that break IOB2's order (IOB1, where ``I-X`` may open an
        entity) keep ``argmax``, whose tags they are scored against."""
        if decoding != AUTO:
            return decoding
        if not is_iob2(labels):
            return "argmax"
        return "bio" if sequences is None or follows_iob2(sequences) else "argmax"

    def check_decoding(self, decoding: str, labels: Sequence[str]) -> None:
        if decoding == "bio":
            check_iob2(labels)

    def postprocess(
        self,
        task: LabelledTask,
        logits: torch.Tensor,
        *,
        words: Sequence[str] | None = None,
        tokens: Sequence[Any] | None = None,
    ) -> dict[str, Any]:
        """``logits`` (W, C) of the words (``words``) or of the tokens (``tokens``)."""
        tags, scores = decode_words(logits, task.labels, task.decoding)
        pieces = {"words": words} if words is not None else {"tokens": tokens}
        return {**pieces, "labels": [task.labels[j] for j in tags], "scores": scores}

    def named(self, task: LabelledTask, values: Sequence[Any]) -> list[Any]:
        return list(values)  # tag lists already

    def _all_metrics(self, y_true: Sequence[Any], y_pred: Sequence[Any]) -> dict[str, Any]:
        return _metrics().ner_scores(y_true, y_pred)


class MultiLabelClassification(TaskKind):
    """Any number of labels per input (or sentence pair), a sigmoid per label.

    Loss: binary cross entropy with logits on multi-hot targets. Prediction: ``{"labels": [the
    names whose probability reaches their threshold], "scores": {name: probability}}``.

    Options (``task.options``, saved with the task): ``thresholds``, one number for every label
    or a list with one per label (default 0.5); ``tune_thresholds`` (default: true unless
    ``thresholds`` is given): at the end of training each label's threshold becomes the one that
    maximises that label's F1 on the validation split (:func:`best_thresholds`), and predictions
    and serving use it. Metrics: micro F1 (primary), macro F1, exact match (subset accuracy).

    Data: a JSONL label is a list of names (``[]``: none applies), a CSV label cell names joined
    by ``|`` (empty: none applies).
    """

    name = "multilabel_classification"
    label_type = list
    label_may_be_empty = True
    calibrates = True
    metrics = ("f1_micro", "f1_macro", "exact_match")
    primary_metric = "f1_micro"
    SEPARATOR: ClassVar[str] = "|"
    OPTIONS: ClassVar[tuple[str, ...]] = ("thresholds", "tune_thresholds")

    def check_options(self, options: Mapping[str, Any], labels: Sequence[str]) -> dict[str, Any]:
        """``{"thresholds": [one per label], "tune_thresholds": bool}``.

        Raises:
            ValueError: an unknown key, a threshold outside [0, 1] or not a number, or a list
                of thresholds whose length is not the number of labels.
        """
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(
                f"options: unknown key(s) {unknown} of a {self.name} task; use {list(self.OPTIONS)}"
            )
        raw = options.get("thresholds", 0.5)
        values = raw if isinstance(raw, list) else [raw] * len(labels)
        if len(values) != len(labels):
            raise ValueError(
                f"options.thresholds has {len(values)} values for the {len(labels)} labels "
                f"{list(labels)}: give one per label, or one number for all"
            )
        thresholds = []
        for value in values:
            number = not isinstance(value, bool) and isinstance(value, (int, float))
            if not number or not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(
                    f"options.thresholds: {value!r} is not a probability threshold (a number "
                    f"from 0 to 1)"
                )
            thresholds.append(float(value))
        tune = options.get("tune_thresholds", "thresholds" not in options)
        if not isinstance(tune, bool):
            raise ValueError(f"options.tune_thresholds must be true or false, got {tune!r}")
        return {"thresholds": thresholds, "tune_thresholds": tune}

    def _thresholds(self, task: LabelledTask) -> list[float]:
        return list(task.options.get("thresholds") or [0.5] * len(task.labels))

    def parse_label(
        self, value: Any, where: str, name_of: Callable[[Any], str], text: bool
    ) -> list[str]:
        """A list of names (JSON) or names joined by ``|`` (a CSV / TSV cell) -> the names."""
        if text:
            items: list[Any] = value.split(self.SEPARATOR) if value.strip() else []
            items = [item.strip() for item in items]
            if any(not item for item in items):
                raise ValueError(
                    f"{where}: label cell {value!r} has an empty name; join a multi-label "
                    f"example's label names with '{self.SEPARATOR}', e.g. 'sports|politics'"
                )
        elif isinstance(value, list):
            items = value
            bad = [v for v in items if isinstance(v, bool) or not isinstance(v, (str, int))]
            if bad:
                raise ValueError(
                    f"{where}: a multi-label label must be a list of label names, got {value!r}"
                )
        else:
            raise ValueError(
                f"{where}: the label of a multi-label example must be a list of label names "
                f'(JSONL: "label": ["a", "b"], or [] for none), got {value!r}'
            )
        names = [name_of(item) for item in items]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"{where}: label(s) {twice} listed twice in {value!r}")
        return names

    def names_in(self, label: Any) -> list[str]:
        return list(label)

    def targets(self, task: LabelledTask, labels: Sequence[Any]) -> list[list[float]]:
        """Each example's label names -> a multi-hot row (1.0 where the label applies)."""
        out = []
        for names in labels:
            row = [0.0] * len(task.labels)
            for i in self.label_ids(task.labels, names):
                row[i] = 1.0
            out.append(row)
        return out

    def batch_targets(self, rows: Sequence[Any], width: int) -> torch.Tensor:
        return torch.tensor(list(rows), dtype=torch.float32)  # (B, C)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())  # (B, C)

    def finetune_head(self, labels: Sequence[str]) -> tuple[type, dict[str, Any]]:
        from transformers import AutoModelForSequenceClassification

        extra = {"problem_type": "multi_label_classification"}
        return AutoModelForSequenceClassification, {**_named_outputs(labels), **extra}

    def postprocess(
        self,
        task: LabelledTask,
        logits: torch.Tensor,
        *,
        words: Sequence[str] | None = None,
        tokens: Sequence[Any] | None = None,
    ) -> dict[str, Any]:
        probs = logits.float().sigmoid().tolist()  # (C,)
        chosen = zip(task.labels, probs, self._thresholds(task))
        return {
            "labels": [name for name, p, t in chosen if p >= t],
            "scores": dict(zip(task.labels, probs)),
        }

    def predict(self, task: LabelledTask, logits: torch.Tensor) -> torch.Tensor:
        # float64 thresholds: the comparison is the one postprocess makes on Python floats
        probs = logits.float().sigmoid().double()  # (N, C)
        thresholds = torch.tensor(self._thresholds(task), dtype=torch.float64, device=probs.device)
        return (probs >= thresholds).long()  # (N, C)

    def named(self, task: LabelledTask, values: Sequence[Any]) -> list[Any]:
        return [[name for name, on in zip(task.labels, row) if on] for row in values]

    def calibrate(
        self, task: LabelledTask, logits: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, Any]:
        options = dict(task.options)
        if not options.get("tune_thresholds", True):
            return options
        probs = logits.float().sigmoid().double().cpu()  # (N, C)
        options["thresholds"] = best_thresholds(probs, targets.cpu() > 0.5, self._thresholds(task))
        return options

    def _all_metrics(self, y_true: Sequence[Any], y_pred: Sequence[Any]) -> dict[str, Any]:
        return _metrics().multilabel_scores(y_true, y_pred)

    def probe_targets(self, targets: torch.Tensor, num_outputs: int) -> torch.Tensor:
        return targets.double()  # (N, C) multi-hot

    def probe_score(self, predicted: torch.Tensor, targets: torch.Tensor) -> float:
        return _metrics().multilabel_scores(targets > 0.5, predicted >= 0.5)["f1_micro"]


def best_thresholds(
    probs: torch.Tensor, gold: torch.Tensor, start: Sequence[float], max_candidates: int = 512
) -> list[float]:
    """Per label, the threshold that maximises that label's F1 on validation data.

    For label ``j`` the candidates are the midpoints between its sorted distinct probabilities
    (at most ``max_candidates``, taken at quantiles), one below the smallest, and ``start[j]``;
    an example is predicted positive where ``p >= t``. Ties go to the candidate closest to
    ``start[j]``. A label with no positive example keeps ``start[j]``.

    Args:
        probs: (N, C) probabilities.
        gold: (N, C) bool, where each label applies.
        start: the current thresholds, one per label.

    Returns:
        C thresholds.
    """
    out = []
    for j, default in enumerate(start):
        p, g = probs[:, j].double(), gold[:, j].bool()  # (N,) each
        if not g.any():
            out.append(float(default))
            continue
        values = torch.unique(p)  # sorted
        if len(values) > max_candidates:
            grid = torch.linspace(0, 1, max_candidates + 1, dtype=p.dtype)
            values = torch.unique(torch.quantile(p, grid))
        below, between = values[:1] / 2, (values[:-1] + values[1:]) / 2
        candidates = torch.cat([below, between, p.new_tensor([float(default)])])  # (M,)
        predicted = p[:, None] >= candidates[None, :]  # (N, M)
        tp = (predicted & g[:, None]).sum(0).double()  # (M,)
        fp = (predicted & ~g[:, None]).sum(0).double()  # (M,)
        fn = g.sum().double() - tp  # (M,)
        f1 = 2 * tp / (2 * tp + fp + fn)  # (M,), the denominator > 0: some gold positive
        best = (f1 == f1.max()).nonzero().flatten()
        pick = best[(candidates[best] - default).abs().argmin()]
        out.append(float(candidates[pick]))
    return out


KINDS: Mapping[str, TaskKind] = MappingProxyType(
    {
        kind.name: kind
        for kind in (
            SequenceClassification(),
            TokenClassification(),
            Regression(),
            MultiLabelClassification(),
        )
    }
)
"""Every task kind by its ``task_type`` name (read-only)."""


def kind_of(name: str) -> TaskKind:
    """The kind named ``name`` (a ``task_type``).

    Raises:
        ValueError: an unknown name; the message lists the known kinds.
    """
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task type {name!r}; the known kinds are {list(KINDS)}") from None
