"""Full fine-tuning of the base under a standard head: the costly baseline adalayers avoids.

Every weight of the base trains (AdamW, linear warm-up over the first 10% of steps, then linear
decay) under ``AutoModelForSequenceClassification`` / ``AutoModelForTokenClassification``. The
data pipeline, epochs, early stopping and model selection on validation are those of
:func:`adalayers.training.train.fit`, and the run folder holds the same files::

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
import shutil
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adalayers.core.backbone import Backbone, resolve_model_path
from adalayers.core.decoding import check_decoding, resolve_decoding
from adalayers.core.encoding import IGNORE_INDEX
from adalayers.training.config import RunConfig, save_config
from adalayers.training.train import (
    _NESTED,
    CONFIG,
    HISTORY,
    METRICS,
    MODEL_DIR,
    _accelerator,
    _append_jsonl,
    _load_data,
    _loader,
    _progress,
    _seed_everything,
    _write_json,
    evaluate_split,
    evaluate_splits,
    head_decoding,
    save_predictions,
    selection_metric,
    tokenize,
)

logger = logging.getLogger(__name__)

DEFAULT_LR = 2e-5
"""The usual learning rate for fully fine-tuning a BERT-size model."""
WARMUP = 0.1
"""Fraction of the optimiser steps spent warming the learning rate up."""


@dataclass
class LabelSpace:
    """The part of a task that tokenising and scoring need: its type and label names."""

    task_type: str
    labels: list[str]
    decoding: str = "auto"  # token tasks: head.decoding, as for the mixer's head

    def __post_init__(self) -> None:
        self.decoding = resolve_decoding(self.decoding, self.task_type, self.labels)
        check_decoding(self.decoding, self.task_type, self.labels)

    def label_ids(self, names: Sequence[str]) -> list[int]:
        """Label names -> ids; an unknown name raises a ``ValueError`` listing the known ones."""
        index = {name: i for i, name in enumerate(self.labels)}
        unknown = [name for name in names if name not in index]
        if unknown:
            raise ValueError(f"label {unknown[0]!r} is not one of this task's labels {self.labels}")
        return [index[name] for name in names]


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


def _loss(task_type: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if task_type == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), targets.float())
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def load_model(config: RunConfig, space: LabelSpace) -> tuple[nn.Module, Any]:
    """The base with a fresh standard head for ``space``, all weights trainable, and its
    tokenizer.

    Raises:
        ValueError: ``transformers`` has no such head for this architecture.
    """
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    path = resolve_model_path(config.base)
    extra = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    token_task = space.task_type == "token_classification"
    auto = AutoModelForTokenClassification if token_task else AutoModelForSequenceClassification
    labels = {"num_labels": 1, "problem_type": "regression"}
    if space.task_type != "regression":
        labels = {
            "num_labels": len(space.labels),
            "id2label": dict(enumerate(space.labels)),
            "label2id": {name: i for i, name in enumerate(space.labels)},
        }
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
    accelerator = _accelerator(config)
    main = accelerator.is_main_process
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{run} already holds a run; pass overwrite or another folder")
        if main:
            shutil.rmtree(run)
    accelerator.wait_for_everyone()
    if main:
        run.mkdir(parents=True, exist_ok=True)
        save_config(config, run / CONFIG)
    progress = main and not quiet and sys.stderr.isatty()
    train_cfg = config.train

    _seed_everything(train_cfg.seed)
    data = _load_data(config)
    space = LabelSpace(data.task_type, list(data.label_names), head_decoding(config, data))
    model, tokenizer = load_model(config, space)
    probe = types.SimpleNamespace(tokenizer=tokenizer, model=model)
    max_length = min(config.data.max_length, Backbone.max_length.fget(probe))  # as fit() does
    metric = selection_metric(config, data)
    scoring = {"metrics": config.task.metrics, "positive_label": config.task.positive_label}
    with accelerator.main_process_first():
        tokenized = {
            s: tokenize(data, s, tokenizer, space, max_length) for s in ("train", "validation")
        }
    pad_id = tokenizer.pad_token_id

    wrapped = _Logits(model)
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    named = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    groups = [
        {
            "params": [p for n, p in named if not n.endswith(no_decay)],
            "weight_decay": train_cfg.weight_decay,
        },
        {"params": [p for n, p in named if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    unwrapped: _Logits = accelerator.unwrap_model(wrapped)

    def loader(epoch: int) -> Any:
        seed = train_cfg.seed * 100_003 + epoch
        return _loader(
            accelerator, tokenized["train"], train_cfg.batch_size, pad_id, shuffle=True, seed=seed
        )

    steps = train_cfg.epochs * math.ceil(len(loader(0)) / train_cfg.grad_accumulation)
    warmup = max(1, int(WARMUP * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    best, best_epoch, bad_epochs, epochs_run = -math.inf, -1, 0, 0
    best_state: dict[str, torch.Tensor] = {}
    train_seconds, tokens = 0.0, 0
    for epoch in range(train_cfg.epochs):
        wrapped.train()
        batches = loader(epoch)
        losses = []
        start = time.perf_counter()
        desc = f"finetune {epoch + 1}/{train_cfg.epochs}"
        for batch in _progress(batches, total=len(batches), desc=desc, enabled=progress):
            batch.pop("index")
            labels = batch.pop("labels")
            with accelerator.accumulate(wrapped):
                loss = _loss(space.task_type, wrapped(**batch), labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients and train_cfg.grad_clip > 0:
                    accelerator.clip_grad_norm_(wrapped.parameters(), train_cfg.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
        train_seconds += time.perf_counter() - start
        val = evaluate_split(
            accelerator,
            wrapped,
            space,
            data,
            tokenized["validation"],
            "validation",
            train_cfg.eval_batch_size,
            pad_id,
            progress,
            **scoring,
        )
        if metric not in val:
            raise ValueError(
                f"train.metric={metric!r} is not a metric of this task; "
                f"choose from {sorted(k for k in val if k not in _NESTED)}"
            )
        score = float(val[metric])
        improved = score > best
        epochs_run = epoch + 1
        if improved:
            best, best_epoch, bad_epochs = score, epoch + 1, 0
            best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in unwrapped.state_dict().items()
            }
        else:
            bad_epochs += 1
        if main:
            _append_jsonl(
                run / HISTORY,
                {
                    "epoch": epoch + 1,
                    "train_loss": float(np.mean(losses)) if losses else None,
                    "validation": {k: v for k, v in val.items() if k not in _NESTED},
                    "metric": metric,
                    "score": score,
                    "improved": improved,
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": round(train_seconds, 2),
                },
            )
        logger.info(
            "finetune epoch %d: loss %.4f, validation %s %.4f%s",
            epoch + 1,
            np.mean(losses) if losses else float("nan"),
            metric,
            score,
            " (best)" if improved else "",
        )
        if train_cfg.early_stopping and bad_epochs >= train_cfg.early_stopping:
            logger.info("early stopping after %d epochs without improvement", bad_epochs)
            break

    unwrapped.load_state_dict(best_state)
    total = sum(p.numel() for p in model.parameters())
    base = sum(p.numel() for p in getattr(model, "base_model", model).parameters())
    results: dict[str, Any] = {
        "baseline": "finetune",
        "task": data.name,
        "task_type": data.task_type,
        "base": config.base,
        "metric": metric,
        "best_epoch": best_epoch,
        "epochs_run": epochs_run,
        "lr": lr,
    }
    results.update(
        evaluate_splits(
            accelerator,
            wrapped,
            space,
            data,
            tokenized,
            tokenizer,
            max_length,
            train_cfg.eval_batch_size,
            pad_id,
            progress,
            predictions=(predictions := {}),
            **scoring,
        )
    )
    results.update(
        {
            "parameters_added": total,  # a second, fine-tuned copy of the whole base
            "trainable_parameters": total,
            "base_parameters": base,
            "percent_of_base": 100 * total / base,
            "train_seconds": round(train_seconds, 2),
            "train_tokens": tokens,
            "train_tokens_per_second": round(tokens / max(train_seconds, 1e-9), 1),
            "processes": accelerator.num_processes,
        }
    )
    if main:
        save_predictions(run, predictions)  # before metrics.json, which marks the end
        _write_json(run / METRICS, results)
        if save_model:
            model.save_pretrained(run / MODEL_DIR)
            tokenizer.save_pretrained(run / MODEL_DIR)
    accelerator.wait_for_everyone()
    return results
