"""The tables of BENCHMARKS.md and docs/experiments/, generated from benchmarks/results/.

A table lives in a document between ``<!-- table: NAME -->`` and ``<!-- /table -->``; the prose
around it is written by hand. tests/test_benchmark_tables.py fails when a committed table
differs from what the results files give.

python benchmarks/tables.py --write            # regenerate every table in the documents
python benchmarks/tables.py --check            # exit 1 if one is stale
python benchmarks/tables.py --table baselines  # print one (names: GENERATORS below)
python benchmarks/tables.py                    # the task table (task_*.json)
python benchmarks/tables.py --compare          # the baseline comparison (compare_*.json)
python benchmarks/tables.py --targets          # the comparison against issue 6's targets
python benchmarks/tables.py --variants         # the hyper-parameter variants, one line per run
python benchmarks/tables.py --seeds            # the comparison over seeds
python benchmarks/tables.py --grid-seeds       # mixer grids repeated over seeds: means
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import statistics
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REFERENCE = {"imdb": "96.1 acc", "cola": "83.6 acc", "conll2003": "89.4 F1"}


def fmt(value: float | None, scale: float = 100.0) -> str:
    return "–" if value is None else f"{value * scale:.1f}"


ROWS = (
    ("mixer", "AdaLayers mixer"),
    ("mixer_chosen", "AdaLayers mixer, α chosen on validation (`--mixer-grid`)"),
    ("best_single_layer", "best single layer (chosen on validation)"),
    ("last", "last layer"),
    ("uniform", "uniform mix"),
    ("scalar_mix", "scalar mix (ELMo)"),
    ("dynamic", "dynamic mixer (per-token weights)"),
    ("probe", "probe: logistic regression, one state (chosen on validation)"),
    ("probe_concat", "probe: logistic regression, all states"),
    ("finetune", "full fine-tuning"),
)
TASKS = (("imdb", "IMDB"), ("cola", "CoLA"), ("conll2003", "CoNLL-2003"))


def _sample(value: str) -> str:
    """``data.sample``'s override (a number or ``{split: number}``) as a column note."""
    sizes = yaml.safe_load(value)
    if isinstance(sizes, int):
        return f"random {sizes:,} of every split"
    return "random " + " / ".join(f"{n:,} {split}" for split, n in sizes.items())


# overrides that give a comparison a smaller budget than its config: the rows say so, or the
# column header when every row of the column shares it
BUDGET = {"train.epochs": "{} epochs".format}
# overrides that change the data or how every row of a comparison is read: such a comparison
# gets a column of its own beside the config's (in this order in its title)
SETTING = {
    "data.max_length": "first {} tokens".format,
    "data.sample": _sample,
    "task.head.decoding": lambda value: f"{value.upper()} decoding",
}
BASES = (("all-MiniLM-L6-v2", "MiniLM"), ("SmolLM2-135M-Instruct", "SmolLM2"))
GREEK = {"alpha": "α", "entropy_weight": "λ"}


def _setting_text(items: list[str] | tuple[str, ...]) -> str:
    """The :data:`SETTING` overrides among ``items`` (``key=value``), as the column's note."""
    given = dict(item.partition("=")[::2] for item in items)
    return ", ".join(note(given[key]) for key, note in SETTING.items() if key in given)


def _setting(result: dict) -> str:
    """What makes a result's column other than its config's, e.g. "BIO decoding"."""
    return _setting_text(result.get("overrides") or [])


def _compare_results() -> list[dict]:
    """Every compare_*.json in name order, less the rows a later run of the same settings and
    seed measured again (at a later commit): the latest measurement of a row counts. A result
    that loses a row is a copy without it (and without the summary figures read from it)."""
    results = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("compare_*.json"))]
    newest_first = sorted(
        range(len(results)), key=lambda i: results[i].get("date", ""), reverse=True
    )
    seen: set[tuple] = set()
    for i in newest_first:
        result = results[i]
        comparison = result["comparison"]
        setting = (
            Path(result["config"]).stem,
            comparison["task"],
            comparison["base"],
            _changes(result, mixer=True),
            _seed(result) or 0,
            bool(result.get("mixer_grid")),
        )
        stale = [row for row in comparison["rows"] if (*setting, row) in seen]
        seen.update((*setting, row) for row in comparison["rows"])
        if stale:
            results[i] = _without_rows(result, stale)
    return results


def _without_rows(result: dict, rows: list[str]) -> dict:
    """A copy of ``result`` without ``rows`` and the summary figures taken from them."""
    result = copy.deepcopy(result)
    for row in rows:
        del result["comparison"]["rows"][row]
        result["summary"].pop(row, None)
        if row.startswith("layer_"):  # the sweep's figures come from its rows
            result["summary"].pop("best_single_layer", None)
            result["summary"].pop("single_layer_test", None)
    return result


def _cells() -> dict[tuple[str, str, str], dict[str, dict]]:
    """(task, base, setting) -> row kind -> the run's row, from every compare_*.json."""
    cells: dict[tuple[str, str, str], dict[str, dict]] = {}
    for result in _compare_results():
        if result.get("variant") or _seed(result) is not None:
            continue
        comparison = result["comparison"]
        overrides = [item.partition("=") for item in result.get("overrides") or []]
        cell = cells.setdefault((comparison["task"], comparison["base"], _setting(result)), {})
        budget = [  # a budget other than the config's
            BUDGET[key](value) for key, _, value in overrides if key in BUDGET
        ]
        metric = comparison["metric"]
        chosen = comparison.get("mixer_chosen")
        if chosen is not None:
            grid = ", ".join(result.get("mixer_grid") or [])
            cell["mixer_chosen"] = {
                **comparison["rows"][chosen],
                "metric": metric,
                "budget": budget,
                "grid": grid,
            }
            if comparison["baselines"] == ["mixer"]:
                continue  # a grid of the mixer alone: the column's other rows come from elsewhere
        for row in comparison["rows"].values():
            if row.get("test") is None:
                continue  # not scored: a row skipped (e.g. a concatenation beyond memory)
            if row["baseline"] not in ("single_layer", "mixer_grid"):
                cell[row["baseline"]] = {**row, "metric": metric, "budget": budget}
        best = result["summary"].get("best_single_layer")  # chosen on validation
        if best is not None:
            row = comparison["rows"][f"layer_{best['layer']}"]
            cell["best_single_layer"] = {**row, "metric": metric, "budget": budget}
    return cells


def _seed(result: dict) -> int | None:
    """The ``train.seed`` a result was run with, if it set one (a repeat with another seed)."""
    for item in result.get("overrides") or []:
        if item.startswith("train.seed="):
            return int(item.split("=", 1)[1])
    return None


# the mixer's own knobs: the other rows do not read them, so a repeat that changes only these
# still repeats the other rows
MIXER_ONLY = (
    "task.mixer.alpha",
    "task.mixer.cutoff",
    "task.mixer.entropy_weight",
    "task.mixer.heads",
)


# the kinds of row a comparison's summary gives one test figure for
SUMMARY_KINDS = (
    "mixer",
    "best_single_layer",
    "last",
    "uniform",
    "scalar_mix",
    "dynamic",
    "probe",
    "probe_concat",
    "finetune",
)


def _storage(item: str) -> bool:
    """Whether an override only says where or how the feature cache lives (not a setting)."""
    return item.startswith(("train.cache=", "cache."))


def _changes(result: dict, *, mixer: bool) -> tuple[str, ...]:
    """What a result changed from its config, bar the seed and where the cache lives."""
    out = []
    for item in result.get("overrides") or []:
        key = item.partition("=")[0]
        if key == "train.seed" or _storage(item):
            continue
        if not mixer and key in MIXER_ONLY:
            continue
        out.append(item)
    return tuple(sorted(out))


def _seed_runs() -> dict[tuple, dict[str, dict[int, float]]]:
    """(config, task, base, changes) -> row kind -> seed -> test metric, from every comparison
    but the grids; ``changes`` as :func:`_changes` gives them for that kind of row."""
    runs: dict[tuple, dict[str, dict[int, float]]] = {}
    for result in _compare_results():
        if result.get("mixer_grid"):
            continue  # its mixer rows are grid points, not repeats
        comparison, summary = result["comparison"], result["summary"]
        seed = _seed(result) or 0
        for kind in SUMMARY_KINDS:
            value = summary.get(kind)
            if isinstance(value, dict):
                value = value.get("test")
            if value is None:
                continue
            key = (
                Path(result["config"]).stem,
                comparison["task"],
                comparison["base"],
                _changes(result, mixer=kind in ("mixer", "dynamic")),
            )
            runs.setdefault(key, {}).setdefault(kind, {}).setdefault(seed, value)
    return runs


def seeds_table() -> str:
    """Test metric per seed for every setting run with two seeds or more: the seed the config
    gives (0) first, then the ``train.seed`` repeats. A setting is the config plus what the runs
    changed; the other rows than the mixer ignore the mixer's own knobs (:data:`MIXER_ONLY`), so
    e.g. a mixer at another α is set beside the baselines run at the config's α."""
    runs = _seed_runs()
    rows = []
    for (config, task, base, changes), cell in runs.items():
        mixer = cell.get("mixer", {})
        if len(mixer) < 2:
            continue
        others = runs.get(
            (config, task, base, tuple(c for c in changes if c.partition("=")[0] not in MIXER_ONLY))
        )
        values = {}
        for kind in SUMMARY_KINDS:
            own = kind in ("mixer", "dynamic")  # the mixer's knobs are theirs
            by_seed = (cell if own else others or {}).get(kind, {})
            xs = [100 * by_seed[s] for s in sorted(mixer) if s in by_seed]
            values[kind] = _spread(xs) if len(xs) > 1 else "–"
        seeds = ", ".join(str(s) for s in sorted(mixer))
        rows.append((f"| {task} × {base} | {', '.join(changes) or '–'} | {seeds} | ", values))
    # the rows every table has; the newer ones (dynamic mixer, probes) where some line has them
    shown = [
        kind
        for kind in SUMMARY_KINDS
        if kind not in ("dynamic", "probe", "probe_concat")
        or any(values[kind] != "–" for _, values in rows)
    ]
    lines = [
        "| task × base | settings changed | seeds | "
        + " | ".join(label for kind, label in ROWS if kind in shown)
        + " |",
        "| --- | --- | --- |" + " --- |" * len(shown),
    ]
    for head, values in rows:
        lines.append(head + " | ".join(values[kind] for kind in shown) + " |")
    return "\n".join(lines)


def _spread(xs: list[float]) -> str:
    """``mean ± sd (each)`` of points already in percent."""
    each = ", ".join(f"{x:.1f}" for x in xs)
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f} ({each})"


def _grid_key(result: dict) -> tuple[tuple, tuple[str, ...]]:
    """A result's (config, task, base, column) and its other changes: its mixer's changes
    (:func:`_changes`) split into those that make its column (:data:`SETTING`) and the rest."""
    comparison = result["comparison"]
    changes = _changes(result, mixer=True)
    column = tuple(c for c in changes if c.partition("=")[0] in SETTING)
    key = (Path(result["config"]).stem, comparison["task"], comparison["base"], column)
    return key, tuple(c for c in changes if c not in column)


def _grid_groups() -> dict[tuple, dict[tuple, dict[int, tuple[float, float]]]]:
    """(config, task, base, column) -> (changes, grid point) -> seed -> (validation, test),
    from every ``--mixer-grid`` run; ``column`` holds the changes that make a column of the main
    table (e.g. BIO decoding), ``changes`` the others."""
    groups: dict[tuple, dict[tuple, dict[int, tuple[float, float]]]] = {}
    for result in _compare_results():
        if not result.get("mixer_grid"):
            continue
        comparison = result["comparison"]
        metric = comparison["metric"]
        key, others = _grid_key(result)
        for row in comparison["rows"].values():
            if row["baseline"] not in ("mixer", "mixer_grid") or not row.get("settings"):
                continue
            setting = (others, tuple(sorted(row["settings"].items())))
            scores = tuple((row.get(split) or {}).get(metric) for split in ("validation", "test"))
            if None not in scores:
                by_seed = groups.setdefault(key, {}).setdefault(setting, {})
                by_seed.setdefault(_seed(result) or 0, scores)
    return groups


def grid_seeds_table() -> str:
    """Mixer grids (``--mixer-grid``) run with two seeds or more, one line per setting (what
    the runs changed plus the grid point): validation and test mean ± sd over the seeds. Of the
    settings of one task, base and column (e.g. BIO decoding), the best mean validation score is
    marked: the one a user would pick."""
    groups = _grid_groups()
    lines = [
        "| task × base | setting | seeds | validation | test |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (_, task, base, column), settings in groups.items():
        settings = {k: runs for k, runs in settings.items() if len(runs) > 1}
        if not settings:
            continue
        validation = {k: statistics.mean(v for v, _ in r.values()) for k, r in settings.items()}
        best = max(validation, key=validation.__getitem__)
        name = f"{task} × {base}" + (f" ({', '.join(column)})" if column else "")
        for setting in sorted(settings):
            runs = settings[setting]
            seeds = sorted(runs)
            others, grid = setting
            text = ", ".join([*others, *(f"{GREEK.get(k, k)} = {v:g}" for k, v in grid)])
            text += " (best on validation)" if setting == best else ""
            lines.append(
                f"| {name} | {text} | {', '.join(map(str, seeds))} "
                f"| {_spread([100 * runs[s][0] for s in seeds])} "
                f"| {_spread([100 * runs[s][1] for s in seeds])} |"
            )
    return "\n".join(lines)


def _score(scores: dict, metric: str) -> str:
    """``metric`` of one split; under BIO decoding also the argmax reading of the same scores."""
    text = f"{metric} {fmt(scores.get(metric))}"
    if metric in (scores.get("argmax") or {}):
        text += f" (argmax {fmt(scores['argmax'][metric])})"
    return text


def _cell(row: dict | None, shared: list[str] | None = None) -> str:
    """One row's test metric, layer, parameters and training time; ``shared``: the budget
    note its column header already gives (not repeated)."""
    if row is None:
        return "not run"
    test, metric = row.get("test") or {}, row["metric"]
    text = _score(test, metric)
    if metric == "mcc" and "accuracy" in test:
        text += f" (acc {fmt(test['accuracy'])})"
    if row.get("layer") is not None:
        text += f", layer {row['layer']}"
    if row.get("grid"):
        chosen = ", ".join(f"{GREEK.get(k, k)} = {v:g}" for k, v in row["settings"].items())
        val = _score(row.get("validation") or {}, metric).removeprefix(f"{metric} ")
        text += f", {chosen} (validation {val}; grid {row['grid']} and the config's)"
    params = row.get("parameters_added")
    if params:
        text += f"; {params / 1e6:.2f}M params" if params >= 1e5 else f"; {params:,} params"
    if row.get("train_seconds") is not None:
        text += f"; {row['train_seconds'] / 60:.1f} min"
    own = [note for note in row.get("budget") or [] if note not in (shared or [])]
    if own:
        text += f" ({', '.join(own)})"
    return text


def _columns(cells: dict) -> tuple[list[tuple[tuple[str, str, str], str]], dict]:
    """The table's columns (key, title): the config's, then one per other setting run; and
    (task, base, setting) -> the budget note every row of that column shares."""
    shared = {}
    for key, cell in cells.items():
        budgets = {tuple(row["budget"]) for row in cell.values()}
        shared[key] = list(budgets.pop()) if len(budgets) == 1 else []

    def title(key: tuple[str, str, str], tn: str, bn: str) -> str:
        notes = list(shared.get(key) or []) + ([key[2]] if key[2] else [])
        return f"{tn} × {bn}" + (f" ({', '.join(notes)})" if notes else "")

    columns = []
    for t, tn in TASKS:
        for b, bn in BASES:
            settings = sorted(s for (ct, cb, s) in cells if (ct, cb) == (t, b)) or [""]
            columns += [((t, b, s), title((t, b, s), tn, bn)) for s in settings]
    return columns, shared


def compare_table() -> str:
    cells = _cells()
    columns, shared = _columns(cells)
    lines = [
        "| baseline | " + " | ".join(c[1] for c in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for kind, label in ROWS:
        values = [
            _cell(cells[key].get(kind), shared[key]) if key in cells else "not run"
            for key, _ in columns
        ]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _test(row: dict | None) -> float | None:
    """A row's test metric in points, rounded as the tables print it (so the margins add up)."""
    if row is None or (row.get("test") or {}).get(row["metric"]) is None:
        return None
    return round(100 * row["test"][row["metric"]], 1)


# (label, the row compared with, the margin the mixer must reach over it)
TARGETS = (
    ("≥ best single layer + 1 point", "best_single_layer", 1.0),
    ("≥ scalar mix", "scalar_mix", 0.0),
    ("within 2 points of full fine-tuning", "finetune", -2.0),
)


def _target(mixer: float | None, other: float | None, need: float) -> str:
    if mixer is None or other is None:
        return "not run"
    gap = round(mixer - other, 1)
    verdict = "met" if gap >= need else f"missed by {need - gap:.1f}"
    return f"{mixer:.1f} vs {other:.1f}: {gap:+.1f}, **{verdict}**".replace("-", "−")


def targets_table() -> str:
    """Each column's mixer (the config's, then the one chosen on validation by ``--mixer-grid``)
    against the targets: ≥ best single layer + 1, ≥ scalar mix, ≥ fine-tuning − 2. Where a
    column was repeated with other seeds (``train.seed`` and nothing else changed), the same
    targets on the means over its seeds follow; then, where its α grid was repeated, the same
    for the grid point with the best mean validation score (:func:`_chosen_over_seeds`)."""
    cells = _cells()
    columns, _ = _columns(cells)
    lines = [
        "| target | " + " | ".join(c[1] for c in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for mixer, name in (("mixer", "mixer"), ("mixer_chosen", "mixer (α chosen on validation)")):
        for label, other, need in TARGETS:
            values = []
            for key, _ in columns:
                cell = cells.get(key, {})
                values.append(_target(_test(cell.get(mixer)), _test(cell.get(other)), need))
            lines.append(f"| {name} {label} | " + " | ".join(values) + " |")
    seeds = _column_seeds()
    repeated = {
        k: by_kind["mixer"] for k, by_kind in seeds.items() if len(by_kind.get("mixer", {})) > 1
    }
    for name, mixers in (
        ("mixer, mean over the column's seeds,", repeated),
        ("mixer (α chosen on validation), mean over the grid's seeds,", _chosen_over_seeds()),
    ):
        if mixers:
            lines.extend(_seed_target_rows(name, mixers, seeds, cells, columns))
    return "\n".join(lines)


def _seed_target_rows(
    name: str,
    mixers: dict[tuple[str, str, str], dict[int, float]],
    seeds: dict[tuple[str, str, str], dict[str, dict[int, float]]],
    cells: dict[tuple[str, str, str], dict[str, dict]],
    columns: list,
) -> list[str]:
    """One line per target: each column's mixer (seed -> test metric) against the means of the
    column's other rows over the same seeds (:func:`_column_seeds`); fine-tuning, where it ran
    once, its one run."""
    lines = []
    for label, other, need in TARGETS:
        values = []
        for key, _ in columns:
            if key not in mixers:
                values.append("one seed")
                continue
            mixer, note = mixers[key], ""
            against = _mean(seeds.get(key, {}).get(other), mixer)
            if against is None and other == "finetune":  # not repeated: its one run
                against = _test(cells[key].get(other))
                note = " (fine-tuning: seed 0 only)" if against is not None else ""
            values.append(_target(_mean(mixer, mixer), against, need) + note)
        lines.append(f"| {name} {label} | " + " | ".join(values) + " |")
    return lines


def _column_runs() -> list[dict]:
    """The results that are a column's own run: not a variant, a grid or a seed repeat."""
    out = []
    for result in _compare_results():
        if not (result.get("variant") or result.get("mixer_grid") or _seed(result) is not None):
            out.append(result)
    return out


def _chosen_over_seeds() -> dict[tuple[str, str, str], dict[int, float]]:
    """(task, base, setting) of a column -> seed -> test metric of the mixer grid point with the
    best validation mean, where the column's own settings were run as a grid with two seeds or
    more (:func:`grid_seeds_table`)."""
    return {key: by_seed for key, (_, by_seed) in _chosen_points().items()}


def _chosen_points() -> dict[tuple[str, str, str], tuple[tuple, dict[int, float]]]:
    """As :func:`_chosen_over_seeds`, with the chosen grid point (``(("alpha", 1.0),)``)."""
    own: dict[tuple, tuple[str, ...]] = {}  # the column's changes, from its mixer's run
    for result in _column_runs():
        if "mixer" in result["comparison"]["rows"]:
            key, others = _grid_key(result)
            own[key] = others
    out: dict[tuple[str, str, str], tuple[tuple, dict[int, float]]] = {}
    for key, settings in _grid_groups().items():
        if key not in own:
            continue
        runs = {k: r for k, r in settings.items() if k[0] == own[key] and len(r) > 1}
        if not runs:
            continue
        best = max(runs, key=lambda k: statistics.mean(v for v, _ in runs[k].values()))
        _, task, base, column = key
        by_seed = {seed: test for seed, (_, test) in runs[best].items()}
        out[(task, base, _setting_text(column))] = (best[1], by_seed)
    return out


def _mean(by_seed: dict[int, float] | None, seeds: dict[int, float]) -> float | None:
    """Mean test metric in points over ``seeds``, rounded as printed; ``None`` if one is missing."""
    if not by_seed or any(s not in by_seed for s in seeds):
        return None
    return round(statistics.mean(100 * by_seed[s] for s in seeds), 1)


def _column_seeds() -> dict[tuple[str, str, str], dict[str, dict[int, float]]]:
    """(task, base, setting) of a column of the main table -> row kind -> seed -> test metric:
    the column's own run (seed 0) and its repeats with other seeds and nothing else changed."""
    runs = _seed_runs()
    out: dict[tuple[str, str, str], dict[str, dict[int, float]]] = {}
    for result in _column_runs():
        comparison = result["comparison"]
        task, base = comparison["task"], comparison["base"]
        by_kind = out.setdefault((task, base, _setting(result)), {})
        for kind in SUMMARY_KINDS:
            key = (Path(result["config"]).stem, task, base, _changes(result, mixer=kind == "mixer"))
            by_kind.update({kind: runs[key][kind]} if kind in runs.get(key, {}) else {})
        chosen = (result["summary"].get("best_single_layer") or {}).get("layer")
        if chosen is not None:  # the layer the sweep chose on validation, rerun with other seeds
            config = Path(result["config"]).stem
            pinned = (*_changes(result, mixer=True), f"task.mixer.single_layer={chosen}")
            repeats = runs.get((config, task, base, tuple(sorted(pinned))), {}).get("mixer", {})
            by_kind["best_single_layer"] = {**repeats, **by_kind.get("best_single_layer", {})}
    return out


def variants_table() -> str:
    """Every run marked ``--variant``: what it changed, validation and test. A run's sweep is
    one line, its single state with the best validation score (``best single layer``)."""
    lines = [
        "| task × base | baselines | settings changed | validation | test |",
        "| --- | --- | --- | --- | --- |",
    ]
    for result in _compare_results():
        if not result.get("variant") and not result.get("mixer_grid"):
            continue
        comparison = result["comparison"]
        metric = comparison["metric"]
        changes = [s for s in result["overrides"] if not _storage(s)]
        rows = dict(comparison["rows"])
        sweep = {n: r for n, r in rows.items() if r.get("baseline") == "single_layer"}
        scored = [n for n, r in sweep.items() if metric in (r.get("validation") or {})]
        if len(sweep) > 1 and scored:
            best = max(scored, key=lambda n: sweep[n]["validation"][metric])
            rows = {n: r for n, r in rows.items() if n not in sweep}
            label = f"best single layer ({sweep[best].get('layer')}; {len(sweep)} swept)"
            rows[label] = sweep[best]
        for name, row in rows.items():
            if not result.get("variant") and "settings" not in row:
                continue  # a grid's other rows are in the main table
            grid = [f"task.mixer.{k}={v:g}" for k, v in (row.get("settings") or {}).items()]
            if grid:
                grid[-1] += " (grid" + (", chosen)" if name == comparison["mixer_chosen"] else ")")
            changed = ", ".join(changes + grid)
            lines.append(
                f"| {comparison['task']} × {comparison['base']} | {name} | {changed or '–'} "
                f"| {_score(row.get('validation') or {}, metric)} "
                f"| {_score(row.get('test') or {}, metric)} |"
            )
    return "\n".join(lines)


def tasks_table() -> str:
    """The three tasks on the shipped configs (``task_*.json``), one line per run."""
    rows = [
        "| task (split) | result on MiniLM | reference (RoBERTa-large) | parameters added "
        "| train wall time | run wall time | train tokens/s | processes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted(RESULTS.glob("task_*.json")):
        r = json.loads(path.read_text())
        test, task = r.get("test") or {}, r["task"]
        if task == "cola":
            result = (
                f"acc {fmt(test.get('accuracy'))}, MCC {fmt(test.get('mcc'))} "
                f"(GLUE dev, {test.get('examples')})"
            )
        elif task == "conll2003":
            result = (
                f"F1 {fmt(test.get('f1'))} (P {fmt(test.get('precision'))}, "
                f"R {fmt(test.get('recall'))}; test, {test.get('examples')})"
            )
        else:
            result = f"acc {fmt(test.get('accuracy'))} (test, {test.get('examples')})"
        rows.append(
            f"| {task} [{path.stem.removeprefix('task_')}] | {result} | {REFERENCE.get(task, '–')} "
            f"| {r['parameters_added']:,} ({r['percent_of_base']:.2f}%) "
            f"| {r['train_seconds'] / 60:.1f} min | {r['wall_seconds'] / 60:.1f} min "
            f"| {r['train_tokens_per_second']:,.0f} | {r.get('processes', 1)} |"
        )
    return "\n".join(rows)


# --- the tables of BENCHMARKS.md: one per question, each from its results file ---------------

MIB = 2**20
METRIC_NAMES = {"mcc": "MCC", "f1": "entity F1", "accuracy": "accuracy"}
PRIMARY = {"cola": "mcc", "conll2003": "f1", "imdb": "accuracy"}


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _source(name: str, result: dict) -> str:
    """Where a table's figures come from: the results file, its command and commit."""
    return (
        f"From `benchmarks/results/{name}.json`: `{result['command']}`, "
        f"commit {result.get('commit') or 'not recorded'}."
    )


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def streaming_table() -> str:
    """Streaming taps against the stacked ``output_hidden_states`` reference, per base: the
    static mixer and, where measured, the dynamic one (``mixer.mode: dynamic``)."""
    name = "streaming_equivalence"
    r = _load(name)
    dynamic = r.get("max_abs_diff_dynamic") or {}

    def cell(diff: float | None) -> str:
        return "–" if diff is None else (f"{diff:.1e}" if diff else "0")

    grouped = r.get("max_abs_diff_dynamic_heads") or {}
    lines = ["| base | max abs difference of the task logits |", "| --- | --- |"]
    if dynamic:
        lines = ["| base | static mixer | dynamic mixer |", "| --- | --- | --- |"]
    if grouped:
        heads = "; ".join(f"{h}: {k}" for k, h in r["dynamic_heads"].items())
        lines = [
            f"| base | static mixer | dynamic mixer | dynamic mixer with heads ({heads}) |",
            "| --- | --- | --- | --- |",
        ]
    for base, diff in r["max_abs_diff"].items():
        extra = f" {cell(dynamic.get(base))} |" if dynamic else ""
        extra += f" {cell(grouped.get(base))} |" if grouped else ""
        lines.append(f"| {base} | {cell(diff)} |{extra}")
    return "\n".join([*lines, "", _source(name, r)])


def memory_table() -> str:
    """Extra peak memory of streaming taps against holding every hidden state."""
    name = "memory_streaming"
    r = _load(name)
    malloc, rss = r["allocated_extra_peak_bytes_vs_bare"], r["extra_peak_bytes_vs_bare"]
    one, held = (
        r["theory_bytes"]["one_buffer_B_T_k"],
        r["theory_bytes"]["all_states_B_T_d_x_states"],
    )
    theory = {
        "hidden_states": f"all states B·T·d held: {held / MIB:.0f} MiB",
        "stream_1": f"B·T·k = {one / MIB:.1f} MiB",
        "stream_4": f"4 × B·T·k = {4 * one / MIB:.1f} MiB",
    }
    labels = {
        "hidden_states": "`output_hidden_states=True`",
        "stream_1": "streaming, 1 task (base output too)",
        "stream_4": "streaming, 4 tasks (base output too)",
    }
    lines = [
        f"{r['base']}, batch {r['batch']} × {r['length']} tokens, k = {r['dim']}, inference; "
        f"extra peak over the bare forward, median of {r['repeats']} fresh processes.",
        "",
        "| variant | extra peak, malloc | extra peak, RSS | theory |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in labels.items():
        lines.append(
            f"| {label} | {malloc[key] / MIB:.1f} MiB | {rss[key] / MIB:.1f} MiB | {theory[key]} |"
        )
    paper = r["roberta_large_on_paper"]
    one_task = r["ratio_allocated_hidden_states_over_stream_1"]
    four_tasks = r["ratio_allocated_hidden_states_over_stream_4"]
    lines += [
        "",
        f"Holding the states adds **{one_task:.1f}×** the malloc peak of one streaming task "
        f"({four_tasks:.1f}× that of four). On paper for RoBERTa-large: all states "
        f"{paper['all_states_bytes'] / MIB:.0f} MiB, one task's buffer "
        f"{paper['one_buffer_bytes'] / MIB:.0f} MiB ({paper['ratio']:.0f}×).",
        _source(name, r),
    ]
    return "\n".join(lines)


def cache_speed_table() -> str:
    """Epoch time online against from the feature cache, and what the cache costs."""
    name = "cache_speed"
    r = _load(name)
    lines = [
        "| task | online epoch | cached epoch | speed-up | store | build (one pass of the base) "
        "| validation, online / cached |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task, x in r["results"].items():
        metric = PRIMARY[task]
        online, cached = x["online_validation"][metric], x["cached_validation"][metric]
        lines.append(
            f"| {dict(TASKS).get(task, task)} | {_seconds(x['online_epoch_seconds'])} "
            f"| {_seconds(x['cached_epoch_seconds'])} | **{x['speedup']:.1f}×** "
            f"| {x['cache_bytes'] / MIB:,.0f} MiB, {x['cache_dtype']}, "
            f"{len(x['cache_layers'])} states | {x['cache_build_seconds']:.0f} s "
            f"| {METRIC_NAMES[metric]} {online:.4f} / {cached:.4f} |"
        )
    precision = RESULTS / "mixed_precision.json"
    if not precision.is_file():
        return "\n".join([*lines, "", _source(name, r)])
    m = _load("mixed_precision")
    x, metric = m["summary"], METRIC_NAMES[m["metric"]]
    epoch, ratio = x["epoch_seconds"], x["cache_ratio"]
    later = [(stem, r) for stem, r in _later_precision_runs() if r["task"] == m["task"]]
    test = _pooled_test([m, *(r for _, r in later)])  # every run of this task's seeds
    lines.append(
        f"| CoLA, bf16 autocast (float32 in the same run; {m['threads']} thread, CPU time × "
        f"{m['steps_per_epoch']} steps) | {_seconds(epoch['online_bf16'])} "
        f"({_seconds(epoch['online_no'])}) | {_seconds(epoch['cached_bf16'])} "
        f"({_seconds(epoch['cached_no'])}) | **{ratio['bf16']:.1f}×** ({ratio['no']:.1f}×) "
        f"| {m['cache_dtype']}, every split | {m['cache_build_seconds']:.0f} s "
        f"| test {metric}, {test['bf16']['n']} seeds: {test['bf16']['mean']:.1f} ± "
        f"{test['bf16']['sd']:.1f} ({test['no']['mean']:.1f} ± {test['no']['sd']:.1f}) |"
    )
    source = _source("mixed_precision", m)
    pooled = ", ".join(f"`{stem}.json`" for stem, _ in later)
    if pooled:
        source += f" Its test {metric} pools the seeds of {pooled} too."
    return "\n".join([*lines, "", _source(name, r), "bf16 row: f" + source[1:]])


def _seconds(x: float) -> str:
    return f"{x:.1f} s" if x >= 10 else f"{x:.2f} s"


def _mean_sd(points: list[float]) -> str:
    """``mean ± sd`` of points already in percent (the value alone for one point)."""
    if len(points) == 1:
        return f"{points[0]:.1f}"
    return f"{statistics.mean(points):.1f} ± {statistics.stdev(points):.1f}"


# the rows of the baselines table; all but fine-tuning leave the base frozen
BASELINE_KINDS = (
    ("mixer", "mixer, config's α"),
    ("mixer_chosen", "mixer, α chosen on validation"),
    ("best_single_layer", "best single layer"),
    ("last", "last layer"),
    ("uniform", "uniform mix"),
    ("scalar_mix", "scalar mix (ELMo)"),
    ("dynamic", "dynamic mixer"),
    ("probe", "probe, one state"),
    ("probe_concat", "probe, all states"),
    ("finetune", "full fine-tuning"),
)


def _baseline_points(cells: dict) -> dict[tuple[str, str, str], dict[str, tuple]]:
    """(task, base, setting) -> row kind -> (test points in percent over the seeds, note)."""
    seeds, chosen = _column_seeds(), _chosen_points()
    out: dict[tuple[str, str, str], dict[str, tuple]] = {}
    for key, cell in cells.items():
        kinds = out.setdefault(key, {})
        for kind, _ in BASELINE_KINDS:
            note, by_seed = "", (seeds.get(key) or {}).get(kind)
            if kind == "mixer_chosen" and key in chosen:
                grid, by_seed = chosen[key]
                note = ", ".join(f"{GREEK.get(k, k)} = {v:g}" for k, v in grid)
            elif kind in cell and not by_seed:  # one run: the column's own
                row = cell[kind]
                by_seed = {0: row["test"][row["metric"]]}
                grid = row.get("settings") or {}
                note = ", ".join(f"{GREEK.get(k, k)} = {v:g}" for k, v in grid.items())
            if by_seed:
                kinds[kind] = ([100 * by_seed[s] for s in sorted(by_seed)], note)
    return out


def baselines_table() -> str:
    """Each column of the comparison (task × base × setting) as one line: every row's test metric
    as mean ± sd over the seeds it was run with, and n. The best frozen mean is in bold."""
    cells = _cells()
    columns, _ = _columns(cells)
    points = _baseline_points(cells)
    lines = [
        "| task × base | metric | " + " | ".join(label for _, label in BASELINE_KINDS) + " |",
        "| --- | --- |" + " --- |" * len(BASELINE_KINDS),
    ]
    for key, title in columns:
        if key not in cells:
            continue
        metric = next(iter(cells[key].values()))["metric"]
        kinds = points[key]
        frozen = [
            round(statistics.mean(kinds[k][0]), 1) for k, _ in BASELINE_KINDS[:-1] if k in kinds
        ]
        values = []
        for kind, _ in BASELINE_KINDS:
            if kind not in kinds:
                values.append("–")
                continue
            xs, note = kinds[kind]
            text = _mean_sd(xs)
            if kind != "finetune" and round(statistics.mean(xs), 1) == max(frozen):
                text = f"**{text}**"
            values.append(f"{text} (n = {len(xs)}{', ' + note if note else ''})")
        lines.append(f"| {title} | {METRIC_NAMES[metric]} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def runtime_table() -> str:
    """What tasks attached to one forward cost, against the bare forward and separate copies."""
    name = "runtime_overhead"
    r = _load(name)
    wall, cpu = r["wall_time_figures"], r["cpu_seconds_median"]
    per_task, ratio = r["target_overhead_per_task"], r["target_throughput_ratio"]

    def pct(x: float, digits: int = 2) -> str:
        return f"{100 * x:.{digits}f}%"

    rows = [
        (
            "overhead of 1 task (base output + predictions vs bare forward)",
            f"**{pct(r['overhead_1_task'])}**",
            pct(wall["overhead_1_task"]),
            f"≤ {pct(per_task, 0)} per task: {_verdict(r['overhead_per_task_with_1'] <= per_task)}",
        ),
        (
            "overhead of 4 tasks",
            f"**{pct(r['overhead_4_tasks'], 1)} = {pct(r['overhead_per_task_with_4'])} per task**",
            f"{pct(wall['overhead_per_task_with_4'])} per task",
            f"≤ {pct(per_task, 0)} per task: {_verdict(r['overhead_per_task_with_4'] <= per_task)}",
        ),
        (
            "the tasks' work alone (taps + heads on stored states) / bare forward",
            f"{pct(r['tasks_work_alone_1_task'], 1)} (1 task); "
            f"{pct(r['tasks_work_alone_per_task_with_4'], 1)} per task (4 tasks)",
            f"{pct(wall['tasks_work_alone_1_task'], 1)}; "
            f"{pct(wall['tasks_work_alone_per_task_with_4'], 1)}",
            f"floor k/(12d): {pct(r['compute_floor_per_task_k_over_12d'], 1)}",
        ),
        (
            "throughput, 4 tasks in one forward vs 4 fine-tuned copies (4 forwards)",
            f"**{r['throughput_4_tasks_one_forward_vs_4_copies']:.2f}×**",
            f"{wall['throughput_4_tasks_one_forward_vs_4_copies']:.2f}×",
            f"≥ {ratio:g}×: " + _verdict(r["throughput_4_tasks_one_forward_vs_4_copies"] >= ratio),
        ),
        (
            "early stop: 4 tasks on the lower states, no base output, vs the same with it",
            f"**{r['early_stop_speedup_lower_half']:.2f}×** "
            f"({r['early_stop_vs_bare_forward']:.2f}× faster than the bare forward)",
            f"{wall['early_stop_speedup_lower_half']:.2f}× "
            f"({wall['early_stop_vs_bare_forward']:.2f}×)",
            "–",
        ),
        (
            "base output with 4 tasks attached",
            "bit-identical (`torch.equal`)"
            if r["base_output_bit_identical_with_4_tasks"]
            else "**differs**",
            "–",
            "–",
        ),
    ]
    lines = [
        f"{r['base']}, batch {r['batch']} × {r['length']} tokens, {r['threads']} torch thread, "
        f"{r['rounds']} interleaved rounds, medians; tasks: {r['task']}, k = {r['dim']}, "
        f"{r['parameters_per_task']:,} parameters each. Medians of {r['measure']}: bare forward "
        f"{1000 * cpu['bare']:.0f} ms, 1 task {1000 * cpu['tasks_1']:.0f} ms, 4 tasks "
        f"{1000 * cpu['tasks_4']:.0f} ms, 4 copies {1000 * cpu['separate_4']:.0f} ms.",
        "",
        f"| what | {r['measure']} | wall time | target |",
        "| --- | --- | --- | --- |",
        *(f"| {' | '.join(row)} |" for row in rows),
        *_dynamic_rows(),
        "",
        _source(name, r),
    ]
    if (RESULTS / "dynamic_mixer.json").is_file():
        source = _source("dynamic_mixer", _load("dynamic_mixer"))
        lines.append("Dynamic mixer row: f" + source[1:])
    return "\n".join(lines)


def _dynamic_rows() -> list[str]:
    """The runtime table's line for ``mixer.mode: dynamic`` (``dynamic_mixer.json``)."""
    if not (RESULTS / "dynamic_mixer.json").is_file():
        return []
    d = _load("dynamic_mixer")
    cpu, wall, target = d["dynamic_over_static"], d["dynamic_over_static_wall"], d["target_ratio"]
    worst = max(cpu["forward_1_task"], cpu["forward_4_tasks"])
    return [
        f"| dynamic mixer / static mixer, base + 1 task (4 tasks), batch {d['batch']} × "
        f"{d['length']} | **{cpu['forward_1_task']:.2f}×** ({cpu['forward_4_tasks']:.2f}×) "
        f"| {wall['forward_1_task']:.2f}× ({wall['forward_4_tasks']:.2f}×) "
        f"| ≤ {target:g}×: {_verdict(worst <= target)} |"
    ]


def embed_table() -> str:
    """Embeddings with 4 side tasks from one forward, against embeddings alone and against
    embeddings plus 4 fine-tuned copies of the base (sentence-transformers).

    The table shows ``embed_side_tasks-100`` (100 rounds, the run decided on to read the target
    with) where it exists, else ``embed_side_tasks``; every other run of the command is listed
    under it with its commit, so none is picked."""
    name = "embed_side_tasks"
    shown = f"{name}-100" if (RESULTS / f"{name}-100.json").is_file() else name
    r = _load(shown)
    wall, cpu = r["wall_time_figures"], r["cpu_seconds_median"]
    target = r["target_ratio_tasks_4_vs_embed"]
    rows = [
        (
            "embeddings + 4 side tasks (one forward, predictions included) / embeddings alone",
            f"**{r['ratio_tasks_4_vs_embed']:.3f}×**",
            f"{wall['ratio_tasks_4_vs_embed']:.3f}×",
            f"≤ {target:g}×: {_verdict(r['ratio_tasks_4_vs_embed'] <= target)}",
        ),
        (
            "embeddings + 4 fine-tuned copies of the base (4 more forwards) / embeddings alone",
            f"**{r['ratio_copies_4_vs_embed']:.2f}×**",
            f"{wall['ratio_copies_4_vs_embed']:.2f}×",
            "–",
        ),
        (
            "4 side tasks on the embedding forward vs 4 copies",
            f"**{r['speedup_tasks_4_vs_copies_4']:.2f}× faster**",
            f"{wall['speedup_tasks_4_vs_copies_4']:.2f}×",
            "–",
        ),
        (
            "`encode()` with 4 tasks attached",
            "bit-identical (`np.array_equal`)"
            if r["embeddings_bit_identical_with_4_tasks"]
            else "**differs**",
            "–",
            "–",
        ),
    ]
    lines = [
        f"{r['base']}, batch {r['batch']} × {r['length']} tokens, {r['threads']} torch thread, "
        f"{r['rounds']} interleaved rounds, medians; tasks: {r['task']}, k = {r['dim']}, "
        f"{r['parameters_per_task']:,} parameters each; copies: {r['copies']}. Medians of "
        f"{r['measure']}: embeddings alone {1000 * cpu['embed']:.0f} ms, with 4 tasks "
        f"{1000 * cpu['embed_tasks_4']:.0f} ms, with 4 copies {1000 * cpu['embed_copies_4']:.0f} "
        f"ms. {_median_interval(r)}",
        "",
        f"| what | {r['measure']} | wall time | target |",
        "| --- | --- | --- | --- |",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        _source(shown, r),
    ]
    others = [
        _load(path.stem)
        for path in sorted(RESULTS.glob(f"{name}*.json"))
        if path.stem != shown and (path.stem == name or path.stem.startswith(f"{name}-repeat"))
    ]
    if others:  # the same command run again: every run's ratio, so none is picked
        runs = sorted(others, key=lambda x: x["ratio_tasks_4_vs_embed"])
        ratios = [x["ratio_tasks_4_vs_embed"] for x in runs]
        lines.insert(
            -1,
            "Other runs of this command: "
            + ", ".join(
                f"{x['ratio_tasks_4_vs_embed']:.3f}× ({x['rounds']} rounds, {x['commit']})"
                for x in runs
            )
            + f"; their median {statistics.median(ratios):.3f}×.\n",
        )
    return "\n".join(lines)


def _median_interval(r: dict, resamples: int = 2000) -> str:
    """A 95% bootstrap interval of the median per-round ratio, embeddings + 4 tasks over
    embeddings alone (resampling the rounds, seeded: the same text on every run)."""
    per_round = r["cpu_seconds_per_round"] if r["threads"] == 1 else r["seconds_per_round"]
    ratios = [b / a for a, b in zip(per_round["embed"], per_round["embed_tasks_4"])]
    rng = random.Random(0)
    medians = sorted(
        statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples)
    )
    low, high = medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]
    return (
        f"The median of the {len(ratios)} per-round ratios has a 95% bootstrap interval of "
        f"{low:.3f}× to {high:.3f}× (rounds resampled {resamples} times)."
    )


def dynamic_mixer_table() -> str:
    """The dynamic mixer's inference cost against the static one's, on one forward."""
    name = "dynamic_mixer"
    r = _load(name)
    cpu, wall, target = r["dynamic_over_static"], r["dynamic_over_static_wall"], r["target_ratio"]
    rows = (
        ("forward_1_task", "base + 1 task, the whole forward", True),
        ("forward_4_tasks", "base + 4 tasks, the whole forward", True),
        ("tasks_overhead_1_task", "the task's cost above the bare forward, 1 task", False),
        ("tasks_overhead_4_tasks", "the tasks' cost above the bare forward, 4 tasks", False),
        ("work_alone", "taps + head of 1 task on stored states (no base)", False),
    )
    lines = [
        f"{r['base']}, batch {r['batch']} × {r['length']} tokens, {r['threads']} torch thread, "
        f"{r['rounds']} interleaved rounds, medians of per-round ratios; tasks: {r['task']}, "
        f"k = {r['dim']}; the query adds {r['dim']} parameters to "
        f"{r['parameters_per_task']['static']:,}.",
        "",
        f"| dynamic / static | {r['measure']} | wall time | target |",
        "| --- | --- | --- | --- |",
    ]
    for key, label, targeted in rows:
        verdict = f"≤ {target:g}×: {_verdict(cpu[key] <= target)}" if targeted else "–"
        lines.append(f"| {label} | **{cpu[key]:.2f}×** | {wall[key]:.2f}× | {verdict} |")
    lines += [
        "",
        f"Max \\|streaming − stacked\\| of the 4 dynamic tasks' logits on this batch: "
        f"{r['max_abs_diff_streaming_vs_stacked_dynamic_4']:.1e}.",
        _source(name, r),
    ]
    for path in sorted(RESULTS.glob(f"{name}-heads*.json")):  # mixer.heads > 1
        h = _load(path.stem)
        cpu, wall = h["dynamic_over_static"], h["dynamic_over_static_wall"]
        lines += [
            "",
            f"With `mixer.heads: {h['heads']}` ({h['rounds']} rounds, the same batch): the whole "
            f"forward **{cpu['forward_1_task']:.2f}×** the static mixer's with 1 task "
            f"(wall {wall['forward_1_task']:.2f}×), **{cpu['forward_4_tasks']:.2f}×** with 4 "
            f"(wall {wall['forward_4_tasks']:.2f}×); taps + head alone {cpu['work_alone']:.2f}×; "
            f"max \\|streaming − stacked\\| "
            f"{h['max_abs_diff_streaming_vs_stacked_dynamic_4']:.1e}. {_source(path.stem, h)}",
        ]
    return "\n".join(lines)


def dynamic_weights_table() -> str:
    """How far the trained per-token layer weights move from the static prior."""
    name = "dynamic_weights"
    r = _load(name)
    lines = [
        "| run (seed 0) | heads | α | mean \\|q\\| | distance from the prior (TV) "
        "| entropy, nats (prior's) | largest weight |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in r["runs"]:
        folder = Path(row["run"]).parent.name
        q = statistics.mean(row["query_norm"])
        lines.append(
            f"| `{folder}` | {row['heads']} | {row['alpha']:g} | {q:.2f} "
            f"| {row['tv_from_prior']:.2f} | {row['entropy']:.2f} ({row['prior_entropy']:.2f}) "
            f"| {row['max_weight']:.2f} |"
        )
    examples = {row["examples"] for row in r["runs"]}
    lines += [
        "",
        f"Over every real token of the first {', '.join(map(str, sorted(examples)))} validation "
        "examples of each run's task; TV: half the summed absolute difference between a token's "
        "layer weights and the prior p~ (0: the static mix).",
        _source(name, r),
    ]
    return "\n".join(lines)


def _against_spread(test: dict) -> str:
    """bf16's test mean against float32's, read against each one's seed sd."""
    diff = round(test["bf16"]["mean"] - test["no"]["mean"], 1)
    sd32, sd16 = test["no"]["sd"], test["bf16"]["sd"]
    text = f"difference {diff:+.1f}".replace("-", "−")
    if abs(diff) <= sd32:
        return f"{text}: within the float32 seeds' sd ({sd32:.1f})"
    if abs(diff) <= sd16:
        return f"{text}: **beyond the float32 seeds' sd ({sd32:.1f})**, within bf16's ({sd16:.1f})"
    return f"{text}: **beyond both seed sds ({sd32:.1f}, {sd16:.1f})**"


def mixed_precision_table() -> str:
    """``train.mixed_precision: bf16`` against float32: a training step online and from the
    cache, and the test metric of full trainings over seeds."""
    name = "mixed_precision"
    if not (RESULTS / f"{name}.json").is_file():
        return "Not measured yet: no `benchmarks/results/mixed_precision.json`."
    r = _load(name)
    x = r["summary"]
    step, epoch, ratio, wall = x["step_seconds"], x["epoch_seconds"], x["cache_ratio"], x["wall"]
    metric = METRIC_NAMES[r["metric"]]

    def spread(s: dict) -> str:
        return f"{s['mean']:.1f} ± {s['sd']:.1f} (n = {s['n']})"

    def times(where: str, p: str) -> str:
        return f"{1000 * step[f'{where}_{p}']:.1f} ms, epoch {_seconds(epoch[f'{where}_{p}'])}"

    instructions = "has" if r["cpu_has_bf16_instructions"] else "has **no**"
    lines = [
        f"CoLA × MiniLM, `{r['config']}`; this CPU {instructions} bfloat16 instructions "
        f"(AVX-512 BF16, AMX). A training step (forward, backward, AdamW) on real batches of "
        f"{r['batches']} rotating, {r['rounds']} interleaved rounds, median {r['measure']} with "
        f"{r['threads']} torch thread; an epoch is {r['steps_per_epoch']} steps. Metrics: the "
        f"config's full training from the cache ({r['cache_dtype']} store), seeds "
        f"{', '.join(map(str, r['seeds']))}.",
        "",
        "| | float32 | bf16 autocast | bf16 speed-up (wall) |",
        "| --- | --- | --- | --- |",
        f"| online step | {times('online', 'no')} | {times('online', 'bf16')} "
        f"| **{x['online_speedup_bf16']:.2f}×** ({wall['online_speedup_bf16']:.2f}×) |",
        f"| cached step | {times('cached', 'no')} | {times('cached', 'bf16')} "
        f"| **{x['cached_speedup_bf16']:.2f}×** ({wall['cached_speedup_bf16']:.2f}×) |",
        f"| online / cached step | {ratio['no']:.1f}× | {ratio['bf16']:.1f}× | – |",
        f"| test {metric}, full training from the cache | {spread(x['test']['no'])} "
        f"| {spread(x['test']['bf16'])} | {_against_spread(x['test'])} |",
        "",
        _source(name, r),
    ]
    later = _later_precision_runs()
    if later:
        lines += ["", *_mixed_precision_later(r, later)]
    return "\n".join(lines)


def _later_precision_runs() -> list[tuple[str, dict]]:
    """(file name, result) of the runs after the first (``mixed_precision-*.json``)."""
    return [(p.stem, _load(p.stem)) for p in sorted(RESULTS.glob("mixed_precision-*.json"))]


def _pooled_test(runs: list[dict]) -> dict[str, dict]:
    """Precision -> mean, sd and n of the test metric (× 100) over every seed of ``runs``."""
    pooled = {}
    for p in ("no", "bf16"):
        xs = [100 * f["test"] for r in runs for f in r["fits"][p]]
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        pooled[p] = {"mean": statistics.mean(xs), "sd": sd, "n": len(xs)}
    return pooled


def _mixed_precision_later(first: dict, named: list[tuple[str, dict]]) -> list[str]:
    """The runs decided on after the first one (``mixed_precision-*.json``): fresh seeds and
    other tasks, each read with the same test, and each task's seeds pooled over every run."""

    def spread(s: dict) -> str:
        return f"{s['mean']:.1f} ± {s['sd']:.1f} (n = {s['n']})"

    lines = [
        "Runs decided on after the one above, each with the same test (seeds never run before "
        "for CoLA). Speed: a step's median thread CPU time, 1 torch thread.",
        "",
        "| run | seeds | bf16 speed-up, online / cached step | online / cached step, float32 "
        "/ bf16 | test float32 | test bf16 | against the seed spread |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    later = [r for _, r in named]
    for r in later:
        x = r["summary"]
        metric = METRIC_NAMES[r["metric"]]
        lines.append(
            f"| {dict(TASKS).get(r['task'], r['task'])} × MiniLM, `{r['config']}` "
            f"| {_seed_list(r['seeds'])} "
            f"| {x['online_speedup_bf16']:.2f}× / {x['cached_speedup_bf16']:.2f}× "
            f"| {x['cache_ratio']['no']:.1f}× / {x['cache_ratio']['bf16']:.1f}× "
            f"| {metric} {spread(x['test']['no'])} | {spread(x['test']['bf16'])} "
            f"| {_against_spread(x['test'])} |"
        )
    for task in sorted({r["task"] for r in [first, *later]}):
        runs = [r for r in [first, *later] if r["task"] == task]
        if len(runs) < 2:
            continue
        test = {p: {k: round(v, 2) for k, v in t.items()} for p, t in _pooled_test(runs).items()}
        seeds = sorted(f["seed"] for r in runs for f in r["fits"]["no"])
        lines.append(
            f"| {dict(TASKS).get(task, task)} × MiniLM, every run pooled "
            f"| {len(seeds)} seeds ({seeds[0]} to {seeds[-1]}) | – | – "
            f"| {METRIC_NAMES[runs[0]['metric']]} {spread(test['no'])} | {spread(test['bf16'])} "
            f"| {_against_spread(test)} |"
        )
    lines += ["", *(_source(stem, r) for stem, r in named)]
    return lines


def _seed_list(seeds: list[int]) -> str:
    """``0, 1, 2`` or, for a longer run of consecutive seeds, ``6 to 17``."""
    if len(seeds) > 3 and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]} to {seeds[-1]}"
    return ", ".join(map(str, seeds))


def vllm_table() -> str:
    """Side tasks inside a vLLM engine against the engine alone and a second copy of the base."""
    name = "vllm_side_tasks"
    r = _load(name)
    wall, mem, lat = r["wall_time_figures"], r["memory"], r["latency_seconds_median"]
    copy, thr = mem["second_copy"], r["throughput_tokens_per_s"]
    per_task, share = r["target_cost_per_task"], r["target_extra_over_second_copy"]
    worst = max(r["cost_per_task_with_1"], r["cost_per_task_with_4"])
    worst_prompts = max(r["prefill_cost_per_task_with_1"], r["prefill_cost_per_task_with_4"])

    def pct(x: float) -> str:
        return f"{100 * x:.2f}%"

    def mib(x: float) -> str:
        return f"{x / MIB:,.0f} MiB"

    def cost(x: dict, bold: str = "") -> str:
        return (
            f"{bold}{pct(x['cost_per_task_with_1'])}{bold} (k = 1), "
            f"{bold}{pct(x['cost_per_task_with_4'])}{bold} (k = 4); prompts alone: "
            f"{pct(x['prefill_cost_per_task_with_1'])}, {pct(x['prefill_cost_per_task_with_4'])}"
        )

    def extra(x: dict, bold: str = "") -> str:
        return (
            f"prompts alone: {bold}{x['prefill_extra_4_tasks_over_second_copy']:.3f}{bold} "
            f"({x['prefill_extra_seconds_4_tasks']:.2f} s vs {x['second_copy_seconds']:.1f} s); "
            f"generating: {x['extra_4_tasks_over_second_copy']:.3f} "
            f"({x['extra_seconds_4_tasks']:.2f} s)"
        )

    rows = [
        (
            "cost per task, (1 − thr_k/thr_0)/k; generation with 0 / 1 / 4 tasks: "
            + " / ".join(f"{thr[f'engine_{k}']:.1f}" for k in (0, 1, 4))
            + " tokens/s (wall)",
            cost(r, "**"),
            cost(wall),
            f"≤ {100 * per_task:g}%: generating {_verdict(worst <= per_task)}, prompts alone "
            + _verdict(worst_prompts <= per_task),
        ),
        (
            "extra time of 4 tasks in the engine / a second copy labelling the same prompts",
            extra(r, "**"),
            extra(wall),
            f"≤ 1/{1 / share:g}: generating "
            + _verdict(r["extra_4_tasks_over_second_copy"] <= share)
            + ", prompts alone "
            + _verdict(r["prefill_extra_4_tasks_over_second_copy"] <= share),
        ),
        (
            "memory: the engine's worker on attaching 4 tasks vs a fresh process with the copy",
            f"+{mib(mem['worker_rss_growth_attach'])} (task weights "
            f"{mib(mem['task_weight_bytes'])}) vs +{mib(copy['rss_growth']['load'])} loaded, "
            f"+{mib(copy['rss_growth']['peak'])} at the peak labelling (base weights "
            f"{mib(copy['base_weight_bytes'])})",
            "–",
            "no second copy of the weights: "
            + _verdict(mem["worker_rss_growth_attach"] < copy["base_weight_bytes"] / 4),
        ),
        (
            "one prompt submitted → its labels, median",
            "–",
            f"{1000 * lat['engine_4']:.0f} ms with 4 tasks (to the first token without: "
            f"{1000 * lat['engine_0']:.0f} ms) vs {1000 * lat['second_copy']:.0f} ms (copy)",
            "–",
        ),
    ]
    tokens = r["prompt_tokens"]
    same = r["generations_identical_with_0_1_4_tasks"]
    caption = (
        f"{r['base']}, {r['engine']}. {r['prompts']} prompts ({r['prompt_source']}; "
        f"{tokens['sum']:,} tokens, {tokens['min']} to {tokens['max']}) × {r['new_tokens']} new "
        f"tokens ({r['sampling']}), {r['rounds']} interleaved rounds, medians of per-round "
        "ratios. Tasks: "
        + ", ".join(f"{n} ({kind})" for n, kind in r["tasks"].items())
        + f"; 1 task = {', '.join(r['task_1'])}; {r['tapped']} tapped; "
        f"{r['untrained_tasks_note']}. Second copy: "
        f"{r['second_copy']}. Measures: {r['measure']}; {r['prefill_note']}. Latency: "
        f"{r['latency_measure']}. "
        f"Greedy generations with 0, 1 and 4 tasks: "
        + ("token-identical. " if same else "**differ**. ")
    )
    lines = [
        "| what | CPU time | wall time | target |",
        "| --- | --- | --- | --- |",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        caption + _source(name, r),
    ]
    return "\n".join(lines)


def _answers(counts: dict[str, int]) -> str:
    return ", ".join(f"{n:,} × {status}" for status, n in counts.items())


def _latency(latency: dict, status: str) -> str:
    x = latency.get(status)
    return "–" if x is None else f"{x['p50']:,.0f} / {x['p99']:,.0f} ms"


def serving_table() -> str:
    """``adalayers serve`` under locust: steady load, overload, drain on SIGTERM."""
    name = "load_test"
    r = _load(name)
    steady, over, drain, server = r["steady"], r["overload"], r["drain"], r["server"]
    memory = r["server_memory_mib"]
    kinds = ", ".join(f"{n} × {k}" for k, n in _counts(r["tasks"].values()).items())
    rejected = {k: v for k, v in over["answers"].items() if k != "200"}
    rows = [
        (
            f"steady, {steady['users']} users, {steady['wall_seconds']:.0f} s",
            f"{steady['requests_per_second']:.1f}",
            f"{steady['ok_per_second']:.1f}",
            _latency(steady["latency_ms"], "200"),
            _answers(steady["answers"]) + (", nothing else" if steady["only_200"] else ""),
        ),
        (
            f"overload, {over['users']} users, {over['wall_seconds']:.0f} s",
            f"{over['requests_per_second']:.1f}",
            f"{over['ok_per_second']:.1f}",
            _latency(over["latency_ms"], "200"),
            _answers(over["answers"])
            + "".join(f" ({k}: {_latency(over['latency_ms'], k)})" for k in rejected)
            + f"; `/health` {over['health_after']} after",
        ),
        (
            f"drain: {drain['users']} users sending {drain['texts_per_request']} × "
            f"{drain['words_per_text']}-word texts, "
            f"SIGTERM after {drain['sigterm_after_seconds']:g} s",
            "–",  # the phase's wall time runs past the server's exit: no rate
            "–",
            _latency(drain["latency_ms"], "200"),
            f"while draining: {_answers(drain['answered_while_draining'])}"
            + (", no 500" if drain["no_5xx_but_503"] else ", **a 5xx other than 503**")
            + f"; exit after {drain['exit_seconds']:.1f} s; after exit: "
            + _answers(drain["connection_errors_after_exit"]),
        ),
    ]
    lines = [
        f"{r['base']}, {len(r['tasks'])} saved tasks ({kinds}); max batch "
        f"{server['max_batch_size']} texts, max wait {server['max_wait_ms']:g} ms, queue "
        f"{server['max_queue']}, drain {server['drain_seconds']:g} s; clients: {r['client']}; "
        f"{r['note']}.",
        "",
        "| phase | requests/s | 200/s | 200: p50 / p99 | answers |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        f"Server RSS: {memory['before']['rss_mib']:,.0f} MiB before, "
        f"{memory['after_steady']['rss_mib']:,.0f} after the steady phase, "
        f"{memory['after_overload']['rss_mib']:,.0f} after the overload, peak "
        f"{memory['at_sigterm']['peak_rss_mib']:,.0f} by SIGTERM; "
        f"{r['mean_texts_per_forward']:.1f} texts per base forward on average.",
        _source(name, r),
    ]
    return "\n".join(lines)


def _counts(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def resume_table() -> str:
    """A run cut mid-epoch and resumed, against the same run not cut."""
    name = "resume_equivalence"
    r = _load(name)
    straight, resumed = r["test_straight"], r["test_resumed"]
    metrics = ("accuracy", "mcc", "f1")

    def scores(x: dict) -> str:
        return ", ".join(
            f"{METRIC_NAMES.get(m, m)} {100 * x[m]:.1f}"
            for m in metrics
            if isinstance(x.get(m), float)
        )

    cut = r["cut_at"]
    rows = [
        ("run", f"`{r['config']}` with " + ", ".join(f"`{o}`" for o in r["overrides"])),
        (
            "cut",
            f"in epoch {cut['epoch']} of {r['epochs']} (the first is 0), its checkpoint at step "
            f"{cut['step_in_epoch']} of the epoch",
        ),
        (
            "every epoch's history (loss, validation, layer weights)",
            "**identical**"
            if r["history_identical"]
            else f"**differs** in epochs {r['epochs_differing']}",
        ),
        ("test, not cut", f"{scores(straight)} ({straight['examples']:,} examples)"),
        ("test, cut and resumed", scores(resumed)),
        ("test metrics", "**identical**" if r["test_identical"] else "**differ**"),
        ("kept head, max abs weight difference", f"{r['kept_head_max_abs_diff']:g}"),
        ("run not cut, time", f"{r['straight_seconds']:.0f} s on {r['torch_threads']} threads"),
    ]
    lines = [
        "| what | result |",
        "| --- | --- |",
        *(f"| {a} | {b} |" for a, b in rows),
        "",
        _source(name, r),
    ]
    return "\n".join(lines)


TUNED = {
    "task.mixer.alpha": "α",
    "train.lr": "lr",
    "task.mixer.dim": "k",
    "task.mixer.dropout": "dropout",
    "task.mixer.cutoff": "cutoff",
    "task.mixer.entropy_weight": "λ",
    "task.mixer.layer_dropout": "layer dropout",
}


def _setting_value(value: float | int | str) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def tune_table() -> str:
    """``adalayers tune`` on CoLA × MiniLM against the α grid of the same config and seed."""
    name = "tune_cola"
    r = _load(name)
    grid, best, counts = r["alpha_grid"], r["best"], r["trials"]
    metric = METRIC_NAMES.get(r["metric"], r["metric"])
    finished = counts.get("complete", 0) + counts.get("pruned", 0)
    seconds = r["wall_seconds_this_call"] or r["study_seconds"]
    load = r["load_average_1_5_15_min"]
    chosen = ", ".join(
        f"{TUNED.get(k, k)} {_setting_value(v)}" for k, v in (best["params"] or {}).items()
    )
    alphas = ", ".join(f"{a:g}" for a in grid["alphas"])
    rows = [
        (
            f"`adalayers tune`: TPE, median pruning, {len(r['space'])} settings",
            f"{finished} ({counts.get('complete', 0)} complete, {counts.get('pruned', 0)} pruned)",
            f"{seconds / 60:.1f} min, {r['jobs']} processes",
            f"**{100 * best['validation']:.1f}**",
            f"{100 * best['test']:.1f}",
            chosen,
        ),
        (
            f"`compare --mixer-grid`: α = {alphas}",
            str(grid["runs"]),
            f"{grid['wall_seconds'] / 60:.1f} min, 1 process",
            f"{100 * grid['validation']:.1f}",
            f"{100 * grid['test']:.1f}",
            f"α {grid['settings']['alpha']:g}",
        ),
    ]
    lines = [
        f"CoLA × MiniLM (`{r['config']}`, seed 0) from the feature cache; {metric} × 100 of the "
        f"run chosen on validation, and its test score. Searched: "
        + ", ".join(
            f"{TUNED.get(k, k)} "
            + (
                "{" + ", ".join(map(str, v["choices"])) + "}"
                if "choices" in v
                else f"{v['low']:g}–{v['high']:g}{' (log)' if v.get('log') else ''}"
            )
            for k, v in r["space"].items()
        )
        + ".",
        "",
        f"| search | runs | wall time | validation {metric} | test {metric} | chosen |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        f"The machine ({r['machine']['cores']} cores) was shared: load average "
        f"{load['start'][0]:.1f} when the search began"
        + (f", {load['end'][0]:.1f} when it ended" if load.get("end") else "")
        + ". The grid's figures: "
        f"`{grid['source']}`.",
        _source(name, r),
    ]
    return "\n".join(lines)


def small_data_table() -> str:
    """Small user datasets: the head on the size-chosen settings against the linear probe, on
    test, mean ± sd over the seeds, per set and training size."""
    name = "small_data-size-defaults"
    r = _load(name)
    sets = {"cola": "CoLA", "imdb": "IMDB (128 tokens)", "conll": "CoNLL-2003 (BIO)"}
    lines = [
        "| set | training examples | metric | head, size-chosen settings | probe, one state "
        "chosen on validation | head − probe | target ≥ +2 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in r["summary"]:
        runs = [x for x in r["runs"] if x["set"] == entry["set"] and x["n"] == entry["n"]]
        head = [100 * x["head_test"] for x in runs]
        probe = [100 * x["probe_test"] for x in runs if x["probe_test"] is not None]
        margin = entry.get("margin")
        lines.append(
            f"| {sets[entry['set']]} | {entry['n']:,} | {METRIC_NAMES[entry['metric']]} "
            f"| {_mean_sd(head)} | {_mean_sd(probe) if probe else '–'} "
            f"| {'–' if margin is None else f'{margin:+.1f}'} "
            f"| {_verdict(bool(entry.get('target_met')))} ({len(runs)} seeds) |"
        )
    validation, test = r["validation_examples"], r["test"]
    return "\n".join(
        [
            *lines,
            "",
            f"Seeded random training sets, written as user files (CSV; CoNLL) with {validation} "
            f"validation examples; test: CoLA {test['cola']}, IMDB {test['imdb']}, CoNLL "
            f"{test['conll']}. The config names only the base, the files and `max_length`: "
            "every training setting is the size's choice. Both figures come from one "
            "`adalayers train` run (its probe check, from the feature cache).",
            "",
            _source(name, r),
        ]
    )


def _dynamic_points() -> dict[tuple[str, str, str], tuple[tuple[str, ...], dict[int, float]]]:
    """(task, base, setting) of a column -> (the dynamic mixer's settings chosen on validation,
    seed -> test metric). Every run with a dynamic row counts, variants too: grouped by what they
    changed bar the mixer's own knobs (:data:`MIXER_ONLY`), each setting of those knobs (α,
    heads; the config's α named where a run kept it) run with the most seeds is a candidate, and
    the one with the best mean validation score is chosen, as the static mixer's α is from its
    grid."""
    out: dict[tuple[str, str, str], tuple[tuple[str, ...], dict[int, float]]] = {}
    for column, candidates in _dynamic_candidates(_dynamic_groups()).items():
        best = _best_on_validation(candidates)
        out[column] = (best, {seed: test for seed, (_, test) in candidates[best].items()})
    return out


def _best_on_validation(candidates: dict[tuple[str, ...], dict[int, tuple[float, float]]]):
    """The setting with the best mean validation score (ties: the first in name order)."""
    return max(
        sorted(candidates), key=lambda k: statistics.mean(v for v, _ in candidates[k].values())
    )


def _dynamic_groups() -> dict[tuple, dict[tuple[str, ...], dict[int, tuple[float, float]]]]:
    """(config, task, base, changes bar the mixer's knobs) -> the mixer's knobs -> seed ->
    (validation, test) of every run with a dynamic row."""
    groups: dict[tuple, dict[tuple[str, ...], dict[int, tuple[float, float]]]] = {}
    for result in _compare_results():
        comparison = result["comparison"]
        row = comparison["rows"].get("dynamic")
        metric = comparison["metric"]
        scores = tuple(
            ((row or {}).get(split) or {}).get(metric) for split in ("validation", "test")
        )
        if None in scores:
            continue
        mixer = _changes(result, mixer=True)
        key = (Path(result["config"]).stem, comparison["task"], comparison["base"])
        key += (_changes(result, mixer=False),)
        setting = tuple(c for c in mixer if c.partition("=")[0] in MIXER_ONLY)
        by_seed = groups.setdefault(key, {}).setdefault(setting, {})
        by_seed.setdefault(_seed(result) or 0, scores)
    return groups


def _dynamic_candidates(
    groups: dict[tuple, dict[tuple[str, ...], dict[int, tuple[float, float]]]],
) -> dict[tuple[str, str, str], dict[tuple[str, ...], dict[int, tuple[float, float]]]]:
    """(task, base, setting) of a column -> its candidate dynamic settings (those run with the
    most seeds) -> seed -> (validation, test); the config's own setting named by its α."""
    out: dict[tuple[str, str, str], dict[tuple[str, ...], dict[int, tuple[float, float]]]] = {}
    for result in _column_runs():
        comparison = result["comparison"]
        key = (Path(result["config"]).stem, comparison["task"], comparison["base"])
        settings = groups.get(key + (_changes(result, mixer=False),))
        column = (comparison["task"], comparison["base"], _setting(result))
        if not settings or column in out:
            continue
        most = max(len(runs) for runs in settings.values())
        config = yaml.safe_load((ROOT / result["config"]).read_text())
        own = (f"task.mixer.alpha={config['task']['mixer']['alpha']:g}",)
        out[column] = {_named(k, own): runs for k, runs in settings.items() if len(runs) == most}
    return out


def dynamic_grid_table() -> str:
    """Every dynamic setting run on a column with its seeds: validation and test means, the
    one :func:`_dynamic_points` chooses in bold."""
    cells = _cells()
    columns, _ = _columns(cells)
    candidates = _dynamic_candidates(_dynamic_groups())
    lines = [
        "| task × base | α | heads | seeds | validation | test |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, title in columns:
        if key not in candidates:
            continue
        for setting, runs in sorted(candidates[key].items(), key=lambda kv: _knobs(kv[0])):
            alpha, heads = _knobs(setting)
            val = [100 * v for v, _ in runs.values()]
            test = [100 * t for _, t in runs.values()]
            mark = "**" if setting == _best_on_validation(candidates[key]) else ""
            lines.append(
                f"| {title} | {alpha:g} | {heads} | {len(runs)} | {mark}{_mean_sd(val)}{mark} "
                f"| {_mean_sd(test)} |"
            )
    return "\n".join(lines)


def _named(setting: tuple[str, ...], own: tuple[str, ...]) -> tuple[str, ...]:
    """A setting of the mixer's knobs with the config's α named where it kept it."""
    if any(c.startswith("task.mixer.alpha=") for c in setting):
        return tuple(sorted(setting))
    return tuple(sorted(setting + own))


def _knobs(setting: tuple[str, ...]) -> tuple[float, int]:
    """(α, heads) of a dynamic setting."""
    knobs = dict(c.partition("=")[::2] for c in setting)
    return float(knobs.get("task.mixer.alpha", "nan")), int(knobs.get("task.mixer.heads", "1"))


def dynamic_columns_table() -> str:
    """Every column with a dynamic-mixer row: its test mean against the rows it must beat (the
    uniform mix and the best single layer, by one point) and the static mixer. The dynamic
    mixer's α is chosen on validation among those it was run with (:func:`_dynamic_points`);
    its run at the config's α is shown beside it."""
    cells = _cells()
    columns, _ = _columns(cells)
    points = _baseline_points(cells)
    chosen = _dynamic_points()
    kinds = ("dynamic", "mixer_chosen", "uniform", "best_single_layer", "scalar_mix", "probe")
    lines = [
        "| task × base | dynamic mixer, α and heads chosen on validation "
        "| dynamic mixer, config's α "
        "| static mixer, α chosen on validation | uniform mix "
        "| best single layer | scalar mix | probe, one state | dynamic − uniform "
        "| dynamic − best single | ≥ +1 over both |",
        "| --- |" + " --- |" * 10,
    ]
    met = total = 0
    for key, title in columns:
        found = points.get(key, {})
        if "dynamic" not in found or key not in chosen:
            continue
        setting, by_seed = chosen[key]
        picked = [100 * by_seed[s] for s in sorted(by_seed)]
        knobs = dict(c.partition("=")[::2] for c in setting)
        alpha, heads = knobs.pop("task.mixer.alpha", None), knobs.pop("task.mixer.heads", "1")
        note = ", ".join(
            ([f"α = {alpha}"] if alpha else [])
            + ([f"{heads} heads"] if heads != "1" else [])
            + [f"{k}={v}" for k, v in knobs.items()]
        )
        means = {k: statistics.mean(found[k][0]) for k in kinds if k in found}
        means["dynamic"] = statistics.mean(picked)
        cells_text = [f"{_mean_sd(picked)} (n = {len(picked)}, {note})"] + [
            f"{_mean_sd(found[k][0])} (n = {len(found[k][0])})" if k in found else "–"
            for k in kinds
        ]
        gaps = [
            means["dynamic"] - means[k] if k in means else None
            for k in ("uniform", "best_single_layer")
        ]
        ok = all(g is not None and round(g, 1) >= 1.0 for g in gaps)
        met, total = met + ok, total + 1
        gap_text = ["–" if g is None else f"{round(g, 1) + 0.0:+.1f}" for g in gaps]  # no -0.0
        lines.append(
            f"| {title} | " + " | ".join(cells_text + gap_text) + f" | {'yes' if ok else 'no'} |"
        )
    lines += ["", f"Met on {met} of {total} columns (the target: 4 of the 5 the issue names)."]
    return "\n".join(lines)


# marker name -> the function that writes the table between the markers
GENERATORS = {
    "dynamic-columns": dynamic_columns_table,
    "small-data": small_data_table,
    "streaming": streaming_table,
    "memory": memory_table,
    "cache-speed": cache_speed_table,
    "baselines": baselines_table,
    "runtime": runtime_table,
    "dynamic-mixer": dynamic_mixer_table,
    "dynamic-grid": dynamic_grid_table,
    "dynamic-weights": dynamic_weights_table,
    "mixed-precision": mixed_precision_table,
    "embed-side-tasks": embed_table,
    "vllm-side-tasks": vllm_table,
    "serving": serving_table,
    "resume": resume_table,
    "tune": tune_table,
    "tasks": tasks_table,
    "compare": compare_table,
    "targets": targets_table,
    "variants": variants_table,
    "seeds": seeds_table,
    "grid-seeds": grid_seeds_table,
}
ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def documents() -> list[Path]:
    """The files whose tables are generated: BENCHMARKS.md and docs/experiments/*.md."""
    return [ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs" / "experiments").glob("*.md"))]


def render(text: str) -> str:
    """``text`` with every ``<!-- table: NAME -->`` ... ``<!-- /table -->`` block regenerated.

    Raises:
        ValueError: a marker names no table of :data:`GENERATORS`.
    """

    def table(match: re.Match) -> str:
        name = match.group(2)
        if name not in GENERATORS:
            raise ValueError(f"unknown table {name!r}; known: {', '.join(GENERATORS)}")
        return f"{match.group(1)}\n{GENERATORS[name]()}\n\n{match.group(4)}"

    return MARKER.sub(table, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=GENERATORS, help="print this table")
    parser.add_argument("--write", action="store_true", help="regenerate the tables in the docs")
    parser.add_argument("--check", action="store_true", help="fail if a doc's tables are stale")
    for name in ("compare", "variants", "seeds", "targets", "grid-seeds"):  # older spellings
        parser.add_argument(f"--{name}", action="store_true", help=f"= --table {name}")
    args = parser.parse_args()
    if args.write or args.check:
        stale = []
        for path in documents():
            text = path.read_text()
            new = render(text)
            if new != text:
                stale.append(path.relative_to(ROOT))
                if args.write:
                    path.write_text(new)
        verb = "rewrote" if args.write else "stale"
        print("\n".join(f"{verb}: {p}" for p in stale) or "tables up to date")
        return 1 if stale and args.check else 0
    name = args.table or next(
        (n for n in GENERATORS if getattr(args, n.replace("-", "_"), False)), "tasks"
    )
    print(GENERATORS[name]())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
