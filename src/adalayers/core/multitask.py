"""Many tasks on one frozen backbone forward (:class:`AdaLayers`), and their predictions."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adalayers.core.backbone import Backbone
from adalayers.core.encoding import (
    check_texts,
    check_words,
    encode_sequences,
    encode_words,
    word_logits,
)
from adalayers.core.taps import stream_taps
from adalayers.core.task import Task, check_base, check_pairs

logger = logging.getLogger(__name__)


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
        check_base(task.base, self.backbone.info_for(task.base), f"task {name!r}")
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
            **load_kwargs: passed to :func:`~adalayers.core.backbone.load_backbone` (``device``,
                ``dtype``, ...) when ``base`` is not already loaded.

        Raises:
            FileNotFoundError: a folder is not a saved task.
            BaseMismatchError: a task was trained on another base (the message names both).
            ValueError: no tasks, duplicate names, or tasks reading different stacks.
        """
        from adalayers.core.backbone import load_backbone

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
        self,
        inputs: Sequence[Any],
        pairs: Sequence[str] | None = None,
        *,
        batch_size: int = 32,
        before_forward: Callable[[], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Predictions of every task for each input, from one base forward per batch.

        Memory is bounded by ``batch_size``, not by the length of the inputs: a token task's
        long input becomes many windows, and at most ``batch_size`` windows run in one forward.

        Args:
            inputs: texts; for token tasks, texts (split on whitespace) or lists of words.
            pairs: second texts of sentence pairs, one per text: required by tasks trained on
                pairs, refused by tasks trained on single texts and by token tasks.
            batch_size: inputs (and windows of long token inputs) per forward.
            before_forward: called before each base forward; an exception it raises stops the
                prediction and propagates (the server uses it to stop work it cannot answer).

        Returns:
            One dict per input: task name -> its kind's prediction
            (:meth:`~adalayers.core.kinds.TaskKind.postprocess`): ``{"label", "score"}``
            (classification), ``{"value"}`` (regression), ``{"words", "labels", "scores"}``
            (token tasks) or ``{"labels", "scores"}`` (multi-label classification).

        Raises:
            TypeError, ValueError: an input is not a string, or is empty: blank, invisible
                characters only, a lone surrogate, or nothing once tokenized (the message names
                its index; :class:`~adalayers.core.encoding.InputError` carries it).
            PairMismatchError: (a ``ValueError``) pairs for a task trained on single texts,
                or single texts for one trained on pairs (names the task).
        """
        if not self.tasks:
            raise ValueError("no tasks attached; add one with add_task()")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        check_pairs(self.tasks, pairs is not None)
        token_tasks = any(t.kind.per_token for t in self.tasks.values())
        tokenizer = self.backbone.tokenizer  # refuses inputs that tokenise to nothing, up front
        items: list[Any] = (
            check_words(inputs, tokenizer)
            if token_tasks
            else check_texts(inputs, "text", tokenizer)
        )
        pair_items = check_texts(pairs, "pair text", tokenizer) if pairs is not None else None
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
                    results.extend(
                        self._predict_batch(chunk, chunk_pairs, batch_size, before_forward)
                    )
        finally:
            self.train(was_training)
        return results

    def _predict_batch(
        self,
        items: list[Any],
        pairs: list[str] | None,
        batch_size: int,
        before_forward: Callable[[], None] | None,
    ) -> list[dict[str, Any]]:
        tokenizer, device = self.backbone.tokenizer, self.backbone.device
        windows = None
        if isinstance(items[0], list):
            windows = encode_words(tokenizer, items, self.max_length)
            inputs = windows.inputs  # (W, T): W windows, W >= len(items)
        else:
            inputs = encode_sequences(tokenizer, items, pairs, self.max_length)  # (B, T)
        num_rows = inputs["input_ids"].shape[0]
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.tasks}
        for start in range(0, num_rows, batch_size):  # at most batch_size windows per forward
            if before_forward is not None:
                before_forward()
            part = {k: v[start : start + batch_size].to(device) for k, v in inputs.items()}
            for name, values in self(part).logits.items():
                parts[name].append(values)  # (b, T, C) or (b, C)
        logits = {name: torch.cat(values) for name, values in parts.items()}  # (W, ...)
        out: list[dict[str, Any]] = [{} for _ in items]
        first_window = list(range(len(items)))
        if windows is not None:
            first_window = [windows.sample.index(i) for i in range(len(items))]
            if len(windows.sample) > len(items) and any(
                not t.kind.per_token for t in self.tasks.values()
            ):
                logger.warning(
                    "sequence tasks read only the first %d tokens of long inputs", self.max_length
                )
        for name, task in self.tasks.items():
            values = logits[name].float().cpu()  # (W, T, C) or (W, C)
            if task.kind.per_token:
                per_word = word_logits(windows, values, [len(w) for w in items])
                for i, rows in enumerate(per_word):  # rows (words, C)
                    out[i][name] = task.kind.postprocess(task, rows, words=items[i])
            else:
                for i, row in enumerate(first_window):
                    out[i][name] = task.kind.postprocess(task, values[row])  # (C,)
        return out
