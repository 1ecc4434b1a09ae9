"""From a run's config to what it trains: the data, the task, the model DDP wraps, and the
Accelerate process group (``accelerate launch`` / ``torchrun`` run data-parallel; every process
holds the frozen base and the task, the task's gradients are all-reduced)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adalayers.core.backbone import Backbone
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
    """A new task for ``data`` on ``backbone`` (its config: :func:`task_config`)."""
    return Task(task_config(config, data), backbone.info())


def task_config(config: RunConfig, data: TaskData) -> TaskConfig:
    """The :class:`TaskConfig` of ``data`` under ``config``: ``head.decoding`` as
    :func:`head_decoding`, ``text_pair`` whether the data are sentence pairs (for a kind that
    reads pairs), ``options`` from ``task.options`` (checked by the kind)."""
    head = dataclasses.replace(config.task.head, decoding=head_decoding(config, data))
    try:
        return TaskConfig(
            data.task_type,
            list(data.label_names),
            config.task.mixer,
            head,
            text_pair=data.kind.reads_pairs and "text_pair" in data.splits["train"].column_names,
            options=dict(config.task.options or {}),
        )
    except ValueError as err:  # the kind's words for its options: name the config's key
        if str(err).startswith("options"):
            raise ValueError(f"task.{err}") from None
        raise


def head_decoding(config: RunConfig, data: TaskData) -> str:
    """``task.head.decoding`` for ``data``: ``auto`` is ``bio`` where the tags are IOB2 and the
    training tags follow it (no ``I-X`` opening an entity, as IOB1 has), else ``argmax``."""
    kind = data.kind
    tags = data.splits["train"]["tags"] if kind.per_token else None
    chosen = kind.resolve_decoding(config.task.head.decoding, data.label_names, tags)
    if config.task.head.decoding == "auto" and kind.per_token:
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


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX); without, torch
    emulates the products and bfloat16 is slower than float32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_precision(requested: str) -> str:
    """``train.mixed_precision`` as this machine runs it (Accelerate's ``mixed_precision``).

    On CUDA ``fp16`` (with a gradient scaler) and ``bf16`` (where the GPU supports it) autocast
    the base, the mixer and the head. On a CPU, ``bf16`` autocasts them with torch's CPU
    autocast (a warning says when the CPU has no bfloat16 instructions: it then runs slower
    than float32) and ``fp16`` falls back to float32 with a warning (Accelerate has no CPU
    float16). The parameters, the optimiser and the loss stay float32.

    Raises:
        ValueError: ``bf16`` on a GPU without bfloat16.
    """
    if requested == "no":
        return "no"
    if torch.cuda.is_available():
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError("train.mixed_precision=bf16: this GPU has no bfloat16; use fp16 or no")
        return requested
    if requested == "fp16":
        logger.warning("train.mixed_precision=fp16 needs CUDA (on a CPU use bf16); float32 here")
        return "no"
    if not cpu_has_bf16():
        logger.warning(
            "train.mixed_precision=bf16 on a CPU without bfloat16 instructions (AVX-512 BF16, "
            "AMX): torch emulates them, expect it slower than float32"
        )
    return requested


def _allow_precision(precision: str) -> None:
    """Let one process run fits of different ``train.mixed_precision`` one after another (a
    notebook, a test session): Accelerate keeps the first one's in a process-wide state and
    refuses another, so a single process forgets it (its device and process group stay)."""
    from accelerate.state import AcceleratorState

    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is not None and held != precision and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()


def make_accelerator(config: RunConfig, trackers_dir: Path | None = None) -> Any:
    """The Accelerate ``Accelerator`` of a run: CPU processes where there is no CUDA,
    ``train.mixed_precision`` as :func:`resolve_precision` says, ``train.grad_accumulation``
    steps per update.

    Args:
        trackers_dir: where the trackers of ``train.report_to`` write (``project_dir``);
            ``None``: no trackers (a cache build, an evaluation).

    Raises:
        ImportError: a tracker of ``train.report_to`` is not installed (naming its package).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    precision = resolve_precision(config.train.mixed_precision)
    _allow_precision(precision)
    tracking: dict[str, Any] = {}
    if trackers_dir is not None and config.train.report_to:
        from adalayers.training.tracking import check_trackers

        check_trackers(config.train.report_to)
        tracking = {"log_with": list(config.train.report_to), "project_dir": str(trackers_dir)}
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # a CPU world of N processes under torchrun
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.grad_accumulation,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        **tracking,
    )


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
