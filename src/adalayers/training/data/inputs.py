"""Inputs to predict on, read from a file: the one reader behind ``adalayers predict --input``.

Formats, by file extension:

* ``.jsonl`` / ``.json``: one JSON value a line: a string, or an object with ``text`` (a string)
  and, for sentence pairs, ``text_pair``, or ``tokens`` (a list of words, token tasks);
* ``.csv`` / ``.tsv``: a header row, then one input a row, in the column of ``text`` and, for
  sentence pairs, that of ``text_pair`` (other columns, such as the label, are ignored);
* anything else: plain text, one input a line.

The field and column names are the standard ones (``text``, ``text_pair``, ``tokens``) or those
a run's ``data.columns`` maps them to, so the files a task was trained on can be read as they
are. Lines are split on ``\\n`` (and ``\\r\\n``) only, not on U+2028 or form feeds, which can sit
inside a text; a leading byte order mark is dropped; blank lines are skipped. Every error names
``file:line``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HINT = (
    "predict --input reads UTF-8 text: a .txt file with one text a line, a .jsonl file with one "
    "JSON string or object a line, or a .csv / .tsv file with a header row"
)
STANDARD = {"text": "text", "text_pair": "text_pair", "tokens": "tokens"}


@dataclass
class Inputs:
    """What a file holds to predict on.

    Attributes:
        path: the file.
        texts: one input a row: a text, or a list of words (``tokens``).
        pairs: the second text of each row (sentence pairs), or ``None`` when the file has none.
        lines: the line number of each row in the file (its first line, for a CSV record that
            spans several).
    """

    path: Path
    texts: list[str | list[str]]
    pairs: list[str] | None
    lines: list[int]

    def where(self, index: int) -> str:
        """``file:line`` of row ``index``."""
        return f"{self.path}:{self.lines[index]}"


def read_inputs(path: str | os.PathLike, columns: Mapping[str, Any] | None = None) -> Inputs:
    """Read the inputs of ``path`` (the format from its extension, see the module docstring).

    Args:
        path: the file.
        columns: standard name (``text``, ``text_pair``) -> the field or column holding it, as
            in a run's ``data.columns``; the standard name is read where that one is absent.
            Integer entries (CoNLL column indices) are ignored.

    Returns:
        The :class:`Inputs`: texts, the pair texts if the file has them, line numbers.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that is not UTF-8 text or holds a NUL byte (a binary file), a line
            that is not valid JSON or not a string / ``text`` object, a CSV row with another
            number of cells than the header, no text column, some rows with a pair and some
            without, or no inputs; the message names ``file:line``.
    """
    path = Path(path)
    names = _names(columns)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _json_rows(path, names)
    elif suffix in (".csv", ".tsv"):
        rows = _table_rows(path, names, "\t" if suffix == ".tsv" else ",")
    else:
        rows = [(n, line, None) for n, line in read_lines(path) if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no inputs")
    with_pair = [n for n, _, pair in rows if pair is not None]
    if with_pair and len(with_pair) != len(rows):
        without = next(n for n, _, pair in rows if pair is None)
        raise ValueError(
            f"{path}:{without}: has no {_shown(names, 'text_pair')} while line {with_pair[0]} "
            f"has one: give every input its pair, or none"
        )
    return Inputs(
        path=path,
        texts=[text for _, text, _ in rows],
        pairs=[pair for _, _, pair in rows] if with_pair else None,
        lines=[n for n, _, _ in rows],
    )


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` without a leading byte order mark.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not UTF-8 text, or a NUL byte (a binary file); names the file and the line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}:{line_no}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}: {err.reason}); is it a binary file? {HINT}"
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        line_no = text.count("\n", 0, nul) + 1
        raise ValueError(f"{path}:{line_no}: holds a NUL byte; is it a binary file? {HINT}")
    return text


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, split on ``\\n`` (and ``\\r\\n``) only.

    ``str.splitlines`` would also split on U+2028, form feeds and other characters that can sit
    inside a text or a JSON string. A leading byte order mark is dropped.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_text`.
    """
    text = read_text(path)
    return [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), 1)]


# -- formats ------------------------------------------------------------------------------------
Row = tuple[int, str | list[str], str | None]  # line, text or words, pair text


def _names(columns: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """Standard name -> the names to look for, the configured one first."""
    names = {key: [value] for key, value in STANDARD.items()}
    for key, value in (columns or {}).items():
        if key in names and isinstance(value, str) and value != key:
            names[key] = [value, key]
    return names


def _shown(names: dict[str, list[str]], key: str) -> str:
    return " or ".join(repr(n) for n in names[key])


def _first(row: Mapping[str, Any], names: list[str]) -> tuple[str | None, Any]:
    for name in names:
        if name in row:
            return name, row[name]
    return None, None


def _json_rows(path: Path, names: dict[str, list[str]]) -> list[Row]:
    rows: list[Row] = []
    expected = (
        f"expected a string, or an object with {_shown(names, 'text')} (a string, and "
        f"{_shown(names, 'text_pair')} for a sentence pair) or {_shown(names, 'tokens')} (a "
        f"list of strings)"
    )
    for line_no, line in read_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from None
        pair = None
        if isinstance(value, dict):
            key, words = _first(value, names["tokens"])
            if key is None:
                key, text = _first(value, names["text"])
                pair_key, pair = _first(value, names["text_pair"])
                if pair_key is not None and not isinstance(pair, str):
                    raise ValueError(f"{path}:{line_no}: {pair_key!r} must be a string")
                value = text
            else:
                value = words
        if isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(w, str) for w in value)
        ):
            rows.append((line_no, value, pair))
        else:
            raise ValueError(f"{path}:{line_no}: {expected}")
    return rows


def _table_rows(path: Path, names: dict[str, list[str]], delimiter: str) -> list[Row]:
    text = read_text(path)
    # newline="": the csv module splits records on \n, \r\n and \r only (not on U+2028)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[Row] = []
    text_col = pair_col = None
    kind = "TSV" if delimiter == "\t" else "CSV"
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise ValueError(f"{path}:{reader.line_num}: not valid {kind} ({err})") from None
        if not record or not "".join(record).strip():
            continue
        if header is None:
            header = record
            text_col = next((header.index(n) for n in names["text"] if n in header), None)
            if text_col is None:
                raise ValueError(
                    f"{path}:{start}: the header has no column {_shown(names, 'text')} "
                    f"(columns: {header}); name the column of the texts so, or set the run's "
                    f"data.columns"
                )
            pair_col = next((header.index(n) for n in names["text_pair"] if n in header), None)
            continue
        if len(record) != len(header):
            raise ValueError(
                f"{path}:{start}: expected {len(header)} {kind} columns ({', '.join(header)}), "
                f"found {len(record)}"
            )
        pair = record[pair_col] if pair_col is not None else None
        rows.append((start, record[text_col], pair))
    return rows
