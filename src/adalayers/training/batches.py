"""From tokenised examples to the batches a model reads.

:func:`tokenize` turns a split into token ids and aligned labels; :func:`length_batches` plans
batches of similar length; :func:`collate` pads them into tensors, or, with a feature store,
reads the cached hidden states of their real tokens instead (:func:`read_states`), only those
the mixer still weighs (:func:`active_layers`, :func:`ensure_states`); :func:`batch_loader` puts
the three together behind a ``DataLoader`` that Accelerate shards across processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from adalayers.core.encoding import align_labels, tokenize_words
from adalayers.core.kinds import TaskKind
from adalayers.core.task import Task, TaskConfig
from adalayers.training.cache import FeatureStore
from adalayers.training.data import TaskData

logger = logging.getLogger(__name__)


# -- tokenising ------------------------------------------------------------------------------
def tokenize(
    data: TaskData,
    split: str,
    tokenizer: Any,
    task: Task | TaskConfig,
    max_length: int,
    stats: dict[str, Any] | None = None,
) -> Any:
    """Tokenise one split: ``input_ids``, ``attention_mask``, ``labels``, ``index``, ``length``.

    ``labels`` holds each example's targets as the task's kind stores them
    (:meth:`~adalayers.core.kinds.TaskKind.targets`).

    Token tasks: the first sub-token of a word carries its label, the others are ignored. A
    word beyond ``max_length`` is cut, and a word the tokenizer turns into no token at all
    (a variation selector ``U+FE0F``, a stray byte-order mark) has no token to carry its
    label: both are scored as ``O`` in evaluation, and a warning tells them apart (raising
    ``data.max_length`` keeps only the first). Examples longer than ``max_length`` are cut
    with a warning; the longest example's length in tokens is logged.

    Args:
        stats: filled with ``longest`` (tokens of the longest example, before cutting),
            ``cut_examples``, and for token tasks ``cut_words`` and ``empty_words``.
    """
    ds = data.splits[split]
    ds = ds.add_column("index", list(range(len(ds))))
    found = {"longest": 0, "cut_examples": 0, "cut_words": 0, "empty_words": 0}
    empty_examples: list[str] = []
    kind = task.kind

    def encode(batch: dict[str, list]) -> dict[str, list]:
        if kind.per_token:
            enc, rows, _ = tokenize_words(
                tokenizer, batch["tokens"], truncation=True, max_length=max_length
            )
            full = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) >= max_length]
            uncut: dict[int, tuple[int, set[int]]] = {}  # full row -> (tokens, words seen)
            if full:
                again, again_rows, _ = tokenize_words(tokenizer, [batch["tokens"][i] for i in full])
                for i, ids, word_ids in zip(full, again["input_ids"], again_rows):
                    uncut[i] = (len(ids), {w for w in word_ids if w is not None})
            labels = []
            word_targets = kind.targets(task, batch["tags"])  # ids, one per word
            for i, (word_ids, words, tags) in enumerate(zip(rows, batch["tokens"], word_targets)):
                seen = {w for w in word_ids if w is not None}
                missing = set(range(len(tags))) - seen
                tokens, seen_uncut = uncut.get(i, (len(enc["input_ids"][i]), seen))
                cut = missing & seen_uncut
                found["cut_words"] += len(cut)
                found["cut_examples"] += bool(cut)
                found["empty_words"] += len(missing - cut)
                found["longest"] = max(found["longest"], tokens)
                if len(empty_examples) < 20:
                    empty_examples.extend(words[w] for w in sorted(missing - cut))
                labels.append(align_labels(word_ids, tags))
        else:
            pairs = batch.get("text_pair")
            enc = tokenizer(batch["text"], pairs, truncation=True, max_length=max_length)
            lengths = [len(ids) for ids in enc["input_ids"]]
            full = [i for i, n in enumerate(lengths) if n >= max_length]
            if full:
                again = tokenizer(
                    [batch["text"][i] for i in full],
                    None if pairs is None else [pairs[i] for i in full],
                )
                for i, ids in zip(full, again["input_ids"]):
                    lengths[i] = len(ids)
            found["cut_examples"] += sum(n > max_length for n in lengths)
            found["longest"] = max([found["longest"], *lengths])
            labels = kind.targets(task, batch["label"])
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        out["labels"] = labels
        out["length"] = [len(ids) for ids in enc["input_ids"]]
        return out

    keep = {"index"}
    ds = ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names if c not in keep])
    where = f"{data.name}/{split}"
    logger.info(
        "%s: the longest example has %d tokens (max_length %d)", where, found["longest"], max_length
    )
    if found["cut_words"]:
        logger.warning(
            "%s: %d word(s) of %d sentence(s) beyond max_length=%d were cut; they are scored "
            "as 'O' in evaluation. The longest sentence has %d tokens: raise data.max_length "
            "to keep them.",
            where,
            found["cut_words"],
            found["cut_examples"],
            max_length,
            found["longest"],
        )
    elif found["cut_examples"]:
        logger.warning(
            "%s: %d example(s) longer than max_length=%d tokens were cut (the longest has %d); "
            "raise data.max_length to keep more of them.",
            where,
            found["cut_examples"],
            max_length,
            found["longest"],
        )
    if found["empty_words"]:
        shown = ", ".join(ascii(w) for w in dict.fromkeys(empty_examples).keys())
        logger.warning(
            "%s: %d word(s) become no token at all with this tokenizer (%s); they get no "
            "prediction of their own and are scored as 'O'. Raising data.max_length does not "
            "change this: remove such words from the data if they should not count.",
            where,
            found["empty_words"],
            shown[:200],
        )
    if stats is not None:
        stats.update(found)
    return ds


# -- batches ---------------------------------------------------------------------------------
def collate(
    features: list[dict[str, Any]],
    pad_id: int,
    store: FeatureStore | None = None,
    layers: Callable[[], Sequence[int] | None] | None = None,
    kind: TaskKind | None = None,
) -> dict[str, Any]:
    """Pad a list of tokenised examples into tensors; ``labels`` as ``kind`` batches them
    (:meth:`~adalayers.core.kinds.TaskKind.batch_targets`; without a kind, one number an
    example).

    With a feature ``store`` the batch holds the cached hidden states of the real tokens,
    packed without padding, instead of token ids: ``states`` (n, N, d), ``state_layers`` (n,)
    and ``state_rows`` (2, N), each row's example and position (see
    :meth:`~adalayers.core.mixer.LayerMixer.forward_rows`). ``layers`` (called per batch) names the
    states to read, e.g. only those the mixer still gives a weight; default: all stored.
    """
    width = max(f["length"] for f in features)
    batch: dict[str, Any] = {}
    if store is not None:
        wanted = layers() if layers is not None else None
        batch.update(read_states(store, [f["index"] for f in features], wanted))
        lengths = torch.tensor([f["length"] for f in features])  # (B,)
        batch["attention_mask"] = (torch.arange(width) < lengths[:, None]).long()  # (B, T)
    else:
        for key, pad in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in features[0]:
                batch[key] = torch.tensor(
                    [f[key] + [pad] * (width - len(f[key])) for f in features]
                )
    labels = [f["labels"] for f in features]
    if kind is not None:
        batch["labels"] = kind.batch_targets(labels, width)
    elif isinstance(labels[0], list):
        raise ValueError("examples with a list of targets each need the task's kind to collate")
    else:
        batch["labels"] = torch.tensor(labels)
    batch["index"] = torch.tensor([f["index"] for f in features])
    return batch


def length_batches(
    lengths: list[int], batch_size: int, *, shuffle: bool, seed: int
) -> list[list[int]]:
    """Batches of similar length (less padding). Shuffled: random order, sorted within pools of
    50 batches, batches shuffled; not shuffled: sorted by length."""
    order = np.argsort(lengths, kind="stable").tolist()
    if shuffle:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(lengths)).tolist()
        pool = batch_size * 50
        order = [
            i
            for s in range(0, len(order), pool)
            for i in sorted(order[s : s + pool], key=lambda i: lengths[i])
        ]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


class CachedExamples(torch.utils.data.Dataset):
    """The columns a cached batch needs (``index``, ``length``, ``labels``), held as lists.

    A batch from the feature cache needs no token ids, and reading these three from the Arrow
    table for every batch costs more than reading the states from the store. Indexing with a
    column name returns the column, like a ``datasets.Dataset``.
    """

    COLUMNS = ("index", "length", "labels")

    def __init__(self, ds: Any) -> None:
        self.columns = ds.select_columns(list(self.COLUMNS)).to_dict()

    def __len__(self) -> int:
        return len(self.columns["index"])

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self.columns[key]
        return {name: values[key] for name, values in self.columns.items()}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self[i] for i in indices]


def batch_loader(
    accelerator: Any,
    ds: Any,
    batch_size: int,
    pad_id: int,
    *,
    shuffle: bool,
    seed: int,
    store: FeatureStore | None = None,
    task: Task | None = None,
    kind: TaskKind | None = None,
) -> Any:
    """Batches of ``ds``, their labels as ``kind`` (default ``task``'s) batches them; with a
    ``store`` they read only the states ``task``'s mixer uses."""
    if store is not None and not isinstance(ds, CachedExamples):
        ds = CachedExamples(ds)
    batches = length_batches(ds["length"][:], batch_size, shuffle=shuffle, seed=seed)
    layers = None if task is None else (lambda: active_layers(task))
    kind = kind if kind is not None or task is None else task.kind
    # the loader's own generator: iterating it then draws nothing from the global one, so a
    # run resumed mid-epoch (a new iterator after the RNG is restored) sees the same dropout
    # masks as the run that was not cut
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=batches,
        collate_fn=lambda f: collate(f, pad_id, store, layers, kind),
        generator=torch.Generator().manual_seed(seed),
    )
    return accelerator.prepare_data_loader(loader)


def read_states(
    store: FeatureStore, indices: Sequence[int], wanted: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """The batch entries holding the cached states of ``indices``: ``states`` (n, N, d),
    ``state_layers`` (n,), ``state_rows`` (2, N); only the ``wanted`` states (default all)."""
    layers = store.layers if wanted is None else [i for i in store.layers if i in wanted]
    rows, index = store.rows(indices, layers)
    # plain tensors: they travel through Accelerate
    return {"states": rows, "state_layers": torch.tensor(layers), "state_rows": index}


def active_layers(task: Task) -> list[int]:
    """The states ``task``'s mixer gives a non-zero weight now (cut layers are not read)."""
    with torch.no_grad():
        return [layer for layer, _ in task.mixer.active_layers()]


def ensure_states(batch: dict[str, Any], store: FeatureStore | None, task: Task) -> None:
    """Read a cached batch's states again if the mixer now weighs a state it lacks.

    Batches are collated one step ahead (the loader looks ahead), and a state the cutoff had
    removed can come back after an optimizer step: then this batch reads all it needs.
    """
    if store is None or "state_layers" not in batch:
        return
    wanted = active_layers(task)
    if set(wanted) <= set(batch["state_layers"].tolist()):
        return
    device = batch["states"].device
    fresh = read_states(store, batch["index"].tolist(), wanted)
    batch.update({key: value.to(device) for key, value in fresh.items()})
