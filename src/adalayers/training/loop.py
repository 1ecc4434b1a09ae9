"""The epoch loop shared by training a task on the frozen base and fine-tuning the whole base.

Each epoch trains on the shuffled batches (:meth:`Loop._train_epoch`), then scores the model on
validation and keeps the best epoch (:meth:`Loop._validate`): one ``history.jsonl`` record per
epoch, early stopping after ``train.early_stopping`` epochs without improvement. What differs
between the two trainers (the model, its loss, its optimiser schedule, how it is scored and how
the best weights are kept) is a :class:`Steps`. A resumable trainer also gives a checkpoint
writer and a stop flag: the loop writes a checkpoint every ``train.checkpoint_every`` steps and
at the end of each epoch, and on a stop signal writes one and raises
:class:`TrainingInterrupted`. Callbacks (:data:`EpochCallback`) see each epoch's record when it
is written: experiment trackers log it (:mod:`.tracking`), a hyper-parameter search reports the
score to its pruner and may stop the training by raising (:mod:`.tune`).

Resuming reproduces the uncut run exactly: each epoch's batches come from a loader with its own
seeded generator (:func:`~adalayers.training.batches.batch_loader`), the steps already done are
skipped, and :class:`LoopState` holds every counter the remaining steps depend on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from adalayers.training.config import TrainConfig
from adalayers.training.evaluate import NESTED
from adalayers.training.progress import ProgressLog, progress_bar
from adalayers.training.run import HISTORY, append_jsonl

logger = logging.getLogger(__name__)


EpochCallback = Callable[[dict[str, Any]], None]
"""Called on every process after each validation with the epoch's ``history.jsonl`` record
(``epoch``, ``train_loss``, ``validation``, ``metric``, ``score``, ``improved``, ``lr``, what
:meth:`Steps.validated` added, ``seconds``); an exception it raises ends the training there."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after writing a checkpoint; ``--resume`` continues it."""


@dataclass
class LoopState:
    """The loop's counters: what a checkpoint saves besides the weights (``trainer_state.json``)."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimiser batches done in the current epoch
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    global_step: int = 0
    train_seconds: float = 0.0
    tokens: int = 0
    loss_sum: float = 0.0  # over the current epoch's steps, so a resumed epoch reports its mean
    loss_steps: int = 0


class Steps(Protocol):
    """What a trainer gives the loop: its model and optimiser, and the steps that differ.

    Attributes:
        model: the model as Accelerate prepared it: ``model(**inputs) -> logits``.
        optimizer: its (prepared) optimiser; the loop steps it and reads its learning rate.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def loader(self, epoch: int) -> Any:
        """The training batches of ``epoch`` (with ``index`` and ``labels``); the same batches
        in the same order every time, so a resumed epoch can skip the ones done."""
        ...

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of one batch (forward included)."""
        ...

    def parameters(self) -> Iterable[torch.Tensor]:
        """The trained parameters (their gradient norm is clipped to ``train.grad_clip``)."""
        ...

    def stepped(self) -> None:
        """Called after each optimiser step that updated the weights (a per-step schedule)."""
        ...

    def validate(self) -> dict[str, Any]:
        """The validation metrics of the model as it is now."""
        ...

    def validated(self, score: float, improved: bool) -> dict[str, Any]:
        """Called after each validation with its score and whether it is the best so far (a
        schedule on the score, keeping the best weights); returns fields to add to the epoch's
        history record."""
        ...


class Loop:
    """Run the epochs of a training: :meth:`run` trains until ``train.epochs`` or early stopping.

    Args:
        accelerator: the Accelerate process group.
        steps: what the trainer gives (:class:`Steps`).
        train: the ``train`` section: ``epochs``, ``grad_clip``, ``early_stopping``,
            ``checkpoint_every``, ``log_every_seconds``.
        run: the run folder (``history.jsonl`` is appended to on the main process).
        metric: the validation metric that picks the best epoch.
        name: what an epoch is called in the progress bar and the log, e.g. ``epoch``.
        progress: show progress bars (else, on the main process, progress log lines).
        state: the counters to continue from (a resumed run), default a fresh start.
        checkpoint: writes a checkpoint of the given state (main process only); ``None``: the
            training is not resumable, ``train.checkpoint_every`` does not apply.
        signals: ``signals["stop"]`` is read after every step; when it is true (on any process)
            a checkpoint is written and :class:`TrainingInterrupted` raised.
        callbacks: called with each epoch's record after its checkpoint (:data:`EpochCallback`).
    """

    def __init__(
        self,
        accelerator: Any,
        steps: Steps,
        train: TrainConfig,
        run: Path,
        *,
        metric: str,
        name: str = "epoch",
        progress: bool = False,
        state: LoopState | None = None,
        checkpoint: Callable[[LoopState], None] | None = None,
        signals: Mapping[str, bool] | None = None,
        callbacks: Sequence[EpochCallback] = (),
    ) -> None:
        self.accelerator = accelerator
        self.steps = steps
        self.settings = train
        self.run_dir = run
        self.metric = metric
        self.name = name
        self.progress = progress
        self.state = state if state is not None else LoopState()
        self.checkpoint = checkpoint
        self.signals = signals
        self.callbacks = list(callbacks)
        self.main = accelerator.is_main_process

    def run(self) -> LoopState:
        """Train the remaining epochs; returns the final counters (best epoch, timings)."""
        while self.state.epoch < self.settings.epochs:
            self._train_epoch()
            if self._validate():
                break
        return self.state

    def _train_epoch(self) -> None:
        """One pass over the training batches, from the step the state says (a resumed run)."""
        accelerator, steps, state, train = self.accelerator, self.steps, self.state, self.settings
        epoch = state.epoch
        steps.model.train()
        loader = steps.loader(epoch)
        batches = loader
        if state.step_in_epoch:
            batches = accelerator.skip_first_batches(loader, state.step_in_epoch)
        losses = []
        start = time.perf_counter()
        what = f"{self.name} {epoch + 1}/{train.epochs}"
        bar = progress_bar(
            batches, total=len(loader) - state.step_in_epoch, desc=what, enabled=self.progress
        )
        log = ProgressLog(  # where there is no bar (nohup, CI, a scheduler): a log line
            what,
            len(loader),
            logger,
            every_seconds=train.log_every_seconds,
            enabled=self.main and not self.progress,
            initial=state.step_in_epoch,
        )
        for batch in bar:
            with accelerator.accumulate(steps.model):
                loss = steps.loss(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and train.grad_clip > 0:
                    accelerator.clip_grad_norm_(steps.parameters(), train.grad_clip)
                steps.optimizer.step()
                if accelerator.sync_gradients:
                    steps.stepped()
                steps.optimizer.zero_grad()
            losses.append(loss.item())
            state.loss_sum += losses[-1]
            state.loss_steps += 1
            state.step_in_epoch += 1
            state.global_step += 1
            state.tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            log.update(1, len(batch["labels"]) * accelerator.num_processes)
            if self.progress:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if self.checkpoint is None:
                continue
            every = train.checkpoint_every
            stop = self._stop_requested()
            if stop or (every and state.global_step % every == 0):
                state.train_seconds += time.perf_counter() - start
                start = time.perf_counter()
                if self.main:
                    self.checkpoint(state)
                accelerator.wait_for_everyone()
                if stop:
                    raise TrainingInterrupted(
                        f"stopped at epoch {epoch + 1}, step {state.step_in_epoch}; "
                        f"checkpoint saved. Continue with: adalayers train --resume "
                        f"--output-dir {self.run_dir}"
                    )
        state.train_seconds += time.perf_counter() - start

    def _stop_requested(self) -> bool:
        """Whether a stop signal reached any process (read once a step)."""
        stop = bool(self.signals is not None and self.signals["stop"])
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(stop)], device=self.accelerator.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum").item())
        return stop

    def _validate(self) -> bool:
        """Score the epoch on validation, keep the best, write its history record and a
        checkpoint; returns whether to stop early."""
        state, metric = self.state, self.metric
        epoch = state.epoch
        val = self.steps.validate()
        if metric not in val:
            raise ValueError(
                f"train.metric={metric!r} is not a metric of this task; "
                f"choose from {sorted(k for k in val if k not in NESTED)}"
            )
        score = float(val[metric])
        improved = score > state.best + self.settings.early_stopping_min_delta
        if improved:
            state.best, state.best_epoch, state.bad_epochs = score, epoch + 1, 0
        else:
            state.bad_epochs += 1
        extra = self.steps.validated(score, improved)
        state.epoch += 1
        state.step_in_epoch = 0
        train_loss = state.loss_sum / state.loss_steps if state.loss_steps else None
        state.loss_sum, state.loss_steps = 0.0, 0
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "validation": {k: v for k, v in val.items() if k not in NESTED},
            "metric": metric,
            "score": score,
            "improved": improved,
            "lr": self.steps.optimizer.param_groups[0]["lr"],
            **extra,
            "seconds": round(state.train_seconds, 2),
        }
        if self.main:
            append_jsonl(self.run_dir / HISTORY, record)
            if self.checkpoint is not None:
                self.checkpoint(state)
        self.accelerator.wait_for_everyone()
        logger.info(
            "%s %d: loss %.4f, validation %s %.4f%s",
            self.name,
            epoch + 1,
            float("nan") if train_loss is None else train_loss,
            metric,
            score,
            " (best)" if improved else "",
        )
        for callback in self.callbacks:
            callback(record)
        stop = self.settings.early_stopping and state.bad_epochs >= self.settings.early_stopping
        if stop:
            logger.info("early stopping after %d epochs without improvement", state.bad_epochs)
        return bool(stop)

    def timings(self) -> dict[str, Any]:
        """The training's time and throughput, for ``metrics.json``."""
        state = self.state
        return {
            "train_seconds": round(state.train_seconds, 2),
            "train_tokens": state.tokens,
            "train_tokens_per_second": round(state.tokens / max(state.train_seconds, 1e-9), 1),
            "processes": self.accelerator.num_processes,
        }
