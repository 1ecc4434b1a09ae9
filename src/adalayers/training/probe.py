"""Linear probes on the frozen states: the simplest thing a user would try.

:func:`probe_layers` is a training-free ridge probe per state: ``cache.layers: N`` keeps the N
states it scores best (:mod:`.cache_prep`), so a store holds only what the mixer is likely to
use.

:func:`probe_baseline` is the ``probe`` row of ``adalayers compare``: a logistic regression (the
kind's own loss: cross entropy, squared error for a regression, binary cross entropy for
multi-label) fitted by L-BFGS on frozen features, on one state chosen on validation and on the
concatenation of the states. Both read sequence tasks as the masked mean of their tokens and
token tasks as each word's first sub-token, standardised on the training split:

    minimise  mean_n loss(x_n W + b, y_n) + ||W||^2 / (2 C N)        C = 1: scikit-learn's default
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adalayers.core.backbone import Backbone
from adalayers.core.encoding import IGNORE_INDEX
from adalayers.core.kinds import TaskKind
from adalayers.training.cache import token_batches

logger = logging.getLogger(__name__)


def _state_batches(
    backbone: Backbone, ds: Any, kind: TaskKind, positions: Sequence[int], max_tokens: int = 8192
) -> Iterator[tuple[list[int], list[torch.Tensor], torch.Tensor, list[int]]]:
    """Per batch of similar length: its example positions, each state's features (R, d) float32
    (sequence tasks: one masked-mean row per example; token tasks: one row per labelled first
    sub-token), the targets of those rows and the rows of each example."""
    lengths = ds["length"][:]
    pad_id = backbone.tokenizer.pad_token_id
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in ds.column_names]
    for batch in token_batches(lengths, list(positions), max_tokens):
        rows = ds.select(batch)
        width = max(lengths[p] for p in batch)
        inputs = {}
        for column in columns:
            pad = pad_id if column == "input_ids" else 0
            inputs[column] = torch.tensor([r + [pad] * (width - len(r)) for r in rows[column][:]])
        states = backbone.hidden_states({k: v.to(backbone.device) for k, v in inputs.items()})
        labels = rows["labels"][:]
        mask = inputs["attention_mask"].float()
        feats = []
        if kind.per_token:
            lab = torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels])
            keep = lab != IGNORE_INDEX  # (B, T)
            for z in states:
                feats.append(z.float().cpu()[keep])  # (R, d)
            yield batch, feats, lab[keep], keep.sum(1).tolist()
        else:
            for z in states:
                pooled = (z.float().cpu() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                feats.append(pooled)  # (B, d)
            yield batch, feats, kind.batch_targets(labels, width), [1] * len(batch)


@torch.inference_mode()
def probe_layers(
    backbone: Backbone,
    ds: Any,
    kind: TaskKind,
    num_outputs: int,
    max_examples: int = 2000,
    seed: int = 0,
) -> dict[int, float]:
    """A training-free score per hidden state: held-out quality of a ridge probe.

    Sequence tasks probe the masked mean of the tokens, token tasks each word's first sub-token.
    The kind says what the probe fits and how it is scored
    (:meth:`~adalayers.core.kinds.TaskKind.probe_targets`, ``probe_score``: classification
    accuracy, the Pearson correlation of a regression, ...); 80% fit / 20% score.
    """
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(ds))[:max_examples].tolist()
    feats: dict[int, list[torch.Tensor]] = {i: [] for i in range(backbone.num_states)}
    targets: list[torch.Tensor] = []
    for _, states, rows_targets, _ in _state_batches(backbone, ds, kind, picks):
        targets.append(rows_targets)
        for i, x in enumerate(states):
            feats[i].append(x)
    y = kind.probe_targets(torch.cat(targets), num_outputs)  # (N, K)
    n = len(y)
    split = int(0.8 * n)
    order = torch.from_numpy(rng.permutation(n))
    fit_idx, test_idx = order[:split], order[split:]
    scores = {}
    for i, chunks in feats.items():
        x = torch.cat(chunks).double()
        x = (x - x[fit_idx].mean(0)) / (x[fit_idx].std(0) + 1e-6)
        x = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
        a = x[fit_idx]
        w = torch.linalg.solve(
            a.T @ a + 10.0 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y[fit_idx]
        )
        pred = x[test_idx] @ w  # (n, K)
        scores[i] = kind.probe_score(pred, y[test_idx])
    return scores


PROBE_C = 1.0
"""The inverse L2 strength of the probe's fit (scikit-learn's ``LogisticRegression`` default)."""


def _scores(
    task: Any,
    data: Any,
    split: str,
    logits: torch.Tensor,
    targets: torch.Tensor,
    counts: Sequence[int],
    names: Any,
    positive: int | None,
) -> dict[str, Any]:
    """The task's metrics of a probe's ``logits`` on ``split`` (token tasks: decoded per
    sentence as the task decodes, scored on the words)."""
    from adalayers.core.decoding import decode_words

    kind, labels = task.kind, task.labels
    if not kind.per_token:
        predicted = kind.predict(task, logits).tolist()
        scores = kind.compute_metrics(targets.tolist(), predicted, names=names, positive=positive)
    else:
        gold = [list(t) for t in data.splits[split]["tags"]]
        tags, first = [], 0
        for count, words in zip(counts, gold):
            rows = logits[first : first + count]  # (words, C)
            ids = decode_words(rows, labels, task.decoding)[0] if count else []
            first += count
            found = [labels[i] for i in ids]
            tags.append(found + ["O"] * (len(words) - len(found)))
        scores = kind.compute_metrics(gold, tags, names=names)
        scores.pop("per_type", None)
    return {**scores, "examples": len(counts)}


def _cached_features(
    store: Any,
    examples: Any,
    kind: TaskKind,
    positions: Sequence[int],
    layers: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Features (S, R, d) of a cached split's stored states (``layers``, default all; sequence
    tasks: each example's mean over its tokens; token tasks: its labelled first sub-tokens),
    their targets and the rows of each example, in the order of ``positions``."""
    layers = list(store.layers if layers is None else layers)
    per_state: list[list[torch.Tensor]] = [[] for _ in layers]
    targets, counts = [], []
    labels, index = examples["labels"], examples["index"]
    for p in positions:
        if kind.per_token:
            row = torch.tensor(labels[p])
            keep = row != IGNORE_INDEX
            targets.append(row[keep])
            counts.append(int(keep.sum()))
        else:
            counts.append(1)
        for j, layer in enumerate(layers):
            z = store.example(index[p], layer)  # (T, d) float32
            per_state[j].append(z[keep] if kind.per_token else z.mean(0, keepdim=True))
    if not kind.per_token:
        targets = [kind.batch_targets([labels[p] for p in positions], 0)]
    x = torch.stack([torch.cat(rows) for rows in per_state])  # (S, R, d)
    return x, torch.cat(targets), counts


def probe_check(
    task: Any,
    data: Any,
    stores: dict[str, Any],
    examples: dict[str, Any],
    metric: str,
    *,
    names: Any = None,
    positive: int | None = None,
    seed: int = 0,
    max_examples: int = 5_000,
    max_rows: int = 100_000,
    c: float = PROBE_C,
    max_iter: int = 100,
) -> dict[str, Any] | None:
    """The validation score of the simplest baseline, read from the feature cache: a logistic
    regression (the kind's loss) on one stored state, the state chosen on validation, fitted
    on at most ``max_rows`` rows (words of a token task, chosen with ``seed``).

    It is meant for small training sets, where a head may not pay: with more than
    ``max_examples`` training examples it does nothing and returns ``None`` (the validation
    split is scored whole, once per state, which on large sets would cost more than it tells).

    ``adalayers train`` runs it at the end of a cached run and says so when the trained head
    does not beat it (:mod:`adalayers.training.headline`). Needs the train and validation
    splits cached; returns ``None`` otherwise.

    Args:
        examples: split -> the tokenised split (``index``, ``labels`` columns).

    Returns:
        ``{"state", "validation", "validation_by_state", "train_examples", "train_rows",
        "seconds"}``, or ``None`` (no cached train and validation, or a large training set).
    """
    if not {"train", "validation"} <= set(stores):
        return None
    n_train = len(examples["train"]["index"])
    if n_train > max_examples:
        return None
    start = time.perf_counter()
    kind = task.kind
    with torch.no_grad():
        x_fit, y_fit, _ = _cached_features(stores["train"], examples["train"], kind, range(n_train))
        if x_fit.shape[1] > max_rows:
            generator = torch.Generator().manual_seed(seed)
            rows = torch.randperm(x_fit.shape[1], generator=generator)[:max_rows].sort().values
            x_fit, y_fit = x_fit[:, rows], y_fit[rows]
        n_val = len(examples["validation"]["index"])
        x_val, y_val, counts = _cached_features(
            stores["validation"], examples["validation"], kind, range(n_val)
        )
    mean, sd = x_fit.mean(1, keepdim=True), x_fit.std(1, keepdim=True) + 1e-6
    x_fit, x_val = (x_fit - mean) / sd, (x_val - mean) / sd
    outputs = kind.num_outputs(task.labels)
    by_state, fits = {}, {}
    for j, layer in enumerate(stores["train"].layers):
        w, b = fits[layer] = fit_linear(x_fit[j], y_fit, kind, outputs, c, max_iter)
        scores = _scores(task, data, "validation", x_val[j] @ w + b, y_val, counts, names, positive)
        by_state[layer] = scores[metric]
    best = max(by_state, key=lambda layer: by_state[layer])  # the first on ties
    out: dict[str, Any] = {
        "state": best,
        "validation": by_state[best],
        "validation_by_state": {str(k): v for k, v in by_state.items()},
    }
    if "test" in stores and "test" in examples:  # the chosen state's probe, scored once
        j = stores["train"].layers.index(best)
        n_test = len(examples["test"]["index"])
        with torch.no_grad():
            x_test, y_test, counts = _cached_features(
                stores["test"], examples["test"], kind, range(n_test), layers=[best]
            )
        w, b = fits[best]
        x_test = (x_test[0] - mean[j]) / sd[j]
        out["test"] = _scores(task, data, "test", x_test @ w + b, y_test, counts, names, positive)[
            metric
        ]
    out.update(
        {
            "train_examples": n_train,
            "train_rows": int(x_fit.shape[1]),
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    return out


# -- the probe baseline of ``adalayers compare`` ----------------------------------------------


def _probe_stores(
    config: Any, backbone: Backbone, data: Any, tokenized: dict[str, Any], max_length: int
) -> dict[str, Any]:
    """The feature stores of a cached config (``train.cache: true``), every state of every split
    of ``cache.splits``: built where missing, shared with the comparison's mixer-family rows
    (which store every state too), so the probe runs the base only for splits not cached. Reads
    the base, data and tokenised splits the probe already holds."""
    import dataclasses

    from adalayers.training.build import build_task, make_accelerator
    from adalayers.training.cache_prep import prepare_cache

    cache = config.cache
    if cache.layers is None and not cache.all_layers:
        config = dataclasses.replace(config, cache=dataclasses.replace(cache, all_layers=True))
    task = build_task(config, data, backbone)
    accelerator = make_accelerator(config)
    return prepare_cache(
        config, accelerator, backbone, data, task, dict(tokenized), max_length, False
    )[2]


def _split_features(
    backbone: Backbone, ds: Any, kind: TaskKind, positions: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``positions`` of a tokenised split -> features (S, R, d) of every state, the targets of
    the R rows and the rows of each example, all in the order of ``positions``."""
    parts: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}
    for batch, states, targets, counts in _state_batches(backbone, ds, kind, positions):
        start = 0
        for p, count in zip(batch, counts):
            rows = slice(start, start + count)
            parts[p] = ([x[rows] for x in states], targets[rows])
            start += count
    x = torch.stack([torch.cat([parts[p][0][i] for p in positions]) for i in range(len(states))])
    targets = torch.cat([parts[p][1] for p in positions])
    counts = [len(parts[p][1]) for p in positions]
    return x, targets, counts  # (S, R, d), (R, ...), (len(positions),)


def fit_linear(
    x: torch.Tensor,
    targets: torch.Tensor,
    kind: TaskKind,
    num_outputs: int,
    c: float = PROBE_C,
    max_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` (D, K) and ``b`` (K,) minimising ``mean loss(x W + b) + ||W||^2 / (2 c N)`` (the
    kind's loss) by L-BFGS with a strong-Wolfe line search, from zero: for classification the
    multinomial logistic regression scikit-learn fits with ``C = c``."""
    n, dim = x.shape
    x = x.contiguous()
    # W is held as (K, D): the gradient is then grad^T x, (K, N) @ (N, D), which a BLAS runs
    # about 14x faster than x^T grad, (D, N) @ (N, K), for the few outputs a probe has
    w = torch.zeros(num_outputs, dim, dtype=x.dtype, requires_grad=True)  # (K, D)
    b = torch.zeros(num_outputs, dtype=x.dtype, requires_grad=True)  # (K,)
    optimizer = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = kind.loss(F.linear(x, w, b), targets) + (w * w).sum() / (2 * c * n)  # (N, K)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach().T.contiguous(), b.detach()  # (D, K), (K,)


def probe_baseline(
    config: Any,
    output_dir: str | Path,
    concat_dir: str | Path,
    *,
    c: float = PROBE_C,
    max_iter: int = 100,
    max_train_rows: int = 100_000,
    max_concat_bytes: int = 4 * 2**30,
) -> dict[str, Any]:
    """The ``probe`` and ``probe_concat`` rows of a comparison: linear probes on the frozen
    states of ``config``'s base and data (the module's docstring says what is fitted).

    One state is chosen by the validation score of its probe (``train.metric``, else the
    task's primary metric); the other probe reads every state at once (their features
    concatenated). With ``train.cache: true`` the features come from the feature stores
    (built where missing, shared with the comparison's other rows), one state at a time;
    otherwise from one pass of the base. Each is scored on validation and test with the
    task's metrics and written as a run folder (``config.yaml``, ``metrics.json``;
    ``baseline`` ``probe`` / ``probe_concat``), ``output_dir`` and ``concat_dir``.

    Args:
        config: the run configuration (its base, data, ``max_length``, ``task.metrics``,
            ``task.head.decoding``, ``train.seed``; the mixer's ``layers`` restrict the states).
        c: the inverse L2 strength.
        max_iter: L-BFGS iterations.
        max_train_rows: fit on at most this many training rows (examples; words of a token
            task), a random subset chosen with ``train.seed`` where there are more.
        max_concat_bytes: ``probe_concat`` is not fitted (its row says why) where every
            state's features together would take more memory than this.

    Returns:
        The single-state probe's results (what ``metrics.json`` holds).
    """
    from adalayers.core.backbone import load_backbone
    from adalayers.training.batches import CachedExamples, tokenize
    from adalayers.training.build import load_data, max_tokens, task_config
    from adalayers.training.config import save_config
    from adalayers.training.evaluate import selection_metric
    from adalayers.training.run import CONFIG, METRICS, write_json

    start = time.perf_counter()
    data = load_data(config)
    backbone = load_backbone(
        config.base, states=config.base_states, gguf_file=config.gguf_file, dtype=config.dtype
    )
    task = task_config(config, data)
    kind, labels = task.kind, task.labels
    metric = selection_metric(config, data)
    names = config.task.metrics
    positive = kind.positive_id(labels, config.task.positive_label)
    max_length = max_tokens(config, backbone)
    chosen = config.task.mixer.layer_indices(backbone.num_states)
    splits = [s for s in ("train", "validation", "test") if len(data.splits.get(s) or []) > 0]
    tokenized = {s: tokenize(data, s, backbone.tokenizer, task, max_length) for s in splits}
    stores = {}
    if config.train.cache:
        stores = _probe_stores(config, backbone, data, tokenized, max_length)
    cached = all(s in stores and set(chosen) <= set(stores[s].layers) for s in splits)
    if cached:  # one state at a time from the stores: memory for one state's features
        examples = {s: CachedExamples(tokenized[s]) for s in splits}
        logger.info("probe: features from the feature cache (%s)", stores["train"].dtype)

        def states(layers: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]]:
            with torch.no_grad():  # not inference_mode: the fit multiplies these in a graph
                return {
                    s: _cached_features(
                        stores[s], examples[s], kind, range(len(examples[s])), layers=layers
                    )
                    for s in splits
                }

    else:  # one pass of the base over every split, every state kept
        full = {}
        for split in splits:
            ds = tokenized[split]
            with torch.no_grad():
                x, targets, counts = _split_features(backbone, ds, kind, range(len(ds)))
            full[split] = (x[chosen], targets, counts)
            logger.info("probe: %s features of %d rows, %d states", split, x.shape[1], len(chosen))

        def states(layers: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[int]]]:
            where = [chosen.index(layer) for layer in layers]
            return {s: (x[where], targets, counts) for s, (x, targets, counts) in full.items()}

    first = states(chosen[:1])
    extracted = time.perf_counter() - start
    generator = torch.Generator().manual_seed(config.train.seed)
    train_rows = first["train"][0].shape[1]
    fit_rows = torch.randperm(train_rows, generator=generator)[:max_train_rows].sort().values
    y_fit = first["train"][1][fit_rows]
    outputs = kind.num_outputs(labels)

    def standardised(features: dict[str, tuple]) -> dict[str, torch.Tensor]:
        """(S, R, d) per split, standardised per state on the rows the fit reads."""
        fit_x = features["train"][0][:, fit_rows]  # (S, N, d)
        mean, sd = fit_x.mean(1, keepdim=True), fit_x.std(1, keepdim=True) + 1e-6  # (S, 1, d)
        del fit_x
        return {s: (features[s][0] - mean) / sd for s in splits}

    def score(split: str, logits: torch.Tensor) -> dict[str, Any]:
        _, targets, counts = first[split]
        return _scores(task, data, split, logits, targets, counts, names, positive)

    def probe(x: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, Any]], int]:
        w, b = fit_linear(x["train"][fit_rows], y_fit, kind, outputs, c, max_iter)
        evaluated = {s: score(s, x[s] @ w + b) for s in splits if s != "train"}
        return evaluated, w.numel() + b.numel()

    by_layer: dict[int, dict[str, dict[str, Any]]] = {}
    for layer in chosen:
        view = standardised(first if layer == chosen[0] else states([layer]))
        by_layer[layer], size = probe({s: view[s][0] for s in splits})
        logger.info(
            "probe: state %d, validation %s %.4f",
            layer,
            metric,
            by_layer[layer]["validation"][metric],
        )
    best = max(chosen, key=lambda layer: by_layer[layer]["validation"][metric])  # first on ties
    rows = sum(first[s][0].shape[1] for s in splits)
    concat_bytes = 4 * len(chosen) * first["train"][0].shape[-1] * (rows + len(fit_rows))
    concat: dict[str, Any] | None = None
    if concat_bytes <= max_concat_bytes:
        view = standardised(states(chosen))
        concat, concat_size = probe({s: view[s].permute(1, 0, 2).flatten(1) for s in splits})
        del view
    else:
        logger.warning(
            "probe_concat: not fitted: %d states' features of %d rows would take %.1f GiB "
            "(max_concat_bytes %.1f GiB)",
            len(chosen),
            rows,
            concat_bytes / 2**30,
            max_concat_bytes / 2**30,
        )
    seconds = time.perf_counter() - start
    base_parameters = backbone.num_parameters()
    common = {
        "task": data.name,
        "task_type": task.task_type,
        "base": config.base,
        "metric": metric,
        "probe": {
            "c": c,
            "max_iter": max_iter,
            "train_rows": len(fit_rows),
            "states": chosen,
            "feature_seconds": round(extracted, 2),
        },
        "base_parameters": base_parameters,
        "best_epoch": None,
        "epochs_run": None,
        "max_length": max_length,
    }
    if kind.per_token:
        common["decoding"] = task.decoding
    single = {
        **common,
        "baseline": "probe",
        "layer": best,
        **by_layer[best],
        "validation_by_layer": {str(k): v["validation"][metric] for k, v in by_layer.items()},
        "parameters_added": size,
        "percent_of_base": 100 * size / base_parameters,
        "train_seconds": round(seconds, 2),
    }
    joined: dict[str, Any] = {**common, "baseline": "probe_concat"}
    if concat is None:
        joined["skipped"] = (
            f"{len(chosen)} states' features would take {concat_bytes / 2**30:.1f} GiB "
            f"(max_concat_bytes {max_concat_bytes / 2**30:.1f} GiB)"
        )
    else:
        joined.update(
            {
                **concat,
                "parameters_added": concat_size,
                "percent_of_base": 100 * concat_size / base_parameters,
            }
        )
    joined["train_seconds"] = round(seconds, 2)
    for folder, results in ((Path(output_dir), single), (Path(concat_dir), joined)):
        folder.mkdir(parents=True, exist_ok=True)
        save_config(config, folder / CONFIG)
        write_json(folder / METRICS, results)
    return single
