"""A task (layer mixer + head), its saved form, and many tasks on one backbone forward."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from adalayers.backbone import Backbone, BaseInfo
from adalayers.decoding import check_decoding, decode_words
from adalayers.encoding import (
    IGNORE_INDEX,
    check_texts,
    check_words,
    encode_sequences,
    encode_words,
    word_logits,
)
from adalayers.heads import HeadConfig, SequenceHead, TokenHead
from adalayers.mixer import LayerMixer, MixerConfig
from adalayers.taps import stream_taps

logger = logging.getLogger(__name__)

TaskType = Literal["sequence_classification", "token_classification", "regression"]
TASK_TYPES = ("sequence_classification", "token_classification", "regression")
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LABELS_NAME = "labels.json"


class BaseMismatchError(ValueError):
    """A saved task is being attached to a base other than the one it was trained on."""


@dataclass
class TaskConfig:
    """Everything needed to rebuild a task.

    Attributes:
        task_type: ``sequence_classification``, ``token_classification`` or ``regression``.
        labels: label names, in output order (empty for regression).
        mixer: the layer mixer's hyper-parameters.
        head: the head's hyper-parameters.
    """

    task_type: TaskType
    labels: list[str] = field(default_factory=list)
    mixer: MixerConfig = field(default_factory=MixerConfig)
    head: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        if isinstance(self.mixer, dict):
            self.mixer = MixerConfig.from_dict(self.mixer)
        if isinstance(self.head, dict):
            self.head = HeadConfig.from_dict(self.head)
        self.labels = [str(label) for label in self.labels]
        if self.task_type == "regression":
            if self.labels:
                raise ValueError(f"a regression task has no labels, got {self.labels}")
        elif len(self.labels) < 2:
            raise ValueError(
                f"a {self.task_type} task needs at least 2 label names, got {self.labels}"
            )
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"label names must be distinct, got {self.labels}")
        check_decoding(self.head.decoding, self.task_type, self.labels)

    @property
    def num_outputs(self) -> int:
        return 1 if self.task_type == "regression" else len(self.labels)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TaskConfig:
        """Build from a mapping; unknown keys and wrong types raise a ``ValueError``."""
        from adalayers._schema import build

        return build(cls, dict(values), "task")

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_type": self.task_type,
            "labels": list(self.labels),
            "mixer": self.mixer.to_dict(),
            "head": self.head.to_dict(),
        }


class Task(nn.Module):
    """A side task: a :class:`~adalayers.mixer.LayerMixer` and a head, for one base.

    Args:
        config: the task's configuration.
        base: the base it reads (number of states, hidden size, fingerprint).
    """

    def __init__(self, config: TaskConfig, base: BaseInfo) -> None:
        super().__init__()
        self.config = config
        self.base = base
        self.mixer = LayerMixer(config.mixer, base.num_states, base.hidden_size)
        head_cls = TokenHead if config.task_type == "token_classification" else SequenceHead
        self.head = head_cls(config.mixer.dim, config.num_outputs, config.head)
        self._label_ids = {name: i for i, name in enumerate(config.labels)}

    @property
    def task_type(self) -> TaskType:
        return self.config.task_type

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    @property
    def decoding(self) -> str:
        """How a token task's scores become tags (``head.decoding``)."""
        return self.config.head.decoding

    def num_parameters(self) -> int:
        """Parameters this task adds to the base (trainable or not)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Stacked reference path: all ``L + 1`` states -> logits."""
        return self.head(self.mixer(hidden_states), attention_mask)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Task loss plus the mixer's entropy term.

        Classification targets are label ids (``-100`` ignored for token tasks); regression
        targets are floats.
        """
        if self.task_type == "regression":
            loss = F.mse_loss(logits.squeeze(-1).float(), targets.float())
        else:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
        return loss + self.mixer.regularization()

    def label_ids(self, names: Sequence[str]) -> list[int]:
        """Label names -> ids; an unknown name raises a ``ValueError`` listing the known ones."""
        ids = []
        for name in names:
            if name not in self._label_ids:
                raise ValueError(f"label {name!r} is not one of this task's labels {self.labels}")
            ids.append(self._label_ids[name])
        return ids

    # -- saving ------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json``, ``labels.json`` and ``model.safetensors`` to ``folder``.

        The folder is written beside the target and renamed into place, so a crash never
        leaves a half-written task.
        """
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            meta = {
                "format_version": FORMAT_VERSION,
                **self.config.to_dict(),
                "base": self.base.to_dict(),
                "parameters": self.num_parameters(),
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            (tmp / LABELS_NAME).write_text(json.dumps(self.labels) + "\n")
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                folder.rename(old)
                tmp.rename(folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, backbone: Backbone | None = None) -> Task:
        """Load a saved task; with ``backbone``, check it is the base the task was trained on.

        Raises:
            FileNotFoundError: ``folder`` lacks ``config.json`` or ``model.safetensors``.
            BaseMismatchError: ``backbone`` is not the task's base (the message names both).
            ValueError: the files disagree with each other (e.g. label names vs head size).
        """
        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder / name} not found: {folder} is not a saved "
                    f"adalayers task (expected {CONFIG_NAME} and "
                    f"{WEIGHTS_NAME})"
                )
        try:
            meta = json.loads((folder / CONFIG_NAME).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON: {err}") from err
        version = meta.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{folder / CONFIG_NAME}: format_version {version!r} is not "
                f"supported (this adalayers reads {FORMAT_VERSION})"
            )
        base = BaseInfo(**meta.pop("base"))
        meta.pop("parameters", None)
        config = TaskConfig.from_dict(meta)
        if backbone is not None:
            check_base(base, backbone.info(), folder)
        task = cls(config, base)
        state = load_file(str(folder / WEIGHTS_NAME))
        expected = task.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{folder / WEIGHTS_NAME} does not match {folder / CONFIG_NAME}: "
                f"missing {missing}, unexpected {unexpected}"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                hint = ""
                if key.startswith("head.out."):
                    hint = (
                        f" ({CONFIG_NAME} lists {config.num_outputs} output(s) "
                        f"{config.labels}, the weights have {tensor.shape[0]})"
                    )
                raise ValueError(
                    f"{folder / WEIGHTS_NAME}: {key} has shape "
                    f"{tuple(tensor.shape)}, config expects "
                    f"{tuple(expected[key].shape)}{hint}"
                )
        task.load_state_dict(state)
        return task


def check_base(expected: BaseInfo, actual: BaseInfo, where: Any = "task") -> None:
    """Raise :class:`BaseMismatchError` naming both bases unless they are the same."""
    problems = []
    if expected.num_states != actual.num_states:
        problems.append(f"{expected.num_states} vs {actual.num_states} hidden states")
    if expected.hidden_size != actual.hidden_size:
        problems.append(f"hidden size {expected.hidden_size} vs {actual.hidden_size}")
    if expected.states != actual.states:
        problems.append(f"{expected.states} vs {actual.states} states")
    if expected.fingerprint != actual.fingerprint:
        problems.append(f"fingerprint {expected.fingerprint} vs {actual.fingerprint}")
    if problems:
        raise BaseMismatchError(
            f"{where} was trained on base {expected.name_or_path!r} but is being attached to "
            f"{actual.name_or_path!r} ({'; '.join(problems)}). Load it onto the base it was "
            f"trained on, or retrain it on this one."
        )


@dataclass
class MultiTaskOutput:
    """What one forward of :class:`AdaLayers` returns.

    Attributes:
        logits: task name -> logits ((B, C), (B, 1) or (B, T, C)).
        base_output: the base model's own output, when asked for (else ``None``).
    """

    logits: dict[str, torch.Tensor]
    base_output: Any = None


class AdaLayers(nn.Module):
    """Many tasks on one frozen backbone forward.

    Each task taps only the states it gives a non-zero weight. With ``stream=True`` (default)
    the taps add ``p~_i f_i`` into one (B, T, k) buffer per task while the base runs, and when
    the base's own output is not wanted the base stops after the last tapped block.

    Args:
        backbone: the frozen base.
        tasks: task name -> :class:`Task` (checked against the base).
    """

    def __init__(self, backbone: Backbone, tasks: Mapping[str, Task] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.tasks = nn.ModuleDict()
        for name, task in (tasks or {}).items():
            self.add_task(name, task)

    def add_task(self, name: str, task: Task) -> None:
        check_base(task.base, self.backbone.info(), f"task {name!r}")
        if name in self.tasks:
            raise ValueError(f"a task named {name!r} is already attached")
        self.tasks[name] = task

    @classmethod
    def from_pretrained(
        cls,
        base: Backbone | str | os.PathLike | None,
        tasks: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
        **load_kwargs: Any,
    ) -> AdaLayers:
        """Load the base once and attach every saved task, checking each task's base.

        Args:
            base: a loaded :class:`Backbone`, a hub id / folder to load, or ``None`` for the base
                the first task was trained on (its ``config.json`` records it).
            tasks: task name -> saved task folder, or a list of folders (named after them).
            **load_kwargs: passed to :func:`~adalayers.backbone.load_backbone` (``device``,
                ``dtype``, ...) when ``base`` is not already loaded.

        Raises:
            FileNotFoundError: a folder is not a saved task.
            BaseMismatchError: a task was trained on another base (the message names both).
            ValueError: no tasks, duplicate names, or tasks reading different stacks.
        """
        from adalayers.backbone import load_backbone

        if not isinstance(tasks, Mapping):
            folders = [Path(t) for t in tasks]
            names = [f.name for f in folders]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"task folders share the name(s) {duplicates}; pass a mapping")
            tasks = dict(zip(names, folders))
        if not tasks:
            raise ValueError("no task folders given")
        loaded = {name: Task.from_pretrained(folder) for name, folder in tasks.items()}
        states = {t.base.states for t in loaded.values()}
        if len(states) > 1:
            raise ValueError(f"the tasks read different stacks of the base: {sorted(states)}")
        if not isinstance(base, Backbone):
            first = next(iter(loaded.values())).base
            name_or_path = base if base is not None else first.name_or_path
            states_kw = load_kwargs.pop("states", None) or first.states
            base = load_backbone(name_or_path, states=states_kw, **load_kwargs)
        runtime = cls(base)
        for name, task in loaded.items():
            runtime.add_task(name, task.to(base.device))
        return runtime

    def remove_task(self, name: str) -> Task:
        if name not in self.tasks:
            raise KeyError(f"no task named {name!r}; attached: {list(self.tasks)}")
        task = self.tasks[name]
        del self.tasks[name]
        return task

    def parameters_added(self) -> dict[str, dict[str, float]]:
        """Per task: parameters added, absolute and as % of the base."""
        base = self.backbone.num_parameters()
        return {
            name: {
                "parameters": t.num_parameters(),
                "percent_of_base": 100.0 * t.num_parameters() / base,
            }
            for name, t in self.tasks.items()
        }

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t.training and any(p.requires_grad for p in t.parameters()) for t in self.tasks.values()
        )

    def forward(
        self,
        inputs: Mapping[str, torch.Tensor],
        *,
        return_base_output: bool = False,
        stream: bool = True,
    ) -> MultiTaskOutput:
        """Run the base once and every attached task.

        Args:
            inputs: tokenizer output; must hold ``input_ids`` and ``attention_mask``.
            return_base_output: also return the base's own output (runs every block).
            stream: streaming taps (default) or the stacked reference path.
        """
        if "attention_mask" not in inputs:
            raise ValueError(
                "inputs need an 'attention_mask' (call the tokenizer with padding=True)"
            )
        grad = self._needs_grad()
        if not grad:
            with torch.inference_mode():
                return self._forward(inputs, return_base_output, stream, grad)
        return self._forward(inputs, return_base_output, stream, grad)

    def _forward(
        self, inputs: Mapping[str, torch.Tensor], return_base_output: bool, stream: bool, grad: bool
    ) -> MultiTaskOutput:
        mask = inputs["attention_mask"]
        features, base_out = self._mix(inputs, return_base_output, stream, grad)
        logits = {name: task.head(features[name], mask) for name, task in self.tasks.items()}
        return MultiTaskOutput(logits, base_out)

    def features(
        self, inputs: Mapping[str, torch.Tensor], *, stream: bool = True
    ) -> dict[str, torch.Tensor]:
        """The mixed features ``F`` (B, T, k) of every task, without the heads."""
        with torch.inference_mode():
            return self._mix(inputs, False, stream, False)[0]

    def _mix(
        self, inputs: Mapping[str, torch.Tensor], return_base_output: bool, stream: bool, grad: bool
    ) -> tuple[dict[str, torch.Tensor], Any]:
        if not stream:
            states = self.backbone.hidden_states(inputs, grad=grad)
            base_out = self.backbone(inputs) if return_base_output else None
            return {name: task.mixer(states) for name, task in self.tasks.items()}, base_out

        buffers: dict[str, torch.Tensor | None] = dict.fromkeys(self.tasks)
        # one tap per state shared by all its readers: GELU once, one matmul, one LayerNorm
        mixers = {name: task.mixer for name, task in self.tasks.items()}
        taps = stream_taps(mixers, buffers, grad=grad)
        base_out = self.backbone.run(inputs, taps, return_base_output=return_base_output, grad=grad)
        features = {name: task.mixer.finish(buffers[name]) for name, task in self.tasks.items()}
        return features, base_out

    @property
    def max_length(self) -> int:
        """The longest token sequence every part accepts (base, positional tables)."""
        limits = [self.backbone.max_length]
        limits += [
            t.mixer.positions.shape[0] for t in self.tasks.values() if t.mixer.positions is not None
        ]
        return min(limits)

    def predict(
        self, inputs: Sequence[Any], pairs: Sequence[str] | None = None, *, batch_size: int = 32
    ) -> list[dict[str, Any]]:
        """Predictions of every task for each input, from one base forward per batch.

        Args:
            inputs: texts; for token tasks, texts (split on whitespace) or lists of words.
            pairs: second texts of sentence pairs (sequence tasks only).
            batch_size: inputs per forward.

        Returns:
            One dict per input: task name -> ``{"label", "score"}`` (classification),
            ``{"value"}`` (regression) or ``{"words", "labels", "scores"}`` (token tasks).

        Raises:
            TypeError, ValueError: an input is not a string, or is empty (the message names it).
        """
        if not self.tasks:
            raise ValueError("no tasks attached; add one with add_task()")
        token_tasks = any(t.task_type == "token_classification" for t in self.tasks.values())
        if token_tasks and pairs is not None:
            raise ValueError("sentence pairs are not supported with token-classification tasks")
        items: list[Any] = check_words(inputs) if token_tasks else check_texts(inputs)
        pair_items = check_texts(pairs, "pair text") if pairs is not None else None
        if pair_items is not None and len(pair_items) != len(items):
            raise ValueError(f"got {len(items)} texts but {len(pair_items)} pair texts")
        was_training = self.training
        self.eval()
        results: list[dict[str, Any]] = []
        try:
            with torch.inference_mode():
                for start in range(0, len(items), batch_size):
                    chunk = items[start : start + batch_size]
                    chunk_pairs = pair_items[start : start + batch_size] if pair_items else None
                    results.extend(self._predict_batch(chunk, chunk_pairs))
        finally:
            self.train(was_training)
        return results

    def _predict_batch(self, items: list[Any], pairs: list[str] | None) -> list[dict[str, Any]]:
        tokenizer, device = self.backbone.tokenizer, self.backbone.device
        windows = None
        if isinstance(items[0], list):
            windows = encode_words(tokenizer, items, self.max_length)
            inputs = windows.inputs
        else:
            inputs = encode_sequences(tokenizer, items, pairs, self.max_length)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        logits = self(inputs).logits
        out: list[dict[str, Any]] = [{} for _ in items]
        first_window = list(range(len(items)))
        if windows is not None:
            first_window = [windows.sample.index(i) for i in range(len(items))]
            if len(windows.sample) > len(items) and any(
                t.task_type != "token_classification" for t in self.tasks.values()
            ):
                logger.warning(
                    "sequence tasks read only the first %d tokens of long inputs", self.max_length
                )
        for name, task in self.tasks.items():
            values = logits[name].float()
            if task.task_type == "token_classification":
                per_word = word_logits(windows, values, [len(w) for w in items])
                for i, rows in enumerate(per_word):
                    tags, scores = decode_words(rows, task.labels, task.decoding)
                    out[i][name] = {
                        "words": items[i],
                        "labels": [task.labels[j] for j in tags],
                        "scores": scores,
                    }
            elif task.task_type == "regression":
                for i, row in enumerate(first_window):
                    out[i][name] = {"value": values[row, 0].item()}
            else:
                probs = values[first_window].softmax(-1)
                score, idx = probs.max(-1)
                for i in range(len(items)):
                    out[i][name] = {"label": task.labels[idx[i].item()], "score": score[i].item()}
        return out
