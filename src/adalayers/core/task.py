"""A task (layer mixer + head) and its saved form; many tasks on one forward are in
:mod:`adalayers.core.multitask`."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from adalayers.core._folders import write_folder
from adalayers.core.backbone import Backbone, BaseInfo
from adalayers.core.heads import HeadConfig
from adalayers.core.kinds import KINDS, TaskKind, kind_of
from adalayers.core.mixer import LayerMixer, MixerConfig

logger = logging.getLogger(__name__)

TaskType = str
"""A task type: the name of a kind in :data:`~adalayers.core.kinds.KINDS`."""
TASK_TYPES = tuple(KINDS)
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LABELS_NAME = "labels.json"
MAX_CONFIG_BYTES = 16 * 2**20
"""A task ``config.json`` larger than this is refused unread (real ones are a few KB plus the
label names)."""
LIMITS = {
    "mixer.dim": 2**16,
    "mixer.max_positions": 2**20,
    "head.num_layers": 64,
    "head.sequence_layers": 64,
    "head.ff_dim": 2**20,
}
"""Upper bounds on the sizes a task config may ask for: far above any useful head, low enough
that a wrong or crafted value fails at once instead of exhausting memory."""
MAX_TABLE_FLOATS = 2**28
"""Largest sinusoidal position table (``max_positions * dim`` floats, 1 GiB): it is computed, not
stored in ``model.safetensors``, so the weight file cannot vouch for its size."""


class BaseMismatchError(ValueError):
    """A saved task is being attached to a base other than the one it was trained on."""


class PairMismatchError(ValueError):
    """A task trained on sentence pairs was given single texts, or the other way round.

    Attributes:
        task: the task's name.
        needs_pairs: whether the task was trained on pairs (``True``) or on single texts.
    """

    def __init__(self, task: str, needs_pairs: bool, message: str | None = None) -> None:
        if message is None:
            message = (
                f"task {task!r} was trained on sentence pairs (text, text_pair): give a second "
                f"text for every text (pairs=[...])"
                if needs_pairs
                else f"task {task!r} was trained on single texts, not sentence pairs: give the "
                f"texts alone (no pairs)"
            )
        super().__init__(message)
        self.task, self.needs_pairs = task, needs_pairs

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.task, self.needs_pairs, str(self))


def check_pairs(tasks: Mapping[str, Task], pairs: bool) -> None:
    """Refuse input that does not fit a task: single texts for a task trained on sentence
    pairs, or pairs for a task trained on single texts (a kind that reads no pairs, token
    tasks, takes none). A task saved before :attr:`TaskConfig.text_pair` existed takes either.

    Args:
        tasks: task name -> task.
        pairs: whether the input holds sentence pairs.

    Raises:
        PairMismatchError: (a ``ValueError``) naming the first task that does not fit.
    """
    for name, task in tasks.items():
        if not task.kind.reads_pairs:
            if pairs:
                what = "labels the words of" if task.kind.per_token else "reads"
                message = f"task {name!r} {what} single texts; it takes no pairs"
                raise PairMismatchError(name, False, message)
            continue
        wants = task.config.text_pair
        if wants is not None and wants != pairs:
            raise PairMismatchError(name, wants)


@dataclass
class TaskConfig:
    """Everything needed to rebuild a task.

    Attributes:
        task_type: the name of its kind (:data:`~adalayers.core.kinds.KINDS`):
            ``sequence_classification``, ``token_classification``, ``regression`` or
            ``multilabel_classification``.
        labels: label names, in output order (empty for regression).
        mixer: the layer mixer's hyper-parameters.
        head: the head's hyper-parameters.
        text_pair: whether the task reads sentence pairs (``text``, ``text_pair``): ``True`` or
            ``False`` as training recorded it; ``None`` where unknown (a task saved before the
            field existed), so that it takes either. A token task never reads pairs.
        options: settings of the kind's own, checked and completed by it
            (:meth:`~adalayers.core.kinds.TaskKind.check_options`), e.g. a multi-label task's
            ``thresholds``; the kinds without options have none (and save none).
    """

    task_type: TaskType
    labels: list[str] = field(default_factory=list)
    mixer: MixerConfig = field(default_factory=MixerConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    text_pair: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kind = kind_of(self.task_type)
        if isinstance(self.mixer, dict):
            self.mixer = MixerConfig.from_dict(self.mixer)
        if isinstance(self.head, dict):
            self.head = HeadConfig.from_dict(self.head)
        self.labels = [str(label) for label in self.labels]
        kind.check_labels(self.labels)
        if self.text_pair and not kind.reads_pairs:
            raise ValueError(f"text_pair=true contradicts task_type {self.task_type}")
        decoding = kind.resolve_decoding(self.head.decoding, self.labels)
        if decoding != self.head.decoding:  # `auto`: saved as what it resolved to
            self.head = replace(self.head, decoding=decoding)
        kind.check_decoding(self.head.decoding, self.labels)
        if not isinstance(self.options, Mapping):
            raise ValueError(f"options must be a mapping, got {self.options!r}")
        self.options = kind.check_options(dict(self.options), self.labels)
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Finite numbers and sizes within :data:`LIMITS` (a ``ValueError`` names the key)."""
        for section, values in (("mixer", self.mixer.to_dict()), ("head", self.head.to_dict())):
            for name, value in values.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{section}.{name} must be a finite number, got {value}")
        for key, limit in LIMITS.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if value > limit:
                raise ValueError(f"{key}={value} is larger than the supported maximum {limit}")
        floats = self.mixer.max_positions * self.mixer.dim
        if self.mixer.positional == "sinusoidal" and floats > MAX_TABLE_FLOATS:
            raise ValueError(
                f"mixer.positional=sinusoidal with mixer.max_positions="
                f"{self.mixer.max_positions} and mixer.dim={self.mixer.dim} needs a table of "
                f"{floats * 4 / 2**30:.1f} GiB (at most {MAX_TABLE_FLOATS * 4 / 2**30:.0f} GiB): "
                f"lower mixer.max_positions"
            )

    @property
    def kind(self) -> TaskKind:
        """What the task type means: loss, labels, head, decoding, predictions, metrics."""
        return kind_of(self.task_type)

    @property
    def num_outputs(self) -> int:
        return self.kind.num_outputs(self.labels)

    @property
    def decoding(self) -> str:
        """How a token task's scores become tags (``head.decoding``)."""
        return self.head.decoding

    def label_ids(self, names: Sequence[str]) -> list[int]:
        """Label names -> ids; an unknown name raises a ``ValueError`` listing the known ones."""
        return self.kind.label_ids(self.labels, names)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TaskConfig:
        """Build from a mapping; unknown keys and wrong types raise a ``ValueError``.

        A head without ``decoding`` (a task saved before the setting existed) reads as
        ``argmax``, the only decoding there was, so its predictions do not change.
        """
        from adalayers.core._schema import build

        values = dict(values)
        head = values.get("head")
        if isinstance(head, Mapping) and "decoding" not in head:
            values["head"] = {**head, "decoding": "argmax"}
        return build(cls, values, "task")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "task_type": self.task_type,
            "labels": list(self.labels),
            "mixer": self.mixer.to_dict(),
            "head": self.head.to_dict(),
        }
        if self.text_pair is not None:
            out["text_pair"] = self.text_pair
        if self.options:
            out["options"] = dict(self.options)
        return out


class Task(nn.Module):
    """A side task: a :class:`~adalayers.core.mixer.LayerMixer` and a head, for one base.

    Args:
        config: the task's configuration.
        base: the base it reads (number of states, hidden size, fingerprint).
    """

    def __init__(self, config: TaskConfig, base: BaseInfo) -> None:
        super().__init__()
        self.config = config
        self.base = base
        self.mixer = LayerMixer(config.mixer, base.num_states, base.hidden_size)
        self.head = config.kind.build_head(config.mixer.dim, config.labels, config.head)

    @property
    def task_type(self) -> TaskType:
        return self.config.task_type

    @property
    def kind(self) -> TaskKind:
        """The task's kind (:mod:`adalayers.core.kinds`)."""
        return self.config.kind

    @property
    def options(self) -> dict[str, Any]:
        """Settings of the kind's own (``TaskConfig.options``), e.g. multi-label thresholds."""
        return self.config.options

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    @property
    def decoding(self) -> str:
        """How a token task's scores become tags (``head.decoding``)."""
        return self.config.head.decoding

    @property
    def text_pair(self) -> bool | None:
        """Whether the task reads sentence pairs (``None``: unknown, it takes either)."""
        return self.config.text_pair

    def num_parameters(self) -> int:
        """Parameters this task adds to the base (trainable or not)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Stacked reference path: all ``L + 1`` states -> logits."""
        return self.head(self.mixer(hidden_states), attention_mask)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The kind's loss (:meth:`~adalayers.core.kinds.TaskKind.loss`) plus the mixer's
        entropy term.

        Targets are those of :meth:`~adalayers.core.kinds.TaskKind.batch_targets`: label ids
        (``-100`` ignored for token tasks), floats for regression, multi-hot rows for
        multi-label classification.
        """
        return self.kind.loss(logits, targets) + self.mixer.regularization()

    def label_ids(self, names: Sequence[str]) -> list[int]:
        """Label names -> ids; an unknown name raises a ``ValueError`` listing the known ones."""
        return self.config.label_ids(names)

    def postprocess(self, logits: torch.Tensor, **pieces: Any) -> dict[str, Any]:
        """One input's prediction from its logits (:meth:`~adalayers.core.kinds.TaskKind.
        postprocess`; token tasks: ``words=`` or ``tokens=``)."""
        return self.kind.postprocess(self, logits, **pieces)

    # -- saving ------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json``, ``labels.json`` and ``model.safetensors`` to ``folder``.

        The folder is written beside the target and renamed into place, so a crash never
        leaves a half-written task. Folder and files get the modes the umask gives ordinary
        ones (0755 / 0644 under umask 022), so another user can serve the task.
        """
        meta = {
            "format_version": FORMAT_VERSION,
            **self.config.to_dict(),
            "base": self.base.to_dict(),
            "parameters": self.num_parameters(),
        }
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}

        def write(tmp: Path) -> None:
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            (tmp / LABELS_NAME).write_text(json.dumps(self.labels) + "\n")
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})

        return write_folder(folder, write)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the task and a model card to the Hub repository ``repo_id`` (``org/name``),
        created if needed; see :func:`adalayers.core.hub.push_to_hub` for ``private``,
        ``token``, ``revision``, ``commit_message``, ``create_pr``, ``metrics`` and ``figure``.

        Returns:
            The commit (``huggingface_hub.CommitInfo``: ``.commit_url``, ``.oid``).
        """
        from adalayers.core.hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        backbone: Backbone | None = None,
        *,
        revision: str | None = None,
        **hub: Any,
    ) -> Task:
        """Load a saved task; with ``backbone``, check it is the base the task was trained on.

        ``folder`` may be a Hugging Face Hub repository ``org/name`` where no such local folder
        exists: only its task files are downloaded, into the Hugging Face cache
        (:func:`adalayers.core.hub.resolve_task`; ``revision``, and ``hub`` options
        ``cache_dir``, ``token``, ``local_files_only``, ``force_download``), and loaded as below.

        Nothing is allocated before ``config.json`` has been checked against the tensor names
        and shapes in the header of ``model.safetensors`` (the task is first built on the
        ``meta`` device), so a wrong or crafted config fails at once. No code is executed:
        the config is JSON and the weights are safetensors (no pickle).

        Raises:
            FileNotFoundError: ``folder`` lacks ``config.json`` or ``model.safetensors``.
            BaseMismatchError: ``backbone`` is not the task's base (the message names both).
            ValueError: a file is unreadable, out of bounds, or disagrees with the other (e.g.
                label names vs head size); the message names the file and the key.
        """
        from adalayers.core.hub import resolve_task

        folder = resolve_task(folder, revision=revision, **hub)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder / name} not found: {folder} is not a saved "
                    f"adalayers task (expected {CONFIG_NAME} and "
                    f"{WEIGHTS_NAME})"
                )
        config, base = read_task_config(folder / CONFIG_NAME)
        if backbone is not None:
            check_base(base, backbone.info_for(base), folder)
        check_weights(config, base, folder / WEIGHTS_NAME, folder / CONFIG_NAME)
        task = cls(config, base)
        try:
            state = load_file(str(folder / WEIGHTS_NAME))
        except SafetensorError as err:
            raise ValueError(f"{folder / WEIGHTS_NAME} cannot be read: {err}") from err
        task.load_state_dict(state)
        return task


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def read_task_config(path: str | os.PathLike) -> tuple[TaskConfig, BaseInfo]:
    """Parse and check a saved task's ``config.json`` (without building anything).

    Raises:
        ValueError: too large, not JSON, another ``format_version``, or a key with a wrong
            type or out of bounds (the message names the file and the key).
    """
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{path} is {size} bytes; a task config is at most {MAX_CONFIG_BYTES} bytes"
        )
    try:
        meta = json.loads(path.read_bytes(), parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, NaN, bad UTF-8, nesting
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    version = meta.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version!r} is not "
            f"supported (this adalayers reads {FORMAT_VERSION})"
        )
    meta.pop("parameters", None)
    try:
        base = BaseInfo.from_dict(meta.pop("base", None))
        config = TaskConfig.from_dict(meta)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return config, base


def check_weights(
    config: TaskConfig, base: BaseInfo, weights: str | os.PathLike, where: Any = "the config"
) -> None:
    """Check that ``weights`` holds exactly the tensors ``config`` builds, reading only its
    header: the task is built on the ``meta`` device (no memory) and every parameter and
    buffer name and shape is compared with the file's.

    Raises:
        ValueError: a missing, unexpected or differently shaped tensor (the message names the
            file, the key and both shapes), or a file that is not safetensors.
    """
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except SafetensorError as err:
        raise ValueError(
            f"{weights} is not a readable safetensors file ({err}); a saved task's weights are "
            f"written by Task.save_pretrained"
        ) from err
    # The position table is left out of the skeleton and its shape added by hand: filling it
    # on ``meta`` (arange, normal_) would import torch's symbolic-shape machinery, seconds.
    mixer = config.mixer
    bare = replace(config, mixer=replace(mixer, positional="none"))
    with torch.device("meta"):
        skeleton = Task(bare, base)
    expected = {key: tuple(t.shape) for key, t in skeleton.state_dict().items()}
    if mixer.positional == "learned":  # a parameter; sinusoidal is a computed buffer
        expected["mixer.positions"] = (mixer.max_positions, mixer.dim)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match {where}: missing {missing[:10]}, unexpected "
            f"{unexpected[:10]}"
            + (" (lists cut at 10)" if max(len(missing), len(unexpected)) > 10 else "")
        )
    wrong = [key for key in sorted(expected) if stored[key] != expected[key]]
    if wrong:
        key = wrong[0]
        hint = ""
        if key.startswith("head.out."):
            hint = (
                f" ({CONFIG_NAME} lists {config.num_outputs} output(s) "
                f"{config.labels[:20]}, the weights have {stored[key][0]})"
            )
        more = f"; {len(wrong) - 1} more tensor(s) differ" if len(wrong) > 1 else ""
        raise ValueError(
            f"{weights}: {key} has shape {stored[key]}, {where} expects {expected[key]}{hint}{more}"
        )


def check_base(expected: BaseInfo, actual: BaseInfo, where: Any = "task") -> None:
    """Raise :class:`BaseMismatchError` unless the bases are the same; the message names both
    (as recorded and as resolved on disk) with their fingerprints.

    Pass ``actual`` as ``backbone.info_for(expected)``: a fingerprint is compared with one of
    its own version (:attr:`BaseInfo.fingerprint_version`)."""
    problems = []
    if expected.num_states != actual.num_states:
        problems.append(f"{expected.num_states} vs {actual.num_states} hidden states")
    if expected.hidden_size != actual.hidden_size:
        problems.append(f"hidden size {expected.hidden_size} vs {actual.hidden_size}")
    if expected.states != actual.states:
        problems.append(f"{expected.states} vs {actual.states} states")
    if expected.fingerprint_version != actual.fingerprint_version:
        problems.append(
            f"fingerprints of versions {expected.fingerprint_version} and "
            f"{actual.fingerprint_version} cannot be compared: use Backbone.info_for"
        )
    elif expected.fingerprint != actual.fingerprint:
        problems.append("different weights")
    if problems:
        raise BaseMismatchError(
            f"{where} was trained on base {expected.describe()} but is being attached to "
            f"{actual.describe()} ({'; '.join(problems)}). Load it onto the base it was "
            f"trained on, or retrain it on this one."
        )
