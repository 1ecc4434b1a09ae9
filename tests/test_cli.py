"""The command line (cli.py): every command is there, and mistakes a user can make end in one
line that names the culprit, exit code 2, no traceback."""

from __future__ import annotations

import pytest
from helpers import train_args

from adalayers.cli import main


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=0.1", "train.lrr"),
        ("train.epochs=many", "train.epochs"),
        ("data.task=imbd", "imbd"),
    ],
)
def test_cli_config_errors_are_one_line(cola, tmp_path, capsys, override, message):
    config, data = cola
    code = main(train_args(config, data, tmp_path / "run", "--set", override))
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model").exists()


def test_cli_missing_data_names_the_file(cola, tmp_path, capsys):
    config, _ = cola
    code = main(train_args(config, tmp_path / "nowhere", tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "train.tsv" in err


def test_cli_label_outside_the_set(cola, tmp_path, capsys):
    config, data = cola
    train = data / "glue" / "CoLA" / "train.tsv"
    train.write_text(train.read_text() + "src\t7\t\tthe movie .\n")
    code = main(train_args(config, data, tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and "7" in err and "train.tsv" in err


def test_cli_predict_bad_input_file(cola_run, tmp_path, capsys):
    run, data = cola_run.folder, cola_run.data
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    assert main(["predict", str(run), "--input", str(bad)]) == 2
    assert "in.jsonl:2" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["predict", str(run), "--input", str(empty)]) == 2
    assert "no inputs" in capsys.readouterr().err
    # a sequence task has no tag sequence to decode
    assert main(["evaluate", str(run), "--data-dir", str(data), "--decoding", "bio"]) == 2
    assert "head.decoding=bio is for token-classification" in capsys.readouterr().err


def test_cli_has_every_command():
    from adalayers.cli import build_parser, cmd_serve

    parser = build_parser()
    args = parser.parse_args(["serve", "runs/a", "runs/b", "--port", "8123"])
    assert args.func is cmd_serve and args.runs == ["runs/a", "runs/b"] and args.port == 8123
    commands = parser._subparsers._group_actions[0].choices
    assert {
        "train",
        "evaluate",
        "predict",
        "info",
        "cache",
        "serve",
        "compare",
        "report",
        "inspect",
        "tune",
    } <= set(commands)
