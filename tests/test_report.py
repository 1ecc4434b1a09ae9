"""The HTML report: every part present, self-contained, and rendered by headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import write_config, write_conll

from adalayers.cli import main
from adalayers.report import read_run, write_report
from adalayers.training import train as train_module
from adalayers.training.config import load_config

RENDER = Path(__file__).resolve().parents[1] / "benchmarks" / "render_report.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, cola_run):
    """A CoLA run (a copy of the session's: the report CLI writes into it), a CoNLL run (two
    epochs), and two baselines copied from the CoLA run."""
    root = tmp_path_factory.mktemp("report")
    cola = root / "cola"
    shutil.copytree(cola_run.folder, cola)
    conll = root / "conll"
    config = write_config(root / "conll.yaml", tiny_model_dir("bert"), task="conll2003", epochs=2)
    data = write_conll(root / "data-conll")
    train_module.fit(load_config(config, data_dir=str(data)), conll, quiet=True)

    single = root / "layer_1"  # what a sweep run records, on the CoLA run's files
    shutil.copytree(cola, single)
    values = yaml.safe_load((single / "config.yaml").read_text())
    values["task"]["mixer"]["single_layer"] = 1
    (single / "config.yaml").write_text(yaml.safe_dump(values))
    metrics = json.loads((single / "metrics.json").read_text())
    metrics["layer_weights"] = {"1": 1.0}
    (single / "metrics.json").write_text(json.dumps(metrics))
    finetuned = root / "finetune"
    shutil.copytree(cola, finetuned)
    metrics["baseline"] = "finetune"
    (finetuned / "metrics.json").write_text(json.dumps(metrics))
    return {"cola": cola, "conll": conll, "layer_1": single, "finetune": finetuned}


def test_confusion_matrix_is_recorded(runs):
    metrics = json.loads((runs["cola"] / "metrics.json").read_text())
    confusion = metrics["test"]["confusion_matrix"]
    assert confusion["labels"] == ["unacceptable", "acceptable"]
    counts = confusion["counts"]
    assert sum(map(sum, counts)) == metrics["test"]["examples"] == 30
    assert (counts[0][0] + counts[1][1]) / 30 == pytest.approx(metrics["test"]["accuracy"])
    history = (runs["cola"] / "history.jsonl").read_text()
    assert "confusion_matrix" not in history  # tables stay out of the per-epoch lines


def test_report_shows_every_part(runs, tmp_path):
    page = write_report([runs["cola"], runs["conll"]], tmp_path / "r.html", title="tiny runs")
    text = page.read_text()
    assert "<title>tiny runs</title>" in text
    assert "cola on " in text and "conll2003 on " in text  # one comparison per task
    assert "Per entity type (test)" in text and "<td>PER</td>" in text
    assert "Confusion matrix (test)" in text and "<td>unacceptable</td>" in text
    conll_metrics = json.loads((runs["conll"] / "metrics.json").read_text())
    assert f"<td>{conll_metrics['parameters_added']:,}</td>" in text
    # the head's settings: its depth for the kind of task, the width only where layers use it
    assert "<td>num_heads=2, sequence_layers=0, dropout=0.1</td>" in text  # CoLA
    # decoding: auto in config.yaml, shown as what it resolved to (IOB2 tags: bio)
    assert "<td>num_heads=2, num_layers=1, ff_dim=16, dropout=0.1, decoding=bio</td>" in text
    # beside every classification result, what always answering one label scores
    cola = json.loads((runs["cola"] / "metrics.json").read_text())
    majority = cola["test"]["majority"]
    assert f"<td>test: majority class ({majority['label']})</td>" in text
    assert f"<td>majority class ({majority['label']})</td>" in text  # in the comparison
    assert f"<td>{majority['mcc']:.4f}</td>" in text
    # a few examples with their inputs, the wrong ones first (sentence pairs: tests/test_end_to_end)
    assert "<h4>Examples (test)</h4>" in text and "<th>words</th>" in text
    sample = cola["samples"]["test"][0]
    assert f"<td>{sample['text']}</td><td>{sample['label']}</td>" in text
    assert len(cola["samples"]["test"]) == 8 and "text_pair" not in sample
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', text)
    alts = [alt for alt, _ in images]
    # CoLA: distribution, history, confusion; CoNLL: distribution, history
    assert alts.count("learned layer distribution") == 2
    assert alts.count("training history") == 2 and alts.count("confusion matrix") == 1
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for _, data in images)


def test_report_is_self_contained(runs, tmp_path):
    text = write_report(list(runs.values()), tmp_path / "r.html").read_text()
    assert not re.search(r"https?://", text), "the page must not reference the network"
    assert "<script" not in text and "<link" not in text and "url(" not in text
    sources = re.findall(r'src="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def test_baselines_are_recognised_and_compared(runs, tmp_path):
    assert read_run(runs["layer_1"]).baseline == "single_layer"
    assert read_run(runs["layer_1"]).layer == 1
    assert read_run(runs["finetune"]).baseline == "finetune"
    assert read_run(runs["cola"]).baseline == "mixer"
    folders = [runs["cola"], runs["layer_1"], runs["finetune"]]
    text = write_report(folders, tmp_path / "r.html").read_text()
    assert "single-layer sweep" in text
    assert "<td>layer 1</td>" in text and "<td>finetune</td>" in text


def test_report_cli(runs, tmp_path, capsys):
    assert main(["report", str(runs["cola"]), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(runs["cola"] / "report.html")
    assert (runs["cola"] / "report.html").stat().st_size > 10_000
    assert main(["report", str(tmp_path), "--output", str(tmp_path / "x.html")]) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.skipif(
    not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
    reason="headless Chromium not installed (Debian: apt-get install chromium)",
)
def test_chromium_renders_the_report(runs, tmp_path):
    import matplotlib.image

    page = write_report([runs["cola"], runs["conll"]], tmp_path / "r.html")
    png = tmp_path / "r.png"
    done = subprocess.run(
        [sys.executable, str(RENDER), str(page), "--output", str(png), "--height", "1600"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["bytes"] == png.stat().st_size > 20_000
    pixels = matplotlib.image.imread(png)[..., :3]  # (H, W, 3) in [0, 1]
    assert pixels.shape[:2] == (1600, 1200)
    ink = (pixels < 0.9).any(-1).mean()  # share of pixels that are not (near) white
    assert ink > 0.02, "the screenshot is (almost) blank"
