"""benchmarks/tables.py: which results go into which table (synthetic results files)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

TABLES = Path(__file__).resolve().parents[1] / "benchmarks" / "tables.py"


@pytest.fixture
def tables(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_tables", TABLES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    return module


def row(kind, val, test, layer=None, **extra):
    return {
        "baseline": kind,
        "layer": layer,
        "validation": {"f1": val},
        "test": {"f1": test},
        "parameters_added": 1000,
        "train_seconds": 60.0,
        **extra,
    }


def write(root, name, rows, overrides=(), variant=None, grid=None, chosen=None, date=None):
    comparison = {
        "task": "conll2003",
        "base": "all-MiniLM-L6-v2",
        "metric": "f1",
        "baselines": sorted({r["baseline"] for r in rows.values()} - {"mixer_grid"}),
        "rows": rows,
    }
    summary = {"metric": "f1"}
    singles = {n: r for n, r in rows.items() if r["baseline"] == "single_layer"}
    if singles:
        best = max(singles.values(), key=lambda r: r["validation"]["f1"])
        summary["best_single_layer"] = {"layer": best["layer"], "test": best["test"]["f1"]}
    for kind in ("mixer", "uniform", "scalar_mix", "finetune", "dynamic"):
        if kind in rows:
            summary[kind] = rows[kind]["test"]["f1"]
    if chosen:
        comparison["mixer_chosen"] = chosen
    result = {
        "config": "configs/minilm-conll2003.yaml",
        "overrides": list(overrides),
        "variant": variant,
        "mixer_grid": grid,
        "summary": summary,
        "comparison": comparison,
    }
    if date:
        result["date"] = date
    (root / f"compare_{name}.json").write_text(json.dumps(result))


def full(seed_shift=0.0):
    return {
        "mixer": row("mixer", 0.80, 0.78 + seed_shift),
        "layer_0": row("single_layer", 0.70, 0.70 + seed_shift, layer=0),
        "layer_1": row("single_layer", 0.75, 0.74 + seed_shift, layer=1),
        "uniform": row("uniform", 0.79, 0.77 + seed_shift),
        "scalar_mix": row("scalar_mix", 0.78, 0.76 + seed_shift),
    }


def test_seeds_group_by_setting_and_the_mixer_knobs_only_split_the_mixer(tables, tmp_path):
    write(tmp_path, "a", full())
    write(tmp_path, "a-seed1", full(0.01), overrides=["train.seed=1"])
    bio = ["task.head.decoding=bio"]
    write(tmp_path, "a-bio", full(0.02), overrides=bio)  # another setting: not seed 2 of "a"
    alpha = [*bio, "task.mixer.alpha=1"]
    write(tmp_path, "a-bio-alpha1", {"mixer": row("mixer", 0.9, 0.85)}, alpha, variant="x")
    write(tmp_path, "a-bio-alpha1-seed1", full(0.04), [*alpha, "train.seed=1"], variant="y")
    lines = tables.seeds_table().splitlines()[2:]
    assert len(lines) == 2
    plain = next(x for x in lines if "| – | 0, 1" in x)
    bio_alpha = next(x for x in lines if "alpha=1" in x)
    assert "| – | 0, 1 | 78.5 ± 0.7 (78.0, 79.0) | 74.5 ± 0.7 (74.0, 75.0) |" in plain
    # the mixer at alpha 1 over seeds 0 and 1, beside the baselines of the bio runs (seed 0 from
    # the bio column at the config's alpha, which they do not read); no "last" run: a dash
    expected = "| 0, 1 | 83.5 ± 2.1 (85.0, 82.0) | 77.0 ± 1.4 (76.0, 78.0) | – | 80.0 ± 1.4"
    assert "task.head.decoding=bio, task.mixer.alpha=1 " + expected in bio_alpha


def test_a_mixer_grid_fills_its_own_row_and_leaves_the_column(tables, tmp_path):
    write(tmp_path, "a", full())
    grid = {
        "mixer": row("mixer", 0.81, 0.70, settings={"alpha": 128.0}),
        "mixer_alpha1": row("mixer_grid", 0.83, 0.79, settings={"alpha": 1.0}),
    }
    write(tmp_path, "a-grid", grid, grid=["alpha=1"], chosen="mixer_alpha1")
    table = tables.compare_table()
    mixer_row = next(x for x in table.splitlines() if x.startswith("| AdaLayers mixer |"))
    assert "f1 78.0" in mixer_row  # the column's own mixer, not the grid's retrained one
    chosen = next(x for x in table.splitlines() if "chosen on validation (`--mixer" in x)
    assert "f1 79.0, α = 1 (validation 83.0; grid alpha=1 and the config's)" in chosen
    assert tables.seeds_table().count("\n") == 1  # grid rows are not seeds
    variants = tables.variants_table()
    assert "task.mixer.alpha=1 (grid, chosen)" in variants
    assert "task.mixer.alpha=128 (grid)" in variants
    assert "| uniform |" not in variants
    write(tmp_path, "a-seed1", full(0.01), overrides=["train.seed=1"], variant="seed1")
    variants = tables.variants_table()
    assert "layer_0" not in variants and "layer_1" not in variants  # the sweep is one line
    line = next(x for x in variants.splitlines() if "best single layer" in x)
    assert "| best single layer (1; 2 swept) | train.seed=1 | f1 75.0 | f1 75.0 |" in line


def test_other_data_makes_a_column_of_its_own(tables, tmp_path):
    """Comparisons of one task and base on other data (length, sample) are separate columns,
    titled in one order whatever the order of the overrides; a budget shared by a column's rows
    goes into its title."""
    write(tmp_path, "a", full(), overrides=["data.max_length=128"])
    sample = ["data.sample={train: 30, test: 20}", "data.max_length=64", "train.epochs=3"]
    write(tmp_path, "b", full(0.05), overrides=sample)
    lines = tables.compare_table().splitlines()
    titles = lines[0].split(" | ")
    a = titles.index("CoNLL-2003 × MiniLM (first 128 tokens)")
    b = titles.index("CoNLL-2003 × MiniLM (3 epochs, first 64 tokens, random 30 train / 20 test)")
    mixer = next(x for x in lines if x.startswith("| AdaLayers mixer |")).split(" | ")
    assert mixer[a].startswith("f1 78.0") and mixer[b].startswith("f1 83.0")


def test_targets_compare_the_mixers_with_the_rows_they_must_beat(tables, tmp_path):
    rows = full()
    rows["finetune"] = row("finetune", 0.82, 0.801)
    write(tmp_path, "a", rows)
    grid = {
        "mixer": row("mixer", 0.80, 0.78, settings={"alpha": 128.0}),
        "mixer_alpha1": row("mixer_grid", 0.83, 0.752, settings={"alpha": 1.0}),
    }
    write(tmp_path, "a-grid", grid, grid=["alpha=1"], chosen="mixer_alpha1")
    lines = {x.split(" | ")[0]: x for x in tables.targets_table().splitlines()[2:]}
    assert len(lines) == 6
    # mixer 78.0; best single layer (validation) 74.0; scalar mix 76.0; fine-tuning 80.1
    assert "78.0 vs 74.0: +4.0, **met**" in lines["| mixer ≥ best single layer + 1 point"]
    assert "78.0 vs 76.0: +2.0, **met**" in lines["| mixer ≥ scalar mix"]
    assert (
        "78.0 vs 80.1: −2.1, **missed by 0.1**"
        in lines["| mixer within 2 points of full fine-tuning"]
    )
    chosen = "| mixer (α chosen on validation) "
    assert "75.2 vs 74.0: +1.2, **met**" in lines[chosen + "≥ best single layer + 1 point"]
    assert "75.2 vs 76.0: −0.8, **missed by 0.8**" in lines[chosen + "≥ scalar mix"]


def test_grid_seeds_average_each_setting_and_mark_the_best_validation_mean(tables, tmp_path):
    def grid(val1, test1, val128, test128):
        return {
            "mixer": row("mixer", val128, test128, settings={"alpha": 128.0}),
            "mixer_alpha1": row("mixer_grid", val1, test1, settings={"alpha": 1.0}),
        }

    lr = "train.lr=0.0003"
    write(tmp_path, "g", grid(0.80, 0.70, 0.82, 0.72), [lr], "g", ["alpha=1"], "mixer")
    write(tmp_path, "g1", grid(0.84, 0.74, 0.80, 0.76), [lr, "train.seed=1"], "g1", ["alpha=1"])
    # one seed only: left out
    write(tmp_path, "h", grid(0.90, 0.60, 0.50, 0.50), ["train.lr=0.1"], "h", ["alpha=1"])
    bio = ["task.head.decoding=bio", "train.seed=1"]
    write(tmp_path, "b", grid(0.95, 0.9, 0.5, 0.5), ["task.head.decoding=bio"], "b", ["alpha=1"])
    write(tmp_path, "b1", grid(0.95, 0.9, 0.5, 0.5), bio, "b1", ["alpha=1"])
    lines = tables.grid_seeds_table().splitlines()[2:]
    assert len(lines) == 4  # two settings in each of two columns; the one-seed grid is left out
    plain = [x for x in lines if "bio" not in x]
    assert plain == [
        "| conll2003 × all-MiniLM-L6-v2 | train.lr=0.0003, α = 1 (best on validation) | 0, 1 "
        "| 82.0 ± 2.8 (80.0, 84.0) | 72.0 ± 2.8 (70.0, 74.0) |",
        "| conll2003 × all-MiniLM-L6-v2 | train.lr=0.0003, α = 128 | 0, 1 "
        "| 81.0 ± 1.4 (82.0, 80.0) | 74.0 ± 2.8 (72.0, 76.0) |",
    ]
    # BIO decoding is a column of its own: its settings are not ranked against the others
    assert "(task.head.decoding=bio) | α = 1 (best on validation)" in lines[0] + lines[1]


def test_targets_on_seed_means_where_the_column_was_repeated(tables, tmp_path):
    rows = full()
    rows["finetune"] = row("finetune", 0.82, 0.80)
    write(tmp_path, "a", rows)  # seed 0: mixer 78.0, best single 74.0, scalar 76.0
    write(tmp_path, "a-seed1", full(-0.04), overrides=["train.seed=1"])  # 74.0, 70.0, 72.0
    # another setting's repeat is not a repeat of this column
    write(tmp_path, "a-x-seed2", full(0.2), overrides=["train.lr=0.1", "train.seed=2"])
    lines = {x.split(" | ")[0]: x for x in tables.targets_table().splitlines()[2:]}
    assert len(lines) == 9
    name = "| mixer, mean over the column's seeds, "
    assert "76.0 vs 72.0: +4.0, **met**" in lines[name + "≥ best single layer + 1 point"]
    assert "76.0 vs 74.0: +2.0, **met**" in lines[name + "≥ scalar mix"]
    fine_tuning = name + "within 2 points of full fine-tuning"
    assert "76.0 vs 80.0: −4.0, **missed by 2.0** (fine-tuning: seed 0 only)" in lines[fine_tuning]
    # fine-tuning repeated with seed 1 as well: its mean
    tuned = {"finetune": row("finetune", 0.8, 0.76)}
    write(tmp_path, "a-finetune-seed1", tuned, overrides=["train.seed=1"])
    lines = {x.split(" | ")[0]: x for x in tables.targets_table().splitlines()[2:]}
    assert "76.0 vs 78.0: −2.0, **met** |" in lines[fine_tuning]
    seeds = tables.seeds_table().splitlines()
    assert seeds[0].endswith("| scalar mix (ELMo) | full fine-tuning |")
    assert seeds[2].endswith("| 74.0 ± 2.8 (76.0, 72.0) | 78.0 ± 2.8 (80.0, 76.0) |")


def test_targets_for_the_alpha_chosen_on_validation_means_over_the_grids_seeds(tables, tmp_path):
    write(tmp_path, "a", full())  # seed 0: best single 74.0, scalar mix 76.0
    write(tmp_path, "a-seed1", full(-0.04), overrides=["train.seed=1"])  # 70.0, 72.0

    def grid(val1, test1, val128, test128):
        return {
            "mixer": row("mixer", val128, test128, settings={"alpha": 128.0}),
            "mixer_alpha1": row("mixer_grid", val1, test1, settings={"alpha": 1.0}),
        }

    name = "| mixer (α chosen on validation), mean over the grid's seeds, "
    write(tmp_path, "a-grid", grid(0.85, 0.75, 0.80, 0.90), grid=["alpha=1"], chosen="mixer")
    lines = {x.split(" | ")[0]: x for x in tables.targets_table().splitlines()[2:]}
    assert name + "≥ scalar mix" not in lines  # one seed of the grid: no such row
    s1 = ["train.seed=1"]
    write(tmp_path, "a-grid1", grid(0.83, 0.71, 0.84, 0.60), s1, "v", ["alpha=1"])
    # a grid that changed something else is not this column's
    other = ["train.lr=0.1", "train.seed=1"]
    write(tmp_path, "a-grid-lr", grid(0.99, 0.99, 0.99, 0.99), other, "v", ["alpha=1"])
    lines = {x.split(" | ")[0]: x for x in tables.targets_table().splitlines()[2:]}
    # α = 1 has the better validation mean (84.0 against 82.0): test 75.0 and 71.0, mean 73.0,
    # though α = 128 has the better test mean (75.0); baselines over seeds 0, 1: 72.0, 74.0
    assert "73.0 vs 72.0: +1.0, **met**" in lines[name + "≥ best single layer + 1 point"]
    assert "73.0 vs 74.0: −1.0, **missed by 1.0**" in lines[name + "≥ scalar mix"]
    assert "not run" in lines[name + "within 2 points of full fine-tuning"]


def test_the_dynamic_mixers_alpha_is_chosen_on_its_validation_mean_over_seeds(tables, tmp_path):
    def runs(tag, val, tests, overrides=(), seeds=(0, 1, 2), variant=None):
        for seed in seeds:
            rows = full() if tag == "a" else {}
            rows["dynamic"] = row("dynamic", val, tests[seed])
            seeded = [f"train.seed={seed}"] if seed else []
            name = tag + (f"-seed{seed}" if seed else "")
            write(tmp_path, name, rows, [*seeded, *overrides], variant)

    runs("a", 0.80, [0.79, 0.77, 0.78])  # the config's α (128): test mean 78.0
    runs("a4", 0.82, [0.70, 0.71, 0.72], ["task.mixer.alpha=4"], variant="v")  # mean 71.0
    # better on validation, but fewer seeds than the others: not a candidate
    runs("a1", 0.99, [0.99, 0.99, 0.99], ["task.mixer.alpha=1"], (0, 1), "v")
    # another column (it changed something other than the mixer's knobs)
    runs("lr", 0.99, [0.99, 0.99, 0.99], ["train.lr=0.1", "task.mixer.alpha=2"], variant="v")
    (key,) = tables._dynamic_points()
    setting, by_seed = tables._dynamic_points()[key]
    assert setting == ("task.mixer.alpha=4",)
    assert by_seed == {0: 0.70, 1: 0.71, 2: 0.72}
    line = tables.dynamic_columns_table().splitlines()[2]
    assert "| 71.0 ± 1.0 (n = 3, α = 4) | 78.0 ± 1.0 (n = 3) |" in line  # chosen, config's α
    assert line.endswith("| -6.0 | -3.0 | no |")  # the chosen one against uniform, best single

    runs("a4", 0.78, [0.70, 0.71, 0.72], ["task.mixer.alpha=4"], variant="v")  # now worse
    setting, by_seed = tables._dynamic_points()[key]
    assert setting == ("task.mixer.alpha=128",)  # the config's own, named
    assert by_seed == {0: 0.79, 1: 0.77, 2: 0.78}


def test_a_row_measured_again_later_counts_with_its_latest_run(tables, tmp_path):
    write(tmp_path, "a", full(), date="2026-11-24T00:00:00Z")  # uniform 77
    later = {"uniform": row("uniform", 0.70, 0.60)}  # the same setting and seed, re-run
    write(tmp_path, "a-uniform-rerun", later, date="2026-11-28T00:00:00Z")
    write(tmp_path, "b", full(0.01), ["task.head.decoding=bio"], date="2026-11-29T00:00:00Z")
    line = tables.baselines_table().splitlines()[2]
    assert "| 60.0 (n = 1) | 76.0 (n = 1) |" in line  # the re-run's uniform, scalar mix kept
    assert "| **78.0** (n = 1) |" in line  # the other rows of the first run still count
    (first,) = [r for r in tables._compare_results() if "mixer" in r["comparison"]["rows"]][:1]
    assert "uniform" not in first["comparison"]["rows"] and "uniform" not in first["summary"]
    assert "uniform" in json.loads((tmp_path / "compare_a.json").read_text())["summary"]


def test_the_dynamic_mixers_heads_are_named_beside_its_alpha(tables, tmp_path):
    for seed in (0, 1):
        seeded = [f"train.seed={seed}"] if seed else []
        rows = full()
        rows["dynamic"] = row("dynamic", 0.80, 0.78)
        write(tmp_path, f"a-{seed}", rows, seeded)
        heads = ["task.mixer.alpha=4", "task.mixer.heads=8"]
        write(tmp_path, f"h-{seed}", {"dynamic": row("dynamic", 0.9, 0.8)}, seeded + heads, "v")
    line = tables.dynamic_columns_table().splitlines()[2]
    assert "| 80.0 ± 0.0 (n = 2, α = 4, 8 heads) |" in line


def test_a_row_that_was_skipped_is_a_dash_not_a_crash(tables, tmp_path):
    rows = full()
    rows["probe"] = row("probe", 0.60, 0.58, layer=1)
    rows["probe_concat"] = {"baseline": "probe_concat", "layer": None}  # beyond memory: no scores
    write(tmp_path, "a", rows)
    line = tables.baselines_table().splitlines()[2]
    assert "| 58.0 (n = 1) | – |" in line  # the probe on one state, then the skipped concatenation


def test_baselines_give_seed_means_with_n_and_bold_the_best_frozen_mean(tables, tmp_path):
    write(tmp_path, "a", full())  # seed 0: mixer 78, best single layer (1) 74, uniform 77
    write(tmp_path, "a-seed1", full(0.01), overrides=["train.seed=1"])

    def grid(val1, test1, val128, test128):
        return {
            "mixer": row("mixer", val128, test128, settings={"alpha": 128.0}),
            "mixer_alpha1": row("mixer_grid", val1, test1, settings={"alpha": 1.0}),
        }

    write(tmp_path, "a-grid", grid(0.83, 0.80, 0.81, 0.70), grid=["alpha=1"], chosen="mixer")
    s1 = ["train.seed=1"]
    write(tmp_path, "a-grid1", grid(0.84, 0.82, 0.80, 0.71), s1, "g1", ["alpha=1"])
    write(tmp_path, "b", full(0.02), overrides=["task.head.decoding=bio"])  # one seed, no grid
    lines = tables.baselines_table().splitlines()
    assert lines[0].startswith("| task × base | metric | mixer, config's α |")
    # α = 1 has the better validation mean over seeds 0, 1 (83.5 against 80.5): test 80, 82
    assert lines[2] == (
        "| CoNLL-2003 × MiniLM | entity F1 | 78.5 ± 0.7 (n = 2) "
        "| **81.0 ± 1.4** (n = 2, α = 1) | 74.5 ± 0.7 (n = 2) | – | 77.5 ± 0.7 (n = 2) "
        "| 76.5 ± 0.7 (n = 2) | – | – | – | – |"  # no dynamic mixer, probes, fine-tuning
    )
    assert lines[3] == (
        "| CoNLL-2003 × MiniLM (BIO decoding) | entity F1 | **80.0** (n = 1) | – "
        "| 76.0 (n = 1) | – | 79.0 (n = 1) | 78.0 (n = 1) | – | – | – | – |"
    )


def test_render_fills_the_markers_and_leaves_the_prose(tables, monkeypatch):
    monkeypatch.setitem(tables.GENERATORS, "demo", lambda: "| a |\n| --- |")
    text = "Prose.\n\n<!-- table: demo -->\nstale\n<!-- /table -->\n\nMore prose.\n"
    rendered = tables.render(text)
    assert rendered == (
        "Prose.\n\n<!-- table: demo -->\n\n| a |\n| --- |\n\n<!-- /table -->\n\nMore prose.\n"
    )
    assert tables.render(rendered) == rendered
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        tables.render("<!-- table: nope -->\n<!-- /table -->")


@pytest.fixture
def committed():
    """benchmarks/tables.py reading the committed benchmarks/results/."""
    spec = importlib.util.spec_from_file_location("bench_tables_committed", TABLES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_tables_are_what_the_results_files_give(committed):
    for path in committed.documents():
        text = path.read_text()
        assert committed.render(text) == text, (
            f"{path.name}: a table differs from benchmarks/results/*.json; "
            "run python benchmarks/tables.py --write"
        )


def test_benchmarks_md_is_short_and_answers_each_question_with_a_generated_table(committed):
    text = (committed.ROOT / "BENCHMARKS.md").read_text()
    assert len(text.splitlines()) <= 250
    names = {m.group(2) for m in committed.MARKER.finditer(text)}
    questions = {
        "streaming",
        "memory",
        "cache-speed",
        "baselines",
        "runtime",
        "embed-side-tasks",
        "serving",
    }
    assert questions <= names
    speed = (committed.ROOT / "docs" / "experiments" / "training-speed.md").read_text()
    assert "<!-- table: resume -->" in speed
    assert "## Integrations" in text
    experiments = committed.ROOT / "docs" / "experiments"
    for link in ("baselines.md", "alpha-and-seeds.md", "variants.md"):
        assert f"docs/experiments/{link}" in text and (experiments / link).exists()


def test_the_tune_table_sets_the_search_beside_the_alpha_grid(tables, tmp_path):
    result = {
        "config": "configs/minilm-cola.yaml",
        "space": {
            "task.mixer.alpha": {"low": 1, "high": 128, "log": True},
            "task.mixer.dim": {"choices": [32, 64]},
        },
        "jobs": 2,
        "trials": {"complete": 20, "pruned": 10, "fail": 1},
        "wall_seconds_this_call": 1500.0,
        "study_seconds": 1490.0,
        "load_average_1_5_15_min": {"start": [6.5, 6.0, 5.0], "end": [7.25, 7.0, 6.0]},
        "metric": "mcc",
        "best": {
            "params": {"task.mixer.alpha": 3.21, "task.mixer.dim": 64},
            "validation": 0.301,
            "test": 0.215,
        },
        "alpha_grid": {
            "source": "benchmarks/results/compare_x.json",
            "runs": 4,
            "alphas": [1.0, 4.0, 16.0, 64.0],
            "settings": {"alpha": 16.0},
            "validation": 0.2598,
            "test": 0.1883,
            "wall_seconds": 78.4,
        },
        "machine": {"cores": 2},
        "command": "python benchmarks/tune_cola.py",
        "commit": "abc1234",
    }
    (tmp_path / "tune_cola.json").write_text(json.dumps(result))
    lines = tables.tune_table().splitlines()
    assert "Searched: α 1–128 (log), k {32, 64}." in lines[0]
    tuned = next(x for x in lines if x.startswith("| `adalayers tune`"))
    assert "| 30 (20 complete, 10 pruned) | 25.0 min, 2 processes | **30.1** | 21.5 |" in tuned
    assert tuned.endswith("| α 3.21, k 64 |")
    grid = next(x for x in lines if x.startswith("| `compare --mixer-grid`"))
    expected = "| 4 | 1.3 min, 1 process | 26.0 | 18.8 | α 16 |"
    assert grid == f"| `compare --mixer-grid`: α = 1, 4, 16, 64 {expected}"
    assert "load average 6.5 when the search began, 7.2 when it ended" in "\n".join(lines)
    assert lines[-1].startswith("From `benchmarks/results/tune_cola.json`")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped)."""
    found = set()
    for line in path.read_text().splitlines():
        heading = re.match(r"#+\s+(.*)", line)
        if heading:
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return found


def test_every_markdown_link_to_a_section_finds_its_heading():
    root = TABLES.parents[1]
    documents = [root / "README.md", root / "BENCHMARKS.md", *root.glob("docs/**/*.md")]
    broken = []
    for document in documents:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", document.read_text()):
            path = (document.parent / target).resolve() if target else document
            if path.suffix == ".md" and path.is_file() and anchor not in _anchors(path):
                broken.append(f"{document.relative_to(root)} -> {target or 'itself'}#{anchor}")
    assert not broken, f"links to headings that do not exist: {broken}"


def test_the_dynamic_weights_table_gives_each_run_its_distance_from_the_prior(tables, tmp_path):
    run = {
        "run": "runs/compare/minilm-conll2003-bio-dynamic-alpha4-heads8/dynamic",
        "heads": 8,
        "alpha": 4.0,
        "examples": 200,
        "tokens": 3000,
        "prior": [0.5, 0.5],
        "prior_entropy": 0.6931,
        "query_norm": [0.5, 1.0],
        "tv_from_prior": 0.4461,
        "entropy": 0.51,
        "max_weight": 0.7,
    }
    result = {"runs": [run], "command": "python benchmarks/dynamic_weights.py", "commit": "abc"}
    (tmp_path / "dynamic_weights.json").write_text(json.dumps(result))
    lines = tables.dynamic_weights_table().splitlines()
    assert lines[2] == (
        "| `minilm-conll2003-bio-dynamic-alpha4-heads8` | 8 | 4 | 0.75 | 0.45 "
        "| 0.51 (0.69) | 0.70 |"
    )
    assert "first 200 validation examples" in lines[4]


def test_the_dynamic_grid_lists_every_setting_and_bolds_the_one_chosen(tables, tmp_path):
    for seed in (0, 1):
        seeded = [f"train.seed={seed}"] if seed else []
        rows = full()
        rows["dynamic"] = row("dynamic", 0.80, 0.78)  # the config's α (its file says 128)
        write(tmp_path, f"a-{seed}", rows, seeded)
        heads = ["task.mixer.heads=8"]  # at the config's α
        write(tmp_path, f"h-{seed}", {"dynamic": row("dynamic", 0.82, 0.70)}, seeded + heads, "v")
    lines = tables.dynamic_grid_table().splitlines()
    assert lines[2:] == [
        "| CoNLL-2003 × MiniLM | 128 | 1 | 2 | 80.0 ± 0.0 | 78.0 ± 0.0 |",
        "| CoNLL-2003 × MiniLM | 128 | 8 | 2 | **82.0 ± 0.0** | 70.0 ± 0.0 |",
    ]
    line = tables.dynamic_columns_table().splitlines()[2]
    assert "| 70.0 ± 0.0 (n = 2, α = 128, 8 heads) |" in line
