"""Side tasks on a sentence-transformers model: embeddings and predictions from one forward.

The first user adalayers names runs an embedding service; in Python that is a
``SentenceTransformer``. :func:`~adalayers.serving.runtime.attach` takes one as it is::

    from sentence_transformers import SentenceTransformer
    from adalayers import attach

    model = SentenceTransformer("all-MiniLM-L6-v2-folder", device="cpu")
    with attach(model, ["runs/sentiment", "runs/topic"]) as side:
        vectors = model.encode(texts)  # bit-identical to model.encode(texts) without tasks
        side.predictions()  # one dict per text, in the order of texts, from the same forward

The tasks tap the hidden states of the model's transformer (``model[0].auto_model``) as
``attach`` does for any transformers model; pooling, normalisation and any other module of the
model run untouched. ``encode`` sorts its inputs by length and runs them in batches: the
attachment gathers the batches of one ``encode`` call and puts the predictions back in the
order of its inputs. To learn which inputs a batch holds it wraps the model's ``encode`` and
``preprocess`` while attached (instance attributes over the class's methods, removed by
:meth:`~adalayers.serving.runtime.AttachedTasks.detach`); the tensors that flow are not
touched.

What is read: each forward of the ``SentenceTransformer`` itself (the batches of ``encode``,
``encode_query``, ``encode_document``, or ``model(features)``), with whatever prompt and
truncation (``model.max_seq_length``) it applies. A call of ``model[0].auto_model`` on its own
is not read. ``encode`` with a process pool or a list of devices runs the model in other
processes, which the attachment does not see: its predictions then raise.

For the HTTP side, :class:`EmbeddingPredictor` and :func:`add_embed_route` give ``adalayers
serve --embeddings MODEL RUN...`` its ``POST /embed`` (text-embeddings-inference's request and
answer, plus side tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from adalayers.core.backbone import resolve_model_path
from adalayers.core.multitask import AdaLayers
from adalayers.core.task import PairMismatchError, Task
from adalayers.serving.predictor import Predictor
from adalayers.serving.runtime import AttachedTasks, prepare_attachment

logger = logging.getLogger(__name__)

INSTALL = "pip install 'adalayers[st]' (sentence-transformers>=6.2,<7)"


# -- recognising and opening a SentenceTransformer ----------------------------------------------
def is_sentence_transformer(model: Any) -> bool:
    """Whether ``model`` is a sentence-transformers model (never imports the package: a model
    can only be one if the package is imported already)."""
    package = sys.modules.get("sentence_transformers")
    base = getattr(getattr(package, "base", None), "model", None)
    kind = getattr(base, "BaseModel", None) or getattr(package, "SentenceTransformer", None)
    return kind is not None and isinstance(model, kind)


def transformer_of(model: Any) -> tuple[nn.Module, Any]:
    """The Hugging Face model inside a ``SentenceTransformer`` and its tokenizer.

    Raises:
        TypeError: ``model`` is another sentence-transformers model (a ``SparseEncoder``, a
            ``CrossEncoder``), or its first module is not a Hugging Face transformer (a
            ``StaticEmbedding``, a ``Router``): no hidden states to read.
        ValueError: the model runs padding-free (flattened) inputs, which the tasks cannot read.
    """
    from sentence_transformers import SentenceTransformer

    if not isinstance(model, SentenceTransformer):
        raise TypeError(
            f"attach reads a SentenceTransformer; got a {type(model).__name__}. For another "
            f"sentence-transformers model, attach to its transformer (model[0].auto_model) and "
            f"call that"
        )
    first = model[0] if len(model) else None
    transformer = getattr(first, "auto_model", None)
    if not isinstance(transformer, nn.Module) or not hasattr(transformer, "config"):
        raise TypeError(
            f"the first module of this SentenceTransformer is a {type(first).__name__}, not a "
            f"Hugging Face transformer (sentence_transformers' Transformer module): it has no "
            f"hidden states for the tasks to read"
        )
    if getattr(first, "can_flatten_inputs", False):
        raise ValueError(
            "this SentenceTransformer runs padding-free (flattened) inputs, which the tasks "
            "cannot read row by row: set model[0].unpad_inputs = False before attaching"
        )
    return transformer, getattr(first, "tokenizer", None)


def load_sentence_transformer(name_or_path: str | os.PathLike, *, device: str | None = None) -> Any:
    """Load a sentence-transformers model, refusing what is not one with a clear message.

    Args:
        name_or_path: a folder saved by sentence-transformers (``modules.json`` beside the
            transformer's files), ``all-MiniLM-L6-v2`` for the embedded one, or a hub id.
        device: where to run it (default ``"cpu"``).

    Raises:
        ImportError: sentence-transformers is not installed.
        ValueError: a local folder without ``modules.json`` (not a sentence-transformers model).
        OSError: nothing to load there (no such folder; a hub id while offline).
        TypeError: a model whose first module is not a transformer (:func:`transformer_of`).
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(f"serving embeddings needs sentence-transformers: {INSTALL}") from err
    path = resolve_model_path(name_or_path)  # the embedded MiniLM's names -> its folder
    if Path(path).exists() and not (Path(path) / "modules.json").is_file():
        raise ValueError(
            f"{name_or_path} is not a sentence-transformers model: {Path(path).resolve()} has "
            f"no modules.json (the list of modules SentenceTransformer.save writes). Give a "
            f"folder saved by sentence-transformers, or serve a plain transformers base "
            f"without --embeddings"
        )
    try:
        model = SentenceTransformer(str(path), device=device or "cpu")
    except (OSError, ValueError) as err:  # not found here, nor on the hub (offline)
        raise OSError(
            f"could not load sentence-transformers model {str(name_or_path)!r}: {err}. Give a "
            f"folder saved by sentence-transformers, or a hub id with network access "
            f"(HF_HUB_OFFLINE is {os.environ.get('HF_HUB_OFFLINE', 'unset')})."
        ) from err
    transformer_of(model)
    return model


# -- attaching ----------------------------------------------------------------------------------
@dataclass
class _Call:
    """One ``encode`` call in progress: its inputs and the batches the tasks have read."""

    size: int
    positions: dict[int, deque[int]]  # id(input) -> its positions not yet seen in a batch
    next_rows: list[int] | None = None  # positions of the batch preprocess() made last
    parts: list[tuple[list[int], dict[str, torch.Tensor], torch.Tensor, Any]] = field(
        default_factory=list
    )
    error: Exception | None = None


class SentenceTransformerTasks(AttachedTasks):
    """Tasks attached to a ``SentenceTransformer`` (see the module docstring and
    :func:`~adalayers.serving.runtime.attach`).

    After ``model.encode(inputs)``, :meth:`predictions`, :attr:`logits` and
    :attr:`attention_mask` hold one row per input, in the order of ``inputs``, whatever batches
    ``encode`` made (token logits and the mask are right-padded to the longest batch). After a
    forward outside ``encode`` (``model(features)``) they hold that forward's rows. Like the
    model's own state, one attachment serves one caller at a time (not two threads at once).

    Attributes:
        model: the ``SentenceTransformer``.
    """

    def __init__(
        self,
        model: nn.Module,
        backbone: Any,
        tasks: Mapping[str, Task],
        *,
        restore: dict[str, Any] | None = None,
    ) -> None:
        if "_adalayers_attached" in vars(model):
            raise ValueError(
                "this SentenceTransformer already has tasks attached: detach them first, or "
                "attach all the tasks in one call"
            )
        self.model = model
        self._call: _Call | None = None
        self._paused = False
        self._error: Exception | None = None
        self._empty = False
        super().__init__(backbone, tasks, restore=restore)
        # sentence-transformers calls its transformer's forward() itself, past the module's
        # hooks: a forward starts and ends at its Transformer module (model[0]) instead
        first = model[0]
        self._handles.append(
            first.register_forward_pre_hook(self._on_start, with_kwargs=True, prepend=True)
        )
        self._handles.append(first.register_forward_hook(self._on_end, always_call=True))
        self._wrapped = {name: vars(model).get(name) for name in ("encode", "preprocess")}
        self._encode, self._preprocess = model.encode, model.preprocess  # the originals
        model.encode = self._encode_call
        model.preprocess = self._preprocess_call
        model._adalayers_attached = self

    # -- which forwards are read ----------------------------------------------------------------
    def _on_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is not self.model[0]:
            return  # the transformer called on its own (or inside model[0]): not read
        self._capturing = False
        features = args[0] if args else kwargs.get("features")
        if self._paused or not isinstance(features, Mapping):
            return
        mask = features.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            logger.warning("attention_mask of shape %s is not (B, T); ignoring it", mask.shape)
            mask = None
        self._buffers.update(dict.fromkeys(self.tasks))  # the taps hold this dict
        self._inputs = {"input_ids": features.get("input_ids"), "attention_mask": mask}
        self._capturing = True

    def _on_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        pending = self._pending
        super()._on_end(module, args, output)
        if self._pending is None or self._pending is pending:
            return  # nothing new was read
        self._error, self._empty = None, False
        call = self._call
        if call is None:
            return  # a forward outside encode(): its rows, as attach() gives them
        rows, call.next_rows = call.next_rows, None
        try:  # the heads run here, batch by batch; a failure must not fail encode()
            AttachedTasks._finish(self)
            if rows is None or len(rows) != self._mask.shape[0]:
                raise RuntimeError(
                    "encode() ran a batch whose inputs preprocess() did not announce; the "
                    "predictions cannot be put back in the order of the inputs"
                )
            call.parts.append((rows, self._logits, self._mask, self._ids))
        except Exception as err:  # noqa: BLE001 - kept for predictions() to raise
            call.error = call.error or err

    # -- the wrappers ---------------------------------------------------------------------------
    def _preprocess_call(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        call = self._call
        if call is not None:
            rows: list[int] | None = []
            for item in inputs:
                left = call.positions.get(id(item))
                if not left:
                    rows = None
                    break
                rows.append(left.popleft())
            call.next_rows = rows
        return self._preprocess(inputs, *args, **kwargs)

    def _encode_call(self, inputs: Any = None, *args: Any, **kwargs: Any) -> Any:
        if self._call is not None or self._paused or inputs is None:
            return self._encode(inputs, *args, **kwargs)  # nested, paused, or not ours to read
        if self.model.is_singular_input(inputs):
            items = [inputs]
        else:  # as encode() does, but here, so that its batches hold these very objects
            if not isinstance(inputs, list):
                inputs = inputs.tolist() if hasattr(inputs, "tolist") else list(inputs)
            items = inputs
        positions: dict[int, deque[int]] = {}
        for i, item in enumerate(items):
            positions.setdefault(id(item), deque()).append(i)
        kept = (self._pending, self._logits, self._mask, self._ids, self._error, self._empty)
        self._call = call = _Call(len(items), positions)
        self._pending = None
        try:
            out = self._encode(inputs, *args, **kwargs)
        except BaseException:  # encode() failed: the latest result stays, as for a forward
            self._pending, self._logits, self._mask, self._ids, self._error, self._empty = kept
            raise
        finally:
            self._call = None
        self._complete(call)
        return out

    def _complete(self, call: _Call) -> None:
        """Put an ``encode`` call's batches back in the order of its inputs."""
        self._pending, self._error, self._empty = None, call.error, call.size == 0
        seen = sorted(row for rows, *_ in call.parts for row in rows)
        if self._error is None and seen != list(range(call.size)):
            self._error = RuntimeError(
                f"encode() ran {call.size} input(s) but the attached tasks read "
                f"{len(seen)}: a pool or a list of devices runs the model in other processes, "
                f"which the tasks do not see; encode in this process to get predictions"
            )
        if self._error is not None or self._empty:
            return
        order = torch.tensor([row for rows, *_ in call.parts for row in rows]).argsort()  # (N,)
        length = max(mask.shape[1] for _, _, mask, _ in call.parts)

        def rows(tensors: list[torch.Tensor], per_token: bool, fill: int = 0) -> torch.Tensor:
            """Batches -> one tensor in input order; per-token ones right-padded to ``length``."""
            if per_token:  # (b, T_i) or (b, T_i, C) -> (b, T, ...)
                tensors = [
                    F.pad(t, [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]], value=fill)
                    for t in tensors
                ]
            joined = torch.cat(tensors)  # (N, ...) in batch order
            return joined[order.to(joined.device)]  # (N, ...) in input order

        self._logits = {}
        for name in self.tasks:
            parts = [logits[name] for _, logits, _, _ in call.parts]
            self._logits[name] = rows(parts, per_token=parts[0].dim() == 3)
        self._mask = rows([mask for _, _, mask, _ in call.parts], per_token=True)
        ids = [ids for *_, ids in call.parts]
        pad = getattr(self.backbone.tokenizer, "pad_token_id", None) or 0
        self._ids = None if any(i is None for i in ids) else rows(ids, per_token=True, fill=pad)

    # -- results --------------------------------------------------------------------------------
    def _finish(self) -> None:
        if self._error is not None:
            raise self._error
        super()._finish()

    def predictions(self, tokenizer: Any = None) -> list[dict[str, Any]]:
        """Per input of the latest ``encode`` call (or row of the latest forward): task name
        -> prediction, as :meth:`AttachedTasks.predictions` gives them (token tasks: per token
        of what the model read, its special tokens such as ``[CLS]`` dropped).

        Raises:
            InputError, PairMismatchError: as :meth:`AttachedTasks.predictions`; the index is
                the input's position in the ``encode`` call.
            RuntimeError: nothing read yet, or the latest ``encode`` ran in other processes.
            ValueError: a task could not read the input (e.g. longer than its position table).
        """
        if self._empty and self._error is None:
            return []  # the latest encode() had no inputs
        return super().predictions(tokenizer)

    @contextlib.contextmanager
    def paused(self, pause: bool = True) -> Iterator[None]:
        """Within the block, forwards are not read (the taps do nothing; the latest
        predictions stay): embeddings alone, at the cost of the model alone.

        Args:
            pause: pause (default); ``False`` makes the block a no-op.
        """
        before, self._paused = self._paused, self._paused or pause
        try:
            yield
        finally:
            self._paused = before

    def detach(self) -> None:
        """Remove every hook and the ``encode`` / ``preprocess`` wrappers; restore the
        transformer's mode and ``requires_grad`` flags."""
        if self.attached:
            for name, held in self._wrapped.items():
                if held is None:
                    vars(self.model).pop(name, None)
                else:
                    setattr(self.model, name, held)
            vars(self.model).pop("_adalayers_attached", None)
        super().detach()


def attach_sentence_transformer(
    model: nn.Module,
    tasks: Any,
    *,
    tokenizer: Any = None,
    check: bool = True,
) -> SentenceTransformerTasks:
    """:func:`~adalayers.serving.runtime.attach` for a ``SentenceTransformer`` (which it
    calls): the tasks read its transformer's states, predictions follow ``encode``'s inputs.

    Raises:
        BaseMismatchError: ``check`` and a task was trained on another base (names both).
        TypeError, ValueError: see :func:`transformer_of`; an attachment already on the model.
    """
    transformer, own = transformer_of(model)
    backbone, named, restore = prepare_attachment(
        transformer, tasks, tokenizer=tokenizer or own, check=check
    )
    attached = SentenceTransformerTasks(model, backbone, named, restore=restore)
    limit = getattr(model, "max_seq_length", None)
    for name, task in named.items():
        positions = task.mixer.positions
        if limit and positions is not None and positions.shape[0] < limit:
            logger.warning(
                "task %r reads at most %d tokens (its positions) but the model truncates at "
                "%d: longer inputs get no prediction; set model.max_seq_length = %d to match",
                name,
                positions.shape[0],
                limit,
                positions.shape[0],
            )
    return attached


# -- serving ------------------------------------------------------------------------------------
class EmbeddingPredictor(Predictor):
    """What ``adalayers serve --embeddings`` runs: a ``SentenceTransformer``'s embeddings with
    side tasks from the same forward (:meth:`embed`), and ``/predict`` as without embeddings
    (the tasks on the same transformer, stopping after the last block they read).

    Args:
        model: the ``SentenceTransformer`` (tasks are attached to it here).
        tasks: task name -> :class:`Task` (checked against the model's weights).
        info: extra facts per task for ``GET /tasks``.

    Raises:
        BaseMismatchError: a task was trained on another base (the message names both).
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Mapping[str, Task],
        info: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        from adalayers.serving.runtime import attach

        self.model = model
        self.side: SentenceTransformerTasks = attach(model, dict(tasks))  # type: ignore[assignment]
        super().__init__(AdaLayers(self.side.backbone, self.side.tasks), info)

    @property
    def max_seq_length(self) -> int:
        """The longest input (in tokens) the model reads; ``encode`` truncates beyond it."""
        limit = getattr(self.model, "max_seq_length", None)
        return int(limit or self.side.backbone.max_length)

    def embed_token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text before truncation, special ones included."""
        with self._tokenizer_lock:
            ids = self._tokenizer(list(texts), verbose=False)["input_ids"]
        return [len(row) for row in ids]

    def embed(
        self,
        texts: list[str],
        tasks: Sequence[str] | None = None,
        *,
        normalize: Sequence[bool] | None = None,
        batch_size: int = 32,
        before_forward: Any = None,
    ) -> tuple[list[list[float]], list[dict[str, Any]] | None]:
        """Embeddings of ``texts`` as ``model.encode`` gives them, and the predictions of
        ``tasks`` from the same forwards (``None``: no task asked, the taps stay idle).

        Args:
            texts: the inputs, run ``batch_size`` at a time (one ``encode`` call each).
            tasks: task names to predict, or ``None``.
            normalize: per text, whether to L2-normalise its vector as
                ``encode(normalize_embeddings=True)`` does (default: no text).
            batch_size: texts per forward.
            before_forward: called before each forward; what it raises stops the work.

        Returns:
            ``(vectors, predictions)``: one list of floats per text; one dict per text (task
            name -> prediction) or ``None``.
        """
        flags = list(normalize) if normalize is not None else [False] * len(texts)
        vectors: list[list[float]] = []
        rows: list[dict[str, Any]] | None = [] if tasks else None
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            if before_forward is not None:
                before_forward()
            with self.side.paused(not tasks):
                out = self.model.encode(
                    chunk,
                    batch_size=len(chunk),
                    convert_to_tensor=True,
                    show_progress_bar=False,
                )  # (b, D)
            normed = F.normalize(out, p=2, dim=1) if any(flags[start : start + len(chunk)]) else out
            for i, row in enumerate(out):
                vectors.append((normed[i] if flags[start + i] else row).float().tolist())
            if rows is not None:
                rows.extend({name: row[name] for name in tasks} for row in self.side.predictions())
        return vectors, rows

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        normalized = any(type(m).__name__ == "Normalize" for m in self.model)
        out["embeddings"] = {
            "model": str(getattr(self.side.backbone, "name_or_path", "")),
            "dimension": self.model.get_embedding_dimension(),
            "max_seq_length": self.max_seq_length,
            "modules": [type(m).__name__ for m in self.model],
            "normalized_by_model": normalized,
        }
        return out


def embeddings_app(
    model: str | os.PathLike | nn.Module,
    tasks: Mapping[str, Task],
    config: Any = None,
    *,
    device: str | None = None,
    info: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """The HTTP app of ``adalayers serve --embeddings``: ``create_app``'s routes plus
    ``POST /embed`` (:func:`add_embed_route`).

    Args:
        model: a ``SentenceTransformer``, or what :func:`load_sentence_transformer` loads.
        tasks: task name -> :class:`Task`.
        config: the server's limits (a :class:`~adalayers.serving.config.ServeConfig`).
        device: where to load ``model`` when it is a name or a folder.
        info: extra facts per task for ``GET /tasks``.
    """
    from adalayers.serving.app import create_app

    if not isinstance(model, nn.Module):
        model = load_sentence_transformer(model, device=device)
    app = create_app(EmbeddingPredictor(model, tasks, info), config)
    add_embed_route(app)
    return app


def add_embed_route(app: Any) -> None:
    """Add ``POST /embed`` to an app :func:`~adalayers.serving.app.create_app` built around an
    :class:`EmbeddingPredictor`.

    The request is text-embeddings-inference's: ``{"inputs": str | [str], "normalize": bool
    (default true), "truncate": bool (default false)}``; the answer is its list of vectors, one
    per input, exactly as ``model.encode`` computes them for the batch the server formed
    (``normalize``: as ``encode(normalize_embeddings=True)``; a model with a ``Normalize``
    module gives unit vectors either way). Adding ``"tasks": [names]`` runs those side tasks on
    the same forward and answers ``{"embeddings": [...], "predictions": [...], "tasks":
    [...]}`` instead (``predictions``: one dict per input, task name -> prediction; token
    tasks per token the model read, special tokens dropped). An input longer than the model's
    ``max_seq_length`` is answered 413 unless ``truncate`` is true; the server's other limits
    are ``/predict``'s.
    """
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    from adalayers.core.encoding import text_problem
    from adalayers.serving.batcher import QueueFullError, ShuttingDownError

    predictor = app.state.predictor
    if not isinstance(predictor, EmbeddingPredictor):
        raise TypeError("add_embed_route needs an app built around an EmbeddingPredictor")
    config = app.state.config
    known = predictor.task_names

    # the schema states the limits and task names; the handler answers them (413, 400)
    text = Annotated[
        str,
        Field(json_schema_extra={"minLength": 1, "maxLength": config.max_chars, "pattern": r"\S"}),
    ]
    texts = Annotated[
        list[text], Field(json_schema_extra={"minItems": 1, "maxItems": config.max_texts})
    ]
    name = Annotated[str, Field(json_schema_extra={"enum": known})]

    class EmbedRequest(BaseModel):
        """``POST /embed`` body (text-embeddings-inference's, plus ``tasks``)."""

        model_config = ConfigDict(extra="forbid")
        inputs: text | texts = Field(
            ...,
            description=(
                f"A text or a list of texts (at most {config.max_texts}, each at most "
                f"{config.max_chars} characters, {config.max_tokens} tokens in all)."
            ),
            examples=[["What is the capital of France?"]],
        )
        normalize: bool = Field(True, description="L2-normalise the vectors (as TEI).")
        truncate: bool = Field(
            False,
            description=(
                f"Cut inputs longer than the model's {predictor.max_seq_length} tokens, as "
                f"sentence-transformers does; false answers 413 for them (as TEI)."
            ),
        )
        tasks: list[name] | None = Field(
            None,
            min_length=1,
            description=(
                f"Side tasks to run on the same forward, of {known}; when given the answer is "
                f"an object with embeddings and predictions instead of a bare list."
            ),
        )

    class EmbedResponse(BaseModel):
        """``POST /embed`` answer when ``tasks`` are asked."""

        embeddings: list[list[float]]
        predictions: list[dict[str, dict[str, Any]]] = Field(
            ..., description="One entry per input: task name -> its prediction."
        )
        tasks: list[str]

    def refusal(err: Exception) -> Any:
        if isinstance(err, QueueFullError):
            detail, retry = f"queue full ({config.max_queue} requests waiting); retry later", "1"
        else:
            detail, retry = f"server is shutting down{f': {err}' if str(err) else ''}; retry", "5"
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": retry})

    async def embed(request: EmbedRequest) -> Any:
        texts = [request.inputs] if isinstance(request.inputs, str) else list(request.inputs)
        if not texts:
            raise HTTPException(422, "inputs is empty: give a text or a list of texts")
        if len(texts) > config.max_texts:
            raise HTTPException(
                413, f"{len(texts)} inputs in one request; the limit is {config.max_texts}"
            )
        for i, text in enumerate(texts):
            if len(text) > config.max_chars:
                raise HTTPException(
                    413, f"input {i} has {len(text)} characters; the limit is {config.max_chars}"
                )
            problem = text_problem(text)
            if problem:
                raise HTTPException(422, f"input {i} {problem[0]}")
        names = None
        if request.tasks is not None:
            unknown = sorted(set(request.tasks) - set(known))
            if unknown:
                raise HTTPException(400, f"unknown task(s) {unknown}; this server has {known}")
            names = list(dict.fromkeys(request.tasks))
            try:
                predictor.check_pairs(names, False)
            except PairMismatchError as err:
                raise HTTPException(
                    422, f"{err}; /embed reads single texts: ask /predict with 'pairs'"
                ) from None
        batcher = app.state.batcher["batcher"]
        try:
            batcher.check_open()
        except (QueueFullError, ShuttingDownError) as err:
            return refusal(err)
        counts = await asyncio.to_thread(predictor.embed_token_counts, texts)
        limit = predictor.max_seq_length
        if not request.truncate:
            for i, count in enumerate(counts):
                if count > limit:
                    raise HTTPException(
                        413,
                        f"input {i} has {count} tokens; the model reads at most {limit}: send "
                        f'"truncate": true to cut it (as sentence-transformers does), or a '
                        f"shorter text",
                    )
        total = sum(min(count, limit) for count in counts)
        if total > config.max_tokens:
            raise HTTPException(
                413,
                f"the inputs make {total} tokens for the model; the limit per request is "
                f"{config.max_tokens}: send fewer or shorter inputs",
            )
        try:
            result = await batcher.submit(texts, names, embed={"normalize": request.normalize})
        except (QueueFullError, ShuttingDownError) as err:
            return refusal(err)
        except (TypeError, ValueError) as err:
            raise HTTPException(422, str(err)) from err
        except Exception as err:  # answered here: one that reaches uvicorn drops the connection
            logger.error("POST /embed answered 500: %s: %s", type(err).__name__, err)
            return JSONResponse({"detail": "internal server error"}, status_code=500)
        if names is None:
            return JSONResponse(result["embeddings"])
        return {**result, "tasks": names}

    embed.__annotations__["request"] = EmbedRequest  # a local class: not a string to resolve
    app.post(
        "/embed",
        response_model=list[list[float]] | EmbedResponse,
        responses={
            400: {"description": "Unknown task."},
            413: {"description": "Too many inputs, characters or tokens; a long input."},
            422: {"description": "Malformed request, an empty text, or a pair task."},
            503: {"description": "Queue full or shutting down; retry later."},
        },
    )(embed)
