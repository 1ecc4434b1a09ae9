"""Cache preparation: which hidden states a run caches, and the stores it reads them from.

With ``cache.layers: N`` a training-free probe picks the N best states and the mixer is
restricted to them; the run then trains on a task rebuilt on those states. Preparation returns
the config that ran (``task.mixer.layers`` as the probe chose, ``cache.dir`` resolved) instead
of changing the caller's, and :func:`~adalayers.training.train.fit` saves that one as the run's
``config.yaml``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from adalayers.core.backbone import Backbone, load_backbone
from adalayers.core.task import Task
from adalayers.training.batches import tokenize
from adalayers.training.build import (
    build_task,
    load_data,
    make_accelerator,
    max_tokens,
    seed_everything,
)
from adalayers.training.cache import FeatureStore, default_cache_dir, open_or_build
from adalayers.training.config import RunConfig
from adalayers.training.data import TaskData
from adalayers.training.probe import probe_layers

logger = logging.getLogger(__name__)


def with_cache_dir(config: RunConfig) -> RunConfig:
    """``config`` with ``cache.dir`` the absolute folder its stores live in (where unset, the
    default: ``$ADALAYERS_CACHE_DIR/features`` or ``~/.cache/adalayers/features``)."""
    folder = Path(config.cache.dir) if config.cache.dir is not None else default_cache_dir()
    return replace(config, cache=replace(config.cache, dir=str(folder.absolute())))


def prepare_cache(
    config: RunConfig,
    accelerator: Any,
    backbone: Backbone,
    data: TaskData,
    task: Task,
    tokenized: dict[str, Any],
    max_length: int,
    progress: bool,
    verify: bool = False,
    lengths: dict[str, dict[str, Any]] | None = None,
) -> tuple[RunConfig, Task, dict[str, FeatureStore]]:
    """Choose the layers worth caching (probe), rebuild the task on them, open the stores.

    ``tokenized`` (split -> tokenised dataset) gains the cached splits it lacked, and
    ``lengths`` (split -> :func:`~adalayers.training.batches.tokenize` statistics) their
    statistics. ``verify`` reads every checksum of a finished store
    (:func:`adalayers.training.cache.open_or_build`).

    Returns:
        The config that ran (:func:`with_cache_dir`; ``task.mixer.layers`` the probe's choice
        where it ran), the task (a new one where the probe ran) and the store of each cached
        split. ``config`` itself is left as it was.
    """
    config = with_cache_dir(config)
    cache, mixer = config.cache, config.task.mixer
    layers = task.mixer.layer_indices
    if (
        cache.layers is not None
        and cache.layers < len(layers)
        and mixer.layers is None
        and mixer.single_layer is None
    ):
        scores = probe_layers(
            backbone,
            tokenized["train"],
            task.kind,
            task.config.num_outputs,
            cache.probe_examples,
            seed=config.train.seed,
        )
        layers = sorted(sorted(scores, key=scores.get, reverse=True)[: cache.layers])
        logger.info(
            "probe score per hidden state: %s; caching %s",
            {i: round(v, 4) for i, v in scores.items()},
            layers,
        )
        restricted = replace(config.task, mixer=replace(mixer, layers=layers))
        config = replace(config, task=restricted)
        torch.manual_seed(config.train.seed)
        task = build_task(config, data, backbone)
    stored = list(range(backbone.num_states)) if cache.all_layers else layers
    stores = {}
    for split in cache.splits:
        if split not in data.splits or len(data.splits[split]) == 0:
            continue
        if split not in tokenized:
            found = None if lengths is None else lengths.setdefault(split, {})
            tokenized[split] = tokenize(data, split, backbone.tokenizer, task, max_length, found)
        stores[split] = open_or_build(
            backbone,
            tokenized[split],
            split,
            stored,
            dtype=cache.dtype,
            root=cache.dir,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
            chunk_examples=cache.chunk_examples,
            progress_bar=progress,
            barrier=accelerator.wait_for_everyone,
            verify=verify,
        )
        if sorted(layers) != sorted(stored):  # a full store: read only the mixer's states
            stores[split] = stores[split].select(layers)
    return config, task, stores


def build_cache(config: RunConfig, *, quiet: bool = False, verify: bool = False) -> dict[str, Any]:
    """Run the base once over the configured splits and store their hidden states.

    ``verify`` reads every checksum of stores already built, even of files unchanged since their
    checksums last passed. Returns a summary: the layers stored, and per split the folder,
    examples and bytes.
    """
    config, task, stores = _build_stores(config, quiet=quiet, verify=verify)
    return {
        "layers": task.mixer.layer_indices,
        "dtype": config.cache.dtype,
        "splits": {
            split: {
                "folder": str(store.folder),
                "examples": len(store),
                "bytes": store.size_bytes(),
            }
            for split, store in stores.items()
        },
    }


def cached_config(config: RunConfig, *, quiet: bool = False) -> RunConfig:
    """Build the stores of ``config`` now (where not built yet) and return the config that
    reads them: ``cache.dir`` resolved, ``task.mixer.layers`` the probe's choice where it ran.

    Runs that train this config (the trials of a search) then open the stores without running
    the base or the probe again.
    """
    return _build_stores(config, quiet=quiet, verify=False)[0]


def cached_stores(config: RunConfig, *, quiet: bool = False) -> dict[str, FeatureStore]:
    """The stores of ``config``'s cached splits, built now where not built yet."""
    return _build_stores(config, quiet=quiet, verify=False)[2]


def _build_stores(
    config: RunConfig, *, quiet: bool, verify: bool
) -> tuple[RunConfig, Task, dict[str, FeatureStore]]:
    accelerator = make_accelerator(config)
    data = load_data(config)
    backbone = load_backbone(
        config.base, states=config.base_states, gguf_file=config.gguf_file, dtype=config.dtype
    )
    max_length = max_tokens(config, backbone)
    seed_everything(config.train.seed)
    task = build_task(config, data, backbone)
    tokenized = {"train": tokenize(data, "train", backbone.tokenizer, task, max_length)}
    progress = accelerator.is_main_process and not quiet and sys.stderr.isatty()
    return prepare_cache(
        config, accelerator, backbone, data, task, tokenized, max_length, progress, verify
    )
