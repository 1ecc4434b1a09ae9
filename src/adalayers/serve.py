"""An HTTP JSON API over trained tasks: one base forward per micro-batch serves every task.

Endpoints (the OpenAPI schema is at ``/openapi.json``, interactive docs at ``/docs``):

* ``POST /predict`` ``{"texts": [...], "tasks": [...] | null}`` -> ``{"predictions": [...]}``,
  one dict per text: task name -> ``{"label", "score"}``, ``{"value"}`` or
  ``{"words", "labels", "scores"}``.
* ``GET /tasks``: each task's type, labels, base and learned layer weights.
* ``GET /health``: status, queue depth and batching counters.

Requests are queued and a single worker runs them in micro-batches: it takes what is waiting,
waits at most ``max_wait_ms`` for more, and runs up to ``max_batch_size`` texts in one forward
(in a worker thread, so the event loop keeps accepting). The queue is bounded: when
``max_queue`` requests are waiting, new ones get ``503`` with ``Retry-After`` rather than a
growing backlog. On shutdown the server stops accepting, finishes what is queued, then exits.

Errors a client can cause answer ``4xx`` with a message: malformed JSON or fields ``422``, an
empty text ``422``, an unknown task ``400``, too many texts, a too long text or a too large body
``413``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from adalayers.model import AdaLayers

try:
    from pydantic import BaseModel, Field
except ImportError as err:  # pragma: no cover - the serve extra is not installed
    raise ImportError(
        "adalayers.serve needs the serve extra: pip install 'adalayers[serve]'"
    ) from err

logger = logging.getLogger(__name__)


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

    @property
    def task_names(self) -> list[str]:
        return list(self.runtime.tasks)

    def predict(
        self, texts: list[str], tasks: Sequence[str] | None = None, batch_size: int = 32
    ) -> list[dict[str, Any]]:
        """Predictions of ``tasks`` (default: all) for ``texts``, one base forward per batch."""
        names = tuple(n for n in self.task_names if tasks is None or n in tasks)
        if names not in self._subsets:
            if len(names) == len(self.task_names):
                self._subsets[names] = self.runtime
            else:
                subset = AdaLayers(self.runtime.backbone)
                for name in names:
                    subset.add_task(name, self.runtime.tasks[name])
                self._subsets[names] = subset.eval()
        return self._subsets[names].predict(texts, batch_size=batch_size)

    def describe(self) -> dict[str, Any]:
        backbone = self.runtime.backbone
        tasks = {}
        for name, task in self.runtime.tasks.items():
            tasks[name] = {
                "task_type": task.task_type,
                "labels": task.labels,
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


class PredictRequest(BaseModel):
    """``POST /predict`` body."""

    texts: list[str] = Field(
        ..., min_length=1, description="Texts to label.", examples=[["a great film"]]
    )
    tasks: list[str] | None = Field(None, description="Tasks to run (default: all).")


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
    stats: dict[str, int] = Field(..., description="Requests, texts, batches, rejected, errors.")


# -- micro-batching -----------------------------------------------------------------------------
class QueueFullError(Exception):
    """The request queue is full (answered with 503)."""


class ShuttingDownError(Exception):
    """The server is shutting down (answered with 503)."""


@dataclass
class _Item:
    texts: list[str]
    tasks: list[str] | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """A bounded queue of requests and one worker that runs them in batches.

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
        self.stats = {"requests": 0, "texts": 0, "batches": 0, "rejected": 0, "errors": 0}
        self._carry: _Item | None = None
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, texts: list[str], tasks: list[str] | None) -> list[dict[str, Any]]:
        if self.closing:
            raise ShuttingDownError
        item = _Item(texts, tasks, asyncio.get_running_loop().create_future())
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
            if size + len(item.texts) > self.max_batch_size:
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
        try:
            merged = self.predictor.predict(texts, tasks, batch_size=self.max_batch_size)
        except Exception:  # one bad request must not fail the others
            if len(batch) == 1:
                raise
            out: list[list[dict[str, Any]] | BaseException] = []
            for item in batch:
                try:
                    out.append(self.predictor.predict(item.texts, item.tasks))
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

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self._run_batch, batch)
            except Exception as err:  # reported to each waiting client
                logger.exception("batch of %d request(s) failed", len(batch))
                results = [err] * len(batch)
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

    async def close(self, timeout: float = 30.0) -> None:
        """Refuse new requests, finish the queued ones (up to ``timeout`` s), stop the worker."""
        self.closing = True
        deadline = time.perf_counter() + timeout
        while (self.queue.qsize() or self._carry) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(ShuttingDownError())
        self.executor.shutdown(wait=True)


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
    runtime: AdaLayers | Predictor,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_queue: int = 256,
    max_texts: int = 64,
    max_chars: int = 10_000,
    max_body_bytes: int = 1_000_000,
    shutdown_timeout: float = 30.0,
) -> Any:
    """Build the FastAPI app serving ``runtime``'s tasks.

    Args:
        runtime: an :class:`AdaLayers` with its tasks (or a :class:`Predictor` around one).
        max_batch_size: most texts run in one base forward.
        max_wait_ms: longest the first request of a batch waits for others to join it.
        max_queue: most requests waiting; beyond it the server answers 503.
        max_texts: most texts in one request (413 beyond).
        max_chars: most characters in one text (413 beyond).
        max_body_bytes: largest request body (413 beyond).
        shutdown_timeout: seconds to finish queued requests on shutdown.

    Returns:
        A ``fastapi.FastAPI`` application (run it with uvicorn).

    Raises:
        ValueError: a limit is not positive.
    """
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    for name, value in {
        "max_batch_size": max_batch_size,
        "max_queue": max_queue,
        "max_texts": max_texts,
        "max_chars": max_chars,
        "max_body_bytes": max_body_bytes,
    }.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if max_wait_ms < 0:
        raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
    predictor = runtime if isinstance(runtime, Predictor) else Predictor(runtime)
    known = predictor.task_names

    state: dict[str, MicroBatcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):  # noqa: ANN202
        batcher = MicroBatcher(predictor, max_batch_size, max_wait_ms, max_queue)
        batcher.start()
        state["batcher"] = batcher
        logger.info("serving tasks %s on %s", known, predictor.runtime.backbone.name_or_path)
        try:
            yield
        finally:
            await batcher.close(shutdown_timeout)

    app = FastAPI(
        title="adalayers",
        description="Side-task predictions from one forward of a frozen base.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

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

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses={
            400: {"description": "Unknown task."},
            413: {"description": "Too many texts, a text too long, or a body too large."},
            422: {"description": "Malformed request or an empty text."},
            503: {"description": "Queue full or shutting down; retry later."},
        },
    )
    async def predict(request: PredictRequest) -> Any:
        if len(request.texts) > max_texts:
            raise HTTPException(
                413, f"{len(request.texts)} texts in one request; the limit is {max_texts}"
            )
        for i, text in enumerate(request.texts):
            if len(text) > max_chars:
                raise HTTPException(
                    413, f"text {i} has {len(text)} characters; the limit is {max_chars}"
                )
            if not text.strip():
                raise HTTPException(422, f"text {i} is empty or whitespace only")
        names = None
        if request.tasks is not None:
            unknown = sorted(set(request.tasks) - set(known))
            if unknown or not request.tasks:
                raise HTTPException(
                    400, f"unknown task(s) {unknown or request.tasks}; this server has {known}"
                )
            names = list(dict.fromkeys(request.tasks))
        try:
            rows = await state["batcher"].submit(request.texts, names)
        except QueueFullError:
            return JSONResponse(
                {"detail": f"queue full ({max_queue} requests waiting); retry later"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        except ShuttingDownError:
            return JSONResponse(
                {"detail": "server is shutting down"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        except (TypeError, ValueError) as err:
            raise HTTPException(422, str(err)) from err
        return {"predictions": rows, "tasks": names or known}

    app.state.predictor = predictor
    app.state.batcher = state
    return app


# -- running it ---------------------------------------------------------------------------------
class BackgroundServer:
    """Run an app with uvicorn in a background thread (tests, notebooks, the load test).

    Args:
        app: the ASGI app.
        host: interface to bind (loopback by default).
        port: port to bind; 0 picks a free one (see :attr:`url`).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        config.setdefault("log_level", "warning")
        self.server = uvicorn.Server(uvicorn.Config(app, **config))
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
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_queue: int = 256,
    max_texts: int = 64,
    max_chars: int = 10_000,
    max_body_bytes: int = 1_000_000,
    log_level: str = "info",
) -> None:
    """Load the runs' tasks on one base and serve them until interrupted (Ctrl-C / SIGTERM).

    Args:
        runs: training run folders or saved task folders (``NAME=PATH`` names a task).
        host: interface to bind; the default serves loopback only.
        port: TCP port.
        base: override the base the runs name.
        device: where to run the base (``"cpu"``, ``"cuda"``).
        max_batch_size, max_wait_ms, max_queue, max_texts, max_chars, max_body_bytes: see
            :func:`create_app`.
        log_level: uvicorn's log level.
    """
    import uvicorn

    from adalayers.runtime import _task_names, load_runs, resolve_run

    named = _task_names(runs)
    runtime = load_runs(named, base=base, device=device)
    info = {
        name: {"run": str(path), "task_folder": str(resolve_run(path)[0])}
        for name, path in named.items()
    }
    app = create_app(
        Predictor(runtime, info),
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_texts=max_texts,
        max_chars=max_chars,
        max_body_bytes=max_body_bytes,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``serve`` command's arguments (shared by ``adalayers serve`` and ``python -m``)."""
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run or task folder; NAME=PATH")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--base", default=None, help="override the base the runs name")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="texts per forward")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="batch fill wait")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    parser.add_argument("--max-texts", type=int, default=64, help="texts per request")
    parser.add_argument("--max-chars", type=int, default=10_000, help="characters per text")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m adalayers.serve RUN [RUN ...] [--host H --port N ...]``."""
    parser = add_arguments(argparse.ArgumentParser(prog="adalayers serve", description=__doc__))
    args = vars(parser.parse_args(argv))
    logging.basicConfig(
        level=args["log_level"].upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    serve(args.pop("runs"), **args)


if __name__ == "__main__":
    main()
