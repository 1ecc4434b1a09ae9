"""Progress lines where no bar is drawn (training/progress.py)."""

from __future__ import annotations

import logging

from adalayers.training.progress import ProgressLog


def test_progress_log_lines():
    now = [0.0]
    records = []

    class Sink(logging.Logger):
        def info(self, message, *args, **kwargs):  # noqa: D401 - a test double
            records.append(message % args)

    log = ProgressLog("epoch 1/2", 100, Sink("sink"), every_seconds=30, clock=lambda: now[0])
    now[0] = 10.0
    log.update(10, 320)
    assert records == []  # not yet 30 s
    now[0] = 40.0
    log.update(10, 320)
    assert records == [
        "epoch 1/2: step 20/100 (20%), 16.0 examples/s, 40s elapsed, about 2m40s left"
    ]
    off = ProgressLog("x", 10, Sink("sink"), every_seconds=0, clock=lambda: now[0])
    now[0] = 1000.0
    off.update(5, 5)
    assert len(records) == 1
