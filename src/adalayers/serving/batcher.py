"""Micro-batching: a bounded queue of requests and one worker that runs them in batches.

The worker takes what is waiting, waits at most ``max_wait_ms`` for more, and runs up to
``max_batch_size`` texts in one forward, in a model thread, so the event loop keeps accepting.
Sentence pairs, single texts and ``POST /embed`` requests (``submit(..., embed=...)``) run in
forwards of their own. When ``max_queue`` requests wait, a new one is refused
(:class:`QueueFullError`). On shutdown it drains: new requests are refused
(:class:`ShuttingDownError`), the accepted ones run until ``drain_seconds``, and what is left
then is answered with :class:`ShuttingDownError` while the model thread stops before its next
forward. The limits are fields of :class:`~adalayers.serving.config.ServeConfig`; the HTTP app
(:mod:`.app`) turns the errors into ``503`` answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from adalayers.serving.config import ServeConfig
from adalayers.serving.predictor import Predictor

logger = logging.getLogger(__name__)


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
    embed: dict[str, Any] | None = None  # a POST /embed request's options (normalize)


class MicroBatcher:
    """A bounded queue of requests and one worker that runs them in batches.

    Shutdown in two steps: :meth:`begin_drain` refuses new requests and lets the worker finish
    the accepted ones; at the drain deadline :meth:`abort` answers what is left with
    :class:`ShuttingDownError` and the worker stops before its next forward.

    Args:
        predictor: what runs a batch.
        config: the limits it reads: ``max_batch_size`` (most texts in one forward),
            ``max_wait_ms`` (longest a waiting request holds the batch open for more),
            ``max_queue`` (most requests waiting; more are refused with
            :class:`QueueFullError`) and ``drain_seconds`` (the default drain time).
    """

    def __init__(self, predictor: Predictor, config: ServeConfig) -> None:
        self.predictor = predictor
        self.config = config
        self.max_batch_size = config.max_batch_size
        self.max_wait = config.max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=config.max_queue)
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
        self,
        texts: list[str],
        tasks: list[str] | None,
        pairs: list[str] | None = None,
        *,
        embed: dict[str, Any] | None = None,
    ) -> Any:
        """Queue a request and wait for its answer: one prediction dict per text, or with
        ``embed`` (``{"normalize": bool}``, for a predictor with ``embed()``, such as
        :class:`~adalayers.serving.integrations.sentence_transformers.EmbeddingPredictor`)
        ``{"embeddings": [...], "predictions": [...] or None}``."""
        if self.closing:
            raise ShuttingDownError
        item = _Item(texts, tasks, asyncio.get_running_loop().create_future(), pairs, embed=embed)
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
            # pairs, single texts and embeddings run in forwards of their own
            mixed = (item.pairs is None, item.embed is None) != (
                first.pairs is None,
                first.embed is None,
            )
            if mixed or size + len(item.texts) > self.max_batch_size:
                self._carry = item  # opens the next batch
                break
            batch.append(item)
            size += len(item.texts)
        return [i for i in batch if not i.future.done()]  # drop requests whose client left

    def _run_batch(self, batch: list[_Item]) -> list[Any]:
        """In the worker thread: one forward for the whole batch (each item alone on failure)."""
        if batch[0].embed is not None:
            return self._run_embed_batch(batch)
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

    def _run_embed_batch(self, batch: list[_Item]) -> list[Any]:
        """In the worker thread: embeddings (and the tasks asked) for a batch of ``/embed``
        requests, one forward per ``max_batch_size`` texts (each item alone on failure)."""

        def run(items: list[_Item]) -> list[dict[str, Any]]:
            names = sorted({t for i in items for t in i.tasks or ()}) or None
            texts = [t for i in items for t in i.texts]
            normalize = [bool(i.embed and i.embed.get("normalize")) for i in items for _ in i.texts]
            vectors, rows = self.predictor.embed(  # type: ignore[attr-defined]
                texts,
                names,
                normalize=normalize,
                batch_size=self.max_batch_size,
                before_forward=self._check_aborted,
            )
            out, start = [], 0
            for item in items:
                stop = start + len(item.texts)
                asked = None
                if item.tasks is not None and rows is not None:
                    asked = [{name: row[name] for name in item.tasks} for row in rows[start:stop]]
                out.append({"embeddings": vectors[start:stop], "predictions": asked})
                start = stop
            return out

        try:
            return run(batch)
        except ShuttingDownError:
            raise
        except Exception:  # one bad request must not fail the others
            if len(batch) == 1:
                raise
        results: list[Any] = []
        for item in batch:
            try:
                results.extend(run([item]))
            except ShuttingDownError:
                raise
            except Exception as err:
                results.append(err)
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

    def begin_drain(self, seconds: float | None = None) -> None:
        """Refuse new requests; :meth:`abort` what is not finished ``seconds`` (default:
        ``drain_seconds``) from now.

        Called when the server starts shutting down; later calls change nothing.
        """
        if self.closing:
            return
        seconds = self.config.drain_seconds if seconds is None else seconds
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

    async def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the accepted ones (until the drain deadline, ``timeout``
        s from now, default ``drain_seconds``, if no drain began), answer the rest with 503,
        stop the worker."""
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
