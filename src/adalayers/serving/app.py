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

Requests are queued and a single worker runs them in micro-batches (:mod:`.batcher`): it takes
what is waiting, waits at most ``max_wait_ms`` for more, and runs up to ``max_batch_size`` texts
in one forward (in a worker thread, so the event loop keeps accepting). A long text of a token
task becomes windows of the base's length, also run ``max_batch_size`` at a time, so memory does
not grow with the text. The queue is bounded: when ``max_queue`` requests are waiting, new ones get
``503`` with ``Retry-After`` rather than a growing backlog.

One request cannot hold the worker for long: besides ``max_texts`` and ``max_chars`` it may
make the base run at most ``max_tokens`` tokens (as the base's tokenizer counts them; a
sequence task reads at most the base's maximum length of each text); more answers ``413``.

On shutdown (SIGTERM, Ctrl-C) the server stops accepting and finishes the requests it
accepted for up to ``drain_seconds``; those still unfinished then are answered ``503`` with
``Retry-After`` and the worker stops computing them (it checks before each forward).

Errors a client can cause answer ``4xx`` with a message: malformed JSON or fields ``422``, an
empty text ``422``, an unknown task ``400``, too many texts, a too long text, too many tokens or
a too large body ``413``. All limits are fields of
:class:`~adalayers.serving.config.ServeConfig` (the CLI's flags) and are stated in the OpenAPI
schema. Run the app with :mod:`.server` (``serve``, ``BackgroundServer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Annotated, Any

from adalayers.core.encoding import text_problem
from adalayers.core.multitask import AdaLayers
from adalayers.core.task import PairMismatchError
from adalayers.serving.batcher import MicroBatcher, QueueFullError, ShuttingDownError
from adalayers.serving.config import ServeConfig
from adalayers.serving.predictor import Predictor

try:
    from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
except ImportError as err:  # pragma: no cover - the serve extra is not installed
    raise ImportError(
        "adalayers.serving.app needs the serve extra: pip install 'adalayers[serve]'"
    ) from err

logger = logging.getLogger(__name__)


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

    Run it with :func:`~adalayers.serving.server.serve` or
    :class:`~adalayers.serving.server.BackgroundServer`, which start the drain clock
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

    config = (config or ServeConfig()).updated(**limits)
    max_queue, max_texts, max_chars = config.max_queue, config.max_texts, config.max_chars
    max_tokens = config.max_tokens
    predictor = runtime if isinstance(runtime, Predictor) else Predictor(runtime)
    known = predictor.task_names
    request_model = _request_model(config, known)

    state: dict[str, MicroBatcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):  # noqa: ANN202
        batcher = MicroBatcher(predictor, config)
        batcher.start()
        state["batcher"] = batcher
        logger.info("serving tasks %s on %s", known, predictor.runtime.backbone.name_or_path)
        try:
            yield
        finally:
            await batcher.close()

    def begin_drain() -> None:
        """Shutdown began: finish what was accepted within ``drain_seconds``, then answer 503."""
        if "batcher" in state:
            state["batcher"].begin_drain()

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
        token = predictor.runtime.tasks[err.task].kind.per_token
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
