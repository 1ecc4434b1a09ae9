"""Experiment tracking: ``train.report_to`` through Hugging Face Accelerate's trackers.

:func:`trackers` starts the trackers a config names (``accelerator.init_trackers``, with the
config flattened to ``section.key`` parameters), hands the training loop a callback that logs
each epoch (:data:`~adalayers.training.loop.EpochCallback`), and ends them
(``accelerator.end_training``) however the training ends. Every epoch logs, at step = epoch:

    train/loss, train/lr, train/seconds        the epoch's mean loss, learning rate, time so far
    validation/<metric>                        every validation metric
    layer_weights/<i>                          the mixer's distribution p~ over hidden state i
    mixer/entropy                              H(p~)

and the end of a run logs ``best/validation/<metric>`` and ``best/test/<metric>`` (the kept
epoch's) at its best epoch.

The trackers write under the run folder, ``RUN/trackers/`` (:data:`TRACKERS_DIR`): TensorBoard
event files in ``RUN/trackers/<task>/``, and, unless MLflow's tracking URI is set (the
``MLFLOW_TRACKING_URI`` variable or ``mlflow.set_tracking_uri``), an MLflow SQLite store
``RUN/trackers/mlflow.db`` (experiment ``<task>``, run named after the run folder; MLflow 3
refuses new file stores) with its artifacts in ``RUN/trackers/mlflow-artifacts/``. Services
(Weights & Biases, Comet, ...) log where their own settings say; W&B keeps its local files in
``RUN/trackers/``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TRACKERS_DIR = "trackers"
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "trackio": ("trackio", "trackio"),
}
"""``train.report_to`` name (Accelerate's) -> (the module it imports, the pip package)."""


def check_trackers(names: list[str]) -> None:
    """Raise an ``ImportError`` naming the pip package of a tracker that is not installed.

    Accelerate leaves out a tracker whose package is missing with a debug line only; a run
    asked to report somewhere should not train for hours and report nowhere.
    """
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"train.report_to names {name}, which is not installed: pip install {package} "
                f"(or pip install 'adalayers[track]' for tensorboard and mlflow)"
            )


def flat_config(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.001}}`` -> ``{"train.lr": 0.001}``: the parameters a tracker
    stores, each a number, a string or a boolean (lists and ``None`` as text)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def epoch_values(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars one epoch's history record logs (see the module's docstring)."""
    values: dict[str, float] = {}
    if record.get("train_loss") is not None:
        values["train/loss"] = float(record["train_loss"])
    values["train/lr"] = float(record["lr"])
    values["train/seconds"] = float(record["seconds"])
    for name, value in record["validation"].items():
        if name != "examples" and isinstance(value, (int, float)) and not isinstance(value, bool):
            values[f"validation/{name}"] = float(value)
    for layer, weight in (record.get("layer_weights") or {}).items():
        values[f"layer_weights/{layer}"] = float(weight)
    if record.get("entropy") is not None:
        values["mixer/entropy"] = float(record["entropy"])
    return values


def _best_values(results: Mapping[str, Any]) -> dict[str, float]:
    values = {}
    for split in ("validation", "test"):
        for name, value in (results.get(split) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if name != "examples":
                    values[f"best/{split}/{name}"] = float(value)
    return values


class Tracking:
    """The trackers of one run, as :func:`trackers` starts them."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def on_epoch(self, record: dict[str, Any]) -> None:
        """The loop's callback (:data:`~adalayers.training.loop.EpochCallback`): log an
        epoch's record at step = its epoch."""
        self.accelerator.log(epoch_values(record), step=int(record["epoch"]))

    def finished(self, results: Mapping[str, Any]) -> None:
        """Log a finished run's kept (best-epoch) validation and test metrics."""
        step = max(int(results.get("best_epoch") or 0), 0)
        self.accelerator.log(_best_values(results), step=step)


@contextmanager
def trackers(
    accelerator: Any, config: Any, run: Path, *, project: str
) -> Iterator[Tracking | None]:
    """Start the trackers of ``config.train.report_to`` for the run in ``run``; ``None`` where
    it names none. They end when the block does, whether training finished, was pruned or
    failed.

    Args:
        accelerator: made with ``log_with`` and ``project_dir=run/trackers``
            (:func:`~adalayers.training.build.make_accelerator`).
        config: the run's :class:`~adalayers.training.config.RunConfig` (logged as parameters).
        project: the experiment's name (the task's name).
    """
    names = list(config.train.report_to)
    if not names:
        yield None
        return
    folder = run / TRACKERS_DIR
    kwargs: dict[str, dict[str, Any]] = {}
    reset_mlflow = False
    if "mlflow" in names:
        import mlflow

        if not mlflow.is_tracking_uri_set():  # the user's server or store comes first
            reset_mlflow = True
            if accelerator.is_main_process:
                folder.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(f"sqlite:///{(folder / 'mlflow.db').absolute()}")
            kwargs["mlflow"] = {"logging_dir": str((folder / "mlflow-artifacts").absolute())}
        kwargs.setdefault("mlflow", {})["run_name"] = run.name
    if "wandb" in names:
        kwargs["wandb"] = {"dir": str(folder), "name": run.name}
    accelerator.init_trackers(project, config=flat_config(config.to_dict()), init_kwargs=kwargs)
    logger.info("reporting to %s under %s", ", ".join(names), folder)
    try:
        yield Tracking(accelerator)
    finally:
        accelerator.end_training()
        if reset_mlflow:
            import mlflow

            mlflow.set_tracking_uri(None)  # unset again, as it was
