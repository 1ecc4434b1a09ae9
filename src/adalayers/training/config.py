"""Run configuration: dataclasses (the single source of truth) loaded from YAML.

A config file has four sections::

    base: all-MiniLM-L6-v2          # hub id, local folder, or the embedded default
    data: {task: cola, max_length: 128}
    task: {mixer: {dim: 64, alpha: 64}, head: {num_heads: 8}}
    train: {epochs: 10, batch_size: 32, lr: 1.0e-4}

Unknown keys, values of the wrong type and contradictory settings raise a ``ValueError`` that
names the key (and the file). ``--set section.key=value`` overrides any value.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from adalayers.core._schema import build
from adalayers.core.backbone import DEFAULT_BASE
from adalayers.core.heads import HeadConfig
from adalayers.core.kinds import KINDS, kind_of
from adalayers.core.mixer import MixerConfig
from adalayers.training.tracking import TRACKERS


@dataclass
class DataConfig:
    """Which data to train on.

    Attributes:
        task: a benchmark (``imdb``, ``cola``, ``rte``, ``stsb``, ``conll2003``) or a user format
            (``csv``, ``jsonl``, ``conll``).
        data_dir: folder of the official files (else ``$ADALAYERS_DATA_DIR``, else the hub).
        files: user formats: split -> file (``train`` required; ``validation``/``test`` optional).
        columns: user formats: standard column (text, text_pair, label) -> column in the file.
        task_type: user formats: ``sequence_classification`` (default), ``regression`` or
            ``multilabel_classification`` (JSONL labels: lists of names; CSV: names joined by
            ``|``); ``conll`` files are ``token_classification``.
        name: the task's name in ``metrics.json``, the report and the logs (default:
            ``task``, e.g. ``csv``).
        label_names: user formats: the label set, in id order. A list of names: a label in
            the file that is one of them stays itself, an integer ``i`` stands for the i-th
            name (``[not_paraphrase, paraphrase]`` names the labels 0 and 1). A mapping from
            the value in the file to a name (``{0: not_paraphrase, 1: paraphrase}``). Labels
            outside the set are an error. Default: the sorted labels found (tags: ``O``
            first).
        max_length: tokens per input (longer inputs are truncated with a warning).
        limit: keep only the first N examples of each split (quick runs, tests).
        sample: keep a random N examples of each split, drawn with ``seed`` and kept in file
            order; an integer for every split or a mapping ``{train: N, test: M}`` (splits not
            named stay whole). Unlike ``limit`` it stays representative when a file is sorted
            (IMDB's files are sorted by label).
        seed: seed of the stratified validation split.
    """

    task: str = "cola"
    data_dir: str | None = None
    files: dict[str, str] | None = None
    columns: dict[str, str] | None = None
    task_type: str | None = None
    name: str | None = None
    label_names: list[str] | dict[str | int, str] | None = None
    max_length: int = 128
    limit: int | None = None
    sample: int | dict[str, int] | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        if self.name is not None and not self.name.strip():
            raise ValueError("data.name must not be empty; leave it out to use data.task")
        try:
            kind = None if self.task_type is None else kind_of(self.task_type)
        except ValueError as err:
            raise ValueError(f"data.task_type: {err}") from None
        if isinstance(self.label_names, dict):  # YAML reads `0: name` with an integer key
            self.label_names = {str(k): str(v) for k, v in self.label_names.items()}
        if self.label_names is not None:
            names = self.label_names
            names = names.values() if isinstance(names, dict) else names
            if len(set(names)) < 2:
                raise ValueError(
                    f"data.label_names needs at least 2 distinct names, got {self.label_names}"
                )
            if kind is not None and not kind.has_labels:
                raise ValueError(
                    f"data.label_names contradicts data.task_type={self.task_type}: set only one"
                )
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8, got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit must be >= 1, got {self.limit}")
        if self.limit is not None and self.sample is not None:
            raise ValueError("data.limit and data.sample contradict each other: set only one")
        sizes = self.sample if isinstance(self.sample, dict) else {"train": self.sample or 1}
        for split, size in sizes.items():
            if split not in ("train", "validation", "test"):
                raise ValueError(
                    f"data.sample names the split {split!r}; use train, validation or test"
                )
            if size < 1:
                raise ValueError(f"data.sample: {split} must be >= 1 examples, got {size}")


@dataclass
class TrainConfig:
    """How to train.

    Attributes:
        epochs: maximum number of epochs.
        batch_size: examples per optimiser step and process (before accumulation).
        eval_batch_size: examples per evaluation batch.
        lr: learning rate.
        weight_decay: decoupled weight decay (never applied to the layer weights ``p``).
        optimizer: ``adamw`` or ``adam``.
        lr_patience: epochs without improvement before the learning rate is halved.
        lr_factor: the factor of that decay.
        early_stopping: stop after this many epochs without improvement (0: never).
        early_stopping_min_delta: an epoch improves on the best only when its validation score
            is higher by more than this (in the metric's units, e.g. 0.005 MCC); the best
            epoch kept and the patience both follow it, as in Keras' ``EarlyStopping``. 0: any
            increase counts. On a small validation set, where one example moves the score by
            about 0.001, a small positive value keeps near-ties from deciding the run.
        grad_clip: clip the gradient norm to this (0: no clipping).
        grad_accumulation: optimiser step every N batches.
        mixed_precision: ``no``, ``fp16`` or ``bf16``: autocast the forward through Accelerate
            (CUDA: both; CPU: ``bf16`` only, fast where the CPU has AVX-512 BF16 or AMX; ``fp16``
            on a CPU trains in float32 with a warning). Weights and optimiser stay float32.
        seed: seed for initialisation and data order.
        metric: validation metric for model selection (default: the task's primary metric).
        checkpoint_every: also checkpoint every N optimiser steps within an epoch (0: per epoch).
        cache: train from a stored cache of the frozen hidden states (see the ``cache``
            section); epochs then never run the base.
        log_every_seconds: where progress bars are off (stderr is not a terminal), log a
            progress line this often during an epoch: step, examples per second, elapsed
            time and an estimate of what is left (0: never). A cache build logs such a line
            every 30 seconds.
        report_to: experiment trackers, through Accelerate's: ``tensorboard``, ``mlflow``,
            ``wandb``, ``comet_ml``, ``aim``, ``clearml``, ``dvclive``, ``swanlab``,
            ``trackio``. Each epoch logs the loss, the validation metrics, the learning rate
            and the layer distribution p~; they write under ``RUN/trackers/``
            (:mod:`adalayers.training.tracking`). Default: none.
        size_defaults: user data (``data.task: csv | jsonl | conll``): choose the settings
            the config leaves out by the size of the training set
            (:mod:`adalayers.training.size_defaults`); ``false`` keeps the plain defaults.
    """

    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr_patience: int = 5
    lr_factor: float = 0.5
    early_stopping: int = 10
    early_stopping_min_delta: float = 0.0
    grad_clip: float = 1.0
    grad_accumulation: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    metric: str | None = None
    checkpoint_every: int = 0
    cache: bool = False
    log_every_seconds: float = 30.0
    report_to: list[str] = field(default_factory=list)
    size_defaults: bool = True

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "eval_batch_size", "grad_accumulation"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"train.lr_factor must be in (0, 1), got {self.lr_factor}")
        for key in (
            "weight_decay",
            "lr_patience",
            "early_stopping",
            "early_stopping_min_delta",
            "grad_clip",
            "checkpoint_every",
            "log_every_seconds",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        unknown = [name for name in self.report_to if name not in TRACKERS]
        if unknown:
            raise ValueError(
                f"train.report_to: unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)}"
            )
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"train.report_to names a tracker twice: {self.report_to}")


@dataclass
class CacheConfig:
    """The frozen-feature cache (used when ``train.cache`` is true, and by ``adalayers cache``).

    Attributes:
        dir: where stores live (default ``$ADALAYERS_CACHE_DIR`` or ``~/.cache/adalayers``).
        dtype: storage precision: ``float16``, ``bfloat16``, ``int8`` (per-row scale) or
            ``float32``.
        layers: which hidden states to store: ``null`` for the mixer's layers (all by
            default), or an integer N to keep the N best states by a training-free probe (the
            mixer is then restricted to them).
        probe_examples: training examples the probe reads.
        chunk_examples: examples per checksummed chunk (the unit of resuming).
        splits: splits to cache (the others are evaluated online).
        all_layers: store every hidden state even when the mixer reads fewer, so runs that
            read different layers of the same data share one store (e.g. the single-layer
            sweep of ``adalayers compare``); each run reads only its own layers from it.
    """

    dir: str | None = None
    dtype: Literal["float16", "bfloat16", "int8", "float32"] = "float16"
    layers: int | None = None
    probe_examples: int = 2000
    chunk_examples: int = 1024
    splits: list[str] = field(default_factory=lambda: ["train", "validation"])
    all_layers: bool = False

    def __post_init__(self) -> None:
        if self.all_layers and self.layers is not None:
            raise ValueError(
                "cache.all_layers and cache.layers contradict each other (store every state, "
                "or the N best): set only one"
            )
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"cache.layers must be >= 1, got {self.layers}")
        if self.probe_examples < 10 or self.chunk_examples < 1:
            raise ValueError("cache.probe_examples must be >= 10 and cache.chunk_examples >= 1")
        unknown = [s for s in self.splits if s not in ("train", "validation", "test")]
        if unknown:
            raise ValueError(f"cache.splits: unknown split(s) {unknown}")


@dataclass
class TaskSection:
    """The task's model: the layer mixer and the head (labels come from the data), and what
    its results report.

    Attributes:
        mixer: the layer mixer.
        head: the task head.
        metrics: the metrics ``metrics.json``, ``history.jsonl`` and the report give, e.g.
            ``[accuracy, f1_positive]`` (GLUE's MRPC and QQP) or ``[mcc]`` (CoLA): of a
            classification ``accuracy``, ``f1_macro``, ``f1_positive`` (F1 of the positive
            class, two labels only) and ``mcc``; of a regression ``pearson`` and
            ``spearman``; of a token task ``precision``, ``recall``, ``f1`` (entities) and
            ``accuracy`` (tokens); of a multi-label task ``f1_micro``, ``f1_macro`` and
            ``exact_match`` (subset accuracy). The first is the primary metric (model
            selection and the headline) unless ``train.metric`` names another of them.
            Default: all of the task type's (``f1_positive`` where there are two labels), and
            its usual primary.
        positive_label: two-label tasks: the label whose F1 is ``f1_positive`` (default: the
            second label, e.g. ``1``, ``positive``, ``paraphrase``).
        options: settings of the task kind's own, checked by the kind when the task is built
            and saved with it; a ``multilabel_classification`` task takes ``thresholds`` (one
            number, or one per label; default 0.5) and ``tune_thresholds`` (default: true unless
            ``thresholds`` is given: at the end of training each label's threshold is set to
            maximise its F1 on validation). The other kinds take none.
    """

    mixer: MixerConfig = field(default_factory=MixerConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    metrics: list[str] | None = None
    positive_label: str | None = None
    options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.metrics is not None:
            known = sorted({name for kind in KINDS.values() for name in kind.metrics})
            unknown = [name for name in self.metrics if name not in known]
            if unknown or not self.metrics:
                raise ValueError(
                    f"task.metrics: unknown or no metric(s) {unknown}; choose from {known}"
                )
            if len(set(self.metrics)) != len(self.metrics):
                raise ValueError(f"task.metrics names a metric twice: {self.metrics}")


@dataclass
class SearchRange:
    """The values ``adalayers tune`` tries for one setting: an entry of the ``tune`` section,
    e.g. ``task.mixer.alpha: {low: 1, high: 128, log: true}`` or
    ``task.mixer.dim: {choices: [32, 64, 128]}``.

    Attributes:
        low: the smallest value of a range (a number setting; an integer one takes integers).
        high: the largest value of the range, above ``low``.
        log: draw the range on a log scale (``low > 0``), e.g. for a learning rate.
        step: draw only ``low``, ``low + step``, ... (not with ``log``).
        choices: the values to choose from instead of a range (numbers, strings, booleans).
    """

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    def check(self, key: str, kind: Any) -> None:
        """Check the entry of setting ``key`` (of type ``kind``); an integer setting's range
        becomes integers.

        Raises:
            ValueError: naming ``tune.<key>``: choices and a range together, no choices, an
                empty range, a range for a setting that is not a number, ...
        """
        where = f"tune.{key}"
        ranged = self.low is not None or self.high is not None or self.step is not None
        if self.choices is not None:
            if ranged or self.log:
                raise ValueError(f"{where}: give choices or a range (low, high), not both")
            if not self.choices:
                raise ValueError(f"{where}: choices is empty; list the values to try")
            bad = [c for c in self.choices if not isinstance(c, (bool, int, float, str))]
            if bad:
                raise ValueError(f"{where}: choices must be numbers, strings or booleans: {bad}")
            if len({repr(c) for c in self.choices}) != len(self.choices):
                raise ValueError(f"{where}: choices lists a value twice: {self.choices}")
            return
        if kind not in (int, float):
            raise ValueError(f"{where}: {key} is not a number; list its values under choices")
        if self.low is None or self.high is None:
            raise ValueError(f"{where}: give low and high (a range), or choices")
        if not self.low < self.high:
            raise ValueError(
                f"{where}: the range [{self.low:g}, {self.high:g}] is empty; low must be below "
                f"high (to fix the setting instead, set it in its section)"
            )
        if self.log and self.low <= 0:
            raise ValueError(f"{where}: a log range needs low > 0, got {self.low:g}")
        if self.step is not None and (self.log or self.step <= 0):
            raise ValueError(f"{where}: step must be positive, and not given with log")
        if kind is int:
            for name in ("low", "high", "step"):
                value = getattr(self, name)
                if value is not None and not float(value).is_integer():
                    raise ValueError(f"{where}: {key} is an integer; {name} must be one too")
                if value is not None:
                    setattr(self, name, int(value))

    def values(self) -> list[Any]:
        """The values that bound the entry: its choices, or the ends of its range."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


SEARCHED = {"task.mixer": MixerConfig, "task.head": HeadConfig, "train": TrainConfig}
"""The sections whose settings ``tune`` may search."""


def setting_type(key: str) -> Any:
    """The type of the setting ``key`` (``task.mixer.alpha`` -> ``float``; ``Optional``
    left out), a setting of one of the :data:`SEARCHED` sections.

    Raises:
        ValueError: ``key`` is not such a setting (naming it).
    """
    section, _, name = key.rpartition(".")
    if section not in SEARCHED:
        raise ValueError(
            f"tune: {key!r} cannot be searched; tune searches the settings of "
            f"{', '.join(SEARCHED)} (e.g. task.mixer.alpha, train.lr)"
        )
    hints = typing.get_type_hints(SEARCHED[section])
    if name not in hints:
        close = difflib.get_close_matches(name, list(hints), n=1)
        hint = f" (did you mean {section}.{close[0]}?)" if close else ""
        raise ValueError(f"tune: {key!r} is not a setting of {section}{hint}")
    annotation = hints[name]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None -> X
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = options[0] if len(options) == 1 else annotation
    return annotation


@dataclass
class RunConfig:
    """A whole run.

    Attributes:
        base: the frozen base model (hub id, local folder, or ``all-MiniLM-L6-v2``).
        base_states: encoder-decoder bases: read ``encoder`` (default) or ``decoder`` states.
        gguf_file: load the base from this GGUF file inside ``base``.
        dtype: the base's weights dtype (``float32``, ``bfloat16``, ``float16``; default as stored).
        data: the data section.
        task: the mixer and head.
        train: the training section.
        cache: the frozen-feature cache section.
        tune: the search space of ``adalayers tune``: a setting of ``task.mixer``,
            ``task.head`` or ``train`` (dotted, e.g. ``task.mixer.alpha``) -> the values to try
            (:class:`SearchRange`). The other commands leave it aside.
    """

    base: str = DEFAULT_BASE
    base_states: Literal["encoder", "decoder"] | None = None
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskSection = field(default_factory=TaskSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    tune: dict[str, SearchRange] | None = None
    # the dotted keys the config file and --set gave (load_config), so that settings left out
    # can be chosen by the data's size (size_defaults); None: unknown (a config built in Python)
    given_keys: ClassVar[frozenset[str] | None] = None

    def __post_init__(self) -> None:
        metric, metrics = self.train.metric, self.task.metrics
        if metric is not None and metrics is not None and metric not in metrics:
            raise ValueError(
                f"train.metric={metric!r} is not one of task.metrics {metrics}: add it there "
                f"or choose one of them"
            )
        mixer = self.task.mixer
        if mixer.positional != "none" and mixer.max_positions < self.data.max_length:
            raise ValueError(
                f"task.mixer.max_positions={mixer.max_positions} must be >= "
                f"data.max_length={self.data.max_length} with positional "
                f"embeddings, or inputs would be cut silently"
            )
        for key, values in (self.tune or {}).items():
            values.check(key, setting_type(key))
            for value in values.values():  # the config takes each end (each choice)
                try:
                    with_settings(self, {key: value})
                except ValueError as err:
                    raise ValueError(f"tune.{key}: {value!r} is refused: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def with_settings(config: RunConfig, settings: Mapping[str, Any]) -> RunConfig:
    """``config`` with dotted settings changed (``{"task.mixer.alpha": 4.0}``) and no ``tune``
    section: one trial's config, checked as a config file is.

    Raises:
        ValueError: a value the config refuses (naming the key).
    """
    values = config.to_dict()
    values["tune"] = None
    for key, value in settings.items():
        *sections, name = key.split(".")
        target = values
        for section in sections:
            target = target[section]
        target[name] = value
    out = build(RunConfig, values)
    if config.given_keys is not None:
        out.given_keys = config.given_keys | set(settings)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return [part for part in key.strip().split(".") if part], value


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    data_dir: str | None = None,
) -> RunConfig:
    """Read a YAML config, apply ``--set`` overrides and ``--data-dir``, validate.

    Raises:
        FileNotFoundError: the config file does not exist.
        ValueError: invalid YAML, unknown keys, wrong types (naming the key and the file).
    """
    values: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
    for text in overrides or []:
        keys, value = parse_override(text)
        target = values
        for part in keys[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {text!r}: {part} is not a section")
        target[keys[-1]] = value
    if data_dir is not None:
        values.setdefault("data", {})["data_dir"] = str(data_dir)
    try:
        config = build(RunConfig, values)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    config.given_keys = given_keys(values)
    return config


def given_keys(values: Mapping[str, Any], prefix: str = "") -> frozenset[str]:
    """The dotted keys a config mapping sets (``{"train": {"lr": 1}}`` -> ``{"train",
    "train.lr"}``): a section counts as given, and so does every key in it."""
    out: set[str] = set()
    for key, value in values.items():
        name = f"{prefix}{key}"
        out.add(name)
        if isinstance(value, Mapping):
            out |= given_keys(value, f"{name}.")
    return frozenset(out)


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tmp.replace(path)
