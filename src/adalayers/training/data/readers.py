"""Readers for the benchmark datasets and for user files, all returning one :class:`TaskData`.

Local files in the official formats (see ``shared/datasets/README.md``) are read with the standard
library and checked row by row, so a bad file fails with ``file:line`` and what to do instead of a
traceback from deep inside pyarrow. The result is a :class:`datasets.DatasetDict` with the splits
``train`` / ``validation`` / ``test`` and standard columns:

* sequence tasks: ``text``, optional ``text_pair``, ``label`` (a label name; a float for
  regression; a list of names for multi-label classification);
* token tasks: ``tokens`` and ``tags`` (lists of strings).

What a label looks like in a file and in the columns is the task kind's to say
(:mod:`adalayers.core.kinds`: ``parse_label``, ``label_type``, ``per_token``, ...); the readers
only know the file formats.

Labels stay strings here; encoding them to ids happens later. Without a data directory (argument
or ``$ADALAYERS_DATA_DIR``) the benchmark tasks are loaded from the Hugging Face hub instead.

Split conventions (those of the reference results):

* IMDB: test = official test; validation = stratified 10% of train.
* CoLA / RTE / STS-B: test = GLUE dev (the reported set, GLUE test labels are private);
  validation = 10% of train, stratified by label (random for the STS-B regression).
* CoNLL-2003: train / valid / test as given.
* User files: train and optional validation / test files; a missing validation split is a
  stratified 10% of train, a missing test split repeats the validation split (with a warning).
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

from adalayers.core.kinds import KINDS, TaskKind, kind_of

logger = logging.getLogger(__name__)

ENV_VAR = "ADALAYERS_DATA_DIR"
SPLITS = ("train", "validation", "test")
SEQ, TOK, REG = "sequence_classification", "token_classification", "regression"
TASK_TYPES = tuple(KINDS)
USER_FORMATS = ("csv", "jsonl", "conll")
_MISSING_HINT = f"Point --data-dir (or {ENV_VAR}) at the folder holding the official files."


@dataclass
class TaskData:
    """A task's splits in standard columns plus what is needed to encode its labels.

    Attributes:
        name: Task name, e.g. ``"cola"`` or ``"csv"``.
        task_type: the name of a task kind (:data:`~adalayers.core.kinds.KINDS`), e.g.
            ``"sequence_classification"``.
        label_names: Label (tag) names in id order; empty for regression.
        splits: ``DatasetDict`` with the splits ``"train"``, ``"validation"``, ``"test"``.
    """

    name: str
    task_type: str
    label_names: list[str]
    splits: DatasetDict

    @property
    def kind(self) -> TaskKind:
        """The task's kind (:func:`~adalayers.core.kinds.kind_of` its ``task_type``)."""
        return kind_of(self.task_type)


@dataclass(frozen=True)
class _Benchmark:
    """Where a benchmark lives locally (official files) and on the hub, and how to read it."""

    task_type: str
    label_names: tuple[str, ...]
    files: dict[str, str]  # split -> path relative to the data dir
    columns: dict[str, str] = field(default_factory=dict)  # standard column -> file column
    fmt: str = "tsv"
    fieldnames: tuple[str, ...] | None = None  # for files without a header
    raw_labels: tuple[str, ...] | None = None  # label values in the file, in label_names order
    hub: tuple[str, str | None, str | None] = ("", None, None)  # repo, config, revision
    hub_columns: dict[str, str] | None = None  # standard column -> hub column; None: `columns`
    hub_test: str = "validation"  # hub split used as our test split


_GLUE_PAIR = {"text": "sentence1", "text_pair": "sentence2"}
BENCHMARKS: dict[str, _Benchmark] = {
    "imdb": _Benchmark(
        SEQ,
        ("negative", "positive"),
        {"train": "imdb/train.jsonl.gz", "test": "imdb/test.jsonl.gz"},
        {"text": "text", "label": "label"},
        fmt="jsonl",
        raw_labels=("0", "1"),
        hub=("stanfordnlp/imdb", None, None),  # what "imdb" redirects to
        hub_test="test",
    ),
    "cola": _Benchmark(
        SEQ,
        ("unacceptable", "acceptable"),
        {"train": "glue/CoLA/train.tsv", "test": "glue/CoLA/dev.tsv"},
        {"text": "sentence", "label": "label"},
        fieldnames=("source", "label", "mark", "sentence"),
        raw_labels=("0", "1"),
        hub=("nyu-mll/glue", "cola", None),
    ),
    "rte": _Benchmark(
        SEQ,
        ("entailment", "not_entailment"),
        {"train": "glue/RTE/train.tsv", "test": "glue/RTE/dev.tsv"},
        {**_GLUE_PAIR, "label": "label"},
        hub=("nyu-mll/glue", "rte", None),
    ),
    "stsb": _Benchmark(
        REG,
        (),
        {"train": "glue/STS-B/train.tsv", "test": "glue/STS-B/dev.tsv"},
        {**_GLUE_PAIR, "label": "score"},
        hub=("nyu-mll/glue", "stsb", None),
        hub_columns={**_GLUE_PAIR, "label": "label"},
    ),
    "conll2003": _Benchmark(
        TOK,
        (),
        {f: f"conll2003/{n}.txt" for f, n in zip(SPLITS, ("train", "valid", "test"))},
        fmt="conll",
        # The "conll2003" hub repo is a loading script (unsupported since datasets 4): read the
        # hub's parquet conversion of it instead.
        hub=("eriktks/conll2003", None, "refs/convert/parquet"),
        hub_columns={"tokens": "tokens", "tags": "ner_tags"},
        hub_test="test",
    ),
}
_HUB_RENAME = {"neg": "negative", "pos": "positive"}  # IMDB's ClassLabel names -> ours
_CONLL_HUB_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


# --------------------------------------------------------------------------- public helpers


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Return ``data_dir``, else ``$ADALAYERS_DATA_DIR``, else ``None`` (meaning: use the hub)."""
    value = data_dir if data_dir is not None else os.environ.get(ENV_VAR) or None
    return Path(value).expanduser() if value is not None else None


def split_validation(
    ds: Dataset, *, seed: int = 42, fraction: float = 0.1, stratify_by: str | None = None
) -> tuple[Dataset, Dataset]:
    """Hold out ``fraction`` of ``ds`` as validation, deterministically for a given seed.

    With ``stratify_by`` every value of that column contributes ``round(fraction * count)``
    examples, so label proportions are kept. Both parts keep the original example order.

    Args:
        ds: Dataset to split.
        seed: Seed of the NumPy generator that picks the held-out examples.
        fraction: Share of examples to hold out.
        stratify_by: Column to stratify by (e.g. ``"label"``), or ``None`` for a random split.

    Returns:
        ``(train, validation)``.

    Raises:
        ValueError: If the split would leave either part empty.
    """
    rng = np.random.default_rng(seed)
    if stratify_by is None:
        held = rng.permutation(len(ds))[: round(fraction * len(ds))]
    else:
        values = np.asarray(ds[stratify_by][:], dtype=object)
        held = []
        for value in sorted(set(values)):
            idx = rng.permutation(np.flatnonzero(values == value))
            held.extend(idx[: round(fraction * len(idx))])
    mask = np.zeros(len(ds), dtype=bool)
    mask[np.asarray(held, dtype=int)] = True
    if mask.all() or not mask.any():
        raise ValueError(
            f"cannot hold out {fraction:.0%} of {len(ds)} training examples as validation; "
            "give more training examples or a separate validation file"
        )
    return ds.select(np.flatnonzero(~mask)), ds.select(np.flatnonzero(mask))


_INVISIBLE = "\ufeff\u200b\u200c\u200d\u2060\u00ad"
"""Characters that show as nothing: byte-order mark (a stray one where files were joined),
zero-width space / non-joiner / joiner, word joiner, soft hyphen."""
_IOB_TAG = re.compile(r"^(?:O|[BIES]-\S+)$")
_IOB_PREFIX = re.compile(r"^[BIES]-")


def read_conll(path: str | os.PathLike, token_col: int = 0, tag_col: int = -1) -> dict[str, list]:
    """Read a CoNLL file: one ``token ... tag`` line per token, a blank line between sentences.

    Columns are separated by whitespace; ``-DOCSTART-`` lines are skipped. A line holding
    only whitespace and invisible characters (byte-order mark, zero-width space or joiner,
    word joiner, soft hyphen) is blank: it ends the sentence. The token and the tag must be
    two distinct columns of every other line.
    Where the file's tags are IOB tags (``B-X``, ``I-X``, also ``E-X``, ``S-X``), every tag
    must be one (or ``O``): a stray tag such as ``PER`` or ``B_PER`` is an error, not an
    entity type of its own.

    Args:
        path: The file (``.gz`` is decompressed).
        token_col: Index of the token column.
        tag_col: Index of the tag column (negative counts from the end).

    Returns:
        ``{"tokens": [[str, ...], ...], "tags": [[str, ...], ...]}``, one entry per sentence.

    Raises:
        ValueError: On a line without distinct token and tag columns or a tag outside an IOB
            file's scheme (the message has ``file:line`` and what to do), or no sentences.
    """
    path = Path(path)
    out: dict[str, list] = {"tokens": [], "tags": []}
    tokens: list[str] = []
    tags: list[str] = []
    first_line: dict[str, int] = {}  # tag -> the line it first appears on
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not "".join(parts).strip(_INVISIBLE) or parts[0] == "-DOCSTART-":
                if tokens:
                    out["tokens"].append(tokens)
                    out["tags"].append(tags)
                    tokens, tags = [], []
                continue
            token, tag = (c if c >= 0 else len(parts) + c for c in (token_col, tag_col))
            if token == tag or not (0 <= token < len(parts) and 0 <= tag < len(parts)):
                raise ValueError(
                    f"{path}:{lineno}: malformed CoNLL line {line.rstrip(chr(10) + chr(13))!r}: "
                    f"{len(parts)} whitespace-separated column(s), but the token (column "
                    f"{token_col}) and the tag (column {tag_col}) need two distinct columns. "
                    f"Give every token line its tag, and end a sentence with an empty line"
                )
            tokens.append(parts[token])
            tags.append(parts[tag])
            first_line.setdefault(parts[tag], lineno)
    if tokens:
        out["tokens"].append(tokens)
        out["tags"].append(tags)
    if not out["tokens"]:
        raise ValueError(f"{path} contains no sentences")
    if any(_IOB_PREFIX.match(tag) for tag in first_line):
        bad = sorted((line, tag) for tag, line in first_line.items() if not _IOB_TAG.match(tag))
        if bad:
            line, tag = bad[0]
            raise ValueError(
                f"{path}:{line}: tag {tag!r} is not an IOB tag (O, B-TYPE, I-TYPE) while the "
                f"file's other tags are ({len(bad)} such tag(s): {[t for _, t in bad[:5]]}). "
                f"Fix the line, or map such tags to IOB ones before training"
            )
    return out


# --------------------------------------------------------------------------- file readers


def _require(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}. {hint}")
    return path


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _format_of(path: Path, default: str) -> str:
    """``csv`` / ``tsv`` / ``jsonl`` from the file name (``.gz`` ignored), else ``default``."""
    name = path.name[:-3] if path.suffix == ".gz" else path.name
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return {"json": "jsonl"}.get(ext, ext) if ext in ("csv", "tsv", "jsonl", "json") else default


def _iter_rows(
    path: Path, fmt: str, fieldnames: Iterable[str] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` from a CSV, TSV (read with QUOTE_NONE) or JSONL file."""
    with _open_text(path) as f:
        if fmt == "jsonl":
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: expected one JSON object per line")
                yield lineno, row
            return
        quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
        reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",", quoting=quoting)
        header = list(fieldnames) if fieldnames is not None else None
        for record in reader:
            if not record:
                continue
            if header is None:
                header = record
                continue
            if len(record) != len(header):
                raise ValueError(
                    f"{path}:{reader.line_num}: expected {len(header)} {fmt.upper()} columns "
                    f"({', '.join(header)}), found {len(record)}"
                )
            yield reader.line_num, dict(zip(header, record))


def _read_table(
    path: Path,
    fmt: str,
    columns: dict[str, str],
    fieldnames: Iterable[str] | None = None,
    empty_label: bool = False,
) -> dict[str, list]:
    """Read ``columns`` (standard name -> column in the file) into lists, labels still raw;
    ``_line`` holds each row's line number. ``empty_label``: an empty label cell is a label (a
    multi-label example to which no label applies), not an error."""
    out: dict[str, list] = {key: [] for key in columns}
    out["_line"] = []
    for lineno, row in _iter_rows(path, fmt, fieldnames):
        for key, col in columns.items():
            if col not in row:
                raise ValueError(
                    f"column {col!r} (for {key!r}) not found in {path} (line {lineno}); "
                    f"columns present: {sorted(row)}. Fix the column mapping."
                )
            value = row[col]
            if value is None or (value == "" and key == "label" and not empty_label):
                raise ValueError(f"{path}:{lineno}: empty value in column {col!r}")
            if key != "label" and not isinstance(value, str):
                raise ValueError(f"{path}:{lineno}: column {col!r} must hold text, got {value!r}")
            out[key].append(value)
        out["_line"].append(lineno)
    if not out["label"]:
        raise ValueError(f"{path} contains no examples")
    return out


def _finish_labels(
    raw: dict[str, list],
    source: str,
    kind: TaskKind,
    raw_to_name: dict[str, str] | None = None,
    allowed: Iterable[str] | None = None,
    text: bool = False,
) -> dict[str, list]:
    """Map raw labels to what the kind keeps (names, floats, lists of names) and check the
    names against ``allowed`` when given. ``text``: the labels are CSV / TSV cells."""
    allowed = list(allowed or [])
    raw = dict(raw)
    lines = raw.pop("_line", None)
    if kind.per_token:
        bad = {t for seq in raw["tags"] for t in seq} - set(allowed) if allowed else set()
        if bad:
            raise ValueError(
                f"tag(s) {sorted(bad)} in {source} are not in the label set {allowed}; "
                "fix the file or pass the full label_names"
            )
        return raw

    def name_of(value: Any, where: str) -> str:
        name = str(value) if raw_to_name is None else raw_to_name.get(str(value))
        if name is None or (allowed and name not in allowed):
            expected = list(raw_to_name) if raw_to_name else allowed
            if raw_to_name and allowed and all(raw_to_name.get(a) == a for a in allowed):
                expected = f"{allowed} (or their numbers 0 to {len(allowed) - 1})"
            raise ValueError(
                f"label {value!r} in {where} is not one of the allowed labels {expected}; "
                "fix the file or pass the full label_names"
            )
        return name

    labels = []
    for i, value in enumerate(raw["label"]):
        where = f"{source}:{lines[i]}" if lines else source
        labels.append(kind.parse_label(value, where, lambda v, w=where: name_of(v, w), text))
    return {**raw, "label": labels}


_LABEL_FEATURES = {str: Value("string"), float: Value("float64"), list: List(Value("string"))}
"""The column type of a kind's labels (``TaskKind.label_type``)."""


def _to_dataset(columns: dict[str, list], kind: TaskKind) -> Dataset:
    if kind.per_token:
        features = Features(tokens=List(Value("string")), tags=List(Value("string")))
    else:
        features = Features({k: Value("string") for k in columns if k != "label"})
        features["label"] = _LABEL_FEATURES[kind.label_type]
    return Dataset.from_dict(columns, features=features)


def _tag_names(tags: Iterable[str]) -> list[str]:
    """Sorted tag set with ``"O"`` first."""
    tags = set(tags)
    return (["O"] if "O" in tags else []) + sorted(tags - {"O"})


# --------------------------------------------------------------------------- sources


def _benchmark_local(spec: _Benchmark, root: Path) -> tuple[dict[str, Dataset], list[str]]:
    """Read the official files: ``(splits, tag names or [] to infer them)``."""
    splits = {}
    kind = kind_of(spec.task_type)
    for split, rel in spec.files.items():
        path = _require(root / rel, _MISSING_HINT)
        if kind.per_token:
            raw = read_conll(path)
        else:
            raw = _read_table(path, spec.fmt, spec.columns, spec.fieldnames)
            to_name = dict(zip(spec.raw_labels, spec.label_names)) if spec.raw_labels else None
            text = spec.fmt != "jsonl"
            raw = _finish_labels(raw, str(path), kind, to_name, spec.label_names, text)
        splits[split] = _to_dataset(raw, kind)
    return splits, []


def _benchmark_hub(name: str, spec: _Benchmark) -> tuple[dict[str, Dataset], list[str]]:
    """Load from the hub: ``(splits, tag names or [] to infer them)``."""
    repo, config, revision = spec.hub
    logger.info("no data directory given: loading %s from the Hugging Face hub (%s)", name, repo)
    try:
        hub = datasets.load_dataset(repo, config, revision=revision)
    except Exception as e:  # network, missing repo, offline mode: all mean "no data here"
        raise FileNotFoundError(
            f"no data directory given for {name!r} and loading {repo!r} from the Hugging Face hub "
            f"failed ({type(e).__name__}: {e}). {_MISSING_HINT}"
        ) from e
    kind = kind_of(spec.task_type)
    wanted = {"train": "train", "test": spec.hub_test}
    if kind.per_token:
        wanted["validation"] = "validation"
    splits, tag_names = {}, []
    for split, hub_split in wanted.items():
        ds, source = hub[hub_split], f"hub:{repo}/{hub_split}"
        hub_columns = spec.hub_columns or spec.columns
        raw = {k: ds[col][:] for k, col in hub_columns.items()}
        feature = ds.features[hub_columns["tags" if kind.per_token else "label"]]
        if kind.per_token:
            inner = getattr(feature, "feature", None)
            names = inner.names if isinstance(inner, ClassLabel) else _CONLL_HUB_TAGS
            raw["tags"] = [[names[i] for i in seq] for seq in raw["tags"]]
            tag_names = _tag_names(names)
            raw = _finish_labels(raw, source, kind)
        elif not kind.has_labels:
            raw = _finish_labels(raw, source, kind)
        else:
            names = feature.names if isinstance(feature, ClassLabel) else spec.label_names
            to_name = {str(i): _HUB_RENAME.get(n, n) for i, n in enumerate(names)}
            raw["label"] = [str(i) for i in raw["label"]]  # -1 (unlabelled) fails the check
            raw = _finish_labels(raw, source, kind, to_name, spec.label_names)
        splits[split] = _to_dataset(raw, kind)
    return splits, tag_names


def _user_files(
    name: str,
    files: dict[str, str | os.PathLike],
    columns: dict[str, Any] | None,
    data_dir: str | os.PathLike | None,
    task_type: str | None,
    label_names: list[str] | Mapping[Any, str] | None,
) -> tuple[str, dict[str, Dataset], list[str]]:
    if not files or "train" not in files:
        raise ValueError(f"task {name!r} needs files={{'train': PATH, ...}} (got {files!r})")
    if unknown := sorted(set(files) - set(SPLITS)):
        raise ValueError(f"unknown split(s) {unknown} in files; use {list(SPLITS)}")
    if name == "conll":
        task_type = task_type or TOK
        defaults: dict[str, Any] = {"tokens": 0, "tags": -1}
    else:
        task_type = task_type or SEQ
        defaults = {"text": "text", "text_pair": None, "label": "label"}
    kind = KINDS.get(task_type) if isinstance(task_type, str) else None
    if kind is None or (name == "conll") != kind.per_token:
        raise ValueError(
            f"task_type {task_type!r} does not fit user format {name!r}"
            + ("" if kind else f"; the task types are {list(KINDS)}")
        )
    if not kind.has_labels and label_names:
        raise ValueError(f"label_names contradicts task_type {task_type!r}; drop one of them")
    to_name, names = _label_map(label_names, kind)
    if unknown := sorted(set(columns or {}) - set(defaults)):
        raise ValueError(f"unknown column key(s) {unknown} for {name!r}; use {list(defaults)}")
    cols = {k: v for k, v in {**defaults, **(columns or {})}.items() if v is not None}
    if name == "conll" and not all(isinstance(v, int) for v in cols.values()):
        raise ValueError(f"CoNLL columns must be column indices (int), got {cols}")

    splits = {}
    for split, file in files.items():
        path = Path(file)
        if data_dir is not None and not path.is_absolute():
            path = Path(data_dir) / path
        _require(path, f"Check files[{split!r}]: relative paths start at --data-dir if given.")
        text = False
        if kind.per_token:
            raw = read_conll(path, cols["tokens"], cols["tags"])
        else:
            fmt = _format_of(path, name)
            raw = _read_table(path, fmt, cols, empty_label=kind.label_may_be_empty)
            text = fmt != "jsonl"
        splits[split] = _to_dataset(
            _finish_labels(raw, str(path), kind, to_name, names, text), kind
        )
    return task_type, splits, names


def _label_map(
    label_names: list[str] | Mapping[Any, str] | None, kind: TaskKind
) -> tuple[dict[str, str] | None, list[str]]:
    """``(raw label -> name, names in id order)`` of a user task's ``label_names``.

    A mapping maps each raw value (as text) to its name. A list keeps a label that is one of
    its names, and reads an integer ``i`` as the i-th name (``["neg", "pos"]`` for 0 and 1).
    Tags (token tasks) are taken as they are: only a list of them is accepted.
    """
    if not label_names:
        return None, []
    if isinstance(label_names, Mapping):
        if kind.per_token:
            raise ValueError(
                "label_names for a CoNLL task is the list of tags in id order, not a mapping"
            )
        to_name = {str(raw): str(name) for raw, name in label_names.items()}
        return to_name, list(dict.fromkeys(to_name.values()))
    names = [str(name) for name in label_names]
    if len(set(names)) != len(names):
        raise ValueError(f"label_names names a label twice: {names}")
    if kind.per_token:
        return None, names
    to_name = {name: name for name in names}
    for i, name in enumerate(names):
        to_name.setdefault(str(i), name)
    return to_name, names


# --------------------------------------------------------------------------- entry point


def _sample_sizes(sample: int | dict[str, int] | None) -> dict[str, int]:
    """``sample`` as split -> number of examples; checks the splits and numbers."""
    if sample is None:
        return {}
    sizes = dict.fromkeys(SPLITS, sample) if isinstance(sample, int) else dict(sample)
    unknown = [s for s in sizes if s not in SPLITS]
    if unknown:
        raise ValueError(f"sample names unknown split(s) {unknown}; the splits are {list(SPLITS)}")
    for split, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"sample: {split} must be a positive number of examples, got {size!r}")
    return sizes


def load_task_data(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 42,
    files: dict[str, str | os.PathLike] | None = None,
    columns: dict[str, Any] | None = None,
    limit: int | None = None,
    sample: int | dict[str, int] | None = None,
    task_type: str | None = None,
    label_names: list[str] | Mapping[Any, str] | None = None,
) -> TaskData:
    """Load a benchmark or user task into standard columns and train / validation / test splits.

    Args:
        name: ``"imdb"``, ``"cola"``, ``"rte"``, ``"stsb"``, ``"conll2003"``, or a user format:
            ``"csv"`` (CSV, or TSV by file extension), ``"jsonl"``, ``"conll"``.
        data_dir: Folder with the official files (``imdb/``, ``glue/CoLA/``, ...). Defaults to
            ``$ADALAYERS_DATA_DIR``; if neither is set, benchmarks come from the Hugging Face hub.
            For user tasks, relative paths in ``files`` are taken from this argument.
        seed: Seed of the validation hold-out split.
        files: User tasks only: ``{"train": path, "validation": path, "test": path}``; only
            ``"train"`` is required. ``.gz`` files are decompressed.
        columns: User tasks only. CSV / JSONL: ``{"text": ..., "text_pair": ..., "label": ...}``
            (defaults ``"text"``, none, ``"label"``); CoNLL: ``{"tokens": 0, "tags": -1}``
            (column indices).
        limit: Keep the first ``limit`` examples of every split (after splitting).
        sample: Keep a random subset of every split (after splitting), drawn with ``seed`` and
            kept in file order: a number of examples for every split, or ``{split: number}``
            (splits not named stay whole). A split smaller than the number stays whole.
        task_type: User CSV / JSONL only: ``"sequence_classification"`` (default),
            ``"regression"`` (labels parsed as floats) or ``"multilabel_classification"``
            (JSONL: a list of label names; CSV: names joined by ``|``).
        label_names: User tasks only: the full label set, in id order; labels outside it raise.
            A list of names (a label that is one of them stays itself; CSV / JSONL: an
            integer ``i`` stands for the i-th name, so ``["neg", "pos"]`` names 0 and 1), or
            CSV / JSONL: a mapping from the value in the file to its name, e.g.
            ``{"0": "not_paraphrase", "1": "paraphrase"}``. Defaults to the sorted labels
            found (tags: ``"O"`` first).

    Returns:
        The :class:`TaskData`.

    Raises:
        FileNotFoundError: A data file is missing (or the hub is unreachable without a data dir).
        ValueError: Unknown task, bad column mapping, malformed file, unknown or missing label,
            empty file.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples, got {limit}")
    if limit is not None and sample is not None:
        raise ValueError("limit and sample contradict each other: give only one")
    sizes = _sample_sizes(sample)
    if name in BENCHMARKS:
        if files or columns or task_type or label_names:
            raise ValueError(
                f"files / columns / task_type / label_names are for user tasks, "
                f"not for the benchmark {name!r}"
            )
        spec = BENCHMARKS[name]
        root = resolve_data_dir(data_dir)
        if root is not None:
            splits, label_names = _benchmark_local(spec, root)
        else:
            splits, label_names = _benchmark_hub(name, spec)
        task_type = spec.task_type
    elif name in USER_FORMATS:
        task_type, splits, label_names = _user_files(
            name, files, columns, data_dir, task_type, label_names
        )
    else:
        raise ValueError(f"unknown task {name!r}; use one of {[*BENCHMARKS, *USER_FORMATS]}")

    kind = kind_of(task_type)
    if "validation" not in splits:
        stratify = "label" if kind.stratify else None
        splits["train"], splits["validation"] = split_validation(
            splits["train"], seed=seed, stratify_by=stratify
        )
    if "test" not in splits:
        logger.warning("%s: no test file given; the test split repeats the validation split", name)
        splits["test"] = splits["validation"]
    if not kind.has_labels:
        label_names = []
    elif not label_names:  # benchmark's fixed set, else every label found (before `limit`)
        label_names = list(BENCHMARKS[name].label_names) if name in BENCHMARKS else []
        if not label_names and kind.per_token:
            label_names = _tag_names(t for ds in splits.values() for seq in ds["tags"] for t in seq)
        elif not label_names:
            found = {n for ds in splits.values() for x in ds["label"] for n in kind.names_in(x)}
            label_names = sorted(found)
    if limit is not None:
        splits = {s: ds.select(range(min(limit, len(ds)))) for s, ds in splits.items()}
    for split, size in sizes.items():
        ds = splits[split]
        if size < len(ds):
            rng = random.Random(f"{seed}-{split}")
            splits[split] = ds.select(sorted(rng.sample(range(len(ds)), size)))
    result = DatasetDict({s: splits[s] for s in SPLITS})
    logger.info("%s: %s", name, {s: len(ds) for s, ds in result.items()})
    return TaskData(name=name, task_type=task_type, label_names=label_names, splits=result)
