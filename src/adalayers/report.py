"""Plots of a run, and the HTML report of one or many runs (:func:`write_report`)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def plot_layer_weights(
    weights: Mapping[int, float], path: str | os.PathLike, title: str = ""
) -> Path:
    """Bar chart of the learned layer distribution ``p~`` (state index -> weight)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    layers = sorted(int(k) for k in weights)
    values = [float(weights[k] if k in weights else weights[str(k)]) for k in layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(layers) + 2), 3))
    ax.bar([str(i) for i in layers], values, color="#4C72B0")
    ax.set_xlabel("hidden state (0 = embeddings)")
    ax.set_ylabel("weight p~")
    ax.set_ylim(0, max(values + [1e-6]) * 1.15)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


# -- the HTML report ---------------------------------------------------------------------------
# One static page per set of runs: every figure is an inline PNG and all styling is inline, so
# the page opens offline and can be mailed as one file.

_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { border-bottom: 2px solid #4C72B0; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 90%; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #eef1f7; }
tr.best td { font-weight: bold; }
td.note, p.note { color: #777; font-size: 90%; }
img { max-width: 100%; display: block; margin: .4em 0 1em; }
nav li { margin: .1em 0; }
table.examples td { text-align: left; }
"""
_BASELINE_ORDER = (
    "mixer",
    "dynamic",
    "scalar_mix",
    "uniform",
    "last",
    "single_layer",
    "finetune",
    "probe",
    "probe_concat",
)
_NO_MIXER = ("finetune", "probe", "probe_concat")  # rows without the mixer and head
_LINE_STYLES = {
    "mixer": ("#C44E52", "-"),
    "scalar_mix": ("#55A868", "--"),
    "uniform": ("#8172B2", ":"),
    "last": ("#937860", "-."),
    "finetune": ("#222222", "--"),
    "dynamic": ("#DD8452", "-"),
    "probe": ("#8C8C8C", ":"),
    "probe_concat": ("#8C8C8C", "--"),
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _img(fig: Any, alt: str) -> str:
    """A matplotlib figure as an inline ``<img>`` (base64 PNG); closes the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _plt().close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, list):  # a multi-label example's labels
        return html.escape(", ".join(str(v) for v in value))
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], best: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f"<td>{_fmt(v)}</td>" for v in row)
        body.append(f"<tr{' class=best' if i == best else ''}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


@dataclass
class RunRecord:
    """What a run folder holds, read for the report.

    Attributes:
        folder: the run folder.
        name: its display name.
        config: ``config.yaml`` as a mapping.
        metrics: ``metrics.json`` (empty while the run has not finished).
        history: the lines of ``history.jsonl``.
        baseline: ``mixer``, ``dynamic``, ``scalar_mix``, ``uniform``, ``last``,
            ``single_layer``, ``finetune``, ``probe`` or ``probe_concat``.
        layer: the state a single-layer run or the probe reads (``None`` otherwise).
    """

    folder: Path
    name: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    baseline: str
    layer: int | None

    @property
    def label(self) -> str:
        if self.baseline == "probe":
            return f"probe: layer {self.layer}"
        if self.baseline == "probe_concat":
            return "probe: all states"
        if self.baseline in ("single_layer", "last"):
            prefix = "last: " if self.baseline == "last" else ""
            return f"{prefix}layer {self.layer}"
        return self.baseline

    @property
    def group(self) -> tuple[str, str]:
        """(task, base): runs that can be compared."""
        data = self.config.get("data") or {}
        return str(data.get("name") or data.get("task", "?")), str(self.config.get("base", "?"))

    def score(self, split: str = "test") -> float | None:
        """The run's primary metric on ``split`` (``None`` if unknown)."""
        metric = self.metrics.get("metric")
        value = (self.metrics.get(split) or {}).get(metric)
        return float(value) if isinstance(value, (int, float)) else None


def read_run(folder: str | os.PathLike, name: str | None = None) -> RunRecord:
    """Read a run folder (``adalayers train``, a baseline of ``adalayers compare``).

    Raises:
        FileNotFoundError: ``folder`` has neither ``config.yaml`` nor ``metrics.json``.
        ValueError: a file of the run cannot be parsed.
    """
    import yaml

    folder = Path(folder)
    config_path, metrics_path = folder / "config.yaml", folder / "metrics.json"
    if not config_path.is_file() and not metrics_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a run folder (no config.yaml or metrics.json); give folders that "
            f"adalayers train or adalayers compare wrote"
        )
    try:
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        history_path = folder / "history.jsonl"
        history = (
            [json.loads(line) for line in history_path.read_text().splitlines() if line.strip()]
            if history_path.is_file()
            else []
        )
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{folder}: cannot read the run's files ({err})") from err
    config = config or {}
    mixer = (config.get("task") or {}).get("mixer") or {}
    baseline, layer = "mixer", None
    if metrics.get("baseline") == "finetune":
        baseline = "finetune"
    elif metrics.get("baseline") in ("probe", "probe_concat"):
        baseline, layer = metrics["baseline"], metrics.get("layer")
    elif mixer.get("mode") == "dynamic" and mixer.get("single_layer") is None:
        baseline = "dynamic"
    elif mixer.get("mode") == "scalar_mix":
        baseline = "scalar_mix"
    elif mixer.get("single_layer") is not None:
        weights = metrics.get("layer_weights") or (
            history[-1].get("layer_weights") if history else None
        )
        layer = int(next(iter(weights))) if weights else int(mixer["single_layer"])
        baseline = "last" if mixer["single_layer"] == -1 else "single_layer"
    elif mixer.get("freeze_distribution"):
        baseline = "uniform"
    return RunRecord(folder, name or folder.name, config, metrics, history, baseline, layer)


def expand_runs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Run folders from ``paths``; a comparison folder (``comparison.json``) gives its rows."""
    out: list[Path] = []
    for path in map(Path, paths):
        comparison = path / "comparison.json"
        if comparison.is_file() and not (path / "metrics.json").is_file():
            rows = json.loads(comparison.read_text()).get("rows", {})
            out += [path / row.get("run", name) for name, row in rows.items()]
        else:
            out.append(path)
    return out


def _names(folders: Sequence[Path]) -> list[str]:
    """Folder names, made unique with their parents where two runs share one."""
    names = [f.name for f in folders]
    return [f"{f.parent.name}/{f.name}" if names.count(f.name) > 1 else f.name for f in folders]


def _scalar_metrics(metrics: Mapping[str, Any]) -> list[str]:
    return [k for k, v in metrics.items() if isinstance(v, (int, float)) and k != "examples"]


def _comparison_section(records: list[RunRecord]) -> str:
    metric = next((r.metrics["metric"] for r in records if r.metrics.get("metric")), None)
    finished = [r for r in records if r.metrics]
    extra = []
    for r in finished:
        for key in _scalar_metrics(r.metrics.get("test") or r.metrics.get("validation") or {}):
            if key != metric and key not in extra:
                extra.append(key)
    header = ["run", "baseline", f"validation {metric}", f"test {metric}"]
    header += [f"test {k}" for k in extra]
    header += ["parameters added", "% of base", "train s", "epochs"]
    ordered = sorted(
        records,
        key=lambda r: (
            _BASELINE_ORDER.index(r.baseline) if r.baseline in _BASELINE_ORDER else 99,
            r.layer if r.layer is not None else -1,
        ),
    )
    rows, scores = [], []
    for r in ordered:
        test = r.metrics.get("test") or {}
        rows.append(
            [r.name, r.label, r.score("validation"), r.score("test")]
            + [test.get(k) for k in extra]
            + [
                r.metrics.get("parameters_added"),
                r.metrics.get("percent_of_base"),
                r.metrics.get("train_seconds"),
                r.metrics.get("epochs_run", "not finished" if not r.metrics else None),
            ]
        )
        scores.append(r.score("test") if r.score("test") is not None else r.score("validation"))
    valid = [s for s in scores if s is not None]
    best = scores.index(max(valid)) if valid else None
    note = (
        '<p class="note">Bold: the best primary metric (test, else validation). Parameters '
        "added: what the task adds beside the frozen base; full fine-tuning adds a whole second "
        "copy of the base.</p>"
    )
    majority = next((r for r in finished if _majority(r.metrics, "test", "validation")), None)
    if majority is not None:  # what always answering one label scores: did the head learn?
        m = majority.metrics
        test = _majority(m, "test") or {}
        label = (test or _majority(m, "validation"))["label"]
        rows.append(
            [f"majority class ({label})", "always the most frequent training label"]
            + [(_majority(m, s) or {}).get(metric) for s in ("validation", "test")]
            + [test.get(k) for k in extra]
            + [None] * 4
        )
        note = note.replace(
            "</p>",
            " The last row answers every example with the training "
            "split's most frequent label.</p>",
        )
    return _table(header, rows, best) + note


def _majority(metrics: Mapping[str, Any], *splits: str) -> dict[str, Any] | None:
    """The majority-class scores of the first of ``splits`` that has them."""
    for split in splits:
        found = (metrics.get(split) or {}).get("majority")
        if found:
            return found
    return None


def _sweep_figure(records: list[RunRecord]) -> str:
    """Single-layer runs as bars, the other baselines as lines, the mixer's weights on top."""
    singles = sorted(
        (r for r in records if r.baseline == "single_layer" and r.metrics), key=lambda r: r.layer
    )
    if not singles:
        return ""
    split = "test" if all(r.score("test") is not None for r in singles) else "validation"
    metric = singles[0].metrics.get("metric", "")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(singles) + 4), 3.6))
    layers = [r.layer for r in singles]
    ax.bar(layers, [r.score(split) or 0.0 for r in singles], color="#A1B7D8", label="single layer")
    for r in records:
        if r.baseline in _LINE_STYLES and r.score(split) is not None:
            color, style = _LINE_STYLES[r.baseline]
            ax.axhline(r.score(split), color=color, linestyle=style, label=r.label)
    ax.set_xlabel("hidden state (0 = embeddings)")
    ax.set_ylabel(f"{split} {metric}")
    ax.set_xticks(layers)
    mixer = next((r for r in records if r.baseline == "mixer" and r.metrics), None)
    weights = (mixer.metrics.get("layer_weights") or {}) if mixer else {}
    if weights:
        twin = ax.twinx()
        keys = sorted(int(k) for k in weights)
        twin.plot(
            keys,
            [float(weights[str(k)] if str(k) in weights else weights[k]) for k in keys],
            "o-",
            color="#C44E52",
            alpha=0.6,
            label="mixer weight p~",
        )
        twin.set_ylabel("mixer weight p~")
        twin.set_ylim(bottom=0)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.8)
    ax.set_title(f"single-layer sweep vs the mixer ({split})")
    fig.tight_layout()
    return _img(fig, "single-layer sweep")


def _weights(weights: Mapping[Any, float]) -> tuple[list[int], list[float]]:
    keys = sorted(int(k) for k in weights)
    lookup = {int(k): float(v) for k, v in weights.items()}
    return keys, [lookup[k] for k in keys]


def _distribution_figure(record: RunRecord) -> str:
    weights = record.metrics.get("layer_weights") or {}
    if len(weights) < 2:
        return ""
    keys, values = _weights(weights)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(keys) + 2), 2.8))
    ax.bar([str(k) for k in keys], values, color="#4C72B0")
    ax.set_xlabel("hidden state (0 = embeddings)")
    ax.set_ylabel("weight p~")
    ax.set_ylim(0, max(values + [1e-6]) * 1.15)
    ax.set_title("learned layer distribution (best epoch)")
    fig.tight_layout()
    return _img(fig, "learned layer distribution")


def _history_figure(record: RunRecord) -> str:
    """Training curves, and the layer distribution per epoch as a heat map."""
    history = record.history
    if not history:
        return ""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    weights = [h.get("layer_weights") or {} for h in history]
    heat = len(weights[0]) > 1 and all(weights)
    fig, axes = plt.subplots(1, 2 if heat else 1, figsize=(10 if heat else 5, 3.2), squeeze=False)
    ax = axes[0][0]
    losses = [h.get("train_loss") for h in history]
    ax.plot(
        epochs, [v if v is not None else float("nan") for v in losses], "o-", label="train loss"
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    twin = ax.twinx()
    twin.plot(epochs, [h.get("score") for h in history], "s--", color="#C44E52")
    twin.set_ylabel(f"validation {history[0].get('metric', '')}")
    ax.set_title("training")
    if heat:
        keys = _weights(weights[0])[0]
        grid = [_weights(w)[1] for w in weights]
        ax = axes[0][1]
        extent = (-0.5, len(keys) - 0.5, epochs[0] - 0.5, epochs[-1] + 0.5)  # epochs: 1, 2, ...
        image = ax.imshow(
            grid, aspect="auto", cmap="viridis", origin="lower", interpolation="none", extent=extent
        )
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([str(k) for k in keys], fontsize=7)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("hidden state")
        ax.set_ylabel("epoch")
        ax.set_title("layer distribution p~ per epoch")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return _img(fig, "training history")


def _confusion(record: RunRecord) -> str:
    split = "test" if "confusion_matrix" in (record.metrics.get("test") or {}) else "validation"
    confusion = (record.metrics.get(split) or {}).get("confusion_matrix")
    if not confusion:
        return ""
    labels, counts = confusion["labels"], confusion["counts"]
    table = _table(
        ["gold \\ predicted", *labels], [[label, *row] for label, row in zip(labels, counts)]
    )
    plt = _plt()
    size = 1.2 + 0.5 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    ax.imshow(counts, cmap="Blues")
    top = max(max(row) for row in counts) or 1
    for i, row in enumerate(counts):
        for j, value in enumerate(row):
            color = "white" if value > top / 2 else "black"
            ax.text(j, i, str(value), ha="center", va="center", color=color)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    fig.tight_layout()
    return f"<h4>Confusion matrix ({split})</h4>" + table + _img(fig, "confusion matrix")


def _per_type(record: RunRecord) -> str:
    split = "test" if "per_type" in (record.metrics.get("test") or {}) else "validation"
    per_type = (record.metrics.get(split) or {}).get("per_type")
    if not per_type:
        return ""
    rows = [
        [name, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support")]
        for name, v in sorted(per_type.items())
    ]
    header = ["entity type", "precision", "recall", "F1", "support"]
    return f"<h4>Per entity type ({split})</h4>" + _table(header, rows)


def _samples(record: RunRecord) -> str:
    """A few examples of the test split (else validation) with their inputs, both texts of a
    sentence pair, the gold and the predicted label (``metrics.json``'s ``samples``)."""
    samples = record.metrics.get("samples") or {}
    split = "test" if samples.get("test") else "validation"
    rows = samples.get(split)
    if not rows:
        return ""
    if "tokens" in rows[0]:
        header = ["#", "words", "gold tags", "predicted tags"]
        cells = [
            [r["index"], " ".join(r["tokens"]), " ".join(r["tags"]), " ".join(r["predicted_tags"])]
            for r in rows
        ]
    else:
        pairs = any("text_pair" in r for r in rows)
        header = ["#", "text", *(["text pair"] if pairs else []), "gold", "predicted"]
        cells = [
            [
                r["index"],
                r.get("text", ""),
                *([r.get("text_pair", "")] if pairs else []),
                r["label"],
                r["prediction"],
            ]
            for r in rows
        ]
    gold, predicted = ("tags", "predicted_tags") if "tags" in rows[0] else ("label", "prediction")
    wrong = sum(r[gold] != r[predicted] for r in rows)
    note = (
        f'<p class="note">{len(rows)} examples, {wrong} of them predicted wrong: wrong '
        f"predictions are chosen first, then right ones, shown in the split's order (# is the "
        f"example's index; predictions_{split}.jsonl has them all).</p>"
    )
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in cells)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    table = f'<table class="examples"><tr>{head}</tr>{body}</table>'
    return f"<h4>Examples ({split})</h4>" + note + table


def _run_section(record: RunRecord, anchor: str) -> str:
    m, config = record.metrics, record.config
    parts = [f'<h3 id="{anchor}">{html.escape(record.name)} ({html.escape(record.label)})</h3>']
    mixer = (config.get("task") or {}).get("mixer") or {}
    facts = [
        ["folder", str(record.folder)],
        ["task", record.group[0]],
        ["base", record.group[1]],
        ["baseline", record.label],
    ]
    if record.baseline not in _NO_MIXER and mixer:
        keys = ("mode", "dim", "alpha", "cutoff", "entropy_weight", "layer_dropout", "positional")
        facts.append(["mixer", ", ".join(f"{k}={mixer.get(k)}" for k in keys if k in mixer)])
    head = (config.get("task") or {}).get("head") or {}
    if record.baseline not in _NO_MIXER and head:
        from adalayers.core.kinds import KINDS  # torch: only for a run's section

        kind = KINDS.get(m.get("task_type"))  # type: ignore[arg-type]
        token = kind is not None and kind.per_token
        depth = "num_layers" if token else "sequence_layers"
        keys = ("num_heads", depth, *(("ff_dim",) if head.get(depth) else ()), "dropout")
        keys += ("decoding",) if token else ()
        head = {**head, **({"decoding": m["decoding"]} if "decoding" in m else {})}  # resolved
        facts.append(["head", ", ".join(f"{k}={head[k]}" for k in keys if k in head)])
    for key in ("parameters_added", "percent_of_base", "best_epoch", "epochs_run"):
        facts.append([key.replace("_", " "), m.get(key)])
    facts.append(["train seconds", m.get("train_seconds")])
    parts.append(_table(["", ""], facts))
    if not m:
        parts.append('<p class="note">Not finished: no metrics.json yet.</p>')
    splits = [s for s in ("validation", "test") if s in m]
    if splits:
        keys = []
        for s in splits:
            keys += [k for k in _scalar_metrics(m[s]) if k not in keys]
        keys.append("examples")
        rows = []
        for s in splits:
            rows.append([s, *(m[s].get(k) for k in keys)])
            majority = _majority(m, s)
            if majority:  # beside every result: what always answering one label scores
                scores = {**majority, "examples": m[s].get("examples")}
                rows.append(
                    [f"{s}: majority class ({majority['label']})"] + [scores.get(k) for k in keys]
                )
        parts.append(_table(["split", *keys], rows))
    parts += [_per_type(record), _confusion(record), _samples(record)]
    parts += [_distribution_figure(record), _history_figure(record)]
    return "\n".join(p for p in parts if p)


def write_report(
    run_dirs: Sequence[str | os.PathLike],
    output_html: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """Write one static HTML page about ``run_dirs``: it opens offline (no external assets).

    Per (task, base): a table of every run (metrics, parameters added, time) and the
    single-layer sweep against the mixer and the other baselines. Per run: its metrics, the
    per-type NER table, the confusion matrix, a few examples with their inputs (both texts of
    a sentence pair), the learned layer distribution and its history over the epochs.

    Args:
        run_dirs: run folders, or comparison folders (``adalayers compare``) for all their runs.
        output_html: the page to write.
        title: the page title.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: a folder is not a run.
        ValueError: no runs given.
    """
    folders = expand_runs(run_dirs)
    if not folders:
        raise ValueError("no run folders given")
    records = [read_run(f, name) for f, name in zip(folders, _names(folders))]
    title = title or ("adalayers report: " + ", ".join(r.name for r in records[:4]))
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    anchors = {id(r): f"run-{i}" for i, r in enumerate(records)}
    body = [f"<h1>{html.escape(title)}</h1>"]
    body.append(
        f'<p class="note">{len(records)} run(s); written {time.strftime("%Y-%m-%d %H:%M")}.</p>'
    )
    links = "".join(
        f'<li><a href="#{anchors[id(r)]}">{html.escape(r.name)}</a> ({html.escape(r.label)})</li>'
        for r in records
    )
    body.append(f"<nav><ul>{links}</ul></nav>")
    for (task, base), members in groups.items():
        body.append(f"<h2>{html.escape(task)} on {html.escape(base)}</h2>")
        body.append(_comparison_section(members))
        body.append(_sweep_figure(members))
    body.append("<h2>Runs</h2>")
    body += [_run_section(r, anchors[id(r)]) for r in records]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body></html>\n"
    )
    path = Path(output_html)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
