"""Hyper-parameter search on Optuna: :func:`tune` (``adalayers tune``), and :func:`search`, the
one search loop that ``tune`` and ``compare --mixer-grid`` both run.

The search space is the config's ``tune`` section (:class:`~.config.SearchRange` per dotted
setting of ``task.mixer``, ``task.head`` or ``train``), checked when the config loads. A study
maximises the validation score that picks a run's best epoch (``train.metric``, else the task's
primary metric). :func:`search` asks the study for trials, suggests each trial's settings from
the space (:func:`suggest`), has them trained and tells the study each outcome, until the study
holds ``trials`` finished (complete or pruned) trials: ``tune`` trains one trial at a time with
TPE, reporting every epoch's validation score to a median pruner through the training loop's
callbacks; ``compare --mixer-grid`` asks for the whole grid at once (a ``GridSampler``) and
trains its rows with the other baselines (:func:`adalayers.training.compare.compare`).

:func:`tune` writes into its output folder::

    study.db           the Optuna storage (unless --storage names another)
    trials/0007/       each trial's run folder (as `adalayers train` writes it, no checkpoint)
    best/              a copy of the best trial's run folder: config.yaml, model/, metrics.json
    tune.json          the study: the space, every trial (settings, state, validation, test),
                       the best trial and the test score of its run

Calling it again with the same storage and study name resumes the study (``load_if_exists``):
only the trials still missing are trained. Several processes may share one storage (``jobs``,
or separate ``adalayers tune`` commands on one ``--storage``), each asking for the next trial;
with ``train.cache`` the feature stores are built once before the first trial (their lock makes
any other process wait for them), and every trial opens them without running the base.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

try:
    import optuna
except ImportError as err:  # the tune extra
    raise ImportError(
        "adalayers tune and compare --mixer-grid need Optuna: pip install optuna "
        "(or pip install 'adalayers[tune]')"
    ) from err

import torch

from adalayers.training.cache_prep import cached_config
from adalayers.training.config import RunConfig, SearchRange, setting_type, with_settings
from adalayers.training.run import CHECKPOINT_DIR, write_json
from adalayers.training.tracking import flat_config
from adalayers.training.train import TrainingInterrupted, fit

logger = logging.getLogger(__name__)

TRIALS_DIR = "trials"
BEST_DIR = "best"
SUMMARY = "tune.json"
STORAGE = "study.db"
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

Proposal = tuple[optuna.trial.Trial, dict[str, Any]]
"""A trial the study asked for and its settings (dotted key -> value)."""
Outcome = float | BaseException
"""What a trial gave: its validation score, ``optuna.TrialPruned``, or the error that failed it."""
Tell = Callable[[optuna.trial.Trial, Outcome], None]


def suggest(trial: optuna.trial.Trial, space: Mapping[str, SearchRange]) -> dict[str, Any]:
    """The settings of ``trial``: one value per entry of ``space`` (Optuna's ``suggest_*``)."""
    settings: dict[str, Any] = {}
    for key, values in space.items():
        if values.choices is not None:
            settings[key] = trial.suggest_categorical(key, values.choices)
        elif setting_type(key) is int:
            step = int(values.step or 1)
            settings[key] = trial.suggest_int(
                key, values.low, values.high, step=step, log=values.log
            )
        else:
            settings[key] = trial.suggest_float(
                key, values.low, values.high, step=values.step, log=values.log
            )
    return settings


def finished_trials(study: optuna.Study) -> int:
    """Trials of the study that are complete or pruned (failed and running ones not counted)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def search(
    study: optuna.Study,
    space: Mapping[str, SearchRange],
    trials: int,
    train: Callable[[list[Proposal], Tell], None],
    *,
    batch: int = 1,
) -> None:
    """The search loop: ask the study for up to ``batch`` trials at a time, suggest their settings
    from ``space``, have ``train`` train them, tell the study each outcome; until the study holds
    ``trials`` finished trials (other processes' included), asking at most as many trials as
    were missing when the call began.

    Args:
        study: the study (its sampler proposes, its pruner prunes).
        space: dotted setting -> the values to try.
        trials: finished trials to reach.
        train: trains the proposals and calls ``tell(trial, outcome)`` for each as it ends
            (a score, ``optuna.TrialPruned``, or an error); a trial it does not tell fails.
        batch: trials asked at once (``compare``'s grid: all of them, trained in parallel rows).

    Raises:
        Whatever ``train`` raises, after the trials it had not told are marked failed.
    """
    pending: dict[int, optuna.trial.Trial] = {}  # asked, not told yet

    def tell(trial: optuna.trial.Trial, outcome: Outcome) -> None:
        pending.pop(trial.number, None)
        _tell(study, trial, outcome)

    budget = trials - finished_trials(study)
    while budget > 0:
        missing = trials - finished_trials(study)
        if missing <= 0:
            break
        proposals = []
        for _ in range(min(batch, missing, budget)):
            trial = study.ask()
            proposals.append((trial, suggest(trial, space)))
        budget -= len(proposals)
        pending.update((trial.number, trial) for trial, _ in proposals)
        try:
            train(proposals, tell)
        finally:
            for trial in list(pending.values()):
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            pending.clear()


def _tell(study: optuna.Study, trial: optuna.trial.Trial, outcome: Outcome) -> None:
    if isinstance(outcome, optuna.TrialPruned):
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    elif isinstance(outcome, BaseException) or math.isnan(outcome):
        if isinstance(outcome, BaseException):
            trial.set_user_attr("error", f"{type(outcome).__name__}: {outcome}"[:1000])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, float(outcome))


class _ReportToPruner:
    """The loop callback of a trial: report each epoch's validation score to the study and stop
    the training (``optuna.TrialPruned``) where the pruner says so."""

    def __init__(self, trial: optuna.trial.Trial) -> None:
        self.trial = trial

    def __call__(self, record: dict[str, Any]) -> None:
        epoch, score = int(record["epoch"]), float(record["score"])
        self.trial.report(score, step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"epoch {epoch}: validation {record['metric']} {score:.4f}, below the median "
                f"of the earlier trials at that epoch"
            )


def run_trial(
    config: RunConfig,
    out: Path,
    trial: optuna.trial.Trial,
    settings: Mapping[str, Any],
    *,
    prune: bool,
) -> Outcome:
    """Train one trial of ``tune`` in ``out/trials/<number>``: its validation score, or
    ``optuna.TrialPruned``, or the ``ValueError`` of a setting the config or the task refused
    (the trial fails, the search goes on). Other errors are raised."""
    run = out / TRIALS_DIR / f"{trial.number:04d}"
    trial.set_user_attr("run", str(run.absolute()))
    shown = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in settings.items())
    logger.info("trial %d: %s", trial.number, shown)
    start = time.perf_counter()
    try:
        results = fit(
            with_settings(config, settings),
            run,
            quiet=True,
            overwrite=True,
            callbacks=[_ReportToPruner(trial)] if prune else [],
        )
    except optuna.TrialPruned as pruned:
        logger.info("trial %d pruned: %s", trial.number, pruned)
        return pruned
    except TrainingInterrupted:  # a trial is not resumed: its study is
        raise TrainingInterrupted(
            f"stopped in trial {trial.number}; run the same adalayers tune command again to "
            f"resume the study (the trials it misses are trained anew)"
        ) from None
    except ValueError as err:
        logger.warning("trial %d failed (%s): %s", trial.number, shown, err)
        return err
    finally:
        shutil.rmtree(run / CHECKPOINT_DIR, ignore_errors=True)  # a trial is not resumed
        trial.set_user_attr("wall_seconds", round(time.perf_counter() - start, 2))
    metric = results["metric"]
    score = results["validation"][metric]
    trial.set_user_attr("metric", metric)
    trial.set_user_attr("test", (results.get("test") or {}).get(metric))
    for key in ("best_epoch", "epochs_run", "train_seconds"):
        trial.set_user_attr(key, results.get(key))
    logger.info("trial %d: validation %s %.4f", trial.number, metric, score)
    return score


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's ``GridSampler`` for the ask-and-tell loop of :func:`search`: it does not call
    ``study.stop()`` after the last grid point, which outside ``study.optimize`` raises a
    ``RuntimeError`` (optuna/optuna#5141); :func:`search` stops by counting the trials."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        pass


def make_study(
    storage: str | None,
    name: str | None,
    *,
    seed: int | None,
    prune: bool = True,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """Create the study, or load it where ``storage`` holds one of that name: TPE (seeded,
    ``constant_liar`` so that processes sharing it spread out) and a median pruner that waits
    for 5 trials and prunes from the second epoch on, unless ``sampler`` / ``prune`` say
    otherwise."""
    if sampler is None:
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
        if prune
        else optuna.pruners.NopPruner()
    )
    return optuna.create_study(
        storage=storage,
        study_name=name,
        direction="maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )


def tune(
    config: RunConfig,
    output_dir: str | os.PathLike,
    *,
    trials: int,
    storage: str | None = None,
    study_name: str | None = None,
    jobs: int = 1,
    seed: int | None = None,
    prune: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Search ``config.tune`` on validation; export the best trial's run to ``output_dir/best``.

    Args:
        config: the run configuration; its ``tune`` section is the search space.
        output_dir: where the trials' run folders, ``best/`` and ``tune.json`` go.
        trials: finished (complete or pruned) trials the study should hold; a study that holds
            them already trains none.
        storage: an Optuna storage URL (``sqlite:///tune.db``); default
            ``sqlite:///<output_dir>/study.db``.
        study_name: the study in the storage (default: the output folder's name).
        jobs: processes searching at once, each with ``1/jobs`` of the torch threads, sharing
            the storage.
        seed: the sampler's seed (process ``i`` of ``jobs`` uses ``seed + i``); default
            ``train.seed``. Processes started apart on one storage should be given different
            seeds.
        prune: stop trials whose validation falls below the median of earlier trials.
        quiet: no progress bars while building the cache.

    Returns:
        The summary, also written to ``tune.json``.

    Raises:
        ValueError: no ``tune`` section, ``trials`` or ``jobs`` below 1, or the storage's study
            was started with another config or space.
    """
    if not config.tune:
        raise ValueError(
            "the config has no tune section: add the settings to search, e.g.\n"
            "tune:\n  task.mixer.alpha: {low: 1, high: 128, log: true}\n"
            "  train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}"
        )
    if trials < 1 or jobs < 1:
        raise ValueError(f"--trials and --jobs must be at least 1, got {trials} and {jobs}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("adalayers tune runs its own processes (--jobs); do not launch it")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / STORAGE).absolute()}"
    name = study_name or out.absolute().name
    space = dict(config.tune)
    base = with_settings(config, {})  # the trials' config, without the tune section
    seed = config.train.seed if seed is None else seed
    study = make_study(storage, name, seed=seed, prune=prune)
    _check_same_search(study, base, space, name)
    if base.train.cache:  # once, before the first trial: trials only open the stores
        logger.info("building the feature stores once for every trial")
        base = cached_config(base, quiet=quiet)
    done = finished_trials(study)
    logger.info(
        "study %s: %d of %d trials finished; %d to train, %d process(es)",
        name,
        done,
        trials,
        max(trials - done, 0),
        jobs,
    )
    if jobs == 1:
        _search_trials(study, space, trials, base, out, prune)
    else:
        _search_in_processes(base, space, out, storage, name, trials, seed, prune, jobs)
    return export(optuna.load_study(study_name=name, storage=storage), out, space, storage)


def _search_trials(
    study: optuna.Study,
    space: Mapping[str, SearchRange],
    trials: int,
    base: RunConfig,
    out: Path,
    prune: bool,
) -> None:
    def train(proposals: list[Proposal], tell: Tell) -> None:
        for trial, settings in proposals:
            tell(trial, run_trial(base, out, trial, settings, prune=prune))

    search(study, space, trials, train)


def _search_process(
    base: RunConfig,
    space: dict[str, SearchRange],
    out: Path,
    storage: str,
    name: str,
    trials: int,
    seed: int,
    prune: bool,
) -> None:
    """One process of ``tune(jobs=N)``: its own sampler on the shared study."""
    study = make_study(storage, name, seed=seed, prune=prune)
    _search_trials(study, space, trials, base, out, prune)


def _search_in_processes(
    base: RunConfig,
    space: dict[str, SearchRange],
    out: Path,
    storage: str,
    name: str,
    trials: int,
    seed: int,
    prune: bool,
    jobs: int,
) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from adalayers.training.compare import init_worker

    threads = max(1, torch.get_num_threads() // jobs)
    level = logging.getLogger("adalayers").getEffectiveLevel()
    logger.info("searching in %d processes, %d torch threads each", jobs, threads)
    with ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(threads, level),
    ) as pool:
        futures = [
            pool.submit(_search_process, base, space, out, storage, name, trials, seed + i, prune)
            for i in range(jobs)
        ]
        for future in futures:
            future.result()  # the first error, after every process has stopped


def _check_same_search(
    study: optuna.Study, base: RunConfig, space: Mapping[str, SearchRange], name: str
) -> None:
    """Record the config and the space in a new study; refuse a study started with others."""
    mine = {
        "config": _jsonable(base.to_dict()),
        "space": {k: dataclasses.asdict(v) for k, v in space.items()},
    }
    saved = study.user_attrs.get("search")
    if saved is None:
        study.set_user_attr("search", mine)
    elif saved != mine:
        old, new = flat_config(saved), flat_config(mine)
        differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ValueError(
            f"study {name!r} in this storage was started with another config or tune section "
            f"(it differs in {', '.join(differ[:5])}); choose another --study-name (or "
            f"--output-dir) to search this one"
        )


def _jsonable(values: Any) -> Any:
    import json

    return json.loads(json.dumps(values))


def export(
    study: optuna.Study, out: Path, space: Mapping[str, SearchRange], storage: str
) -> dict[str, Any]:
    """Copy the best trial's run to ``out/best`` and write ``out/tune.json``; returns it."""
    every = study.get_trials(deepcopy=False)
    states = [t.state.name.lower() for t in every]
    summary: dict[str, Any] = {
        "study": study.study_name,
        "storage": _without_password(storage),
        "direction": "maximize",
        "space": {k: dataclasses.asdict(v) for k, v in space.items()},
        "trials": {state: states.count(state) for state in dict.fromkeys(states)},
        "rows": [_trial_row(t) for t in every],
    }
    complete = [t for t in every if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        source = Path(best.user_attrs["run"])
        _copy_run(source, out / BEST_DIR)
        summary["metric"] = best.user_attrs.get("metric")
        summary["best"] = {
            "trial": best.number,
            "params": best.params,
            "validation": best.value,
            "test": best.user_attrs.get("test"),
            "run": str(out / BEST_DIR),
            "trial_run": str(source),
        }
    write_json(out / SUMMARY, summary)
    return summary


def _trial_row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    row = {
        "trial": trial.number,
        "state": trial.state.name.lower(),
        "params": trial.params,
        "validation": trial.value,
        "test": attrs.get("test"),
        "epochs_run": attrs.get("epochs_run"),
        "wall_seconds": attrs.get("wall_seconds"),
        "started": _iso(trial.datetime_start),
        "finished": _iso(trial.datetime_complete),
    }
    if trial.state == optuna.trial.TrialState.PRUNED:
        row["pruned_at_epoch"] = trial.last_step
    if "error" in attrs:
        row["error"] = attrs["error"]
    return row


def _iso(moment: Any) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds")


def _copy_run(source: Path, target: Path) -> None:
    """``target`` becomes a copy of the run folder ``source`` (without a checkpoint), replaced
    whole: a reader sees the old copy or the new one."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(CHECKPOINT_DIR))
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL (a journal file, ...): nothing to hide
        return url
