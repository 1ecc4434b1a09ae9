"""The server's limits: one :class:`ServeConfig`, read by the batcher, the HTTP app, the
server start-up and the ``adalayers serve`` flags (no web framework needed to import it)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class ServeConfig:
    """The server's limits, in one place for the batcher, the app, :func:`serve` and the CLI.

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

    def updated(self, **limits: Any) -> ServeConfig:
        """A copy with ``limits`` replaced (``shutdown_timeout`` is the old name of
        ``drain_seconds``).

        Raises:
            TypeError: a limit that is not a field (the message names it).
            ValueError: a limit out of range (the message names it).
        """
        if "shutdown_timeout" in limits:
            limits["drain_seconds"] = limits.pop("shutdown_timeout")
        known = sorted(spec.name for spec in fields(self))
        unknown = sorted(set(limits) - set(known))
        if unknown:
            raise TypeError(f"unknown server limit(s) {unknown}; ServeConfig has {known}")
        return replace(self, **limits)
