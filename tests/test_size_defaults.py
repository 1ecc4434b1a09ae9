"""Settings chosen by the training set's size, for user data (training/size_defaults.py)."""

from __future__ import annotations

import json

import pytest

from adalayers.training.config import RunConfig, load_config, with_settings
from adalayers.training.size_defaults import SMALL, choose, missing, resolve, resolve_config


def _user_config(tmp_path, text: str, overrides=None) -> RunConfig:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path, overrides)


CSV = """\
data:
  task: csv
  files: {train: train.csv}
task:
  head: {num_heads: 2}
train:
  epochs: 3
"""


def test_load_config_records_the_keys_the_file_and_set_give(tmp_path):
    config = _user_config(tmp_path, CSV, ["train.lr=3e-4"])
    assert {"data.task", "task.head.num_heads", "train.epochs", "train.lr"} <= config.given_keys
    assert "train.batch_size" not in config.given_keys
    assert "task.head.dropout" not in config.given_keys  # a section given in part
    # a trial's config (tune) keeps them, and counts its own settings as given
    trial = with_settings(config, {"task.mixer.alpha": 2.0})
    assert "task.mixer.alpha" in trial.given_keys and "train.lr" in trial.given_keys


def test_choose_aims_at_a_number_of_steps_and_leaves_large_sets_alone():
    small = choose({"train": 1000, "validation": 500, "test": 1000}, 128)
    assert small["train.epochs"] == 39  # 63 steps of 16 per epoch, ~2,400 steps
    assert small["train.early_stopping"] == 7
    assert small["train.cache"] is True and "test" in small["cache.splits"]
    assert choose({"train": 3000}, 128)["train.epochs"] == 13
    assert choose({"train": 50}, 128)["train.epochs"] == 60  # capped
    assert choose({"train": SMALL + 1}, 128) == {}
    # too many token slots to cache without asking: no cache, the rest still chosen
    long = choose({"train": 5000, "validation": 500, "test": 25000}, 512)
    assert "train.cache" not in long and long["train.lr"] == 1e-3
    mid = choose({"train": 2000, "validation": 500, "test": 25000}, 128)
    assert mid["train.cache"] is True and "cache.splits" not in mid  # test stays online


def test_missing_keeps_what_the_config_gives():
    settings = {"train.lr": 1e-3, "train.epochs": 20, "task.head.dropout": 0.1}
    assert missing(settings, {"train", "train.epochs", "task.head"}) == {
        "train.lr": 1e-3,
        "task.head.dropout": 0.1,
    }


def test_resolve_fills_only_the_missing_settings_of_user_data(tmp_path):
    config = _user_config(tmp_path, CSV)
    resolved, chosen = resolve(config, {"train": 800, "validation": 100, "test": 100})
    assert "train.epochs" not in chosen and resolved.train.epochs == 3  # given
    assert resolved.task.head.num_heads == 2  # given
    assert chosen["train.lr"] == resolved.train.lr == 1e-3
    assert resolved.task.head.dropout == 0.1 and resolved.train.batch_size == 16
    assert chosen["train.early_stopping"] == 4  # from the given 3 epochs, at least 4
    assert resolved.train.cache is True
    assert "train.lr" in resolved.given_keys  # resolving again changes nothing
    assert resolve(resolved, {"train": 800})[1] == {}


@pytest.mark.parametrize(
    "text, overrides",
    [
        ("data: {task: cola}\n", None),  # a benchmark task
        (CSV, ["train.size_defaults=false"]),  # turned off
    ],
)
def test_resolve_leaves_benchmarks_and_opt_outs_alone(tmp_path, text, overrides):
    config = _user_config(tmp_path, text, overrides)
    resolved, chosen = resolve(config, {"train": 800})
    assert chosen == {} and resolved is config


def test_a_config_built_in_python_is_left_as_built():
    config = RunConfig()
    config = with_settings(config, {"data.task": "csv"})
    assert config.given_keys is None
    assert resolve(config, {"train": 800}) == (config, {})


def test_a_fully_given_config_does_not_read_the_data(tmp_path, monkeypatch):
    text = CSV.replace("train:\n  epochs: 3\n", "") + ("train: {size_defaults: true}\n")
    config = _user_config(tmp_path, text)
    everything = [f"{k}={json.dumps(v)}" for k, v in choose({}, 64).items()]
    config = _user_config(tmp_path, text, everything)

    def fail(_):
        raise AssertionError("the data was read")

    monkeypatch.setattr("adalayers.training.build.load_data", fail)
    assert resolve_config(config)[:2] == (config, {})
