"""Cache preparation: the config a cached run saves is the one that ran (the probe's layers, the
resolved cache folder), and the caller's config is left as it was."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

from helpers import write_cola, write_config

from adalayers.training.cache_prep import with_cache_dir
from adalayers.training.config import RunConfig, load_config
from adalayers.training.train import fit


def test_with_cache_dir_resolves_the_default_and_relative_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADALAYERS_CACHE_DIR", str(tmp_path / "home"))
    config = RunConfig()
    assert with_cache_dir(config).cache.dir == str(tmp_path / "home" / "features")
    assert config.cache.dir is None  # a new config, not this one changed
    relative = load_config(None, ["cache.dir=stores"])
    assert with_cache_dir(relative).cache.dir == str(Path.cwd() / "stores")
    assert with_cache_dir(with_cache_dir(relative)) == with_cache_dir(relative)


def test_a_cached_run_saves_the_config_that_ran(tmp_path, tiny_model_dir, monkeypatch):
    """The probe's layers and the default cache folder are in the run's ``config.yaml``; the
    config passed to ``fit`` is unchanged; training from the saved config reads the same
    store (no probe, no second store)."""
    home = tmp_path / "home"
    monkeypatch.setenv("ADALAYERS_CACHE_DIR", str(home))
    data = write_cola(tmp_path / "data", n_train=120)
    config = load_config(
        write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"), epochs=1),
        ["train.cache=true", "cache.layers=2", "cache.probe_examples=50"],
        data_dir=str(data),
    )
    before = copy.deepcopy(config)
    results = fit(config, tmp_path / "run", quiet=True)
    assert config == before
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.cache.dir == str(home / "features")
    assert len(saved.task.mixer.layers) == 2
    assert results["cache"]["train"]["layers"] == saved.task.mixer.layers
    mixer = replace(config.task.mixer, layers=saved.task.mixer.layers)
    assert saved == replace(with_cache_dir(config), task=replace(config.task, mixer=mixer))
    again = fit(saved, tmp_path / "again", quiet=True)
    assert again["cache"] == results["cache"]
    assert len(list((home / "features").glob("*/train"))) == 1
