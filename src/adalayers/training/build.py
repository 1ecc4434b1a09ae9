"""From a run's config to what it trains: the data, the task, the model DDP wraps, and the
Accelerate process group (``accelerate launch`` / ``torchrun`` run data-parallel; every process
holds the frozen base and the task, the task's gradients are all-reduced)."""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from adalayers.core.backbone import Backbone
from adalayers.core.decoding import resolve_decoding
from adalayers.core.multitask import AdaLayers
from adalayers.core.task import Task, TaskConfig
from adalayers.training.config import RunConfig
from adalayers.training.data import TaskData, load_task_data

logger = logging.getLogger(__name__)


def load_data(config: RunConfig) -> TaskData:
    """The data of ``config.data`` (named ``data.name`` where it is set)."""
    d = config.data
    data = load_task_data(
        d.task,
        d.data_dir,
        seed=d.seed,
        files=d.files,
        columns=d.columns,
        limit=d.limit,
        sample=d.sample,
        task_type=d.task_type,
        label_names=d.label_names,
    )
    return dataclasses.replace(data, name=d.name) if d.name else data


def max_tokens(config: RunConfig, backbone: Backbone) -> int:
    """The tokens an example keeps: ``data.max_length``, within the base's limit and, with
    positional embeddings, the mixer's ``max_positions``."""
    length = min(config.data.max_length, backbone.max_length)
    if config.task.mixer.positional != "none":
        length = min(length, config.task.mixer.max_positions)
    return length


def build_task(config: RunConfig, data: TaskData, backbone: Backbone) -> Task:
    """A new task for ``data`` on ``backbone`` (``head.decoding`` as :func:`head_decoding`;
    ``text_pair`` records whether the data are sentence pairs)."""
    head = dataclasses.replace(config.task.head, decoding=head_decoding(config, data))
    token = data.task_type == "token_classification"
    task_config = TaskConfig(
        data.task_type,
        list(data.label_names),
        config.task.mixer,
        head,
        text_pair=not token and "text_pair" in data.splits["train"].column_names,
    )
    return Task(task_config, backbone.info())


def head_decoding(config: RunConfig, data: TaskData) -> str:
    """``task.head.decoding`` for ``data``: ``auto`` is ``bio`` where the tags are IOB2 and the
    training tags follow it (no ``I-X`` opening an entity, as IOB1 has), else ``argmax``."""
    tags = data.splits["train"]["tags"] if data.task_type == "token_classification" else None
    chosen = resolve_decoding(config.task.head.decoding, data.task_type, data.label_names, tags)
    if config.task.head.decoding == "auto" and data.task_type == "token_classification":
        logger.info("task.head.decoding: auto -> %s", chosen)
    return chosen


class TaskModel(nn.Module):
    """The frozen base and one task behind a single ``forward`` (what DDP wraps)."""

    def __init__(self, backbone: Backbone, task: Task) -> None:
        super().__init__()
        self.runtime = AdaLayers(backbone, {"task": task})

    @property
    def task(self) -> Task:
        return self.runtime.tasks["task"]

    def forward(self, **inputs: Any) -> torch.Tensor:
        """Logits from token ids (runs the base) or from cached ``states`` (does not)."""
        if "states" in inputs:
            task = self.task
            mask = inputs["attention_mask"]  # (B, T)
            states = inputs["states"]  # packed rows (n, N, d), or state index -> (B, T, d)
            if "state_rows" in inputs:
                layers = inputs["state_layers"].tolist()
                features = task.mixer.forward_rows(
                    layers, states, inputs["state_rows"], tuple(mask.shape)
                )
            else:
                features = task.mixer(states)
            return task.head(features, mask)
        return self.runtime(inputs).logits["task"]


def make_accelerator(config: RunConfig) -> Any:
    """The Accelerate ``Accelerator`` of a run: CPU processes where there is no CUDA (and then
    no mixed precision, with a warning), ``train.grad_accumulation`` steps per update."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    precision = config.train.mixed_precision
    if precision != "no" and not torch.cuda.is_available():
        logger.warning("train.mixed_precision=%s needs CUDA; training in float32", precision)
        precision = "no"
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # a CPU world of N processes under torchrun
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.grad_accumulation,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
