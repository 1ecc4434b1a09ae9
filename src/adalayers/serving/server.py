"""Starting the HTTP app: uvicorn with a drain on shutdown, in the foreground (:func:`serve`,
what ``adalayers serve`` runs) or in a background thread (:class:`BackgroundServer`)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from adalayers.serving.app import create_app
from adalayers.serving.config import ServeConfig
from adalayers.serving.predictor import Predictor
from adalayers.serving.runtime import _task_names, load_runs, resolve_run

DRAIN_MARGIN = 5.0  # uvicorn's own graceful-shutdown limit: the app's drain time plus this


def make_server(app: Any, **config: Any) -> Any:
    """A ``uvicorn.Server`` for ``app`` that starts the app's drain when shutdown begins.

    uvicorn tells an app about shutdown only after its graceful wait (and cancels what is still
    running then, answering 500); this server calls ``app.state.begin_drain`` first, so the app
    answers what it cannot finish within its ``drain_seconds`` with 503 itself.
    ``timeout_graceful_shutdown`` defaults to that drain time plus :data:`DRAIN_MARGIN`.

    Args:
        app: the ASGI app (from :func:`~adalayers.serving.app.create_app`, or any other).
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
    embeddings: str | None = None,
    **limits: Any,
) -> None:
    """Load the runs' tasks on one base and serve them until interrupted (Ctrl-C / SIGTERM).

    With ``embeddings`` (a sentence-transformers model) the base is that model's transformer
    and the server also answers ``POST /embed``: text-embeddings-inference's request and
    answer, with the side tasks asked in ``tasks`` from the same forward
    (:func:`~adalayers.serving.integrations.sentence_transformers.add_embed_route`).

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
        embeddings: a sentence-transformers model (folder, hub id, or ``all-MiniLM-L6-v2``)
            whose embeddings to serve; the runs' tasks must have been trained on its weights.
        **limits: :class:`ServeConfig` fields overriding ``config``'s, e.g.
            ``max_tokens=4096, drain_seconds=60``.

    Raises:
        TypeError, ValueError: a limit that is unknown or out of range (before any loading);
            ``base`` and ``embeddings`` both given; ``embeddings`` not a sentence-transformers
            model.
        BaseMismatchError: a task was trained on another base (the message names both).
    """
    config = (config or ServeConfig()).updated(**limits)  # checked before any loading
    if embeddings is not None and base is not None:
        raise ValueError("--base and --embeddings both name the base: give one of them")
    named = _task_names(runs)
    info = {
        name: {"run": str(path), "task_folder": str(resolve_run(path)[0])}
        for name, path in named.items()
    }
    if embeddings is not None:
        from adalayers.core.task import Task
        from adalayers.serving.integrations.sentence_transformers import embeddings_app

        tasks = {name: Task.from_pretrained(resolve_run(path)[0]) for name, path in named.items()}
        app = embeddings_app(embeddings, tasks, config, device=device, info=info)
    else:
        runtime = load_runs(named, base=base, device=device)
        app = create_app(Predictor(runtime, info), config)
    make_server(app, host=host, port=port, log_level=log_level).run()
