"""Baselines through the same pipeline, same head and same training budget, and one comparison.

Every baseline but ``finetune`` is the task of the config with one mixer setting changed:

    mixer       the config as it is (the AdaLayers mixer)
    sweep       one run per hidden state i:  task.mixer.single_layer = i
    last        the last state only:          task.mixer.single_layer = -1 (with the sweep,
                its last row: the same run, not trained twice)
    uniform     fixed equal weights:          task.mixer.freeze_distribution = true (p stays 0;
                a dynamic config's uniform row is static: mode = adalayers)
    scalar_mix  ELMo's scalar mix:            task.mixer.mode = scalar_mix
    dynamic     per-token layer weights:      task.mixer.mode = dynamic
    finetune    the whole base fine-tuned under a standard head (:mod:`adalayers.training.finetune`)
    probe       no head, no mixer: a logistic regression on the frozen states
                (:func:`adalayers.training.probe.probe_baseline`), two rows from one pass of the
                base: ``probe`` (one state, chosen on validation) and ``probe_concat`` (every
                state's features concatenated)

The config's ``task.mixer.layer_dropout`` applies to every row that mixes several states
(mixer, uniform, scalar_mix) and is a no-op for the single states.

A mixer grid (``mixer_grid={"alpha": [1, 4, 16]}``, ``--mixer-grid alpha=1,4,16``) adds one
``mixer`` row per other setting of the mixer's own knobs (``alpha``, ``cutoff``,
``entropy_weight``: the ones the baselines do not have), named like ``mixer_alpha4``; the
comparison names the mixer row with the best validation score (``mixer_chosen``), so "the mixer
with its settings chosen on validation" is one command and one reading, not a hand pick. The
grid's rows are the trials of an Optuna study with a ``GridSampler``, run through the search loop
of ``adalayers tune`` (:func:`adalayers.training.tune.search`; Optuna is the ``tune`` extra).

:func:`compare` writes one run folder per row under the output folder (``layer_<i>`` for the
sweep), then ``comparison.json`` (row -> metrics, parameters added, train and wall time) and
``report.html`` (:func:`adalayers.report.write_report`). With ``train.cache: true`` the
mixer-family runs store every hidden state once (``cache.all_layers``) and share that store, so
the sweep never runs the base again. ``comparison.json`` is rewritten after every row
(``"complete": false`` and the ``pending`` rows until the last), so a call cut off keeps the rows
it finished; repeating the command reuses finished runs and resumes interrupted ones.

``jobs=N`` (``--jobs N``) trains N rows at once, each in a spawned process with ``1/N`` of the
torch threads: the small heads here cannot keep every thread of a CPU busy, so on two cores two
one-thread rows train more rows per hour than one two-thread row. Rows that read one feature
store build it once (its lock file).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from adalayers.core._schema import build
from adalayers.training.cache_prep import with_cache_dir
from adalayers.training.checkpoint import has_checkpoint
from adalayers.training.config import RunConfig, load_config, parse_override
from adalayers.training.evaluate import NESTED
from adalayers.training.run import CHECKPOINT_DIR, CONFIG, METRICS, write_json
from adalayers.training.train import fit

logger = logging.getLogger(__name__)

BASELINES = ("mixer", "sweep", "last", "uniform", "scalar_mix", "dynamic", "finetune", "probe")
COMPARISON = "comparison.json"
REPORT = "report.html"
GRID_KEYS = ("alpha", "cutoff", "entropy_weight")
"""The mixer settings a grid may search: the distribution's own, which no baseline has."""


def parse_baselines(text: str | Sequence[str]) -> list[str]:
    """``"mixer,sweep"`` -> ``["mixer", "sweep"]``; unknown names raise a ``ValueError``."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown or not names:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {','.join(BASELINES)}")
    return list(dict.fromkeys(names))


def parse_mixer_grid(items: Sequence[str] | None) -> dict[str, list[Any]]:
    """``["alpha=1,4,16", "cutoff=0,0.01"]`` -> ``{"alpha": [1, 4, 16], "cutoff": [0, 0.01]}``.

    A key may also be written ``task.mixer.alpha``; values are read as YAML, like ``--set``.

    Raises:
        ValueError: not ``KEY=V1,V2,...``, a key outside :data:`GRID_KEYS`, a key given twice, or
            no value.
    """
    grid: dict[str, list[Any]] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--mixer-grid {item!r}: expected KEY=V1,V2,..., e.g. alpha=1,4,16")
        key, raw = item.split("=", 1)
        key = key.strip().removeprefix("task.mixer.")
        if key not in GRID_KEYS:
            raise ValueError(
                f"--mixer-grid {item!r}: {key!r} cannot be searched; choose from "
                f"{', '.join(GRID_KEYS)} (the mixer's own settings; the others are shared with "
                f"the baselines: change them with --set)"
            )
        if key in grid:
            raise ValueError(f"--mixer-grid: {key!r} is given twice; list its values once")
        values = [parse_override(f"{key}={v}")[1] for v in raw.split(",") if v.strip()]
        if not values:
            raise ValueError(f"--mixer-grid {item!r}: no values for {key!r}")
        grid[key] = list(dict.fromkeys(values))
    return grid


def _grid_name(settings: Mapping[str, Any]) -> str:
    return "mixer_" + "_".join(
        f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in settings.items()
    )


def num_states(config: RunConfig) -> int:
    """``L + 1`` of the config's base, from its config alone (built on the meta device)."""
    from transformers import AutoConfig, AutoModel

    from adalayers.core.backbone import Backbone, resolve_model_path

    extra = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    try:
        hf_config = AutoConfig.from_pretrained(resolve_model_path(config.base), **extra)
    except OSError as err:
        raise OSError(
            f"could not load the config of base model {config.base!r}: {err}. Give a local "
            f"folder, or a hub id with network access."
        ) from err
    with torch.device("meta"):
        model = AutoModel.from_config(hf_config)
    return Backbone(model, states=config.base_states).num_states


def _derive(config: RunConfig, **mixer: Any) -> RunConfig:
    """``config`` with mixer settings changed (validated as a config file would be)."""
    values = config.to_dict()
    values["task"]["mixer"].update(mixer)
    if config.train.cache:
        values["cache"]["all_layers"] = True  # one store for every mixer-family run
    return build(RunConfig, values)


def plan(
    config: RunConfig,
    baselines: str | Sequence[str],
    states: int,
    mixer_grid: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, RunConfig]:
    """Row name -> the config of that run (``finetune`` keeps the config as it is).

    ``mixer_grid`` adds, after the ``mixer`` row, one row per combination of its values that
    differs from the config's own (:func:`parse_mixer_grid`).

    Raises:
        ValueError: ``cache.layers`` is set with the cache on (the sweep reads every state), or
            a grid without the ``mixer`` baseline, or a grid value the mixer refuses.
    """
    if config.train.cache and config.cache.layers is not None:
        raise ValueError(
            "compare with train.cache needs every hidden state stored; unset cache.layers "
            "(the probe) so all baselines share one store"
        )
    mixer = config.task.mixer
    rows: dict[str, RunConfig] = {}
    for name in parse_baselines(baselines):
        if name == "mixer":
            rows[name] = _derive(config)
            for name_, cfg in _grid_rows(config, mixer_grid or {}):
                rows.setdefault(name_, cfg)
        elif name == "sweep":
            chosen = range(states) if mixer.layers is None else mixer.layer_indices(states)
            for i in chosen:  # the config's layers, else every state
                rows[f"layer_{i}"] = _derive(config, single_layer=i, layers=None)
        elif name == "last":
            rows[name] = _derive(config, single_layer=-1, layers=None)
        elif name == "uniform":
            static = "adalayers" if mixer.mode == "dynamic" else mixer.mode
            rows[name] = _derive(config, freeze_distribution=True, mode=static)
        elif name == "dynamic":
            rows[name] = _derive(config, mode="dynamic")
        elif name == "probe":  # one fit makes both rows
            rows["probe"] = rows["probe_concat"] = config
        elif name == "scalar_mix":
            rows[name] = _derive(config, mode="scalar_mix", cutoff=0.0, entropy_weight=0.0)
        else:
            rows[name] = config
    if mixer_grid and "mixer" not in rows:
        raise ValueError("--mixer-grid searches the mixer's settings: add mixer to --baselines")
    return rows


def _grid_rows(config: RunConfig, grid: Mapping[str, Sequence[Any]]) -> list[tuple[str, RunConfig]]:
    out = []
    for values in itertools.product(*grid.values()):
        settings = dict(zip(grid, values))
        name = _grid_row(config, grid, settings)
        if name == "mixer":
            continue  # the config's own setting: the mixer row itself
        try:
            out.append((name, _derive(config, **settings)))
        except ValueError as err:
            raise ValueError(f"--mixer-grid {settings}: {err}") from None
    return out


def _grid_row(
    config: RunConfig, grid: Mapping[str, Sequence[Any]], settings: Mapping[str, Any]
) -> str:
    """The row of a grid point: ``mixer`` where it is the config's own setting, else its name
    (:func:`_grid_name`, the keys in the grid's order)."""
    own = config.task.mixer
    if all(getattr(own, k) == v for k, v in settings.items()):
        return "mixer"
    return _grid_name({k: settings[k] for k in grid})


def _search_grid(
    config: RunConfig,
    grid: Mapping[str, Sequence[Any]],
    rows: Mapping[str, Mapping[str, Any]],
    asked: dict[str, tuple[Any, Any]],
    train_rows: Any,
) -> None:
    """Run ``train_rows()`` (every row to train) with the grid's rows as the trials of one
    Optuna study with a ``GridSampler``, through the search loop of ``adalayers tune``
    (:func:`adalayers.training.tune.search`). The whole grid is asked for at once, so its rows
    train beside the other baselines (``jobs``): a row reused from an earlier call is told at
    once, one trained here when it finishes (``asked``: row -> (trial, tell), which the
    caller's ``finished`` pops).

    Raises:
        ImportError: Optuna is not installed (naming its package).
    """
    import math

    from adalayers.training import tune  # Optuna: the tune extra
    from adalayers.training.config import SearchRange

    space = {f"task.mixer.{k}": SearchRange(choices=list(v)) for k, v in grid.items()}
    sampler = tune.GridSampler(
        {key: values.choices for key, values in space.items()}, seed=config.train.seed
    )
    study = tune.make_study(None, None, seed=None, prune=False, sampler=sampler)
    points = math.prod(len(values) for values in grid.values())

    def train(proposals: list[Any], tell: Any) -> None:
        for trial, settings in proposals:
            point = {key.removeprefix("task.mixer."): v for key, v in settings.items()}
            name = _grid_row(config, grid, point)
            if name in rows:
                tell(trial, _validation_score(rows[name]))
            else:
                asked[name] = (trial, tell)
        train_rows()

    tune.search(study, space, points, train, batch=points)


def _validation_score(row: Mapping[str, Any]) -> float:
    return float(row["validation"][row["metric"]])


def choose_mixer(rows: Mapping[str, Mapping[str, Any]], metric: str) -> str | None:
    """The mixer row (the config's or a grid row) with the best validation score; ties go to the
    earlier row (the config's own first)."""
    best, best_score = None, None
    for name, row in rows.items():
        if row.get("baseline") not in ("mixer", "mixer_grid"):
            continue
        score = (row.get("validation") or {}).get(metric)
        if score is not None and (best_score is None or score > best_score):
            best, best_score = name, score
    return best


def _kind(name: str) -> str:
    if name.startswith("mixer_"):
        return "mixer_grid"
    return "single_layer" if name.startswith("layer_") else name


def _same_config(saved: RunConfig, planned: RunConfig) -> bool:
    """Whether a row's saved ``config.yaml`` is the run ``planned`` would make: a cached run
    records its resolved ``cache.dir`` (:func:`~adalayers.training.cache_prep.with_cache_dir`),
    and a run saved before it did records none."""
    if saved.train.cache and planned.train.cache:
        return with_cache_dir(saved) == with_cache_dir(planned)
    return saved == planned


def _row(name: str, run: Path, results: dict[str, Any], wall: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run": run.name,
        "baseline": _kind(name),
        "layer": int(name.split("_")[1]) if name.startswith("layer_") else results.get("layer"),
        "metric": results.get("metric"),
    }
    for split in ("validation", "test"):
        if split in results:
            row[split] = {k: v for k, v in results[split].items() if k not in NESTED}
    for key in ("parameters_added", "percent_of_base", "best_epoch", "epochs_run"):
        row[key] = results.get(key)
    row["train_seconds"] = results.get("train_seconds")
    row["wall_seconds"] = None if wall is None else round(wall, 2)
    if "layer_weights" in results:
        row["layer_weights"] = results["layer_weights"]
    return row


def compare(
    config: RunConfig,
    baselines: str | Sequence[str],
    output_dir: str | os.PathLike,
    *,
    finetune_lr: float | None = None,
    mixer_grid: Mapping[str, Sequence[Any]] | None = None,
    quiet: bool = False,
    overwrite: bool = False,
    jobs: int = 1,
) -> dict[str, Any]:
    """Train the chosen baselines of ``config`` and write ``comparison.json`` and ``report.html``.

    Args:
        config: the run configuration (the ``mixer`` row trains it as it is).
        baselines: names from :data:`BASELINES` (a list or ``"a,b,c"``).
        output_dir: the comparison folder; one run folder per row goes inside.
        finetune_lr: the fine-tuning learning rate (default
            :data:`adalayers.training.finetune.DEFAULT_LR`).
        mixer_grid: other values of the mixer's own settings to train as extra mixer rows,
            e.g. ``{"alpha": [1, 4, 16]}``; ``mixer_chosen`` names the best on validation.
        quiet: no progress bars.
        overwrite: train every row again instead of reusing finished runs.
        jobs: rows trained at once, each in a process of its own with ``1/jobs`` of this
            process's torch threads (see :func:`_train_rows`). On a CPU whose threads a small
            head cannot keep busy, ``jobs=2`` trains more rows per hour.

    Returns:
        The comparison (also written to ``comparison.json``).

    Raises:
        FileExistsError: a finished run in ``output_dir`` was trained with another config.
        ValueError: ``jobs`` below 1, or above 1 under ``accelerate launch`` / ``torchrun``.
    """
    from adalayers.report import write_report

    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "--jobs trains rows in processes of its own; under accelerate launch or torchrun "
            "the processes already share every row: leave --jobs at 1"
        )
    from adalayers.training.size_defaults import resolve_config

    out = Path(output_dir)
    names = parse_baselines(baselines)
    config, _, _ = resolve_config(config)  # user data: every row on the size-chosen settings
    states = num_states(config)
    rows_plan = plan(config, names, states, mixer_grid)
    out.mkdir(parents=True, exist_ok=True)
    previous = {}
    if (out / COMPARISON).is_file() and not overwrite:
        previous = json.loads((out / COMPARISON).read_text()).get("rows", {})
    rows: dict[str, Any] = {}
    order = list(rows_plan)
    last_layer = f"layer_{states - 1}"
    # with the sweep before it, "last" is the sweep's last row: the same run, not trained twice
    same_as_last = (
        "last" in rows_plan
        and last_layer in rows_plan
        and order.index(last_layer) < order.index("last")
    )
    todo: list[tuple[str, RunConfig, bool]] = []  # (row, config, resume)
    for name, cfg in rows_plan.items():
        if name == "last" and same_as_last:
            continue
        run = out / name
        saved = run / CONFIG
        if (run / METRICS).is_file() and not overwrite:
            expected = cfg if name != "finetune" else None
            if expected is not None and not _same_config(load_config(saved), expected):
                raise FileExistsError(
                    f"{run} was trained with another config than this comparison's; pass "
                    f"--overwrite or choose another --output-dir"
                )
            logger.info("%s: reusing the finished run in %s", name, run)
            results = json.loads((run / METRICS).read_text())
            rows[name] = _row(name, run, results, previous.get(name, {}).get("wall_seconds"))
            continue
        if name == "probe_concat":
            continue  # fitted by the probe row
        resume = (
            name not in ("finetune", "probe")
            and not overwrite
            and has_checkpoint(run / CHECKPOINT_DIR)
            and saved.is_file()
            and _same_config(load_config(saved), cfg)
        )
        todo.append((name, cfg, resume))

    def same_run(name: str) -> None:
        if same_as_last and name == last_layer:
            rows["last"] = {**rows[last_layer], "baseline": "last", "layer": None}
            rows["last"]["same_run_as"] = last_layer

    grid_trials: dict[str, tuple[Any, Any]] = {}  # row -> (trial, tell) of the grid's study

    def finished(name: str, results: dict[str, Any], wall: float) -> None:
        rows[name] = _row(name, out / name, results, wall)
        same_run(name)
        if name == "probe":  # its fit wrote the concatenation's row too
            concat = json.loads((out / "probe_concat" / METRICS).read_text())
            rows["probe_concat"] = _row("probe_concat", out / "probe_concat", concat, wall)
        if name in grid_trials:
            trial, tell = grid_trials.pop(name)
            tell(trial, _validation_score(rows[name]))
        if len(rows) < len(rows_plan):  # the rows so far, in case the call is cut off
            _summarize(
                config, names, _ordered(rows, order), rows_plan, mixer_grid, out, complete=False
            )

    if last_layer in rows:  # reused
        same_run(last_layer)

    def train_rows() -> None:
        _train_rows(todo, out, finished, jobs=jobs, finetune_lr=finetune_lr, quiet=quiet)

    if mixer_grid:
        _search_grid(config, mixer_grid, rows, grid_trials, train_rows)
    else:
        train_rows()
    rows = _ordered(rows, order)
    comparison = _summarize(config, names, rows, rows_plan, mixer_grid, out, complete=True)
    if comparison.get("mixer_chosen"):
        logger.info("mixer chosen on validation: %s", comparison["mixer_chosen"])
    if os.environ.get("RANK", "0") == "0":  # one writer under torchrun / accelerate launch
        title = f"{config.data.task} on {config.base}"
        runs = [out / name for name, row in rows.items() if "same_run_as" not in row]
        write_report(runs, out / REPORT, title=title)
    return comparison


def _ordered(rows: dict[str, Any], order: Sequence[str]) -> dict[str, Any]:
    """``rows`` in the plan's order (rows finish out of order under ``jobs > 1``)."""
    return {name: rows[name] for name in order if name in rows}


def _train_row(
    name: str,
    cfg: RunConfig,
    run: Path,
    resume: bool,
    finetune_lr: float | None,
    quiet: bool,
) -> tuple[dict[str, Any], float]:
    """Train one row in ``run``: its results and wall time."""
    from adalayers.training.finetune import finetune
    from adalayers.training.probe import probe_baseline

    logger.info("%s: training in %s", name, run)
    start = time.perf_counter()
    if name == "finetune":
        results = finetune(cfg, run, lr=finetune_lr, quiet=quiet, overwrite=True)
    elif name == "probe":
        results = probe_baseline(cfg, run, run.parent / "probe_concat")
    else:
        results = fit(cfg, run, resume=resume, quiet=quiet, overwrite=not resume)
    return results, time.perf_counter() - start


def init_worker(threads: int, level: int) -> None:
    """A process of ``compare --jobs`` (or ``tune --jobs``): its share of the threads, and the
    parent's log level."""
    torch.set_num_threads(threads)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.WARNING,
    )
    logging.getLogger("adalayers").setLevel(level)
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _train_rows(
    todo: Sequence[tuple[str, RunConfig, bool]],
    out: Path,
    finished: Any,
    *,
    jobs: int,
    finetune_lr: float | None,
    quiet: bool,
) -> None:
    """Train the ``todo`` rows and call ``finished(name, results, wall)`` after each.

    With ``jobs > 1`` up to ``jobs`` rows train at once, each in a fresh (spawned) process with
    ``torch.get_num_threads() // jobs`` threads and no progress bars. Rows that share a feature
    store build it once (its lock, :func:`adalayers.training.cache.open_or_build`). A row that fails
    stops the rows not yet started; the running ones finish and are kept, then the error is
    raised. The thread count changes float rounding, so a row can differ from the same row
    trained with ``jobs=1`` in the last digits.
    """
    if jobs == 1 or len(todo) <= 1:
        for name, cfg, resume in todo:
            finished(name, *_train_row(name, cfg, out / name, resume, finetune_lr, quiet))
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, torch.get_num_threads() // jobs)
    level = logging.getLogger("adalayers").getEffectiveLevel()
    logger.info("training %d rows, %d at a time, %d torch threads each", len(todo), jobs, threads)
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(todo)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(threads, level),
    ) as pool:
        futures = {
            pool.submit(_train_row, name, cfg, out / name, resume, finetune_lr, True): name
            for name, cfg, resume in todo
        }
        pending, error = set(futures), None
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                if future.cancelled():
                    continue
                if future.exception() is None:
                    finished(futures[future], *future.result())
                elif error is None:
                    error = future.exception()
                    for other in pending:
                        other.cancel()  # rows not started; the running ones finish
        if error is not None:
            raise error


def _summarize(
    config: RunConfig,
    names: list[str],
    rows: dict[str, Any],
    rows_plan: Mapping[str, RunConfig],
    mixer_grid: Mapping[str, Sequence[Any]] | None,
    out: Path,
    *,
    complete: bool,
) -> dict[str, Any]:
    """The comparison of the rows trained so far, written to ``comparison.json``
    (``"complete": false`` until every planned row is in)."""
    first = next(iter(rows.values()))
    comparison = {
        "task": config.data.task,
        "base": config.base,
        "metric": first["metric"],
        "baselines": names,
        "complete": complete,
        "rows": rows,
        "report": REPORT,
    }
    if not complete:
        comparison["pending"] = [name for name in rows_plan if name not in rows]
    if mixer_grid:
        comparison["mixer_grid"] = {k: list(v) for k, v in mixer_grid.items()}
        comparison["mixer_chosen"] = choose_mixer(rows, first["metric"])
        for name, row in rows.items():
            if row["baseline"] in ("mixer", "mixer_grid"):
                mixer = rows_plan[name].task.mixer
                row["settings"] = {k: getattr(mixer, k) for k in mixer_grid}
    if os.environ.get("RANK", "0") == "0":  # one writer under torchrun / accelerate launch
        write_json(out / COMPARISON, comparison)
    return comparison
