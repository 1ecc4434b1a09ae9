"""Serving side tasks: load them once, attach them to a model you hold, read prompts in generate().

Three ways to run trained tasks next to a base, all with one forward of the base:

* :func:`load_runs` (or :meth:`AdaLayers.from_pretrained`) loads the base once and every task
  from its saved folder; ``AdaLayers`` then runs them all from one forward (and stops the base
  early when its own output is not wanted).
* :func:`attach` puts persistent taps on a model object the caller already holds (a
  ``LlamaForCausalLM``, ``BartForConditionalGeneration``, ``BertModel``, or a
  :class:`~adalayers.core.backbone.Backbone`). The caller keeps calling the model as usual; its
  outputs
  are bit-identical. :meth:`AttachedTasks.detach` removes every hook.
* For generating models the usual ``model.generate(...)`` works unchanged: the taps read the
  prompt's states from the pass that already reads the prompt — the prefill of a decoder, the
  encoder pass of an encoder-decoder — and ignore the one-token decoding steps that follow.

Which forward is captured: every forward of the stack the tasks read that *starts a new
sequence*, i.e. runs without a key/value cache or with an empty one. A decoder's prefill starts
a new sequence; its decoding steps continue one (the cache holds the prompt) and are skipped. An
encoder pass always starts one. The latest captured forward's predictions are kept until the
next one.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adalayers.core.backbone import Backbone
from adalayers.core.encoding import InputError
from adalayers.core.multitask import AdaLayers
from adalayers.core.taps import stream_taps
from adalayers.core.task import CONFIG_NAME, PairMismatchError, Task, check_base

logger = logging.getLogger(__name__)

RUN_MODEL_DIR = "model"
"""Where a training run keeps its loadable task: ``RUN/model/``."""
RUN_CONFIG = "config.yaml"
"""The run's config; its ``base`` key names the base."""


# -- finding and loading tasks ------------------------------------------------------------------
def resolve_run(path: str | os.PathLike) -> tuple[Path, str | None]:
    """The saved task folder of a run and the base its config names.

    Args:
        path: a training run folder (``RUN/model/`` holds the task, ``RUN/config.yaml`` its
            config) or a saved task folder itself; where no such folder exists, a Hugging Face
            Hub repository ``org/name`` holding a task (:func:`adalayers.core.hub.resolve_task`
            fetches it into the Hugging Face cache).

    Returns:
        ``(task_folder, base)``; ``base`` is ``None`` when no run config names one (the task's
        own ``config.json`` then says which base it was trained on).

    Raises:
        FileNotFoundError: ``path`` is neither a run nor a saved task.
        ValueError: the run's ``config.yaml`` cannot be read.
    """
    from adalayers.core.hub import looks_like_repo_id, resolve_task

    if not Path(path).exists() and looks_like_repo_id(path):
        return resolve_task(path), None
    path = Path(path)
    if (path / CONFIG_NAME).is_file() and not (path / RUN_MODEL_DIR).is_dir():
        return path, None
    folder = path / RUN_MODEL_DIR
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{path} is not a training run (no {RUN_MODEL_DIR}/{CONFIG_NAME}) nor a saved task "
            f"(no {CONFIG_NAME}). Give the folder a training run wrote, or its {RUN_MODEL_DIR}/ "
            f"subfolder."
        )
    base = None
    config = path / RUN_CONFIG
    if config.is_file():
        import yaml

        try:
            values = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{config} is not valid YAML: {err}") from err
        raw = values.get("base") if isinstance(values, dict) else None
        if isinstance(raw, dict):
            raw = raw.get("name_or_path") or raw.get("name") or raw.get("path")
        base = str(raw) if raw else None
    return folder, base


def _task_names(paths: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Name each path by its folder (``NAME=PATH`` names it explicitly); names must be unique."""
    named: dict[str, Path] = {}
    for item in paths:
        text = str(item)
        if "=" in text and not Path(text).exists():
            name, _, where = text.partition("=")
        else:
            where = text
            folder = Path(text).resolve()
            name = folder.parent.name if folder.name == RUN_MODEL_DIR else folder.name
        if not name:
            raise ValueError(f"empty task name in {text!r}; write NAME=PATH")
        if name in named:
            raise ValueError(
                f"two tasks would be named {name!r} ({named[name]} and {where}); name them "
                f"explicitly with NAME=PATH"
            )
        named[name] = Path(where)
    return named


def load_runs(
    runs: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
    *,
    base: str | os.PathLike | Backbone | None = None,
    **load_kwargs: Any,
) -> AdaLayers:
    """Load the base once and every run's task onto it.

    Args:
        runs: training run folders or saved task folders; a list names each task after its
            folder (``NAME=PATH`` names it explicitly), a mapping gives the names.
        base: the base to load (or an already loaded :class:`Backbone`); by default the base the
            first run's config names (else the one its task recorded).
        **load_kwargs: passed to :func:`~adalayers.core.backbone.load_backbone` (``device``,
            ``dtype``, ...).

    Returns:
        An :class:`AdaLayers` in eval mode with one task per run.

    Raises:
        FileNotFoundError: a path is not a run or a task.
        BaseMismatchError: a task was trained on another base (the message names both).
    """
    named = dict(runs) if isinstance(runs, Mapping) else _task_names(runs)
    if not named:
        raise ValueError("no runs given")
    folders: dict[str, Path] = {}
    bases: dict[str, str | None] = {}
    for name, path in named.items():
        folders[name], bases[name] = resolve_run(path)
    if base is None:
        base = next((b for b in bases.values() if b), None)
    return AdaLayers.from_pretrained(base, folders, **load_kwargs).eval()


# -- attaching to a model the caller holds ------------------------------------------------------
def _as_tasks(tasks: Any) -> dict[str, Task]:
    if isinstance(tasks, AdaLayers):
        return dict(tasks.tasks.items())
    if isinstance(tasks, Mapping):
        out = {}
        for name, task in tasks.items():
            out[name] = (
                task if isinstance(task, Task) else Task.from_pretrained(resolve_run(task)[0])
            )
        return out
    if isinstance(tasks, (str, os.PathLike)):
        raise TypeError("tasks must be a mapping or a list of folders; wrap the folder in a list")
    return {
        name: Task.from_pretrained(resolve_run(path)[0])
        for name, path in _task_names(list(tasks)).items()
    }


# transformers < 5.24 names the KV cache argument ``past_key_values``; 5.24 renamed it ``cache``
_CACHE_ARGS = ("cache", "past_key_values")


def content_positions(ids: Sequence[int], special: Collection[int]) -> list[int]:
    """The positions of a row's token ids that are not the tokenizer's special tokens
    (``[CLS]``, ``<|im_start|>``, ...): the tokens a token task was trained to label."""
    return [j for j, token in enumerate(ids) if token not in special]


def _continues_a_sequence(arguments: Mapping[str, Any]) -> bool:
    """Whether a forward's arguments carry a KV cache that already holds earlier tokens."""
    for name in _CACHE_ARGS:
        cache = arguments.get(name)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            if cache.get_seq_length() > 0:
                return True
        elif isinstance(cache, (tuple, list)) and len(cache) > 0:
            return True  # a legacy tuple cache: non-empty means earlier tokens
    return False


class AttachedTasks:
    """Tasks reading a model's hidden states through persistent taps (see :func:`attach`).

    Use as a context manager, or call :meth:`detach` when done. After each forward of the model
    that starts a new sequence (a plain forward, a ``generate()`` prefill, an encoder pass),
    :attr:`logits` and :meth:`predictions` give every task's output for that input.

    Attributes:
        backbone: the :class:`Backbone` view of the model (shares its modules).
        tasks: task name -> :class:`Task`.
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Mapping[str, Task],
        *,
        restore: dict[str, Any] | None = None,
    ) -> None:
        self.backbone = backbone
        self.tasks = dict(tasks)
        self._restore = restore or {}
        self._signature = inspect.signature(backbone.stack.forward)
        self._capturing = False
        self._buffers: dict[str, torch.Tensor | None] = {}
        self._inputs: dict[str, torch.Tensor | None] = {}
        self._pending: tuple[dict[str, torch.Tensor | None], dict[str, Any]] | None = None
        self._logits: dict[str, torch.Tensor] | None = None
        self._mask: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._tapped = None
        self._attach()

    # -- hooks -----------------------------------------------------------------------------------
    def _attach(self) -> None:
        mixers = {name: task.mixer for name, task in self.tasks.items()}
        with torch.no_grad():
            taps = stream_taps(mixers, self._buffers, enabled=lambda: self._capturing)
        stack = self.backbone.stack
        self._handles.append(
            stack.register_forward_pre_hook(self._on_start, with_kwargs=True, prepend=True)
        )
        self._handles.append(stack.register_forward_hook(self._on_end, always_call=True))
        self._tapped = self.backbone.tapped(taps, stop_early=False)
        self._tapped.__enter__()

    def _on_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._capturing = False
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        if _continues_a_sequence(bound):
            return  # a decoding step continuing a sequence: the prompt was captured already
        ids = bound.get("input_ids")
        mask = bound.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            logger.warning("attention_mask of shape %s is not (B, T); ignoring it", mask.shape)
            mask = None
        self._buffers.update(dict.fromkeys(self.tasks))  # the taps hold this dict
        self._inputs = {"input_ids": ids, "attention_mask": mask}
        self._capturing = True

    def _on_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        # output is None when the forward raised (or was stopped early): keep the last result
        complete = output is not None and all(b is not None for b in self._buffers.values())
        if self._capturing and complete:
            self._pending = (dict(self._buffers), self._inputs)
            self._logits = None
        self._capturing = False
        self._buffers.update(dict.fromkeys(self.tasks))

    # -- results ---------------------------------------------------------------------------------
    def _finish(self) -> None:
        if self._pending is None:
            if self._logits is None:
                raise RuntimeError(
                    "no input captured yet: call the model (or its generate()) first"
                )
            return
        buffers, inputs = self._pending
        self._pending = None
        some = next(b for b in buffers.values() if b is not None)
        batch, length = some.shape[:2]
        mask = inputs["attention_mask"]
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=some.device)
        mask = mask[:, -length:].to(some.device)
        # Left padding (as generate() needs) -> right padding, so positions and heads see each
        # prompt as it would be seen alone: real tokens first, in order.
        order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)  # (B, T)
        mask = mask.gather(1, order)  # (B, T)
        ids = inputs["input_ids"]
        self._ids = ids[:, -length:].to(order.device).gather(1, order) if ids is not None else None
        logits = {}
        with torch.inference_mode():
            for name, task in self.tasks.items():
                buf = buffers[name]  # (B, T, k)
                buf = buf.gather(1, order[..., None].expand_as(buf))  # (B, T, k)
                buf = buf.masked_fill(mask[..., None] == 0, 0.0)  # no NaN from padding rows
                logits[name] = task.head(task.mixer.finish(buf), mask)
        self._logits, self._mask = logits, mask

    @property
    def logits(self) -> dict[str, torch.Tensor]:
        """Task name -> logits of the latest captured input ((B, C), (B, 1) or (B, T, C)).

        Token logits follow the prompt's real tokens: position ``t`` is its ``t``-th token and
        padding comes last, whichever side the input was padded on (see
        :attr:`attention_mask`).
        """
        self._finish()
        assert self._logits is not None
        return self._logits

    @property
    def attention_mask(self) -> torch.Tensor:
        """The (right-padded) attention mask of the latest captured input, (B, T)."""
        self._finish()
        assert self._mask is not None
        return self._mask

    def predictions(self, tokenizer: Any = None) -> list[dict[str, Any]]:
        """Per input row: task name -> its kind's prediction
        (:meth:`~adalayers.core.kinds.TaskKind.postprocess`, as ``AdaLayers.predict`` gives it):
        ``{"label", "score"}``, ``{"value"}``, ``{"labels", "scores"}`` (multi-label), or for
        token tasks ``{"tokens", "labels", "scores"}`` (one entry per prompt token; padding and
        the tokenizer's special tokens, such as ``[CLS]``, which training never labels, dropped).

        Args:
            tokenizer: turns token ids into token strings (default: the backbone's).

        Sentence pairs: call the model on ``tokenizer(texts, text_pairs)``; the predictions
        are those of ``AdaLayers.predict(texts, text_pairs)``.
        Where the tokenizer marks a pair with its own number of special tokens (``[CLS] a
        [SEP] b [SEP]``: 3 against 2 for one text), a row is known to hold one text or a pair
        and a task that reads the other kind refuses it; otherwise (GPT-2, Llama chat
        prompts) it is not checked.

        Raises:
            InputError: (a ``ValueError``) a row holds only special tokens: its text was empty
                or tokenised to nothing, so there is nothing to predict on (names the row).
            PairMismatchError: (a ``ValueError``) a row holds a sentence pair and a task was
                trained on single texts, or the other way round (names the row and the task).
        """
        logits = self.logits
        tokenizer = tokenizer or self.backbone.tokenizer
        lengths = self._mask.sum(1).tolist()
        special = set(getattr(tokenizer, "all_special_ids", None) or ())
        if self._ids is not None and special:
            for i, n in enumerate(lengths):
                if set(self._ids[i, :n].tolist()) <= special:
                    raise InputError(
                        "input",
                        i,
                        "holds only special tokens: its text was empty or tokenised to nothing, "
                        "so there is nothing to predict on",
                        "Drop it before calling the model.",
                    )
            self._check_pairs(tokenizer, special, lengths)
        out: list[dict[str, Any]] = [{} for _ in lengths]
        for name, task in self.tasks.items():
            values = logits[name].float().cpu()  # (B, T, C) or (B, C)
            kind = task.kind
            for i, n in enumerate(lengths):
                if not kind.per_token:
                    out[i][name] = kind.postprocess(task, values[i])  # (C,)
                    continue
                row = values[i, :n]  # (n, C)
                ids = self._ids[i, :n].tolist() if self._ids is not None else None
                if ids is not None and special:  # never labelled in training: not predicted
                    keep = content_positions(ids, special)
                    row, ids = row[keep], [ids[j] for j in keep]
                tokens = (
                    tokenizer.convert_ids_to_tokens(ids)
                    if tokenizer is not None and ids is not None
                    else ids
                )
                out[i][name] = kind.postprocess(task, row, tokens=tokens)
        return out

    def _check_pairs(self, tokenizer: Any, special: set[int], lengths: list[int]) -> None:
        """Refuse a row whose kind (one text, a pair) a task does not read, where the
        tokenizer's special tokens tell the kinds apart."""
        counter = getattr(tokenizer, "num_special_tokens_to_add", None)
        if counter is None or self._ids is None:
            return
        single, pair = counter(pair=False), counter(pair=True)
        if single == pair:
            return  # the tokenizer marks no pairs: nothing to tell them apart by
        for i, n in enumerate(lengths):
            found = sum(t in special for t in self._ids[i, :n].tolist())
            if found not in (single, pair):
                continue  # special tokens of another making (a chat template): not checked
            is_pair = found == pair
            for name, task in self.tasks.items():
                wants = task.text_pair if task.kind.reads_pairs else False
                if wants is None or wants == is_pair:
                    continue
                held = "a sentence pair" if is_pair else "one text"
                read = "sentence pairs" if wants else "single texts"
                how = "tokenizer(texts, text_pairs)" if wants else "tokenizer(texts)"
                raise PairMismatchError(
                    name,
                    wants,
                    f"input row {i} holds {held} ({found} special tokens) but task {name!r} "
                    f"reads {read}: call the model on {how}",
                )

    # -- lifetime --------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._tapped is not None

    def detach(self) -> None:
        """Remove every hook and restore the model's training mode and ``requires_grad`` flags."""
        if self._tapped is None:
            return
        self._tapped.__exit__(None, None, None)
        self._tapped = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        model = self.backbone.model
        flags = self._restore.get("requires_grad")
        if flags is not None:
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)
        if self._restore.get("training") is not None:
            model.train(self._restore["training"])

    def __enter__(self) -> AttachedTasks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"AttachedTasks({list(self.tasks)}, {self.backbone.name_or_path!r}, {state})"


def attach(
    model: nn.Module | Backbone,
    tasks: Mapping[str, Task | str | os.PathLike] | Sequence[str | os.PathLike] | AdaLayers,
    *,
    tokenizer: Any = None,
    check: bool = True,
) -> AttachedTasks:
    """Attach trained tasks to a model the caller holds; its outputs stay bit-identical.

    Example::

        model = AutoModelForCausalLM.from_pretrained(path)
        with attach(model, {"sentiment": "runs/sst2", "ner": "runs/conll"}, tokenizer=tok) as side:
            ids = model.generate(**tok(["Tell me about Paris."], return_tensors="pt"))
            side.predictions()  # [{"sentiment": {...}, "ner": {...}}], read from the prefill

    While attached the model is frozen (eval mode, no gradients), as the tasks' base must be;
    :meth:`AttachedTasks.detach` restores both. Tasks are moved to the model's device. A task
    trained on sentence pairs reads a pair where the model is called on
    ``tokenizer(texts, text_pairs)`` (see :meth:`AttachedTasks.predictions`).

    A ``SentenceTransformer`` is taken as it is: ``model.encode(...)`` returns the same
    embeddings, and :meth:`AttachedTasks.predictions` one row per input of the latest
    ``encode`` call, in its order
    (:mod:`adalayers.serving.integrations.sentence_transformers`).

    Args:
        model: a ``transformers`` model (a base ``AutoModel``, or one with a head such as
            ``*ForCausalLM`` / ``*ForConditionalGeneration``), a ``SentenceTransformer``, or a
            :class:`Backbone`.
        tasks: name -> :class:`Task` or saved folder; a list of run / task folders (named after
            their folders); or an :class:`AdaLayers` whose tasks to attach.
        tokenizer: used by :meth:`AttachedTasks.predictions` to name tokens.
        check: refuse tasks trained on another base (compares base fingerprints: the same
            weights match however they were loaded).

    Returns:
        The :class:`AttachedTasks` (a context manager that detaches on exit).

    Raises:
        BaseMismatchError: ``check`` and a task was trained on another base.
        ValueError: no tasks, or tasks reading different stacks of an encoder-decoder.
    """
    from adalayers.serving.integrations import sentence_transformers as st

    if st.is_sentence_transformer(model):
        return st.attach_sentence_transformer(model, tasks, tokenizer=tokenizer, check=check)
    backbone, named, restore = prepare_attachment(model, tasks, tokenizer=tokenizer, check=check)
    return AttachedTasks(backbone, named, restore=restore)


def prepare_attachment(
    model: nn.Module | Backbone,
    tasks: Mapping[str, Task | str | os.PathLike] | Sequence[str | os.PathLike] | AdaLayers,
    *,
    tokenizer: Any = None,
    check: bool = True,
) -> tuple[Backbone, dict[str, Task], dict[str, Any]]:
    """What :func:`attach` does before it puts the taps on: the tasks loaded and checked
    against the model, moved to its device; the model frozen.

    Returns:
        ``(backbone, tasks, restore)``: the :class:`Backbone` view of ``model``, task name ->
        :class:`Task`, and the model's training mode and ``requires_grad`` flags to restore.
    """
    named = _as_tasks(tasks)
    if not named:
        raise ValueError("no tasks to attach")
    states = {t.base.states for t in named.values()}
    if len(states) > 1:
        raise ValueError(
            f"tasks read different stacks ({sorted(states)}); one attachment reads one stack: "
            f"attach them separately"
        )
    if isinstance(model, Backbone):
        backbone, restore = model, {}
        if tokenizer is not None and backbone.tokenizer is None:
            backbone.tokenizer = tokenizer
    else:
        restore = {
            "training": model.training,
            "requires_grad": [p.requires_grad for p in model.parameters()],
        }
        backbone = Backbone(model, tokenizer, states=states.pop())  # type: ignore[arg-type]
    if check:
        # the fingerprint leaves out an LM / task wrapper's head: a task trained on the
        # AutoModel base matches the base part of a *ForCausalLM, *ForConditionalGeneration, ...
        for name, task in named.items():
            check_base(task.base, backbone.info_for(task.base), f"task {name!r}")
    device = backbone.device
    for task in named.values():
        task.to(device).eval()
    return backbone, named, restore
