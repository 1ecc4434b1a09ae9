"""The ``probe`` baseline (training/probe.py ``probe_baseline``): its fit against
scikit-learn, its rows in ``adalayers compare`` and the report, a token task; the ``dynamic``
row of the plan."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import CONLL_SENTENCES, write_cola, write_config, write_conll

from adalayers.cli import main
from adalayers.core.kinds import KINDS
from adalayers.training import compare as compare_module
from adalayers.training.config import load_config
from adalayers.training.probe import fit_linear, probe_baseline


def test_fit_is_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    y = (x @ rng.normal(size=(6, 3))).argmax(1)
    x = x + rng.normal(scale=1.5, size=x.shape)  # not separable: a finite optimum
    kind = KINDS["sequence_classification"]
    w, b = fit_linear(torch.tensor(x, dtype=torch.float64), torch.tensor(y), kind, 3, c=1.0)
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=1000).fit(x, y)
    # softmax logits are defined up to a shift per example: compare the probabilities
    ours = torch.softmax(torch.tensor(x) @ w + b, -1).numpy()
    # (the kinds' losses run in float32: the same optimum to about 1e-4)
    np.testing.assert_allclose(ours, reference.predict_proba(x), atol=1e-3)
    assert (ours.argmax(1) == reference.predict(x)).mean() > 0.99


def test_compare_has_the_probe_rows(tmp_path, tiny_model_dir, monkeypatch):
    data = write_cola(tmp_path / "data", n_train=40, n_dev=12)
    config = write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"), epochs=1)
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(config), "--data-dir", str(data), "--output-dir", str(out)]
    args += ["--baselines", "mixer,probe", "--quiet"]
    assert main(args) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    rows = comparison["rows"]
    assert list(rows) == ["mixer", "probe", "probe_concat"] and comparison["complete"]
    probe, concat = rows["probe"], rows["probe_concat"]
    assert probe["baseline"] == "probe" and concat["baseline"] == "probe_concat"
    assert probe["layer"] in range(4) and concat["layer"] is None
    for row in (probe, concat):
        assert row["test"]["examples"] == 12 and -1 <= row["test"]["mcc"] <= 1
        assert row["train_seconds"] > 0
    # a linear map of d (then 4 d) features to 2 classes
    assert probe["parameters_added"] == 32 * 2 + 2 and concat["parameters_added"] == 4 * 32 * 2 + 2
    metrics = json.loads((out / "probe" / "metrics.json").read_text())
    scores = metrics["validation_by_layer"]
    assert set(scores) == {"0", "1", "2", "3"}
    assert scores[str(probe["layer"])] == max(scores.values())
    report = (out / "report.html").read_text()
    assert f"probe: layer {probe['layer']}" in report and "probe: all states" in report
    # a second call reuses both rows: no second fit

    def refuse(*a, **k):
        raise AssertionError("the probe was fitted again")

    monkeypatch.setattr("adalayers.training.probe.probe_baseline", refuse)
    assert main(args) == 0
    again = json.loads((out / "comparison.json").read_text())["rows"]
    assert again["probe_concat"]["test"] == concat["test"]


def test_token_task_probe_reads_first_sub_tokens(tmp_path, tiny_model_dir):
    data = write_conll(tmp_path / "data")
    path = write_config(tmp_path / "cfg.yaml", tiny_model_dir("roberta"), task="conll2003")
    config = load_config(path, ["task.head.decoding=bio"], data_dir=str(data))
    results = probe_baseline(config, tmp_path / "probe", tmp_path / "concat")
    assert results["metric"] == "f1" and results["decoding"] == "bio"
    for split, examples in (("validation", 9), ("test", 9)):
        assert results[split]["examples"] == examples
        assert 0 <= results[split]["f1"] <= 1 and "per_type" not in results[split]
    # one row per word (its first sub-token): every word of the 30 training sentences
    assert results["probe"]["train_rows"] == sum(len(CONLL_SENTENCES[i % 3]) for i in range(30))
    concat = json.loads((tmp_path / "concat" / "metrics.json").read_text())
    assert concat["baseline"] == "probe_concat" and concat["parameters_added"] > 0


@pytest.mark.parametrize("task", ["cola", "conll2003"])
def test_a_cached_probe_reads_the_store_and_equals_the_online_one(
    tmp_path, tiny_model_dir, monkeypatch, task
):
    if task == "cola":
        data = write_cola(tmp_path / "data", n_train=40, n_dev=12)
    else:
        data = write_conll(tmp_path / "data")
    path = write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"), task=task)
    online = probe_baseline(
        load_config(path, data_dir=str(data)), tmp_path / "online", tmp_path / "online_concat"
    )
    cached_config = load_config(
        path,
        [
            "train.cache=true",
            f"cache.dir={tmp_path / 'cache'}",
            "cache.dtype=float32",
            "cache.splits=[train,validation,test]",
        ],
        data_dir=str(data),
    )
    from adalayers.training.cache_prep import cached_stores

    # build the stores first (every state, as the probe reads them): the fit must not run the base
    every_state = dataclasses.replace(cached_config.cache, all_layers=True)
    cached_stores(dataclasses.replace(cached_config, cache=every_state))

    def refuse(*args, **kwargs):
        raise AssertionError("the probe ran the base on a cached split")

    monkeypatch.setattr("adalayers.training.probe._split_features", refuse)
    cached = probe_baseline(cached_config, tmp_path / "cached", tmp_path / "cached_concat")
    metric = online["metric"]
    assert cached["layer"] == online["layer"]
    for split in ("validation", "test"):
        assert cached[split][metric] == pytest.approx(online[split][metric], abs=1e-6)
    for layer, score in online["validation_by_layer"].items():
        assert cached["validation_by_layer"][layer] == pytest.approx(score, abs=1e-6)


def test_a_concatenation_too_large_for_memory_is_skipped_and_said(
    tmp_path, tiny_model_dir, monkeypatch
):
    import functools

    data = write_cola(tmp_path / "data", n_train=40, n_dev=12)
    config = write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"), epochs=1)
    monkeypatch.setattr(
        "adalayers.training.probe.probe_baseline",
        functools.partial(probe_baseline, max_concat_bytes=0),
    )
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(config), "--data-dir", str(data), "--output-dir", str(out)]
    assert main([*args, "--baselines", "probe", "--quiet"]) == 0
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert rows["probe"]["test"]["examples"] == 12  # the one-state probe is fitted as ever
    assert "test" not in rows["probe_concat"]
    skipped = json.loads((out / "probe_concat" / "metrics.json").read_text())["skipped"]
    assert "GiB" in skipped and "max_concat_bytes" in skipped


def test_plan_has_a_dynamic_row_and_keeps_uniform_static(tmp_path, tiny_model_dir):
    path = write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"))
    rows = compare_module.plan(load_config(path), "mixer,dynamic,uniform,probe", 4)
    assert list(rows) == ["mixer", "dynamic", "uniform", "probe", "probe_concat"]
    assert rows["dynamic"].task.mixer.mode == "dynamic"
    assert rows["mixer"].task.mixer.mode == "adalayers"
    dynamic = compare_module.plan(load_config(path, ["task.mixer.mode=dynamic"]), "uniform", 4)
    assert dynamic["uniform"].task.mixer.mode == "adalayers"  # a fixed mix, not per token
    assert dynamic["uniform"].task.mixer.freeze_distribution
    with pytest.raises(ValueError, match="bogus"):
        compare_module.parse_baselines("probe,bogus")


@pytest.mark.parametrize("family,task", [("bert", "cola"), ("roberta", "conll2003")])
def test_a_cached_run_checks_its_head_against_the_probe(tmp_path, tiny_model_dir, family, task):
    """``train`` with the cache fits the probe on the stored states; stored in float32 they are
    the states ``probe_baseline`` reads, so every state scores the same on validation."""
    if task == "cola":
        data = write_cola(tmp_path / "data", n_train=40, n_dev=12)
    else:
        data = write_conll(tmp_path / "data")
    path = write_config(tmp_path / "cfg.yaml", tiny_model_dir(family), task=task, epochs=1)
    overrides = ["train.cache=true", f"cache.dir={tmp_path / 'cache'}", "cache.dtype=float32"]
    args = ["train", "--config", str(path), "--data-dir", str(data), "--quiet"]
    args += ["--output-dir", str(tmp_path / "run")]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    check = metrics["probe"]
    head = metrics["validation"][metrics["metric"]]
    assert check["head_validation"] == head
    assert check["head_beats_probe"] == (head > check["validation"])
    assert check["validation"] == max(check["validation_by_state"].values())
    reference = probe_baseline(
        load_config(path, overrides, data_dir=str(data)), tmp_path / "p", tmp_path / "c"
    )
    for state, score in reference["validation_by_layer"].items():
        assert check["validation_by_state"][state] == pytest.approx(score, abs=1e-6), state


def test_the_headline_says_when_the_probe_is_level_with_the_head():
    from adalayers.training.headline import headline

    results = {
        "task": "mine",
        "task_type": "sequence_classification",
        "base": "b",
        "metric": "accuracy",
        "test": {"accuracy": 0.70, "majority": {"label": "x", "accuracy": 0.68}},
        "probe": {
            "state": 3,
            "validation": 0.71,
            "head_validation": 0.70,
            "head_beats_probe": False,
        },
    }
    assert "a linear probe on state 3 alone scores 71.0% on validation" in headline(results, "r")
    results["probe"].update(validation=0.6, head_beats_probe=True)
    assert "probe" not in headline(results, "r")
