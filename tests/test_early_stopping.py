"""The loop's early stopping and best epoch on given validation scores (no training)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from adalayers.training.config import TrainConfig
from adalayers.training.loop import Loop


class Scores:
    """Steps whose validation returns the given scores in turn."""

    def __init__(self, scores):
        self.scores = iter(scores)
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 1e-3}])
        self.kept = []

    def validate(self):
        return {"mcc": next(self.scores)}

    def validated(self, score, improved):
        if improved:
            self.kept.append(score)
        return {}


def run(scores, tmp_path, **train):
    steps = Scores(scores)
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    settings = TrainConfig(epochs=len(scores), **train)
    loop = Loop(accelerator, steps, settings, tmp_path, metric="mcc")
    epochs = 0
    while epochs < len(scores):
        epochs += 1
        if loop._validate():
            break
    return epochs, loop.state.best_epoch, steps.kept


# the near-tie of a CoLA run: 0.2403 against a best of 0.2374, three examples' worth
SCORES = [0.20, 0.2374, 0.23, 0.22, 0.2403, 0.2802, 0.27]


def test_any_increase_counts_by_default(tmp_path):
    assert run(SCORES, tmp_path, early_stopping=3) == (7, 6, [0.20, 0.2374, 0.2403, 0.2802])


def test_min_delta_ignores_near_ties_for_the_best_epoch_and_the_patience(tmp_path):
    epochs, best, kept = run(SCORES, tmp_path, early_stopping=3, early_stopping_min_delta=0.005)
    assert (epochs, best, kept) == (5, 2, [0.20, 0.2374])  # 0.2403 is not 0.005 better


def test_a_negative_min_delta_is_refused():
    with pytest.raises(ValueError, match="train.early_stopping_min_delta must be >= 0"):
        TrainConfig(early_stopping_min_delta=-0.01)
