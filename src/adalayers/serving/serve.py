"""An HTTP JSON API over trained tasks: one base forward per micro-batch serves every task.

Endpoints (the OpenAPI schema is at ``/openapi.json``, interactive docs at ``/docs``):

* ``POST /predict`` ``{"texts": [...], "tasks": [...] | null}`` -> ``{"predictions": [...]}``,
  one dict per text: task name -> ``{"label", "score"}``, ``{"value"}`` or
  ``{"words", "labels", "scores"}``. Tasks trained on sentence pairs take
  ``{"pairs": [[text, text_pair], ...]}`` instead of ``texts``, one prediction per pair; a pair
  task sent ``texts``, or a single-text task sent ``pairs``, is answered ``422``.
* ``GET /tasks``: each task's type, labels, whether it reads pairs (``text_pair``), base and
  learned layer weights.
* ``GET /health``: status, queue depth and batching counters.

Requests are queued and a single worker runs them in micro-batches: it takes what is waiting,
waits at most ``max_wait_ms`` for more, and runs up to ``max_batch_size`` texts in one forward
(in a worker thread, so the event loop keeps accepting). A long text of a token task becomes
windows of the base's length, also run ``max_batch_size`` at a time, so memory does not grow
with the text. The queue is bounded: when ``max_queue`` requests are waiting, new ones get
``503`` with ``Retry-After`` rather than a growing backlog.

One request cannot hold the worker for long: besides ``max_texts`` and ``max_chars`` it may
make the base run at most ``max_tokens`` tokens (as the base's tokenizer counts them; a
sequence task reads at most the base's maximum length of each text); more answers ``413``.

On shutdown (SIGTERM, Ctrl-C) the server stops accepting and finishes the requests it
accepted for up to ``drain_seconds``; those still unfinished then are answered ``503`` with
``Retry-After`` and the worker stops computing them (it checks before each forward).

Errors a client can cause answer ``4xx`` with a message: malformed JSON or fields ``422``, an
empty text ``422``, an unknown task ``400``, too many texts, a too long text, too many tokens or
a too large body ``413``. All limits are fields of :class:`ServeConfig` (the CLI's flags) and
are stated in the OpenAPI schema.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from typing import Annotated, Any

from adalayers.core.encoding import text_problem
from adalayers.core.task import AdaLayers, PairMismatchError, check_pairs

try:
    from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
except ImportError as err:  # pragma: no cover - the serve extra is not installed
    raise ImportError(
        "adalayers.serving.serve needs the serve extra: pip install 'adalayers[serve]'"
    ) from err

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits, in one place for :func:`create_app`, :func:`serve` and the CLI.

    Each field is a flag of ``adalayers serve`` (``max_tokens`` -> ``--max-tokens``) whose
    help is the field's ``help``; the request limits are also stated in the OpenAPI schema.

    Raises:
        ValueError: a limit is not positive (``max_wait_ms`` and ``drain_seconds``: negative);
            the message names it.
    """

    max_batch_size: int = field(
        default=32, metadata={"help": "most texts, or windows of long texts, in one base forward"}
    )
    max_wait_ms: float = field(
        default=5.0, metadata={"help": "longest the first request of a batch waits for others"}
    )
    max_queue: int = field(
        default=256, metadata={"help": "most requests waiting; beyond it 503 with Retry-After"}
    )
    max_texts: int = field(
        default=64, metadata={"help": "most texts (or sentence pairs) in one request (413)"}
    )
    max_chars: int = field(
        default=10_000, metadata={"help": "most characters in a text (each of a pair) (413)"}
    )
    max_tokens: int = field(
        default=16_384,
        metadata={
            "help": "most tokens one request may make the base run, as its tokenizer counts "
            "them; a sequence task reads at most the base's maximum length per text (413)"
        },
    )
    max_body_bytes: int = field(
        default=1_000_000, metadata={"help": "largest request body in bytes (413)"}
    )
    drain_seconds: float = field(
        default=30.0,
        metadata={
            "help": "on shutdown (SIGTERM), seconds to finish the accepted requests; those "
            "still unfinished then get 503 with Retry-After"
        },
    )

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{spec.name} must be a number, got {value!r}")
            if spec.name in ("max_wait_ms", "drain_seconds"):
                if value < 0:
                    raise ValueError(f"{spec.name} must be >= 0, got {value}")
            elif value <= 0:
                raise ValueError(f"{spec.name} must be positive, got {value}")


class Predictor:
    """Runs any subset of a runtime's tasks on texts (what the server calls, in a thread).

    Args:
        runtime: the base with its tasks.
        info: extra facts per task for ``GET /tasks`` (e.g. the run folder).
    """

    def __init__(self, runtime: AdaLayers, info: dict[str, dict[str, Any]] | None = None) -> None:
        if not runtime.tasks:
            raise ValueError("the runtime has no tasks to serve")
        self.runtime = runtime.eval()
        self.info = info or {}
        self._subsets: dict[tuple[str, ...], AdaLayers] = {}
        # a copy for counting tokens off the model thread: a fast tokenizer called from two
        # threads with different truncation settings fails ("Already borrowed")
        self._tokenizer = copy.deepcopy(runtime.backbone.tokenizer)
        self._tokenizer_lock = threading.Lock()

    @property
    def task_names(self) -> list[str]:
        return list(self.runtime.tasks)

    def count_tokens(
        self,
        texts: Sequence[str],
        tasks: Sequence[str] | None = None,
        pairs: Sequence[str] | None = None,
    ) -> list[int]:
        """Tokens per text (or pair: both texts) that the base runs for ``tasks`` (default:
        all), special ones included.

        A token task reads all of a text (in windows); a sequence task only the base's maximum.
        """
        names = [n for n in self.task_names if tasks is None or n in tasks]
        whole = any(self.runtime.tasks[n].task_type == "token_classification" for n in names)
        second = list(pairs) if pairs is not None else None
        with self._tokenizer_lock:
            ids = self._tokenizer(list(texts), second, verbose=False)["input_ids"]
        cap = None if whole else self.runtime.max_length
        return [len(row) if cap is None else min(len(row), cap) for row in ids]

    def check_pairs(self, tasks: Sequence[str] | None, pairs: bool) -> None:
        """Raise :class:`~adalayers.core.task.PairMismatchError` if ``tasks`` (default: all) do not
        all take this kind of input (sentence pairs, or single texts)."""
        names = [n for n in self.task_names if tasks is None or n in tasks]
        check_pairs({n: self.runtime.tasks[n] for n in names}, pairs)

    def predict(
        self,
        texts: list[str],
        tasks: Sequence[str] | None = None,
        batch_size: int = 32,
        before_forward: Callable[[], None] | None = None,
        pairs: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Predictions of ``tasks`` (default: all) for ``texts`` (and the second texts
        ``pairs`` of sentence pairs), one base forward per batch.

        ``before_forward`` is called before each forward; what it raises stops the work.
        """
        names = tuple(n for n in self.task_names if tasks is None or n in tasks)
        if names not in self._subsets:
            if len(names) == len(self.task_names):
                self._subsets[names] = self.runtime
            else:
                subset = AdaLayers(self.runtime.backbone)
                for name in names:
                    subset.add_task(name, self.runtime.tasks[name])
                self._subsets[names] = subset.eval()
        return self._subsets[names].predict(
            texts, pairs, batch_size=batch_size, before_forward=before_forward
        )

    def describe(self) -> dict[str, Any]:
        backbone = self.runtime.backbone
        tasks = {}
        for name, task in self.runtime.tasks.items():
            tasks[name] = {
                "task_type": task.task_type,
                "labels": task.labels,
                "text_pair": False if task.task_type == "token_classification" else task.text_pair,
                "base": task.base.name_or_path,
                "layer_weights": {str(k): v for k, v in task.mixer.layer_weights().items()},
                "parameters": task.num_parameters(),
                **self.info.get(name, {}),
            }
        return {
            "base": {
                "name_or_path": backbone.name_or_path,
                "family": backbone.family,
                "states": backbone.states,
                "num_states": backbone.num_states,
                "hidden_size": backbone.hidden_size,
                "fingerprint": backbone.fingerprint(),
            },
            "tasks": tasks,
        }


_ONE_INPUT = (
    "give exactly one of 'texts' (a list of texts) or 'pairs' (a list of [text, text_pair], for "
    "tasks trained on sentence pairs)"
)


class PredictRequest(BaseModel):
    """``POST /predict`` body: ``texts``, or ``pairs`` for tasks trained on sentence pairs."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"oneOf": [{"required": ["texts"]}, {"required": ["pairs"]}]},
    )

    texts: list[str] = Field(
        None,  # one of texts / pairs (checked below); not nullable in the schema
        min_length=1,
        description="Texts to label.",
        examples=[["a great film"]],
    )
    pairs: list[tuple[str, str]] = Field(
        None,
        min_length=1,
        description="Sentence pairs to label, each [text, text_pair], for tasks trained on pairs.",
        examples=[[["The cat sat.", "A cat was sitting."]]],
    )
    tasks: list[str] | None = Field(None, description="Tasks to run (default: all).")

    @model_validator(mode="before")
    @classmethod
    def _texts_or_pairs(cls, values: Any) -> Any:
        """One of ``texts`` / ``pairs``, and no other field (``text_pairs`` is not ignored)."""
        if isinstance(values, dict):
            unknown = sorted(set(values) - set(cls.model_fields))
            if unknown:
                raise ValueError(
                    f"unknown field(s) {unknown}: a request has 'texts' (a list of texts) or "
                    f"'pairs' (a list of [text, text_pair]), and optionally 'tasks'"
                )
            if ("texts" in values) == ("pairs" in values):
                raise ValueError(_ONE_INPUT)
        return values

    def inputs(self) -> tuple[list[str], list[str] | None]:
        """``(texts, second texts or None)``."""
        if self.pairs is not None:
            return [a for a, _ in self.pairs], [b for _, b in self.pairs]
        return self.texts, None


class PredictResponse(BaseModel):
    """``POST /predict`` answer."""

    predictions: list[dict[str, dict[str, Any]]] = Field(
        ..., description="One entry per text: task name -> its prediction."
    )
    tasks: list[str] = Field(..., description="The tasks that ran.")


class Health(BaseModel):
    """``GET /health`` answer."""

    status: str = Field(..., description="'ok' or 'shutting down'.")
    queue: int = Field(..., description="Requests waiting.")
    max_queue: int
    stats: dict[str, int] = Field(
        ..., description="Requests, texts, batches, rejected, errors, aborted (at shutdown)."
    )


class ErrorResponse(BaseModel):
    """A 4xx or 503 answer: what went wrong and what to do."""

    detail: str | list[dict[str, Any]] = Field(
        ..., description="The message, or pydantic's list of field errors (malformed requests)."
    )


def _request_model(config: ServeConfig, tasks: list[str]) -> type[PredictRequest]:
    """:class:`PredictRequest` whose schema states this server's limits and task names.

    The limits are documented, not enforced by pydantic: the handler answers them with 413 and
    an unknown task with 400, each with a message (422 is for malformed requests).
    """
    text = Annotated[
        str,
        Field(json_schema_extra={"minLength": 1, "maxLength": config.max_chars, "pattern": r"\S"}),
    ]
    name = Annotated[str, Field(json_schema_extra={"enum": tasks})]
    limits = (
        f"at most {config.max_texts} of them, at most {config.max_chars} characters a text, and "
        f"at most {config.max_tokens} tokens in all (413 beyond)"
    )
    return create_model(
        "PredictRequest",
        __base__=PredictRequest,
        __doc__=PredictRequest.__doc__,
        texts=(
            list[text],
            Field(
                None,
                min_length=1,
                description=f"Texts to label: {limits}. Give texts or pairs.",
                examples=[["a great film"]],
                json_schema_extra={"maxItems": config.max_texts},
            ),
        ),
        pairs=(
            list[tuple[text, text]],
            Field(
                None,
                min_length=1,
                description=(
                    f"Sentence pairs to label, each [text, text_pair], for tasks trained on "
                    f"pairs: {limits}, counting both texts of a pair. Give texts or pairs."
                ),
                examples=[[["The cat sat.", "A cat was sitting."]]],
                json_schema_extra={"maxItems": config.max_texts},
            ),
        ),
        tasks=(
            Annotated[list[name], Field(json_schema_extra={"minItems": 1})] | None,
            Field(None, description=f"Tasks to run, of {tasks} (default: all)."),
        ),
    )


# -- micro-batching -----------------------------------------------------------------------------
class QueueFullError(Exception):
    """The request queue is full (answered with 503)."""


class ShuttingDownError(Exception):
    """The server is shutting down: a new request, or an accepted one not finished within
    the drain time (answered with 503 and ``Retry-After``)."""


@dataclass
class _Item:
    texts: list[str]
    tasks: list[str] | None
    future: asyncio.Future
    pairs: list[str] | None = None  # the second texts of sentence pairs
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """A bounded queue of requests and one worker that runs them in batches.

    Shutdown in two steps: :meth:`begin_drain` refuses new requests and lets the worker finish
    the accepted ones; at the drain deadline :meth:`abort` answers what is left with
    :class:`ShuttingDownError` and the worker stops before its next forward.

    Args:
        predictor: what runs a batch.
        max_batch_size: most texts in one forward.
        max_wait_ms: longest a waiting request holds the batch open for more.
        max_queue: most requests waiting; more are refused with :class:`QueueFullError`.
    """

    def __init__(
        self, predictor: Predictor, max_batch_size: int, max_wait_ms: float, max_queue: int
    ) -> None:
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=max_queue)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="adalayers-model")
        self.closing = False
        self.aborted = False  # read by the model thread before each forward
        self.stats = {
            "requests": 0,
            "texts": 0,
            "batches": 0,
            "rejected": 0,
            "errors": 0,
            "aborted": 0,
        }
        self._carry: _Item | None = None
        self._running: list[_Item] = []
        self._worker: asyncio.Task | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    def check_open(self) -> None:
        """Raise now what :meth:`submit` would raise for a new request (a cheap early check)."""
        if self.closing:
            raise ShuttingDownError
        if self.queue.full():
            self.stats["rejected"] += 1
            raise QueueFullError

    async def submit(
        self, texts: list[str], tasks: list[str] | None, pairs: list[str] | None = None
    ) -> list[dict[str, Any]]:
        if self.closing:
            raise ShuttingDownError
        item = _Item(texts, tasks, asyncio.get_running_loop().create_future(), pairs)
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.stats["rejected"] += 1
            raise QueueFullError from None
        return await item.future

    async def _next_batch(self) -> list[_Item]:
        first = self._carry or await self.queue.get()
        self._carry = None
        batch, size = [first], len(first.texts)
        self._running = batch  # what abort() answers while the batch fills
        deadline = time.perf_counter() + self.max_wait
        while size < self.max_batch_size:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            # pairs and single texts run in forwards of their own
            mixed = (item.pairs is None) != (first.pairs is None)
            if mixed or size + len(item.texts) > self.max_batch_size:
                self._carry = item  # opens the next batch
                break
            batch.append(item)
            size += len(item.texts)
        return [i for i in batch if not i.future.done()]  # drop requests whose client left

    def _run_batch(self, batch: list[_Item]) -> list[list[dict[str, Any]] | BaseException]:
        """In the worker thread: one forward for the whole batch (each item alone on failure)."""
        tasks = None
        if all(i.tasks is not None for i in batch):
            tasks = sorted({t for i in batch for t in i.tasks})
        texts = [t for i in batch for t in i.texts]
        pairs = None if batch[0].pairs is None else [t for i in batch for t in i.pairs or []]
        check = self._check_aborted
        try:
            merged = self.predictor.predict(
                texts, tasks, batch_size=self.max_batch_size, before_forward=check, pairs=pairs
            )
        except ShuttingDownError:
            raise
        except Exception:  # one bad request must not fail the others
            if len(batch) == 1:
                raise
            out: list[list[dict[str, Any]] | BaseException] = []
            for item in batch:
                try:
                    out.append(
                        self.predictor.predict(
                            item.texts,
                            item.tasks,
                            self.max_batch_size,
                            before_forward=check,
                            pairs=item.pairs,
                        )
                    )
                except ShuttingDownError:
                    raise
                except Exception as err:
                    out.append(err)
            return out
        results: list[list[dict[str, Any]] | BaseException] = []
        start = 0
        for item in batch:
            rows = merged[start : start + len(item.texts)]
            start += len(item.texts)
            if item.tasks is not None:
                rows = [{name: row[name] for name in item.tasks} for row in rows]
            results.append(rows)
        return results

    def _check_aborted(self) -> None:
        """In the model thread, before each forward: stop work nobody waits for any more."""
        if self.aborted:
            raise ShuttingDownError("the drain time ran out")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.aborted:
            batch = await self._next_batch()
            if not batch or self.aborted:
                continue
            self._running = batch
            try:
                results = await loop.run_in_executor(self.executor, self._run_batch, batch)
            except ShuttingDownError as err:  # aborted: the futures are already answered
                results = [err] * len(batch)
            except (TypeError, ValueError) as err:  # a bad input: the client gets a 422
                logger.info("request refused: %s", err)
                results = [err] * len(batch)
            except Exception as err:  # reported to each waiting client
                logger.exception("batch of %d request(s) failed", len(batch))
                results = [err] * len(batch)
            finally:
                self._running = []
            self.stats["batches"] += 1
            for item, result in zip(batch, results):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    self.stats["errors"] += 1
                    item.future.set_exception(result)
                else:
                    self.stats["requests"] += 1
                    self.stats["texts"] += len(item.texts)
                    item.future.set_result(result)

    def begin_drain(self, seconds: float) -> None:
        """Refuse new requests; :meth:`abort` what is not finished ``seconds`` from now.

        Called when the server starts shutting down; later calls change nothing.
        """
        if self.closing:
            return
        self.closing = True
        logger.info("draining: %d request(s) queued, %.1f s to finish them", self.pending, seconds)
        self._abort_timer = asyncio.get_running_loop().call_later(seconds, self.abort)

    @property
    def pending(self) -> int:
        """Accepted requests not answered yet (queued or running)."""
        held = [*self._running, *([self._carry] if self._carry else [])]
        return sum(not item.future.done() for item in held) + self.queue.qsize()

    def abort(self) -> None:
        """Answer every accepted request not finished yet with :class:`ShuttingDownError`, and
        make the worker stop (the model thread stops before its next forward)."""
        self.closing = self.aborted = True
        waiting = [*self._running, *([self._carry] if self._carry else [])]
        self._carry = None
        while not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        left = [item for item in waiting if not item.future.done()]
        for item in left:
            item.future.set_exception(
                ShuttingDownError("this request was accepted but not finished in the drain time")
            )
        self.stats["aborted"] += len(left)
        if left:
            logger.warning("drain time over: %d request(s) answered 503", len(left))

    async def close(self, timeout: float = 30.0) -> None:
        """Refuse new requests, finish the accepted ones (until the drain deadline, ``timeout``
        s from now if no drain began), answer the rest with 503, stop the worker."""
        self.begin_drain(timeout)
        while self.pending and not self.aborted:
            await asyncio.sleep(0.01)
        self.abort()  # nothing left if the drain finished in time
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        # the model thread stops before its next forward; wait for it off the event loop
        await asyncio.to_thread(self.executor.shutdown, wait=True, cancel_futures=True)


# -- request size limit -------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: answer 413 to any request body over ``max_bytes`` (declared or sent)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Any) -> None:
        body = json.dumps(
            {"detail": f"request body is larger than the limit of {self.max_bytes} bytes"}
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        # read the whole body first (the app would anyway), refusing it once over the limit
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                await self._reject(send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


# -- the app ------------------------------------------------------------------------------------
def create_app(
    runtime: AdaLayers | Predictor, config: ServeConfig | None = None, **limits: Any
) -> Any:
    """Build the FastAPI app serving ``runtime``'s tasks.

    Run it with :func:`serve` or :class:`BackgroundServer`, which start the drain clock
    (``drain_seconds``) when shutdown begins; under another server the clock starts when the
    app's lifespan ends.

    Args:
        runtime: an :class:`AdaLayers` with its tasks (or a :class:`Predictor` around one).
        config: the server's limits (default: :class:`ServeConfig`'s).
        **limits: :class:`ServeConfig` fields overriding ``config``'s, e.g. ``max_texts=8``
            (``shutdown_timeout`` is the old name of ``drain_seconds``).

    Returns:
        A ``fastapi.FastAPI`` application.

    Raises:
        TypeError: a limit that is not a :class:`ServeConfig` field.
        ValueError: a limit out of range (the message names it), or no tasks to serve.
    """
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    if "shutdown_timeout" in limits:
        limits["drain_seconds"] = limits.pop("shutdown_timeout")
    names_known = sorted(f.name for f in fields(ServeConfig))
    unknown_limits = sorted(set(limits) - set(names_known))
    if unknown_limits:
        raise TypeError(f"unknown server limit(s) {unknown_limits}; ServeConfig has {names_known}")
    config = replace(config or ServeConfig(), **limits)
    max_queue, max_texts, max_chars = config.max_queue, config.max_texts, config.max_chars
    max_tokens = config.max_tokens
    predictor = runtime if isinstance(runtime, Predictor) else Predictor(runtime)
    known = predictor.task_names
    request_model = _request_model(config, known)

    state: dict[str, MicroBatcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):  # noqa: ANN202
        batcher = MicroBatcher(predictor, config.max_batch_size, config.max_wait_ms, max_queue)
        batcher.start()
        state["batcher"] = batcher
        logger.info("serving tasks %s on %s", known, predictor.runtime.backbone.name_or_path)
        try:
            yield
        finally:
            await batcher.close(config.drain_seconds)

    def begin_drain() -> None:
        """Shutdown began: finish what was accepted within ``drain_seconds``, then answer 503."""
        if "batcher" in state:
            state["batcher"].begin_drain(config.drain_seconds)

    app = FastAPI(
        title="adalayers",
        description="Side-task predictions from one forward of a frozen base.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.get("/health", response_model=Health)
    async def health() -> dict[str, Any]:
        batcher = state["batcher"]
        return {
            "status": "shutting down" if batcher.closing else "ok",
            "queue": batcher.queue.qsize(),
            "max_queue": max_queue,
            "stats": dict(batcher.stats),
        }

    @app.get("/tasks")
    async def tasks() -> dict[str, Any]:
        return predictor.describe()

    retry = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}
    retry["Retry-After"]["required"] = True  # type: ignore[index]

    responses = {
        400: {"model": ErrorResponse, "description": "Unknown task."},
        413: {
            "model": ErrorResponse,
            "description": (
                f"Too many texts (> {max_texts}), a text too long (> {max_chars} "
                f"characters), too many tokens (> {max_tokens}), or a body too large "
                f"(> {config.max_body_bytes} bytes)."
            ),
        },
        422: {
            "model": ErrorResponse,
            "description": (
                "Malformed request, an empty text, or input that does not fit a task: texts "
                "for a task trained on sentence pairs, or pairs for one trained on single texts."
            ),
        },
        503: {
            "model": ErrorResponse,
            "description": (
                "Queue full, shutting down, or accepted but not finished within the "
                f"drain time ({config.drain_seconds} s) at shutdown; retry later."
            ),
            "headers": retry,
        },
    }

    def pair_advice(err: PairMismatchError) -> str:
        """What to send instead, in the request's words."""
        if err.needs_pairs:
            return (
                f"task {err.task!r} was trained on sentence pairs: send 'pairs': [[text, "
                f"text_pair], ...] instead of 'texts' (GET /tasks: text_pair is true)"
            )
        token = predictor.runtime.tasks[err.task].task_type == "token_classification"
        kind = "labels the words of single texts" if token else "was trained on single texts"
        return (
            f"task {err.task!r} {kind}, not sentence pairs: send 'texts' instead of 'pairs', or "
            f"name in 'tasks' only tasks trained on pairs"
        )

    def refusal(err: QueueFullError | ShuttingDownError) -> Any:
        """503 with Retry-After: the queue is full, or the server is shutting down."""
        if isinstance(err, QueueFullError):
            detail, retry_after = f"queue full ({max_queue} requests waiting); retry later", "1"
        else:
            detail = f"server is shutting down{f': {err}' if str(err) else ''}; retry"
            retry_after = "5"
        return JSONResponse(
            {"detail": detail}, status_code=503, headers={"Retry-After": retry_after}
        )

    def name(i: int, j: int, paired: bool) -> str:
        """How an error names a text: ``text 3``, or ``pair 3, text_pair``."""
        return f"pair {i}, {('text', 'text_pair')[j]}" if paired else f"text {i}"

    async def predict(request: PredictRequest) -> Any:
        texts, pairs = request.inputs()
        paired = pairs is not None
        what = "pairs" if paired else "texts"
        if len(texts) > max_texts:
            raise HTTPException(
                413, f"{len(texts)} {what} in one request; the limit is {max_texts}"
            )
        for j, column in enumerate((texts, pairs) if paired else (texts,)):
            for i, text in enumerate(column):
                if len(text) > max_chars:
                    raise HTTPException(
                        413,
                        f"{name(i, j, paired)} has {len(text)} characters; the limit is "
                        f"{max_chars}",
                    )
                problem = text_problem(text)  # blank, invisible characters only, lone surrogate
                if problem:
                    raise HTTPException(422, f"{name(i, j, paired)} {problem[0]}")
        names = None
        if request.tasks is not None:
            unknown = sorted(set(request.tasks) - set(known))
            if unknown or not request.tasks:
                raise HTTPException(
                    400, f"unknown task(s) {unknown or request.tasks}; this server has {known}"
                )
            names = list(dict.fromkeys(request.tasks))
        try:
            predictor.check_pairs(names, paired)
        except PairMismatchError as err:
            raise HTTPException(422, pair_advice(err)) from None
        batcher = state["batcher"]
        try:  # the cheap refusals first: under overload a 503 costs no tokenizing
            batcher.check_open()
        except (QueueFullError, ShuttingDownError) as err:
            return refusal(err)
        # the token budget (off the event loop: a long body takes a while to tokenize)
        counts = await asyncio.to_thread(predictor.count_tokens, texts, names, pairs)
        if sum(counts) > max_tokens:
            top = max(range(len(counts)), key=counts.__getitem__)
            which = f"pair {top}" if paired else f"text {top}"
            raise HTTPException(
                413,
                f"the {what} make {sum(counts)} tokens for the base ({which}: {counts[top]}); "
                f"the limit per request is {max_tokens}: send fewer or shorter {what}",
            )
        try:
            rows = await batcher.submit(texts, names, pairs)
        except (QueueFullError, ShuttingDownError) as err:
            return refusal(err)
        except (TypeError, ValueError) as err:
            raise HTTPException(422, str(err)) from err
        except Exception as err:  # answered here: one that reaches uvicorn drops the connection
            logger.error("POST /predict answered 500: %s: %s", type(err).__name__, err)
            return JSONResponse({"detail": "internal server error"}, status_code=500)
        return {"predictions": rows, "tasks": names or known}

    # registered with the request model that states this server's limits in the schema
    predict.__annotations__["request"] = request_model
    app.post("/predict", response_model=PredictResponse, responses=responses)(predict)

    app.state.predictor = predictor
    app.state.batcher = state
    app.state.config = config
    app.state.begin_drain = begin_drain
    return app


# -- running it ---------------------------------------------------------------------------------
DRAIN_MARGIN = 5.0  # uvicorn's own graceful-shutdown limit: the app's drain time plus this


def make_server(app: Any, **config: Any) -> Any:
    """A ``uvicorn.Server`` for ``app`` that starts the app's drain when shutdown begins.

    uvicorn tells an app about shutdown only after its graceful wait (and cancels what is still
    running then, answering 500); this server calls ``app.state.begin_drain`` first, so the app
    answers what it cannot finish within its ``drain_seconds`` with 503 itself.
    ``timeout_graceful_shutdown`` defaults to that drain time plus :data:`DRAIN_MARGIN`.

    Args:
        app: the ASGI app (from :func:`create_app`, or any other).
        **config: ``uvicorn.Config`` arguments (host, port, log_level, ...).
    """
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            begin = getattr(getattr(app, "state", None), "begin_drain", None)
            if begin is not None:
                begin()
            await super().shutdown(sockets)

    limits = getattr(getattr(app, "state", None), "config", None)
    if isinstance(limits, ServeConfig):
        config.setdefault("timeout_graceful_shutdown", limits.drain_seconds + DRAIN_MARGIN)
    return DrainingServer(uvicorn.Config(app, **config))


class BackgroundServer:
    """Run an app with uvicorn in a background thread (tests, notebooks, the load test).

    Args:
        app: the ASGI app.
        host: interface to bind (loopback by default).
        port: port to bind; 0 picks a free one (see :attr:`url`).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        config.setdefault("log_level", "warning")
        self.server = make_server(app, **config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.perf_counter() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.perf_counter() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful: stop accepting, let in-flight requests finish, run the shutdown."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(
    runs: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    base: str | None = None,
    device: str | None = None,
    config: ServeConfig | None = None,
    log_level: str = "info",
    **limits: Any,
) -> None:
    """Load the runs' tasks on one base and serve them until interrupted (Ctrl-C / SIGTERM).

    On SIGTERM the server stops accepting, finishes the accepted requests for up to
    ``drain_seconds``, answers the rest 503 with ``Retry-After``, and exits.

    Args:
        runs: training run folders or saved task folders (``NAME=PATH`` names a task).
        host: interface to bind; the default serves loopback only.
        port: TCP port.
        base: override the base the runs name.
        device: where to run the base (``"cpu"``, ``"cuda"``).
        config: the server's limits (default: :class:`ServeConfig`'s).
        log_level: uvicorn's log level.
        **limits: :class:`ServeConfig` fields overriding ``config``'s (the CLI passes its
            flags this way), e.g. ``max_tokens=4096, drain_seconds=60``.

    Raises:
        TypeError, ValueError: a limit that is unknown or out of range (before any loading).
    """
    from adalayers.serving.runtime import _task_names, load_runs, resolve_run

    unknown = sorted(set(limits) - {f.name for f in fields(ServeConfig)})
    if unknown:
        raise TypeError(f"unknown server limit(s) {unknown}")
    config = replace(config or ServeConfig(), **limits)
    named = _task_names(runs)
    runtime = load_runs(named, base=base, device=device)
    info = {
        name: {"run": str(path), "task_folder": str(resolve_run(path)[0])}
        for name, path in named.items()
    }
    app = create_app(Predictor(runtime, info), config)
    make_server(app, host=host, port=port, log_level=log_level).run()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``serve`` command's arguments (shared by ``adalayers serve`` and ``python -m``)."""
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run or task folder; NAME=PATH")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--base", default=None, help="override the base the runs name")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    for spec in fields(ServeConfig):  # --max-batch-size ... --drain-seconds
        parser.add_argument(
            "--" + spec.name.replace("_", "-"),
            type=type(spec.default),
            default=spec.default,
            help=f"{spec.metadata['help']} (default: %(default)s)",
        )
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m adalayers.serving.serve RUN [RUN ...] [--host H --port N ...]``."""
    parser = add_arguments(argparse.ArgumentParser(prog="adalayers serve", description=__doc__))
    args = vars(parser.parse_args(argv))
    logging.basicConfig(
        level=args["log_level"].upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    serve(args.pop("runs"), **args)


if __name__ == "__main__":
    main()
