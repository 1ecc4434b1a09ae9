"""Progress: a bar on a terminal (:func:`progress_bar`), else log lines, for runs whose stderr
is not a terminal (``nohup``, CI, a scheduler).

A progress bar draws nothing useful into a file, so where bars are off the training loop and
the cache build call :meth:`ProgressLog.update` after each step instead: every
``every_seconds`` it logs one line with the step, examples per second, the time elapsed and
an estimate of what is left (the steps left at the mean rate so far)::

    epoch 1/3: step 120/480 (25%), 32.0 examples/s, 2m00s elapsed, about 6m00s left
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

DEFAULT_EVERY_SECONDS = 30.0
"""Seconds between two progress lines unless the caller says otherwise."""


def format_seconds(seconds: float) -> str:
    """``59s``, ``2m05s``, ``1h02m``: short enough for a log line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLog:
    """Log a progress line at most every ``every_seconds`` (none when it is 0 or disabled).

    Args:
        what: what is progressing, e.g. ``"epoch 1/3"`` or ``"cache train"``.
        total: the number of steps expected (``None`` if unknown: no estimate then).
        logger: where the lines go (at INFO).
        every_seconds: the least time between two lines; 0 turns the lines off.
        enabled: ``False`` turns the lines off (e.g. a progress bar shows the same).
        initial: steps done before (a resumed run); the estimate uses only the rate since.
        clock: the time source (tests pass a fake one).
    """

    def __init__(
        self,
        what: str,
        total: int | None,
        logger: logging.Logger,
        *,
        every_seconds: float = DEFAULT_EVERY_SECONDS,
        enabled: bool = True,
        initial: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_seconds < 0:
            raise ValueError(f"every_seconds must be >= 0, got {every_seconds}")
        self.what, self.total, self.logger = what, total, logger
        self.every = every_seconds
        self.enabled = enabled and every_seconds > 0
        self.clock = clock
        self.start = self.last = clock()
        self.initial = self.steps = initial
        self.examples = 0

    def update(self, steps: int = 1, examples: int = 0) -> None:
        """Count ``steps`` more steps of ``examples`` examples; log if it is time."""
        self.steps += steps
        self.examples += examples
        if not self.enabled:
            return
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        self.logger.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line as of ``now`` (default: the clock's time)."""
        elapsed = (self.clock() if now is None else now) - self.start
        rate = self.examples / elapsed if elapsed > 0 else 0.0
        step = f"step {self.steps}"
        left = ""
        if self.total:
            step += f"/{self.total} ({100 * self.steps / self.total:.0f}%)"
            if self.steps > self.initial:
                per_step = elapsed / (self.steps - self.initial)
                remaining = per_step * max(self.total - self.steps, 0)
                left = f", about {format_seconds(remaining)} left"
        return (
            f"{self.what}: {step}, {rate:.1f} examples/s, {format_seconds(elapsed)} elapsed{left}"
        )


def progress_bar(iterable: Any, *, total: int, desc: str, enabled: bool) -> Any:
    """``iterable`` behind a tqdm bar that is cleared when done (a no-op unless ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True
    )
