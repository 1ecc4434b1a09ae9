"""``adalayers compare`` (training/compare.py): the plan of baseline rows, one comparison end to
end on a tiny base, reuse of finished rows, parallel rows, a mixer grid."""

from __future__ import annotations

import json
import logging

import pytest
from helpers import write_cola, write_config

from adalayers.cli import main
from adalayers.core.task import Task
from adalayers.training import compare as compare_module
from adalayers.training import train as train_module
from adalayers.training.config import load_config


def test_plan_maps_baselines_onto_config_knobs(tmp_path, tiny_model_dir):
    path = write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"))
    config = load_config(path, ["train.cache=true", "task.mixer.cutoff=0.05"])
    rows = compare_module.plan(config, "mixer,sweep,last,uniform,scalar_mix,finetune", 4)
    assert list(rows) == [
        "mixer",
        *(f"layer_{i}" for i in range(4)),
        "last",
        "uniform",
        "scalar_mix",
        "finetune",
    ]
    assert rows["mixer"].task.mixer == config.task.mixer
    assert rows["layer_2"].task.mixer.single_layer == 2
    assert rows["last"].task.mixer.single_layer == -1
    assert rows["uniform"].task.mixer.freeze_distribution
    scalar = rows["scalar_mix"].task.mixer
    assert scalar.mode == "scalar_mix" and scalar.cutoff == 0.0
    assert all(rows[n].cache.all_layers for n in rows if n != "finetune")
    assert rows["finetune"] is config
    restricted = load_config(path, ["task.mixer.layers=[1, 3]"])
    assert [n for n in compare_module.plan(restricted, "sweep", 4)] == ["layer_1", "layer_3"]
    with pytest.raises(ValueError, match="cache.layers"):
        compare_module.plan(load_config(path, ["train.cache=true", "cache.layers=2"]), "sweep", 4)
    with pytest.raises(ValueError, match="bogus"):
        compare_module.parse_baselines("mixer,bogus")


ALL_ROWS = {"mixer", "layer_0", "layer_1", "layer_2", "layer_3", "last", "uniform", "scalar_mix"}


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_model_dir):
    """``adalayers compare`` with every baseline on tiny CoLA (one epoch each, cached)."""
    root = tmp_path_factory.mktemp("compare")
    data = write_cola(root / "data", n_train=40, n_dev=12)
    config = write_config(root / "cfg.yaml", tiny_model_dir("bert"), epochs=1)
    out = root / "cmp"
    args = ["compare", "--config", str(config), "--data-dir", str(data), "--output-dir", str(out)]
    args += ["--baselines", "mixer,sweep,last,uniform,scalar_mix,finetune", "--quiet"]
    args += ["--set", "train.cache=true", "--set", f"cache.dir={root / 'cache'}"]
    args += ["--finetune-lr", "1e-3"]
    assert main(args) == 0
    return out, root / "cache", args


def test_compare_writes_one_comparison(compared, capsys):
    out, _, _ = compared
    comparison = json.loads((out / "comparison.json").read_text())
    rows = comparison["rows"]
    assert set(rows) == ALL_ROWS | {"finetune"}
    assert comparison["metric"] == "mcc"
    for name, row in rows.items():
        assert (out / row.get("same_run_as", name) / "metrics.json").is_file()
        assert row["test"]["examples"] == 12 and "mcc" in row["test"]
        assert row["wall_seconds"] >= row["train_seconds"] > 0
    assert rows["layer_2"]["layer_weights"] == {"2": 1.0}
    assert rows["uniform"]["layer_weights"] == pytest.approx({str(i): 0.25 for i in range(4)})
    # the last state alone and the sweep's last row are the same run, trained once
    assert rows["last"]["test"] == rows["layer_3"]["test"]
    assert rows["last"]["same_run_as"] == "layer_3" and not (out / "last").exists()
    assert rows["last"]["baseline"] == "last" and rows["last"]["layer"] is None
    single, mixer = rows["layer_0"]["parameters_added"], rows["mixer"]["parameters_added"]
    assert single < rows["scalar_mix"]["parameters_added"] < mixer
    assert rows["finetune"]["percent_of_base"] > 100 > rows["mixer"]["percent_of_base"]
    assert Task.from_pretrained(out / "scalar_mix" / "model").config.mixer.mode == "scalar_mix"
    report = (out / "report.html").read_text()
    assert report.count("<h3 id=") == len(rows) - 1 and "single-layer sweep" in report


def test_every_mixer_baseline_shares_one_store(compared):
    _, cache, _ = compared
    train_stores = sorted(p.parent for p in cache.glob("*/train"))
    assert len(train_stores) == 1  # one key: base, every layer, dtype, tokens
    meta = json.loads((train_stores[0] / "meta.json").read_text())
    assert meta["layers"] == [0, 1, 2, 3]


def test_compare_again_reuses_finished_runs(compared, monkeypatch, capsys):
    out, _, args = compared
    before = (out / "comparison.json").read_text()

    def refuse(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare_module, "fit", refuse)
    monkeypatch.setattr("adalayers.training.finetune.finetune", refuse)
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["rows"]) == ALL_ROWS | {"finetune"}
    assert json.loads((out / "comparison.json").read_text())["rows"] == json.loads(before)["rows"]
    changed = [*args, "--set", "train.lr=0.5"]
    assert main(changed) == 2
    assert "another config" in capsys.readouterr().err


def test_compare_with_jobs_trains_the_same_rows_in_parallel_processes(
    compared, tmp_path, capsys, caplog
):
    """``--jobs 2`` (two spawned processes, a fresh store that both open at once) gives the
    rows of the one-process comparison: same runs, same metrics, same layer weights."""
    out, _, args = compared
    parallel = tmp_path / "cmp"
    args = [a.replace(str(out), str(parallel)) for a in args]
    cache_at = args.index(next(a for a in args if a.startswith("cache.dir=")))
    args[cache_at] = f"cache.dir={tmp_path / 'cache'}"
    args.remove("--quiet")  # the log says how the rows ran
    with caplog.at_level(logging.INFO, logger="adalayers"):
        assert main([*args, "--jobs", "2"]) == 0
    assert "training 8 rows, 2 at a time" in caplog.text
    summary = json.loads(capsys.readouterr().out)
    one = json.loads((out / "comparison.json").read_text())
    two = json.loads((parallel / "comparison.json").read_text())
    assert two["complete"] is True and list(two["rows"]) == list(one["rows"])  # the plan's order
    assert list(summary["rows"]) == list(one["rows"])
    for name, row in one["rows"].items():
        for split in ("validation", "test"):
            assert two["rows"][name][split] == pytest.approx(row[split], abs=1e-6), name
        assert two["rows"][name].get("layer_weights") == pytest.approx(
            row.get("layer_weights"), abs=1e-5
        )
    assert two["rows"]["last"]["same_run_as"] == "layer_3" and not (parallel / "last").exists()
    assert len(list((tmp_path / "cache").glob("*/train"))) == 1  # built once, shared


def test_compare_with_jobs_keeps_the_rows_that_finished_when_one_fails(tmp_path, tiny_model_dir):
    data = write_cola(tmp_path / "data", n_train=40, n_dev=12)
    config = load_config(
        write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"), epochs=1), data_dir=str(data)
    )
    out = tmp_path / "cmp"
    broken = out / "uniform" / train_module.CHECKPOINT_DIR
    broken.mkdir(parents=True)  # a run to resume whose checkpoint cannot be read
    (broken / "state.pt").write_bytes(b"not a checkpoint")
    rows_plan = compare_module.plan(config, "uniform,mixer", 4)
    from adalayers.training.config import save_config

    save_config(rows_plan["uniform"], out / "uniform" / train_module.CONFIG)
    with pytest.raises(RuntimeError, match=r"state\.pt cannot be read"):
        compare_module.compare(config, "uniform,mixer", out, quiet=True, jobs=2)
    partial = json.loads((out / "comparison.json").read_text())
    assert partial["complete"] is False and partial["pending"] == ["uniform"]
    assert set(partial["rows"]) == {"mixer"} and (out / "mixer" / "metrics.json").is_file()


@pytest.mark.slow  # four comparisons in spawned processes: about 50 s on 2 cores
def test_parallel_rows_benchmark_times_both_calls(
    tmp_path, tiny_model_dir, monkeypatch, benchmark_script
):
    script = benchmark_script("parallel_rows")
    data = write_cola(tmp_path / "data", n_train=40, n_dev=12)
    config = write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"), epochs=1)
    monkeypatch.chdir(tmp_path)
    argv = ["parallel_rows.py", str(config), "--data-dir", str(data), "--name", "tiny"]
    monkeypatch.setattr("sys.argv", [*argv, "--baselines", "mixer,uniform"])
    script.main()
    result = json.loads((tmp_path / "results" / "parallel_rows-tiny.json").read_text())
    assert [c["jobs"] for c in result["calls"]] == [1, 2]
    assert result["speedup"] == pytest.approx(
        result["wall_seconds_jobs1"][0] / result["wall_seconds_jobs2"][0], abs=0.01
    )
    rows = result["calls"][0]["rows"]
    assert set(rows) == {"mixer", "uniform"}
    for diff in result["metric_difference_jobsN_minus_jobs1"].values():
        assert diff == pytest.approx({"validation": 0.0, "test": 0.0}, abs=1e-6)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".parallel_rows")] == []


def test_compare_refuses_jobs_below_one_or_under_a_launcher(tmp_path, tiny_model_dir, monkeypatch):
    config = load_config(write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert")))
    with pytest.raises(ValueError, match="at least 1"):
        compare_module.compare(config, "mixer", tmp_path / "a", jobs=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="leave --jobs at 1"):
        compare_module.compare(config, "mixer", tmp_path / "b", jobs=2)


def test_a_comparison_cut_off_keeps_its_finished_rows(tmp_path, tiny_model_dir):
    data = write_cola(tmp_path / "data", n_train=40, n_dev=12)
    config = load_config(
        write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"), epochs=1), data_dir=str(data)
    )
    out = tmp_path / "cmp"
    trained = []
    real_fit = compare_module.fit

    def fit_until_uniform(cfg, run, **kw):
        if run.name == "uniform":
            raise KeyboardInterrupt  # the session ends mid-row
        trained.append(run.name)
        return real_fit(cfg, run, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compare_module, "fit", fit_until_uniform)
        with pytest.raises(KeyboardInterrupt):
            compare_module.compare(config, "mixer,last,uniform", out, quiet=True)
    partial = json.loads((out / "comparison.json").read_text())
    assert partial["complete"] is False and partial["pending"] == ["uniform"]
    assert set(partial["rows"]) == {"mixer", "last"} and trained == ["mixer", "last"]
    assert partial["rows"]["mixer"]["wall_seconds"] > 0
    done = compare_module.compare(config, "mixer,last,uniform", out, quiet=True)
    assert done["complete"] is True and "pending" not in done
    assert set(done["rows"]) == {"mixer", "last", "uniform"}
    for name in ("mixer", "last"):  # reused, with the wall time of the call that trained them
        assert done["rows"][name] == partial["rows"][name]
    assert json.loads((out / "comparison.json").read_text()) == json.loads(json.dumps(done))


def test_mixer_grid_parses_and_plans_extra_mixer_rows(tmp_path, tiny_model_dir):
    grid = compare_module.parse_mixer_grid(["alpha=1,4,64", "task.mixer.cutoff=0, 0.05"])
    assert grid == {"alpha": [1, 4, 64], "cutoff": [0, 0.05]}
    path = write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"))
    config = load_config(path, ["task.mixer.alpha=64", "task.mixer.cutoff=0.05"])
    rows = compare_module.plan(config, "mixer,uniform", 4, grid)
    # the config's own (alpha 64, cutoff 0.05) is the mixer row, not trained twice
    assert list(rows) == [
        "mixer",
        "mixer_alpha1_cutoff0",
        "mixer_alpha1_cutoff0.05",
        "mixer_alpha4_cutoff0",
        "mixer_alpha4_cutoff0.05",
        "mixer_alpha64_cutoff0",
        "uniform",
    ]
    assert rows["mixer_alpha4_cutoff0.05"].task.mixer.alpha == 4.0
    assert rows["mixer_alpha1_cutoff0"].task.mixer.cutoff == 0.0
    assert rows["uniform"].task.mixer.alpha == 64.0  # the grid touches mixer rows only
    for bad, match in [
        (["dim=32,64"], "cannot be searched"),
        (["alpha"], "KEY=V1"),
        (["alpha=1", "alpha=4"], "twice"),
        (["alpha=,"], "no values"),
    ]:
        with pytest.raises(ValueError, match=match):
            compare_module.parse_mixer_grid(bad)
    with pytest.raises(ValueError, match="alpha must be positive"):
        compare_module.plan(config, "mixer", 4, {"alpha": [0]})
    with pytest.raises(ValueError, match="add mixer"):
        compare_module.plan(config, "sweep", 4, {"alpha": [1]})


def test_choose_mixer_takes_the_best_validation_among_mixer_rows():
    rows = {
        "mixer": {"baseline": "mixer", "validation": {"f1": 0.5}},
        "mixer_alpha1": {"baseline": "mixer_grid", "validation": {"f1": 0.7}},
        "mixer_alpha4": {"baseline": "mixer_grid", "validation": {"f1": 0.7}},  # a tie: earlier
        "uniform": {"baseline": "uniform", "validation": {"f1": 0.9}},  # not a mixer row
    }
    assert compare_module.choose_mixer(rows, "f1") == "mixer_alpha1"
    rows["mixer"]["validation"]["f1"] = 0.8
    assert compare_module.choose_mixer(rows, "f1") == "mixer"
    assert compare_module.choose_mixer({"uniform": rows["uniform"]}, "f1") is None


def test_compare_with_a_mixer_grid_names_the_row_chosen_on_validation(compared, capsys):
    out, _, args = compared
    grid_out = out.parent / "grid"
    grid_args = [a if a != str(out) else str(grid_out) for a in args]
    grid_args[grid_args.index("--baselines") + 1] = "mixer,uniform"
    assert main([*grid_args, "--mixer-grid", "alpha=1,4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    comparison = json.loads((grid_out / "comparison.json").read_text())
    rows = comparison["rows"]
    assert list(rows) == ["mixer", "mixer_alpha1", "mixer_alpha4", "uniform"]
    assert comparison["mixer_grid"] == {"alpha": [1, 4]}
    assert rows["mixer_alpha1"]["baseline"] == "mixer_grid"
    assert rows["mixer_alpha4"]["settings"] == {"alpha": 4.0}
    assert rows["mixer"]["settings"] == {
        "alpha": load_config(out / "mixer" / "config.yaml").task.mixer.alpha
    }
    assert "settings" not in rows["uniform"]
    mixers = [n for n in rows if n.startswith("mixer")]
    best = max(rows[n]["validation"]["mcc"] for n in mixers)
    chosen = comparison["mixer_chosen"]
    assert chosen in mixers and rows[chosen]["validation"]["mcc"] == best
    assert printed["mixer_chosen"] == chosen
    assert load_config(grid_out / "mixer_alpha1" / "config.yaml").task.mixer.alpha == 1.0
    # every grid row has its own run in the report
    assert (grid_out / "report.html").read_text().count("<h3 id=") == len(rows)
