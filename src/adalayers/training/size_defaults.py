"""Training settings chosen by the size of the training set, for user data.

A config for one's own data (``data.task: csv | jsonl | conll``) names the files and rarely
how to train on them. The library's plain defaults, and the shipped benchmark configs, were
chosen for tens of thousands of examples; on a few thousand they train too few steps, with
too big a head and no regularisation, and the head then adds little over a linear probe.

So for user data every setting below that the config (or ``--set``) does not give is chosen
from the number of training examples ``n`` (after ``data.sample`` / ``data.limit``):

==========================  ==============================================================
setting                     n <= 5,000 (larger sets keep the plain defaults)
==========================  ==============================================================
``train.epochs``            enough for ~2,400 optimiser steps, between 10 and 60
``train.early_stopping``    a fifth of the epochs, at least 4
``train.lr_patience``       2
``train.lr``                1e-3
``train.batch_size``        16
``train.weight_decay``      0.01
``train.cache``             true where (train + validation) x ``data.max_length`` <= 1.5 M
``cache.splits``            with ``test`` too where test x ``data.max_length`` <= 1.5 M
``task.mixer.alpha``        4
``task.mixer.dropout``      0.1
``task.head.dropout``       0.1
``task.head.num_heads``     4
``task.head.ff_dim``        256
==========================  ==============================================================

The values were set once, from what the benchmark configs and α grids had shown, and checked
(not searched) on seeded samples of 1,000 and 3,000 examples of the shipped CoLA, IMDB (128
tokens) and CoNLL-2003 sets, against a linear probe (``benchmarks/small_data.py``;
BENCHMARKS.md, "Small datasets"; docs/experiments/small-data.md).

Anything the config gives is kept as given; the log says what was chosen, ``metrics.json``
keeps it under ``size_defaults``, and the run folder's ``config.yaml`` holds the resolved
values (so ``--resume`` and ``evaluate`` read the same). Benchmark tasks (``data.task: cola``,
...) and configs built in Python are left as they are; ``train.size_defaults: false`` turns
the choice off for user data too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

USER_TASKS = ("csv", "jsonl", "conll")
SMALL = 5_000  # training examples up to which the small-data settings apply
STEPS = 2_400  # optimiser steps a small run aims at
CACHE_TOKENS = 1_500_000  # n x max_length up to which a small run caches the states


def choose(sizes: Mapping[str, int], max_length: int) -> dict[str, Any]:
    """The settings for splits of these sizes (``{"train": n, "validation": ..., "test":
    ...}``; every key of the table above for a small training set)."""
    n_train = sizes.get("train", 0)
    if n_train > SMALL:
        return {}
    batch = 16
    steps_per_epoch = max(1, math.ceil(n_train / batch))
    epochs = min(60, max(10, math.ceil(STEPS / steps_per_epoch)))
    settings: dict[str, Any] = {
        "train.epochs": epochs,
        "train.early_stopping": max(4, epochs // 5),
        "train.lr_patience": 2,
        "train.lr": 1.0e-3,
        "train.batch_size": batch,
        "train.weight_decay": 0.01,
        "task.mixer.alpha": 4.0,
        "task.mixer.dropout": 0.1,
        "task.head.dropout": 0.1,
        "task.head.num_heads": 4,
        "task.head.ff_dim": 256,
    }
    fitted = (n_train + sizes.get("validation", 0)) * max_length <= CACHE_TOKENS
    if fitted:
        settings["train.cache"] = True
        if sizes.get("test", 0) * max_length <= CACHE_TOKENS:
            settings["cache.splits"] = ["train", "validation", "test"]
    return settings


def missing(settings: Mapping[str, Any], given: Iterable[str]) -> dict[str, Any]:
    """The settings whose key the config does not give."""
    given = set(given)
    return {k: v for k, v in settings.items() if k not in given}


def resolve(config: Any, sizes: Mapping[str, int]) -> tuple[Any, dict[str, Any]]:
    """``config`` with the size-chosen settings it does not give, and those settings.

    Nothing changes for benchmark tasks, configs whose given keys are unknown (built in Python,
    not by :func:`~adalayers.training.config.load_config`), or ``train.size_defaults: false``.
    """
    from adalayers.training.config import with_settings

    given = config.given_keys
    if config.data.task not in USER_TASKS or given is None or not config.train.size_defaults:
        return config, {}
    chosen = missing(choose(sizes, config.data.max_length), given)
    if not chosen:
        return config, {}
    if "train.early_stopping" in chosen and "train.epochs" not in chosen:
        chosen["train.early_stopping"] = max(4, config.train.epochs // 5)  # of the given epochs
    resolved = with_settings(config, chosen)
    resolved.given_keys = frozenset(given) | set(chosen)
    text = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen.items()
    )
    logger.info(
        "%d training examples: settings chosen for a small training set (give them in the "
        "config to override): %s",
        sizes.get("train", 0),
        text,
    )
    return resolved, chosen


def resolve_config(config: Any) -> tuple[Any, dict[str, Any], Any]:
    """:func:`resolve` with the training set's size read from the data: ``(config, chosen,
    data)``, ``data`` the loaded data where it had to be read, else ``None``."""
    from adalayers.training.build import load_data

    given = config.given_keys
    if config.data.task not in USER_TASKS or given is None or not config.train.size_defaults:
        return config, {}, None
    if not missing(choose({}, config.data.max_length), given):
        return config, {}, None  # every setting given: no need to count
    data = load_data(config)
    resolved, chosen = resolve(config, {k: len(v) for k, v in data.splits.items()})
    return resolved, chosen, data
