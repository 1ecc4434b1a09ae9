"""Turning a token head's scores into tags.

``argmax`` takes each word's most likely tag on its own. ``bio`` takes the most likely tag
*sequence* that is valid IOB2 (Viterbi over the per-word log-probabilities): ``I-X`` only after
``B-X`` or ``I-X``, never first. The head is unchanged; only the reading of its scores is.
Invalid sequences are what a per-word argmax produces where it is unsure of an entity's type or
start, and the conlleval rules then count a stray ``I-X`` as an entity of its own.

``auto`` (the default of ``head.decoding``) is ``bio`` for a token task whose tags are IOB2 and
``argmax`` otherwise; a task is saved with the decoding it resolved to. Which decodings a task
may use is its kind's to say (:meth:`~adalayers.core.kinds.TaskKind.resolve_decoding`,
:meth:`~adalayers.core.kinds.TaskKind.check_decoding`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import torch

DECODINGS = ("argmax", "bio")
AUTO = "auto"
_IOB2 = re.compile(r"^(?:O|[BI]-.+)$")


def check_iob2(labels: Sequence[str]) -> None:
    """Raise a ``ValueError`` unless every label is ``O``, ``B-X`` or ``I-X``."""
    bad = [label for label in labels if not _IOB2.match(label)]
    if bad:
        raise ValueError(
            f"head.decoding=bio needs IOB2 tags (O, B-X, I-X), got {bad[:5]}; "
            f"use head.decoding=argmax for other tag sets"
        )


def is_iob2(labels: Sequence[str]) -> bool:
    """Whether every label is ``O``, ``B-X`` or ``I-X`` and some label is an entity tag."""
    return any(label != "O" for label in labels) and all(_IOB2.match(label) for label in labels)


def follows_iob2(sequences: Iterable[Sequence[str]]) -> bool:
    """Whether every ``I-X`` in ``sequences`` follows ``B-X`` or ``I-X`` (IOB2, not IOB1)."""
    for tags in sequences:
        previous = "O"
        for tag in tags:
            if tag.startswith("I-") and previous[2:] != tag[2:]:
                return False
            previous = tag
    return True


def bio_transitions(labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tags may start a sentence (C,) and follow each tag (C, C) under IOB2.

    Returns:
        ``start``: bool (C,), ``allowed``: bool (C, C) with ``allowed[prev, next]``.
    """
    check_iob2(labels)
    inside = [label[2:] if label.startswith("I-") else None for label in labels]
    entity = [label[2:] if label != "O" else None for label in labels]
    start = torch.tensor([kind is None for kind in inside])
    allowed = torch.tensor(
        [
            [inside[j] is None or entity[i] == inside[j] for j in range(len(labels))]
            for i in range(len(labels))
        ]
    )
    return start, allowed


@lru_cache(maxsize=32)
def _transitions(labels: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return bio_transitions(labels)


def viterbi(log_probs: torch.Tensor, start: torch.Tensor, allowed: torch.Tensor) -> list[int]:
    """The highest-scoring tag sequence using only allowed starts and transitions.

    Args:
        log_probs: (W, C) per-word log-probabilities.
        start: bool (C,), the tags a sequence may begin with.
        allowed: bool (C, C), ``allowed[prev, next]``.

    Returns:
        W tag ids (an empty list for W = 0).
    """
    if log_probs.shape[0] == 0:
        return []
    # numpy, not torch: a few hundred tiny operations, which torch would hand to its thread pool
    # (and contend with an engine on the other cores for); numpy's argmax picks the first of ties
    scores = log_probs.detach().float().cpu().numpy()  # (W, C)
    forbid = np.where(allowed.cpu().numpy(), np.float32(0), np.float32(-np.inf))  # (C, C)
    best = np.where(start.cpu().numpy(), scores[0], np.float32(-np.inf))  # (C,)
    back = np.empty((max(len(scores) - 1, 0), scores.shape[1]), dtype=np.int64)
    for w in range(1, len(scores)):
        candidates = best[:, None] + forbid  # (C_prev, C_next)
        back[w - 1] = candidates.argmax(0)  # (C,)
        best = candidates[back[w - 1], np.arange(len(best))] + scores[w]
    tag = int(best.argmax())
    path = [tag]
    for previous in back[::-1]:
        tag = int(previous[tag])
        path.append(tag)
    return path[::-1]


def decode_words(
    logits: torch.Tensor, labels: Sequence[str], decoding: str
) -> tuple[list[int], list[float]]:
    """One sequence's tags and the probability of each chosen tag.

    Args:
        logits: (W, C) the head's scores at each word.
        labels: the C tag names.
        decoding: ``argmax`` or ``bio``.
    """
    probs = logits.float().softmax(-1)  # (W, C)
    if decoding == "bio":
        start, allowed = _transitions(tuple(labels))
        tags = viterbi(probs.clamp_min(1e-30).log(), start, allowed)
        index = torch.tensor(tags, dtype=torch.long, device=probs.device)
        return tags, probs.gather(-1, index[:, None]).squeeze(-1).tolist()
    if decoding != "argmax":
        raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
    score, index = probs.max(-1)
    return index.tolist(), score.tolist()
