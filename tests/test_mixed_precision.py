"""``train.mixed_precision`` through Accelerate: bf16 on a CPU trains (online and from the
feature cache) with finite metrics; fp16 on a CPU falls back to float32 with a warning."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers import read_jsonl

from adalayers.training import build
from adalayers.training.config import load_config
from adalayers.training.train import fit


def _finite(scores: dict) -> bool:
    return all(math.isfinite(v) for v in scores.values() if isinstance(v, float))


@pytest.mark.parametrize("cache", [False, True])
def test_bf16_trains_on_cpu_with_finite_metrics(cola, tmp_path, monkeypatch, cache):
    path, data = cola
    overrides = ["train.mixed_precision=bf16", "train.epochs=2", "task.mixer.mode=dynamic"]
    if cache:
        overrides += ["train.cache=true", f"cache.dir={tmp_path / 'cache'}"]
    config = load_config(path, overrides, data_dir=str(data))
    seen = []
    real = build.make_accelerator

    def spy(*args, **kwargs):
        accelerator = real(*args, **kwargs)
        seen.append(accelerator.mixed_precision)
        return accelerator

    monkeypatch.setattr("adalayers.training.train.make_accelerator", spy)
    # the bf16 products run under the autocast Accelerate wraps around the model's forward
    products = []
    real_linear = torch.nn.functional.linear

    def linear(x, w, *rest):
        out = real_linear(x, w, *rest)
        products.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    results = fit(config, tmp_path / "run", quiet=True)
    assert seen and seen[0] == "bf16"
    assert torch.bfloat16 in products
    history = read_jsonl(tmp_path / "run" / "history.jsonl")
    assert len(history) == 2 and all(math.isfinite(h["train_loss"]) for h in history)
    for split in ("validation", "test"):
        assert _finite(results[split]), results[split]
    assert results["test"]["accuracy"] >= 0.0


def test_fp16_on_cpu_falls_back_to_float32(caplog):
    if torch.cuda.is_available():
        pytest.skip("CUDA runs fp16")
    with caplog.at_level(logging.WARNING, logger="adalayers"):
        assert build.resolve_precision("fp16") == "no"
    assert "fp16 needs CUDA" in caplog.text
    assert build.resolve_precision("no") == "no"
    assert build.resolve_precision("bf16") == "bf16"


def test_one_process_runs_fits_of_different_precision_in_turn(tmp_path):
    """Accelerate keeps a process-wide precision; a float32 fit then a bf16 one (a notebook, a
    test session) must both get what they asked for."""
    path = tmp_path / "cfg.yaml"
    path.write_text("base: x\ndata: {task: cola}\ntrain: {mixed_precision: no}\n")
    plain = load_config(path)
    assert plain.train.mixed_precision == "no"  # YAML 1.1 reads a bare no as false
    assert build.make_accelerator(plain).mixed_precision == "no"
    bf16 = load_config(path, ["train.mixed_precision=bf16"])
    assert build.make_accelerator(bf16).mixed_precision == "bf16"
    assert build.make_accelerator(plain).mixed_precision == "no"
