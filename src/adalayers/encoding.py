"""Text -> token ids: input checks, truncation, windows for long token inputs, label alignment."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def check_texts(texts: Sequence[Any], what: str = "text") -> list[str]:
    """Return ``texts`` as a list of strings, or raise naming the first bad item.

    Raises:
        TypeError: an item is not a string.
        ValueError: an item is empty or whitespace only.
    """
    if isinstance(texts, str):
        raise TypeError(f"expected a list of {what}s, got a single string; wrap it in a list")
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what} at index {i} is {type(text).__name__}, expected str")
        if not text.strip():
            raise ValueError(
                f"{what} at index {i} is empty or whitespace only; there is "
                f"nothing to predict on. Drop it or replace it before calling."
            )
        out.append(text)
    if not out:
        raise ValueError(f"no {what}s given")
    return out


def check_words(items: Sequence[Any]) -> list[list[str]]:
    """Words per input for token tasks: a string is split on whitespace; a list is kept.

    Raises:
        TypeError: an item is neither a string nor a list of strings.
        ValueError: an item has no words, or one of its words is empty.
    """
    if isinstance(items, str):
        raise TypeError("expected a list of inputs, got a single string; wrap it in a list")
    out = []
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
            raise ValueError(
                f"input at index {i} is empty or whitespace only; there is nothing "
                f"to label. Drop it or replace it before calling."
            )
        if any(not w.strip() for w in words):
            raise ValueError(f"input at index {i} contains an empty word")
        out.append(words)
    if not out:
        raise ValueError("no inputs given")
    return out


def encode_sequences(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenise (pairs of) texts, truncating to ``max_length`` with a logged warning."""
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
    """
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
