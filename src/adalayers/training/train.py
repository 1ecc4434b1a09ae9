"""Training a task on the frozen base: :func:`fit`, on Hugging Face Accelerate.

:func:`fit` prepares a run (its folder, :mod:`.run`; the data, base and task, :mod:`.build`;
the feature cache, :mod:`.cache_prep`), drives the epoch loop (:class:`~.loop.Loop`) through
:class:`_MixerTrainer`, then evaluates the best task on every split and writes the results
(:meth:`_MixerTrainer.finalize`). Training is resumable: a checkpoint every
``train.checkpoint_every`` steps, at the end of each epoch and on SIGINT / SIGTERM
(:func:`_stop_on_signals`), which ``resume`` continues exactly where the run stopped.

``accelerate launch`` / ``torchrun`` run :func:`fit` data-parallel; every process holds the frozen
base and the task, gradients of the task are all-reduced.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from adalayers.core.backbone import Backbone, load_backbone
from adalayers.core.task import Task
from adalayers.training import size_defaults
from adalayers.training.batches import CachedExamples, batch_loader, ensure_states, tokenize
from adalayers.training.build import (
    TaskModel,
    build_task,
    load_data,
    make_accelerator,
    max_tokens,
    seed_everything,
)
from adalayers.training.cache import FeatureStore
from adalayers.training.cache_prep import build_cache, prepare_cache
from adalayers.training.checkpoint import (
    CheckpointError,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)
from adalayers.training.config import RunConfig, save_config
from adalayers.training.data import TaskData
from adalayers.training.evaluate import (
    calibrated_options,
    evaluate_run,
    evaluate_split,
    evaluate_splits,
    sample_records,
    selection_metric,
)
from adalayers.training.loop import EpochCallback, Loop, LoopState, TrainingInterrupted
from adalayers.training.run import (
    CHECKPOINT_DIR,
    CONFIG,
    HISTORY,
    MODEL_DIR,
    load_run,
    open_run,
    truncate_history,
    write_results,
)
from adalayers.training.tracking import TRACKERS_DIR, trackers

__all__ = ["TrainingInterrupted", "build_cache", "evaluate_run", "fit", "load_run"]

logger = logging.getLogger(__name__)


def fit(
    config: RunConfig,
    output_dir: str | os.PathLike,
    *,
    resume: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[EpochCallback] = (),
) -> dict[str, Any]:
    """Train a task on the frozen base, keep the best-on-validation head, evaluate on test.

    Args:
        config: the run configuration.
        output_dir: the run folder (created).
        resume: continue from ``output_dir/checkpoint``.
        quiet: no progress bars.
        overwrite: replace an existing run folder.
        callbacks: called with each epoch's history record (:data:`~.loop.EpochCallback`),
            after the trackers of ``train.report_to`` (:mod:`.tracking`) have logged it; one
            that raises ends the training (a search's pruner).

    Returns:
        The final metrics (also written to ``metrics.json``).

    Raises:
        FileExistsError: ``output_dir`` holds a run and neither ``resume`` nor ``overwrite``.
        TrainingInterrupted: a signal stopped training after a checkpoint was written.
    """
    run = Path(output_dir)
    chosen: dict[str, Any] = {}
    data = None
    if not resume:  # a resumed run's config.yaml holds what was chosen
        config, chosen, data = size_defaults.resolve_config(config)
    accelerator = make_accelerator(config, run / TRACKERS_DIR)
    main = accelerator.is_main_process
    open_run(run, config, accelerator, resume=resume, overwrite=overwrite)
    progress = main and not quiet and sys.stderr.isatty()

    seed_everything(config.train.seed)
    if data is None:
        data = load_data(config)
    for split in ("train", "validation"):
        if len(data.splits[split]) == 0:
            raise ValueError(f"the {split} split of {data.name} is empty")
    backbone = load_backbone(
        config.base, states=config.base_states, gguf_file=config.gguf_file, dtype=config.dtype
    )
    max_length = max_tokens(config, backbone)
    task = build_task(config, data, backbone)
    metric = selection_metric(config, data)
    lengths: dict[str, dict[str, Any]] = {"train": {}, "validation": {}}
    with accelerator.main_process_first():
        tokenized = {
            split: tokenize(data, split, backbone.tokenizer, task, max_length, lengths[split])
            for split in ("train", "validation")
        }
    stores: dict[str, FeatureStore] = {}
    if config.train.cache:
        config, task, stores = prepare_cache(
            config,
            accelerator,
            backbone,
            data,
            task,
            tokenized,
            max_length,
            progress,
            lengths=lengths,
        )
        if main:
            save_config(config, run / CONFIG)  # what ran: the probe's layers, the cache folder

    model = TaskModel(backbone, task)
    optimizer = _optimizer(config, task)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=config.train.lr_factor, patience=config.train.lr_patience
    )
    state = LoopState()
    if resume:
        state = _load_checkpoint(run, task, optimizer, scheduler)
        if main:
            truncate_history(run / HISTORY, state.epoch)
        logger.info("resuming %s at epoch %d, step %d", run, state.epoch, state.step_in_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainer = _MixerTrainer(
        accelerator,
        model,
        optimizer,
        scheduler,
        config=config,
        run=run,
        data=data,
        backbone=backbone,
        tokenized=tokenized,
        stores=stores,
        progress=progress,
    )
    task = trainer.task
    logger.info(
        "task %s: %d parameters (%.3f%% of the base's %d)",
        data.name,
        task.num_parameters(),
        100 * task.num_parameters() / backbone.num_parameters(),
        backbone.num_parameters(),
    )

    def checkpoint(state: LoopState) -> None:
        _save_checkpoint(run, task, optimizer, scheduler, state)

    with trackers(accelerator, config, run, project=data.name) as tracking:
        with _stop_on_signals() as signals:
            loop = Loop(
                accelerator,
                trainer,
                config.train,
                run,
                metric=metric,
                progress=progress,
                state=state,
                checkpoint=checkpoint,
                signals=signals,
                callbacks=[*([tracking.on_epoch] if tracking else []), *callbacks],
            )
            loop.run()
        results = trainer.finalize(loop, metric, max_length, lengths, chosen)
        if tracking:
            tracking.finished(results)
    return results


class _MixerTrainer:
    """The :class:`~adalayers.training.loop.Steps` of a task on the frozen base (the task
    trains, the base does not), and the end of its run (:meth:`finalize`).

    Args:
        model: the prepared :class:`~adalayers.training.build.TaskModel`.
        optimizer: its prepared optimiser.
        scheduler: ``ReduceLROnPlateau`` on the validation score.
        tokenized: split -> tokenised dataset (``train`` and ``validation`` at least).
        stores: split -> feature store of the cached splits (read instead of running the base).
    """

    def __init__(
        self,
        accelerator: Any,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        config: RunConfig,
        run: Path,
        data: TaskData,
        backbone: Backbone,
        tokenized: dict[str, Any],
        stores: dict[str, FeatureStore],
        progress: bool,
    ) -> None:
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.task: Task = accelerator.unwrap_model(model).task
        self.config, self.run, self.data, self.backbone = config, run, data, backbone
        self.tokenized, self.stores, self.progress = tokenized, stores, progress
        self.pad_id = backbone.tokenizer.pad_token_id
        # the epochs of a cached split read labels and lengths only, not token ids
        self.train_ds, self.val_ds = (
            CachedExamples(tokenized[split]) if split in stores else tokenized[split]
            for split in ("train", "validation")
        )

    # -- Steps -------------------------------------------------------------------------------
    def loader(self, epoch: int) -> Any:
        return batch_loader(
            self.accelerator,
            self.train_ds,
            self.config.train.batch_size,
            self.pad_id,
            shuffle=True,
            seed=self.config.train.seed * 100_003 + epoch,
            store=self.stores.get("train"),
            task=self.task,
        )

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        ensure_states(batch, self.stores.get("train"), self.task)
        inputs = {k: v for k, v in batch.items() if k not in ("index", "labels")}
        return self.task.loss(self.model(**inputs), batch["labels"])

    def parameters(self) -> Iterable[torch.Tensor]:
        return self.task.parameters()

    def stepped(self) -> None:
        pass  # the learning rate follows the validation score (validated)

    def validate(self) -> dict[str, Any]:
        return evaluate_split(
            self.accelerator,
            self.model,
            self.task,
            self.data,
            self.val_ds,
            "validation",
            self.config.train.eval_batch_size,
            self.pad_id,
            self.progress,
            store=self.stores.get("validation"),
            **self.scoring,
        )

    def validated(self, score: float, improved: bool) -> dict[str, Any]:
        self.scheduler.step(score)
        if improved and self.accelerator.is_main_process:
            self.task.save_pretrained(self.run / MODEL_DIR)
        return {
            "layer_weights": self.task.mixer.layer_weights(),
            "entropy": self.task.mixer.entropy().item(),
        }

    @property
    def scoring(self) -> dict[str, Any]:
        """What :func:`~adalayers.training.evaluate.evaluate_split` reports (``task`` section)."""
        task = self.config.task
        return {"metrics": task.metrics, "positive_label": task.positive_label}

    # -- the end -----------------------------------------------------------------------------
    def probe_check(self, metric: str, results: dict[str, Any]) -> dict[str, Any]:
        """``probe``: a linear probe on one cached state (:func:`~.probe.probe_check`) beside
        the head's validation score, and a warning when the head does not beat it. Nothing for
        runs that do not cache train and validation, or train on more than 5,000 examples."""
        from adalayers.training.probe import probe_check

        scoring = self.scoring
        check = probe_check(
            self.task,
            self.data,
            self.stores,
            {split: CachedExamples(self.tokenized[split]) for split in self.stores},
            metric,
            names=scoring["metrics"],
            positive=self.task.kind.positive_id(self.task.labels, scoring["positive_label"]),
            seed=self.config.train.seed,
        )
        head = (results.get("validation") or {}).get(metric)
        if check is None or head is None:
            return {}
        check["head_validation"] = head
        check["head_beats_probe"] = bool(head > check["validation"])
        if not check["head_beats_probe"]:
            logger.warning(
                "the trained head (validation %s %.4f) does not beat a linear probe on state %d "
                "alone (%.4f): with this data the mixer and head add nothing; see "
                "docs/your-data.md (small datasets)",
                metric,
                head,
                check["state"],
                check["validation"],
            )
        return {"probe": check}

    def finalize(
        self,
        loop: Loop,
        metric: str,
        max_length: int,
        lengths: dict[str, dict[str, Any]],
        chosen: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Evaluate the best task on validation and test, write the predictions,
        ``metrics.json`` and the layer-weights plot; returns the metrics.

        Args:
            lengths: split -> :func:`~adalayers.training.batches.tokenize` statistics; gains
                those of the splits tokenised here.
            chosen: the settings chosen by the training set's size
                (:mod:`~adalayers.training.size_defaults`), kept as ``size_defaults``.
        """
        accelerator, task, data, config, run = (
            self.accelerator,
            self.task,
            self.data,
            self.config,
            self.run,
        )
        state = loop.state
        best = Task.from_pretrained(run / MODEL_DIR, self.backbone)
        task.load_state_dict(best.state_dict())
        options = calibrated_options(  # e.g. multi-label thresholds, learnt on validation
            accelerator,
            self.model,
            task,
            data,
            self.val_ds,
            config.train.eval_batch_size,
            self.pad_id,
            self.progress,
            store=self.stores.get("validation"),
        )
        if options is not None:
            task.config = dataclasses.replace(task.config, options=options)
            logger.info("task options learnt on validation: %s", options)
            if accelerator.is_main_process:
                task.save_pretrained(run / MODEL_DIR)
        results: dict[str, Any] = {
            "task": data.name,
            "task_type": data.task_type,
            "base": config.base,
            "metric": metric,
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
        }
        if chosen:
            results["size_defaults"] = chosen
        if task.kind.per_token:
            results["decoding"] = task.decoding
        if task.options:
            results["options"] = task.options
        results.update(
            evaluate_splits(
                accelerator,
                self.model,
                task,
                data,
                self.tokenized,
                self.backbone.tokenizer,
                max_length,
                config.train.eval_batch_size,
                self.pad_id,
                self.progress,
                stores=self.stores,
                predictions=(predictions := {}),
                stats=lengths,
                **self.scoring,
            )
        )
        results["samples"] = {
            split: sample_records(data, split, records) for split, records in predictions.items()
        }
        if accelerator.is_main_process:
            results.update(self.probe_check(metric, results))
        results["max_length"] = max_length
        results["longest_example_tokens"] = {  # before cutting: to choose data.max_length
            split: found["longest"] for split, found in lengths.items() if "longest" in found
        }
        base_parameters = self.backbone.num_parameters()
        results.update(
            {
                "parameters_added": task.num_parameters(),
                "base_parameters": base_parameters,
                "percent_of_base": 100 * task.num_parameters() / base_parameters,
                "layer_weights": task.mixer.layer_weights(),
                **loop.timings(),
                "cache": {
                    split: {
                        "bytes": store.size_bytes(),
                        "layers": store.layers,
                        "dtype": store.dtype,
                    }
                    for split, store in self.stores.items()
                },
            }
        )
        if accelerator.is_main_process:
            write_results(run, results, predictions)
            from adalayers.report import plot_layer_weights

            plot_layer_weights(
                task.mixer.layer_weights(),
                run / "layer_weights.png",
                title=f"{data.name} on {Path(config.base).name}",
            )
        accelerator.wait_for_everyone()
        return results


def _optimizer(config: RunConfig, task: Task) -> torch.optim.Optimizer:
    decay = [p for n, p in task.named_parameters() if p.requires_grad and n != "mixer.p"]
    no_decay = [p for n, p in task.named_parameters() if p.requires_grad and n == "mixer.p"]
    groups = [
        {"params": decay, "weight_decay": config.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    # one fused kernel over all parameters (CPU and CUDA) instead of a Python loop per tensor:
    # the step of a small head is otherwise a visible share of its training time
    fused = {"fused": True} if _fused_optimizers() else {}
    if config.train.optimizer == "adam":  # L2 through the gradient, as classic Adam
        return torch.optim.Adam(groups, lr=config.train.lr, **fused)
    return torch.optim.AdamW(groups, lr=config.train.lr, **fused)


def _fused_optimizers() -> bool:
    """Whether this torch has fused Adam/AdamW for CPU tensors (2.4 and later)."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 4)


# -- resuming --------------------------------------------------------------------------------
def _save_checkpoint(
    run: Path,
    task: Task,
    optimizer: Any,
    scheduler: Any,
    state: LoopState,
) -> None:
    save_state(
        run / CHECKPOINT_DIR,
        {
            "task": task.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        },
        state.__dict__,
    )


def _load_checkpoint(run: Path, task: Task, optimizer: Any, scheduler: Any) -> LoopState:
    """Restore a checkpoint written by :func:`_save_checkpoint` (tensors and JSON, no pickle)."""
    folder = run / CHECKPOINT_DIR
    blob, counters = load_state(folder)
    try:
        task.load_state_dict(blob["task"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        state = LoopState(**counters)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{folder} does not match this run's task and optimiser ({type(err).__name__}: "
            f"{str(err)[:300]}); delete {folder} to train {run} again from the start"
        ) from err
    return state


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, bool]]:
    """SIGINT / SIGTERM set a flag the loop checks between steps (a second SIGINT aborts)."""
    flag = {"stop": False}
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        logger.warning("signal %d: saving a checkpoint after this step", signum)

    in_main = __import__("threading").current_thread() is __import__("threading").main_thread()
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
