"""``train.report_to`` (training/tracking.py): real TensorBoard event files and a local MLflow
store written by a tiny run, read back; a tracker that is not installed; unknown names."""

from __future__ import annotations

import pytest
from helpers import read_jsonl, train_args

from adalayers.cli import main
from adalayers.training import tracking
from adalayers.training.config import load_config
from adalayers.training.train import fit


def test_tensorboard_and_mlflow_log_every_epoch_under_the_run_folder(cola, tmp_path):
    pytest.importorskip("tensorboard", reason="the track extra: pip install tensorboard")
    mlflow = pytest.importorskip("mlflow", reason="the track extra: pip install mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, data = cola
    config = load_config(path, ["train.report_to=[tensorboard, mlflow]"], data_dir=str(data))
    run = tmp_path / "run"
    results = fit(config, run, quiet=True)
    history = read_jsonl(run / "history.jsonl")
    assert [h["epoch"] for h in history] == [1, 2, 3]

    # TensorBoard: RUN/trackers/<task>/, one scalar per epoch and tag
    events = EventAccumulator(str(run / "trackers" / "cola"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    layers = {f"layer_weights/{i}" for i in range(4)}  # the tiny BERT's 4 states
    assert {"train/loss", "train/lr", "validation/mcc", "mixer/entropy"} | layers <= scalars
    mcc = events.Scalars("validation/mcc")
    assert [e.step for e in mcc] == [1, 2, 3]
    assert [e.value for e in mcc] == pytest.approx([h["validation"]["mcc"] for h in history])
    last = {k: events.Scalars(f"layer_weights/{k}")[-1].value for k in history[-1]["layer_weights"]}
    assert last == pytest.approx(history[-1]["layer_weights"], abs=1e-6)
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [h["train_loss"] for h in history]
    )

    # MLflow: a SQLite store in RUN/trackers/, experiment = task, run = the run folder's name
    store = run / "trackers" / "mlflow.db"
    assert store.is_file()
    assert not mlflow.is_tracking_uri_set()  # the process's MLflow setting is left as it was
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("cola")
    (tracked,) = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_name == "run" and tracked.info.status == "FINISHED"
    assert tracked.data.params["train.lr"] == str(config.train.lr)
    assert tracked.data.params["task.mixer.alpha"] == str(config.task.mixer.alpha)
    by_step = {
        m.step: m.value for m in client.get_metric_history(tracked.info.run_id, "validation/mcc")
    }
    assert by_step == pytest.approx({h["epoch"]: h["validation"]["mcc"] for h in history})
    lr = client.get_metric_history(tracked.info.run_id, "train/lr")
    assert [m.value for m in lr] == pytest.approx([h["lr"] for h in history])
    for layer, weight in history[1]["layer_weights"].items():
        (point,) = [
            m
            for m in client.get_metric_history(tracked.info.run_id, f"layer_weights/{layer}")
            if m.step == 2
        ]
        assert point.value == pytest.approx(weight, abs=1e-6)
    best = client.get_metric_history(tracked.info.run_id, "best/test/mcc")
    assert [(m.step, m.value) for m in best] == [
        (results["best_epoch"], pytest.approx(results["test"]["mcc"]))
    ]


def test_a_tracker_that_is_not_installed_names_its_package(cola, tmp_path, monkeypatch, capsys):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "comet_ml" else real(name, *a),
    )
    path, data = cola
    run = tmp_path / "run"
    args = train_args(path, data, run, "--set", "train.report_to=[comet_ml]")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train.report_to names comet_ml" in err and "pip install comet-ml" in err
    assert not run.exists()  # refused before anything was written


def test_report_to_takes_known_trackers_once(cola):
    path, _ = cola
    with pytest.raises(ValueError, match=r"train.report_to: unknown tracker.*tensorbord"):
        load_config(path, ["train.report_to=[tensorbord]"])
    with pytest.raises(ValueError, match="twice"):
        load_config(path, ["train.report_to=[mlflow, mlflow]"])
    assert load_config(path).train.report_to == []


def test_epoch_values_flatten_a_history_record():
    record = {
        "epoch": 2,
        "train_loss": 0.5,
        "validation": {"mcc": 0.25, "accuracy": 0.7, "examples": 30},
        "lr": 0.001,
        "layer_weights": {"0": 0.75, "3": 0.25},
        "entropy": 0.56,
        "seconds": 1.5,
    }
    assert tracking.epoch_values(record) == {
        "train/loss": 0.5,
        "train/lr": 0.001,
        "train/seconds": 1.5,
        "validation/mcc": 0.25,
        "validation/accuracy": 0.7,
        "layer_weights/0": 0.75,
        "layer_weights/3": 0.25,
        "mixer/entropy": 0.56,
    }
    flat = tracking.flat_config({"train": {"lr": 0.001, "report_to": ["mlflow"]}, "tune": None})
    assert flat == {"train.lr": 0.001, "train.report_to": "['mlflow']", "tune": "None"}
