"""Text -> token ids: input checks, truncation, windows for long token inputs, label alignment."""

from __future__ import annotations

import bisect
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Characters that show nothing: whitespace, controls (NUL...), format characters (zero-width
# space, BOM, joiners), combining marks with no base (variation selectors are ones).
_INVISIBLE = frozenset({"Cc", "Cf", "Mn", "Me", "Zs", "Zl", "Zp"})
_SURROGATE = re.compile("[\ud800-\udfff]")
_DROP = "Drop it or replace it before calling."


class InputError(ValueError):
    """An input that cannot be predicted on. The message names its index and what to do.

    Attributes:
        what: what the input is ("text", "input", "pair text").
        index: its position in the list given.
        reason: what is wrong with it, e.g. ``"is empty or whitespace only"``.
        advice: what to do about it.
    """

    def __init__(self, what: str, index: int, reason: str, advice: str = _DROP) -> None:
        super().__init__(f"{what} at index {index} {reason}. {advice}")
        self.what, self.index, self.reason, self.advice = what, index, reason, advice

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.what, self.index, self.reason, self.advice)


def _preview(text: str, limit: int = 24) -> str:
    return ascii(text[:limit]) + ("..." if len(text) > limit else "")


def _untokenized(text: str, verb: str) -> str:
    return (
        f"is empty once tokenized ({_preview(text)}: the tokenizer drops every character of "
        f"it); there is nothing to {verb}"
    )


def text_problem(text: str, verb: str = "predict on") -> tuple[str, str] | None:
    """What makes ``text`` unusable before any tokenizer sees it and what to do about it, or
    None if nothing does.

    Refused: empty or whitespace-only text; text of only invisible characters (controls,
    format characters such as U+200B or the BOM, lone combining marks); a lone surrogate, which
    is not Unicode text and which no tokenizer accepts.
    """
    surrogate = _SURROGATE.search(text)
    if surrogate:
        return (
            f"holds a lone surrogate U+{ord(surrogate.group()):04X} at character "
            f"{surrogate.start()}, which is not valid Unicode text",
            "Decode its source with errors='replace' or drop the character before calling.",
        )
    if not text.strip():
        return f"is empty or whitespace only; there is nothing to {verb}", _DROP
    if all(ch.isspace() or unicodedata.category(ch) in _INVISIBLE for ch in text):
        return (
            f"is empty once invisible characters are dropped ({_preview(text)} holds only "
            f"whitespace, control, format, zero-width or combining characters); there is "
            f"nothing to {verb}",
            _DROP,
        )
    return None


def token_counts(
    tokenizer: Any, texts: Sequence[str], what: str = "text", verb: str = "predict on"
) -> list[int]:
    """Tokens per text without special tokens; raise naming the first text that has none.

    Raises:
        InputError: a text tokenises to nothing (the tokenizer drops all its characters).
    """
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    counts = [len(row) for row in ids]
    for i, n in enumerate(counts):
        if n == 0:
            raise InputError(what, i, _untokenized(texts[i], verb))
    return counts


def check_texts(texts: Sequence[Any], what: str = "text", tokenizer: Any = None) -> list[str]:
    """Return ``texts`` as a list of strings, or raise naming the first bad item.

    Args:
        texts: the inputs.
        what: what to call an input in messages.
        tokenizer: also refuse texts this tokenizer turns into no tokens at all.

    Raises:
        TypeError: an item is not a string.
        InputError: (a ``ValueError``) an item is empty, whitespace or invisible characters
            only, holds a lone surrogate, or tokenises to nothing.
        ValueError: no texts.
    """
    if isinstance(texts, str):
        raise TypeError(f"expected a list of {what}s, got a single string; wrap it in a list")
    out: list[str] = []
    try:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{what} at index {i} is {type(text).__name__}, expected str")
            problem = text_problem(text)
            if problem:
                raise InputError(what, i, *problem)
            out.append(text)
    except (TypeError, InputError):
        if tokenizer is not None and out:  # an earlier text that tokenises to nothing comes first
            token_counts(tokenizer, out, what)
        raise
    if not out:
        raise ValueError(f"no {what}s given")
    if tokenizer is not None:
        token_counts(tokenizer, out, what)
    return out


def check_words(items: Sequence[Any], tokenizer: Any = None) -> list[list[str]]:
    """Words per input for token tasks: a string is split on whitespace; a list is kept.

    Args:
        items: the inputs.
        tokenizer: also refuse inputs of which this (fast) tokenizer maps no token to a word.

    Raises:
        TypeError: an item is neither a string nor a list of strings.
        InputError: (a ``ValueError``) an item has no words, one of its words is empty, or it
            is invisible characters only, holds a lone surrogate or tokenises to nothing.
        ValueError: no inputs.
    """
    if isinstance(items, str):
        raise TypeError("expected a list of inputs, got a single string; wrap it in a list")
    out: list[list[str]] = []
    try:
        for i, item in enumerate(items):
            if isinstance(item, str):
                words = item.split()
            elif isinstance(item, (list, tuple)) and all(isinstance(w, str) for w in item):
                words = list(item)
            else:
                raise TypeError(
                    f"input at index {i} is {type(item).__name__}, expected a string or "
                    f"a list of word strings"
                )
            if not words:
                raise InputError(
                    "input", i, "is empty or whitespace only; there is nothing to label"
                )
            if any(not w.strip() for w in words):
                raise InputError("input", i, "contains an empty word")
            problem = text_problem(" ".join(words), "label")
            if problem:
                raise InputError("input", i, *problem)
            out.append(words)
    except (TypeError, InputError):
        if tokenizer is not None and out:  # an earlier input that tokenises to nothing comes first
            _check_some_word_has_a_token(tokenizer, out)
        raise
    if not out:
        raise ValueError("no inputs given")
    if tokenizer is not None:
        _check_some_word_has_a_token(tokenizer, out)
    return out


def _check_some_word_has_a_token(tokenizer: Any, words: list[list[str]]) -> None:
    """Refuse the first input none of whose tokens maps to a word (what encode_words needs)."""
    _, word_ids, _ = tokenize_words(tokenizer, words, verbose=False)
    for i, ids in enumerate(word_ids):
        if all(w is None for w in ids):
            raise InputError("input", i, _untokenized(" ".join(words[i]), "label"))


def encode_sequences(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenise (pairs of) texts, truncating to ``max_length`` with a logged warning.

    Raises:
        TypeError, ValueError: as :func:`check_texts` with the tokenizer, naming the index in
            ``texts`` of a text or pair text that is not a string, is blank, holds a lone
            surrogate or tokenises to nothing.
    """
    texts = check_texts(texts, "text", tokenizer)
    if pairs is not None:
        pairs = check_texts(pairs, "pair text", tokenizer)
        if len(pairs) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(pairs)} pair texts")
    lengths = tokenizer(texts, pairs, truncation=False, verbose=False)["input_ids"]
    too_long = [i for i, ids in enumerate(lengths) if len(ids) > max_length]
    if too_long:
        logger.warning(
            "%d input(s) longer than the base's %d tokens were truncated (indices %s)",
            len(too_long),
            max_length,
            too_long[:10],
        )
    enc = tokenizer(
        texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    return dict(enc)


@dataclass
class Windows:
    """Token windows over word-split inputs.

    Attributes:
        inputs: tokenizer tensors, one row per window.
        sample: window -> index of the input it came from.
        word_ids: window -> per-token word index (``None`` for special tokens / padding).
        starts: window -> per-token flag: the token starts its word (not a continuation).
    """

    inputs: dict[str, torch.Tensor]
    sample: list[int]
    word_ids: list[list[int | None]]
    starts: list[list[bool]]


def tokenize_words(
    tokenizer: Any, words: Sequence[Sequence[str]], **kwargs: Any
) -> tuple[Any, list[list[int | None]], list[list[bool]]]:
    """Tokenise pre-split words as the base sees ordinary text, and map tokens back to words.

    The words are joined with single spaces and tokenised as a string; character offsets give
    each token's word. (``is_split_into_words=True`` would drop the space before every word for
    byte-level BPE tokenizers such as RoBERTa's, GPT-2's or SmolLM2's.)

    Returns:
        The tokenizer's output (``offset_mapping`` removed), per row the word index of every
        token (``None`` for special tokens, padding and pure whitespace), and per row whether
        each token starts its word (a window opening inside a word does not).

    Raises:
        ValueError: the tokenizer is not a fast tokenizer (offsets are needed).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; token tasks need "
            f"the character offsets only fast (Rust) tokenizers give"
        )
    texts, spans = [], []
    for items in words:
        position, row = 0, []
        for word in items:
            row.append((position, position + len(word)))
            position += len(word) + 1
        texts.append(" ".join(items))
        spans.append(row)
    enc = tokenizer(texts, return_offsets_mapping=True, **kwargs)
    offsets = enc.pop("offset_mapping")
    offsets = offsets.tolist() if hasattr(offsets, "tolist") else offsets
    sample = enc.get("overflow_to_sample_mapping")
    sample = (
        list(range(len(texts)))
        if sample is None
        else list(sample.tolist() if hasattr(sample, "tolist") else sample)
    )
    word_ids, starts = [], []
    for row, offs in enumerate(offsets):
        row_spans = spans[sample[row]]
        ends = [end for _, end in row_spans]
        ids: list[int | None] = []
        flags: list[bool] = []
        previous = None
        for start, end in offs:
            wid = None
            if end > start:
                w = bisect.bisect_right(ends, start)
                if w < len(row_spans) and row_spans[w][0] < end:  # overlaps the word
                    wid = w
            ids.append(wid)
            flags.append(wid is not None and wid != previous and start <= row_spans[wid][0])
            previous = wid
        word_ids.append(ids)
        starts.append(flags)
    return enc, word_ids, starts


def encode_words(
    tokenizer: Any, words: list[list[str]], max_length: int, stride: int | None = None
) -> Windows:
    """Tokenise pre-split words; inputs longer than ``max_length`` become overlapping windows.

    Every word keeps at least one window holding its first sub-token, so every word gets a
    prediction.

    Raises:
        TypeError, ValueError: as :func:`check_words`, naming the index in ``words`` of an input
            that has no words, is blank, holds a lone surrogate or tokenises to nothing.
    """
    words = check_words(words, tokenizer)
    stride = max_length // 4 if stride is None else stride
    enc, word_ids, starts = tokenize_words(
        tokenizer,
        words,
        truncation=True,
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        padding=True,
        return_tensors="pt",
    )
    sample = enc.pop("overflow_to_sample_mapping").tolist()
    if len(sample) > len(words):
        logger.info(
            "%d long input(s) split into windows of %d tokens",
            len(set(s for s in sample if sample.count(s) > 1)),
            max_length,
        )
    return Windows(dict(enc), sample, word_ids, starts)


def word_logits(
    windows: Windows, logits: torch.Tensor, num_words: Sequence[int]
) -> list[torch.Tensor]:
    """Per input, (num_words, C) logits read at each word's first sub-token.

    Where windows overlap, a word takes the window in which its first sub-token has the most
    context on both sides. A word the tokenizer maps to no token at all gets zero logits.
    """
    num_inputs = len(num_words)
    best: list[dict[int, tuple[int, torch.Tensor]]] = [{} for _ in range(num_inputs)]
    fallback: list[dict[int, torch.Tensor]] = [{} for _ in range(num_inputs)]
    for w, (s, ids, starts) in enumerate(zip(windows.sample, windows.word_ids, windows.starts)):
        positions = [t for t, wid in enumerate(ids) if wid is not None]
        if not positions:
            continue  # a window without words (encode_words refuses inputs that have none)
        lo, hi = positions[0], positions[-1]
        for t, wid in enumerate(ids):
            if wid is None:
                continue
            fallback[s].setdefault(wid, logits[w, t])
            if not starts[t]:
                continue
            context = min(t - lo, hi - t)
            if wid not in best[s] or context > best[s][wid][0]:
                best[s][wid] = (context, logits[w, t])
    out = []
    for s in range(num_inputs):
        zeros = logits.new_zeros(logits.shape[-1])
        rows = [
            best[s][i][1] if i in best[s] else fallback[s].get(i, zeros)
            for i in range(num_words[s])
        ]
        out.append(torch.stack(rows) if rows else logits.new_zeros((0, logits.shape[-1])))
    return out


def align_labels(word_ids: list[int | None], word_labels: Sequence[int]) -> list[int]:
    """Token labels: a word's first sub-token carries its label, the rest are ignored (-100)."""
    out, previous = [], None
    for wid in word_ids:
        out.append(IGNORE_INDEX if wid is None or wid == previous else word_labels[wid])
        previous = wid
    return out
