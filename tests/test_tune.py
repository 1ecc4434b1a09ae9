"""``adalayers tune`` (training/tune.py) and the ``tune`` section of a config: the search space
checked, a study on tiny cached CoLA (the stores built once, resumed from its storage, the best
trial exported as a run folder), pruning through the loop's callbacks, and ``compare
--mixer-grid`` as a grid study through the same search loop."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import read_jsonl, write_cola, write_config

from adalayers.cli import main
from adalayers.training.config import load_config, with_settings

optuna = pytest.importorskip("optuna", reason="the tune extra: pip install optuna")

from adalayers.training import cache as cache_module  # noqa: E402
from adalayers.training import compare as compare_module  # noqa: E402
from adalayers.training import tune as tune_module  # noqa: E402

SPACE = {
    "task.mixer.alpha": {"low": 1, "high": 64, "log": True},
    "train.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
    "task.mixer.dim": {"choices": [8, 16]},
}


def with_space(path, space=SPACE):
    values = yaml.safe_load(path.read_text())
    values["tune"] = space
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"task.mixer.alfa": {"low": 1, "high": 4}}, r"'task.mixer.alfa'.*did you mean.*alpha"),
        ({"data.max_length": {"low": 16, "high": 32}}, r"'data.max_length' cannot be searched"),
        ({"task.mixer.alpha": {"low": 4, "high": 4}}, r"tune.task.mixer.alpha: the range.*empty"),
        ({"train.lr": {"low": 0.1, "high": 0.01}}, r"tune.train.lr: the range.*empty"),
        ({"task.mixer.dim": {"choices": []}}, r"tune.task.mixer.dim: choices is empty"),
        ({"task.mixer.alpha": {"low": 0, "high": 4}}, r"tune.task.mixer.alpha: 0.0 is refused"),
        ({"task.mixer.alpha": {"low": 0, "high": 4, "log": True}}, r"log range needs low > 0"),
        ({"task.mixer.positional": {"low": 0, "high": 1}}, r"not a number; list its values"),
        ({"task.mixer.positional": {"choices": ["none", "rotary"]}}, r"'rotary' is refused"),
        ({"task.mixer.dim": {"low": 8, "high": 16.5}}, r"is an integer; high must be one"),
        ({"train.lr": {"high": 0.1}}, r"tune.train.lr: give low and high"),
        ({"train.lr": {"low": 1e-3, "high": 1e-2, "choices": [1e-3]}}, r"choices or a range"),
        ({"train.lr": {"low": 1e-3, "hihg": 1e-2}}, r"tune.train.lr.hihg"),
    ],
)
def test_the_search_space_is_checked_and_errors_name_the_key(
    tmp_path, tiny_model_dir, entry, message
):
    path = with_space(write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert")), entry)
    with pytest.raises(ValueError, match=message):
        load_config(path)


def test_a_trial_config_has_the_settings_and_no_tune_section(tmp_path, tiny_model_dir):
    config = load_config(with_space(write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"))))
    assert config.tune["task.mixer.dim"].choices == [8, 16]
    assert config.tune["task.mixer.alpha"].low == 1.0 and config.tune["task.mixer.alpha"].log
    trial = with_settings(config, {"task.mixer.alpha": 3, "train.lr": 0.004})
    assert trial.tune is None and trial.task.mixer.alpha == 3.0 and trial.train.lr == 0.004
    assert trial.task.head == config.task.head
    with pytest.raises(ValueError, match="dropout"):
        with_settings(config, {"task.mixer.dropout": 1.5})


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model_dir):
    """``adalayers tune`` on tiny cached CoLA: 3 trials of 2 epochs, the stores' builds counted."""
    root = tmp_path_factory.mktemp("tune")
    data = write_cola(root / "data", n_train=40, n_dev=12)
    config = with_space(write_config(root / "cfg.yaml", tiny_model_dir("bert"), epochs=2))
    out = root / "tune"
    args = ["tune", "--config", str(config), "--data-dir", str(data), "--output-dir", str(out)]
    args += ["--set", "train.cache=true", "--set", f"cache.dir={root / 'cache'}", "--quiet"]
    built = []
    real = cache_module.build_shard
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_module, "build_shard", lambda *a, **k: built.append(1) or real(*a, **k))
        assert main([*args, "--trials", "3"]) == 0
    return out, args, built


def test_tune_trains_the_trials_and_exports_the_best_as_a_run_folder(tuned, capsys):
    out, _, built = tuned
    summary = json.loads((out / "tune.json").read_text())
    assert summary["trials"] == {"complete": 3} and summary["metric"] == "mcc"
    assert [row["trial"] for row in summary["rows"]] == [0, 1, 2]
    values = [row["validation"] for row in summary["rows"]]
    best = summary["best"]
    assert best["validation"] == max(values) and best["trial"] == values.index(max(values))
    assert set(best["params"]) == set(SPACE) and best["params"]["task.mixer.dim"] in (8, 16)
    # the best trial's run, as `adalayers train` writes one
    run = out / "best"
    assert {"config.yaml", "model", "metrics.json", "history.jsonl"} <= {
        p.name for p in run.iterdir()
    }
    assert not (run / "checkpoint").exists()
    ran = load_config(run / "config.yaml")
    assert ran.tune is None and ran.train.cache
    assert ran.task.mixer.alpha == pytest.approx(best["params"]["task.mixer.alpha"])
    assert ran.train.lr == pytest.approx(best["params"]["train.lr"])
    assert ran.task.mixer.dim == best["params"]["task.mixer.dim"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["validation"]["mcc"] == best["validation"]
    assert metrics["test"]["mcc"] == best["test"]
    assert len(read_jsonl(run / "history.jsonl")) == 2
    for trial in range(3):
        folder = out / "trials" / f"{trial:04d}"
        assert (folder / "metrics.json").is_file() and not (folder / "checkpoint").exists()
    # the stores (train, validation) were built once, before the first trial
    assert len(built) == 2
    assert len(list((out.parent / "cache").glob("*/train"))) == 1


def test_tune_resumes_from_its_storage(tuned, monkeypatch, capsys):
    out, args, built = tuned
    trained = []
    real = tune_module.fit
    monkeypatch.setattr(tune_module, "fit", lambda *a, **k: trained.append(1) or real(*a, **k))
    assert main([*args, "--trials", "4"]) == 0  # one trial more
    printed = json.loads(capsys.readouterr().out)
    assert trained == [1] and printed["trials"] == {"complete": 4}
    assert main([*args, "--trials", "4"]) == 0  # the study holds them: nothing to train
    assert trained == [1]
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 4 and len(built) == 2  # and no store built again
    assert main([*args, "--set", "train.epochs=3", "--trials", "5"]) == 2
    assert "started with another config" in capsys.readouterr().err


def test_a_trial_the_pruner_stops_ends_after_that_epoch(tmp_path, tiny_model_dir):
    """The trial reports each epoch's score through the loop's callbacks; a pruned trial's
    training stops there."""

    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    data = write_cola(tmp_path / "data", n_train=40, n_dev=12)
    config = load_config(
        write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert")), data_dir=str(data)
    )
    study = optuna.create_study(direction="maximize", pruner=Always())
    trial = study.ask()
    outcome = tune_module.run_trial(config, tmp_path, trial, {}, prune=True)
    assert isinstance(outcome, optuna.TrialPruned)
    run = tmp_path / "trials" / "0000"
    (record,) = read_jsonl(run / "history.jsonl")  # stopped after its first epoch of 3
    assert not (run / "metrics.json").exists() and not (run / "checkpoint").exists()
    tune_module._tell(study, trial, outcome)
    (frozen,) = study.trials
    assert frozen.state == optuna.trial.TrialState.PRUNED
    assert frozen.intermediate_values == {1: record["score"]}


def test_search_fails_the_trials_it_did_not_tell_and_counts_finished_ones():
    study = optuna.create_study(direction="maximize")
    space = {}  # no settings: the loop's bookkeeping alone

    def half(proposals, tell):
        trial, _ = proposals[0]
        tell(trial, 0.5)
        raise RuntimeError("a row failed")

    with pytest.raises(RuntimeError, match="a row failed"):
        tune_module.search(study, space, 3, half, batch=3)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] + [optuna.trial.TrialState.FAIL] * 2
    assert tune_module.finished_trials(study) == 1
    tune_module.search(study, space, 3, lambda ps, tell: [tell(t, 0.1) for t, _ in ps])
    assert tune_module.finished_trials(study) == 3 and len(study.trials) == 5


def test_tune_without_a_tune_section_says_how_to_add_one(cola, tmp_path, capsys):
    path, data = cola
    args = ["tune", "--config", str(path), "--data-dir", str(data), "--trials", "2"]
    assert main([*args, "--output-dir", str(tmp_path / "t")]) == 2
    assert "no tune section" in capsys.readouterr().err


def test_compare_mixer_grid_is_a_grid_study_through_the_search_loop(
    tmp_path, tiny_model_dir, monkeypatch
):
    data = write_cola(tmp_path / "data", n_train=40, n_dev=12)
    config = load_config(  # alpha 16 is the config's own: the grid's point 16 is the mixer row
        write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"), epochs=1), data_dir=str(data)
    )
    studies = []
    real = tune_module.search

    def search(study, space, trials, train, batch=1):
        studies.append((study, trials, batch))
        return real(study, space, trials, train, batch=batch)

    monkeypatch.setattr(tune_module, "search", search)
    result = compare_module.compare(
        config, "mixer,uniform", tmp_path / "cmp", mixer_grid={"alpha": [1, 16]}, quiet=True
    )
    ((study, trials, batch),) = studies
    assert isinstance(study.sampler, optuna.samplers.GridSampler) and trials == batch == 2
    rows = result["rows"]
    assert list(rows) == ["mixer", "mixer_alpha1", "uniform"]
    told = {t.params["task.mixer.alpha"]: t.value for t in study.trials}
    assert told == {
        1: rows["mixer_alpha1"]["validation"]["mcc"],
        16: rows["mixer"]["validation"]["mcc"],
    }
    best = "mixer" if study.best_trial.params["task.mixer.alpha"] == 16 else "mixer_alpha1"
    if told[1] != told[16]:  # a tie goes to the earlier row in both
        assert result["mixer_chosen"] == best
    # again: every row is reused, and the study is told their scores without training
    monkeypatch.setattr(compare_module, "fit", lambda *a, **k: pytest.fail("trained again"))
    again = compare_module.compare(
        config, "mixer,uniform", tmp_path / "cmp", mixer_grid={"alpha": [1, 16]}, quiet=True
    )
    assert again["rows"] == json.loads(json.dumps(rows))
    assert [t.state for t in studies[1][0].trials] == [optuna.trial.TrialState.COMPLETE] * 2


@pytest.mark.slow  # two spawned processes (torch, transformers): about a minute on 2 cores
def test_two_processes_share_one_study(tmp_path, tiny_model_dir):
    data = write_cola(tmp_path / "data", n_train=40, n_dev=12)
    path = with_space(write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"), epochs=2))
    overrides = ["train.cache=true", f"cache.dir={tmp_path / 'cache'}"]
    config = load_config(path, overrides, data_dir=str(data))
    summary = tune_module.tune(config, tmp_path / "tune", trials=4, jobs=2, quiet=True)
    assert summary["trials"].get("complete", 0) + summary["trials"].get("pruned", 0) >= 4
    assert "running" not in summary["trials"]
    runs = sorted(p.name for p in (tmp_path / "tune" / "trials").iterdir())
    assert runs == [f"{row['trial']:04d}" for row in summary["rows"]]
    assert (tmp_path / "tune" / "best" / "metrics.json").is_file()
    assert len(list((tmp_path / "cache").glob("*/train"))) == 1
