"""Full fine-tuning of the base under a standard head: the costly baseline adalayers avoids.

Every weight of the base trains (AdamW, linear warm-up over the first 10% of steps, then linear
decay) under the standard head of the task's kind (``AutoModelForSequenceClassification`` /
``AutoModelForTokenClassification``, :meth:`~adalayers.core.kinds.TaskKind.finetune_head`),
with the kind's loss. The
data pipeline, epochs, early stopping and model selection on validation are those of
:func:`adalayers.training.train.fit`: the same epoch loop (:class:`~adalayers.training.loop.Loop`)
drives it through :class:`_FinetuneTrainer`, and the run folder holds the same files::

    config.yaml     the resolved configuration (``train.lr`` is the fine-tuning rate used)
    history.jsonl   one line per epoch: loss, validation metrics, learning rate
    metrics.json    final validation and test metrics, parameters, timings; ``"baseline":
                    "finetune"``
    predictions_validation.jsonl, predictions_test.jsonl
                    the best epoch's prediction for every example of the split
    model/          the best fine-tuned model, only with ``save_model=True`` (a full copy of
                    the base: ``parameters_added`` counts all of it)

It is a baseline: not resumable, and the base is trained in float32 whatever ``dtype`` says.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import sys
import types
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adalayers.core.backbone import Backbone, resolve_model_path
from adalayers.core.task import TaskConfig
from adalayers.training.batches import batch_loader, tokenize
from adalayers.training.build import load_data, make_accelerator, seed_everything, task_config
from adalayers.training.config import RunConfig
from adalayers.training.evaluate import (
    calibrated_options,
    evaluate_split,
    evaluate_splits,
    selection_metric,
)
from adalayers.training.loop import Loop
from adalayers.training.run import MODEL_DIR, open_run, write_results

logger = logging.getLogger(__name__)

DEFAULT_LR = 2e-5
"""The usual learning rate for fully fine-tuning a BERT-size model."""
WARMUP = 0.1
"""Fraction of the optimiser steps spent warming the learning rate up."""


class _Logits(nn.Module):
    """A Hugging Face model behind the interface ``evaluate_split`` expects: ``(**batch) ->
    logits``, passing only the inputs its ``forward`` accepts (decoders take no
    ``token_type_ids``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._accepts = set(inspect.signature(model.forward).parameters)

    def forward(self, **inputs: Any) -> torch.Tensor:
        kwargs = {k: v for k, v in inputs.items() if k in self._accepts}
        return self.model(**kwargs).logits


def load_model(config: RunConfig, space: TaskConfig) -> tuple[nn.Module, Any]:
    """The base with a fresh standard head for the task ``space`` describes (its kind's
    :meth:`~adalayers.core.kinds.TaskKind.finetune_head`), all weights trainable, and its
    tokenizer.

    Raises:
        ValueError: ``transformers`` has no such head for this architecture.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(config.base)
    extra = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    auto, labels = space.kind.finetune_head(space.labels)
    if config.dtype not in (None, "float32"):
        logger.info("fine-tuning trains the base in float32 (dtype=%s is ignored)", config.dtype)
    try:
        model = auto.from_pretrained(path, dtype=torch.float32, **labels, **extra)
    except ValueError as err:
        raise ValueError(
            f"cannot fine-tune {config.base} for {space.task_type}: transformers has no "
            f"{auto.__name__} head for it ({err})"
        ) from None
    model.config.pad_token_id = tokenizer.pad_token_id  # decoders classify the last real token
    return model, tokenizer


def finetune(
    config: RunConfig,
    output_dir: str | os.PathLike,
    *,
    lr: float | None = None,
    quiet: bool = False,
    overwrite: bool = False,
    save_model: bool = False,
) -> dict[str, Any]:
    """Fine-tune the whole base with a standard head; keep the best epoch on validation.

    Args:
        config: the run configuration (its ``data`` and ``train`` sections; ``task`` and
            ``cache`` are not used).
        output_dir: the run folder (created).
        lr: the learning rate (default :data:`DEFAULT_LR`; ``train.lr`` is the mixer's).
        quiet: no progress bars.
        overwrite: replace an existing run folder.
        save_model: also save the best model to ``output_dir/model``.

    Returns:
        The final metrics (also written to ``metrics.json``).

    Raises:
        FileExistsError: ``output_dir`` holds a run and ``overwrite`` is false.
    """
    run = Path(output_dir)
    lr = DEFAULT_LR if lr is None else float(lr)
    if lr <= 0:
        raise ValueError(f"the fine-tuning learning rate must be positive, got {lr}")
    config = replace(config, train=replace(config.train, lr=lr))
    accelerator = make_accelerator(config)
    open_run(
        run, config, accelerator, overwrite=overwrite, taken="pass overwrite or another folder"
    )
    progress = accelerator.is_main_process and not quiet and sys.stderr.isatty()

    seed_everything(config.train.seed)
    data = load_data(config)
    space = task_config(config, data)  # labels, decoding, options: what tokenising and scoring need
    model, tokenizer = load_model(config, space)
    probe = types.SimpleNamespace(tokenizer=tokenizer, model=model)
    max_length = min(config.data.max_length, Backbone.max_length.fget(probe))  # as fit() does
    metric = selection_metric(config, data)
    with accelerator.main_process_first():
        tokenized = {
            s: tokenize(data, s, tokenizer, space, max_length) for s in ("train", "validation")
        }
    trainer = _FinetuneTrainer(
        accelerator, model, tokenizer, space, config, data, tokenized, progress
    )
    loop = Loop(
        accelerator,
        trainer,
        config.train,
        run,
        metric=metric,
        name="finetune epoch",
        progress=progress,
    )
    loop.run()
    return trainer.finalize(loop, run, metric, max_length, save_model)


class _FinetuneTrainer:
    """The :class:`~adalayers.training.loop.Steps` of fine-tuning: every weight of the model
    trains (AdamW, no decay on biases and norms), the learning rate warms up over the first
    :data:`WARMUP` of the steps then decays linearly, and the best epoch's weights are kept in
    memory (not resumable); and the end of the run (:meth:`finalize`).
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        tokenizer: Any,
        space: TaskConfig,
        config: RunConfig,
        data: Any,
        tokenized: dict[str, Any],
        progress: bool,
    ) -> None:
        self.accelerator, self.hf_model, self.tokenizer, self.space = (
            accelerator,
            model,
            tokenizer,
            space,
        )
        self.config, self.data, self.tokenized, self.progress = config, data, tokenized, progress
        self.pad_id = tokenizer.pad_token_id
        train = config.train
        wrapped = _Logits(model)
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
        named = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
        groups = [
            {
                "params": [p for n, p in named if not n.endswith(no_decay)],
                "weight_decay": train.weight_decay,
            },
            {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr)
        self.model, self.optimizer = accelerator.prepare(wrapped, optimizer)
        self.unwrapped: _Logits = accelerator.unwrap_model(self.model)
        steps = train.epochs * math.ceil(len(self.loader(0)) / train.grad_accumulation)
        warmup = max(1, int(WARMUP * steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))),
        )
        self.best_state: dict[str, torch.Tensor] = {}

    # -- Steps -------------------------------------------------------------------------------
    def loader(self, epoch: int) -> Any:
        train = self.config.train
        seed = train.seed * 100_003 + epoch
        return batch_loader(
            self.accelerator,
            self.tokenized["train"],
            train.batch_size,
            self.pad_id,
            shuffle=True,
            seed=seed,
            kind=self.space.kind,
        )

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The kind's loss (:meth:`Task.loss <adalayers.core.task.Task.loss>` without the
        mixer's entropy term: there is no mixer here)."""
        inputs = {k: v for k, v in batch.items() if k not in ("index", "labels")}
        return self.space.kind.loss(self.model(**inputs), batch["labels"])

    def parameters(self) -> Iterable[torch.Tensor]:
        return self.model.parameters()

    def stepped(self) -> None:
        self.scheduler.step()

    def validate(self) -> dict[str, Any]:
        return evaluate_split(
            self.accelerator,
            self.model,
            self.space,
            self.data,
            self.tokenized["validation"],
            "validation",
            self.config.train.eval_batch_size,
            self.pad_id,
            self.progress,
            **self.scoring,
        )

    def validated(self, score: float, improved: bool) -> dict[str, Any]:
        if improved:
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.unwrapped.state_dict().items()
            }
        return {}

    @property
    def scoring(self) -> dict[str, Any]:
        """What :func:`~adalayers.training.evaluate.evaluate_split` reports (``task`` section)."""
        task = self.config.task
        return {"metrics": task.metrics, "positive_label": task.positive_label}

    # -- the end -----------------------------------------------------------------------------
    def finalize(
        self, loop: Loop, run: Path, metric: str, max_length: int, save_model: bool
    ) -> dict[str, Any]:
        """Evaluate the best epoch's model on validation and test, write the predictions and
        ``metrics.json`` (and the model with ``save_model``); returns the metrics."""
        accelerator, model, data, config = self.accelerator, self.hf_model, self.data, self.config
        self.unwrapped.load_state_dict(self.best_state)
        options = calibrated_options(  # e.g. multi-label thresholds, learnt on validation
            accelerator,
            self.model,
            self.space,
            data,
            self.tokenized["validation"],
            config.train.eval_batch_size,
            self.pad_id,
            self.progress,
        )
        if options is not None:
            self.space = replace(self.space, options=options)
        total = sum(p.numel() for p in model.parameters())
        base = sum(p.numel() for p in getattr(model, "base_model", model).parameters())
        results: dict[str, Any] = {
            "baseline": "finetune",
            "task": data.name,
            "task_type": data.task_type,
            "base": config.base,
            "metric": metric,
            "best_epoch": loop.state.best_epoch,
            "epochs_run": loop.state.epoch,
            "lr": config.train.lr,
        }
        results.update(
            evaluate_splits(
                accelerator,
                self.model,
                self.space,
                data,
                self.tokenized,
                self.tokenizer,
                max_length,
                config.train.eval_batch_size,
                self.pad_id,
                self.progress,
                predictions=(predictions := {}),
                **self.scoring,
            )
        )
        results.update(
            {
                "parameters_added": total,  # a second, fine-tuned copy of the whole base
                "trainable_parameters": total,
                "base_parameters": base,
                "percent_of_base": 100 * total / base,
                **loop.timings(),
            }
        )
        if accelerator.is_main_process:
            write_results(run, results, predictions)
            if save_model:
                model.save_pretrained(run / MODEL_DIR)
                self.tokenizer.save_pretrained(run / MODEL_DIR)
        accelerator.wait_for_everyone()
        return results
