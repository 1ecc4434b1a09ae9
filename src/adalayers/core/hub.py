"""A task on the Hugging Face Hub: a task folder is a model repository.

A saved task (``config.json``, ``labels.json``, ``model.safetensors``; see
:meth:`~adalayers.core.task.Task.save_pretrained`) is pushed as it is, with a model card
(``README.md``: :func:`model_card`) and, for a training run, its layer-weight figure.
:meth:`Task.from_pretrained("org/name") <adalayers.core.task.Task.from_pretrained>` finds such a
repository through :func:`resolve_task`, which downloads only the task's files and the card into
the Hugging Face cache (``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` reads the cache alone), then loads
the snapshot folder with every check a local folder gets.

Downloading runs in two steps, so a repository that is not a task costs nothing: first
``config.json``, ``labels.json`` and ``README.md``, and the config is checked
(:func:`~adalayers.core.task.read_task_config`); only then ``model.safetensors``, of the same
commit. No other file of the repository is fetched (no ``pytorch_model.bin``: no pickle).

Why not ``huggingface_hub.PyTorchModelHubMixin`` (which SetFit and GLiNER use): its
``from_pretrained`` builds the model from ``config.json`` as keyword arguments of ``__init__``
and allocates it *before* reading the weights, falls back to ``pytorch_model.bin`` (a pickle)
when a repository has no safetensors, and writes its own ``config.json``. A task's config is a
checked schema (:class:`~adalayers.core.task.TaskConfig` + the base's
:class:`~adalayers.core.backbone.BaseInfo`) compared with the safetensors header before anything
is allocated, and the saved format is fixed (``tests/test_saved_format.py``). What the mixin adds
beyond that is ``create_repo`` + one commit, done here with :class:`~huggingface_hub.HfApi`
directly.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    snapshot_download,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from adalayers.core.backbone import _EMBEDDED_ALIASES, DEFAULT_BASE
from adalayers.core.models import SMOLLM2_ALIASES
from adalayers.core.task import (
    CONFIG_NAME,
    LABELS_NAME,
    MAX_CONFIG_BYTES,
    WEIGHTS_NAME,
    read_task_config,
)

if TYPE_CHECKING:
    from adalayers.core.task import Task

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
FIGURE_NAME = "layer_weights.png"
"""The layer-weight figure in a pushed repository (a training run writes it beside ``model/``)."""
TASK_FILES = (CONFIG_NAME, LABELS_NAME, WEIGHTS_NAME)
REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME)
"""What makes a repository an adalayers task (``labels.json`` repeats the config's labels)."""
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LIBRARY_NAME = "adalayers"


# -- names -----------------------------------------------------------------------------------
def looks_like_repo_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` reads as a Hub repository id ``org/name`` (no local path is looked at).

    A single name without ``/``, an absolute path or one starting with ``.`` or ``~`` is never
    taken for a repository: such a string is a local folder that does not exist.
    """
    text = str(name)
    if text.count("/") != 1 or text.startswith((".", "~")) or os.path.isabs(text):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def hub_base_id(name_or_path: str) -> str | None:
    """The Hub id of a task's base (:attr:`BaseInfo.name_or_path`), or ``None`` where it is a
    local folder: the embedded aliases map to their Hub models (``all-MiniLM-L6-v2`` ->
    ``sentence-transformers/all-MiniLM-L6-v2``, ``smollm2`` -> ``HuggingFaceTB/SmolLM2-135M-
    Instruct``); another name counts when it reads as ``org/name`` and is no folder here."""
    lowered = name_or_path.lower()
    if lowered in _EMBEDDED_ALIASES:
        return DEFAULT_BASE
    if lowered in SMOLLM2_ALIASES:
        return SMOLLM2_HUB_ID
    if looks_like_repo_id(name_or_path) and not Path(name_or_path).exists():
        return name_or_path
    return None


# -- loading ---------------------------------------------------------------------------------
def resolve_task(
    name_or_folder: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """The local folder of a task: ``name_or_folder`` itself when it exists (or cannot be a
    repository id), else the snapshot of Hub repository ``org/name`` in the Hugging Face cache.

    Args:
        name_or_folder: a task folder, or a repository id ``org/name``.
        revision: a branch, tag or commit of the repository (default ``main``).
        cache_dir: the Hugging Face cache (default ``HF_HUB_CACHE``).
        token: a Hub token for a private repository (default: the saved login / ``HF_TOKEN``).
        local_files_only: read the cache only, as ``HF_HUB_OFFLINE=1`` does.
        force_download: download the files again even if cached.

    Returns:
        A folder holding ``config.json`` and ``model.safetensors`` (a repository's config has
        been checked; the caller loads it as any task folder).

    Raises:
        FileNotFoundError: the repository is not on the Hub (nor in the cache when offline), or
            is not an adalayers task (the message names the missing files).
        ValueError: its ``config.json`` is not a task's; ``revision`` given for a local folder.
    """
    path = Path(name_or_folder)
    if path.exists() or not looks_like_repo_id(name_or_folder):
        if revision is not None and path.exists():
            raise ValueError(
                f"revision={revision!r} names a version of a Hub repository, but {path} is a "
                f"local folder; drop revision, or give the repository id"
            )
        return path
    repo_id = str(name_or_folder)
    options: dict[str, Any] = {
        "cache_dir": cache_dir,
        "token": token,
        "local_files_only": local_files_only,
        "force_download": force_download,
    }
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    folder: Path | None = None
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=[CONFIG_NAME, LABELS_NAME, CARD_NAME],
                **options,
            )
        )
        _check_repository(repo_id, folder, cache_dir)
        # the weights of the very commit whose config was checked (a branch may move meanwhile)
        snapshot_download(repo_id, revision=folder.name, allow_patterns=[WEIGHTS_NAME], **options)
    except RevisionNotFoundError as err:
        raise FileNotFoundError(
            f"the Hub repository {repo_id} has no revision {revision!r}"
        ) from err
    except GatedRepoError as err:
        raise FileNotFoundError(
            f"{where} is a gated repository: accept its conditions on the Hub and log in "
            f"(hf auth login, or HF_TOKEN)"
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"{repo_id} is neither a local folder nor a Hub repository (or it is private: log "
            f"in with hf auth login, or set HF_TOKEN)"
        ) from err
    except (IncompleteSnapshotError, LocalEntryNotFoundError) as err:
        cache = cache_dir or constants.HF_HUB_CACHE
        if folder is not None or isinstance(err, IncompleteSnapshotError):
            raise FileNotFoundError(
                f"{where}: the Hugging Face cache ({cache}) holds only part of it, and the Hub "
                f"cannot be reached{_offline_note(local_files_only)}. Download it again with the "
                f"Hub reachable."
            ) from err
        raise FileNotFoundError(
            f"{repo_id} is not a local folder, and the Hugging Face cache ({cache}) holds no "
            f"snapshot of {where}{_offline_note(local_files_only)}. Download it once with the "
            f"Hub reachable, or give the task's folder."
        ) from err
    return folder


def _offline_note(local_files_only: bool) -> str:
    if local_files_only:
        return " (local_files_only: the Hub is not asked)"
    if constants.is_offline_mode():
        return " (HF_HUB_OFFLINE is set: the Hub is not asked)"
    return ""


def _repository_files(repo_id: str, folder: Path, cache_dir: Any) -> tuple[list[str], bool]:
    """The repository's files at the snapshot's commit, and whether that is its full listing
    (the tree ``snapshot_download`` cached) rather than the files of the cache alone."""
    cached = sorted(p.name for p in folder.iterdir())
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:  # a huggingface_hub without cached listings
        return cached, False
    try:
        tree = get_cached_repo_tree(repo_id, revision=folder.name, cache_dir=cache_dir)
    except CachedRepoTreeNotFoundError:  # offline, and never downloaded with the Hub reachable
        return cached, False
    return sorted(f.path for f in tree), True


def _check_repository(repo_id: str, folder: Path, cache_dir: Any) -> None:
    """Refuse a repository that is not an adalayers task before its weights are downloaded.

    Raises:
        FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing (named).
        ValueError: ``config.json`` is not a task config (a transformers model's, say).
    """
    files, complete = _repository_files(repo_id, folder, cache_dir)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        held = ", ".join(files[:10]) + (", ..." if len(files) > 10 else "") if files else "none"
        scope = "the repository" if complete else f"its files in the cache ({folder})"
        raise FileNotFoundError(
            f"{repo_id} is not an adalayers task: {scope} has no {' and no '.join(missing)} "
            f"(files: {held}). A task repository holds {', '.join(TASK_FILES)}, as "
            f"Task.save_pretrained writes them and Task.push_to_hub uploads them"
            f"{'' if complete else _offline_note(False)}."
        )
    try:
        read_task_config(folder / CONFIG_NAME)
    except ValueError as err:
        hint = _model_hint(folder)
        if hint:
            raise ValueError(f"{repo_id} is not an adalayers task{hint}: {err}") from None
        raise ValueError(f"{repo_id}: {err}") from None


def _model_hint(folder: Path) -> str:
    """`` (a transformers model: ...)`` when the config is a model's, else ``""``."""
    path = folder / CONFIG_NAME
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return ""
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return ""
    if isinstance(meta, dict) and "model_type" in meta and "task_type" not in meta:
        return (
            f" (its {CONFIG_NAME} is a transformers model's, model_type {meta['model_type']!r}: "
            f"load it as a base with load_backbone, and a task onto it)"
        )
    return ""


# -- the model card --------------------------------------------------------------------------
def _scalars(values: Any) -> dict[str, float]:
    """The finite numbers of a split's metrics (``per_type`` and other nested values left out)."""
    if not isinstance(values, Mapping):
        return {}
    return {
        str(k): float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _weight_bars(weights: Mapping[int, float], width: int = 40) -> str:
    """The layer distribution as a text bar chart (a fenced block)."""
    top = max(weights.values(), default=0.0) or 1.0
    lines = ["state  weight"]
    for layer, weight in sorted(weights.items()):
        lines.append(f"{layer:>5}  {weight:.3f}  {'█' * round(width * weight / top)}")
    return "```text\n" + "\n".join(lines) + "\n```"


def model_card(
    task: Task,
    *,
    repo_id: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    figure: str | None = None,
) -> ModelCard:
    """The ``README.md`` of a task's repository.

    Its metadata: ``base_model`` (:func:`hub_base_id`; left out for a base that is a local
    folder), ``library_name: adalayers``, ``pipeline_tag`` (``token-classification`` for a
    per-token kind, else ``text-classification``), ``tags`` and, from a run's ``metrics``, the
    validation and test scores as ``model-index`` results (``ModelCardData.eval_results``).
    Its text: what the task is, the scores, the learned layer weights (the ``figure`` and a
    text bar chart) and how to use it. The run's example inputs (``metrics["samples"]``) are
    never copied into the card.

    Args:
        task: the task.
        repo_id: where it goes (``org/name``): the model-index name and the usage snippet.
        metrics: a run's ``metrics.json`` (``task``: the data's name, ``metric``: the primary
            one, ``validation`` / ``test``: metric -> value, ``parameters_added``,
            ``percent_of_base``).
        figure: the path of the layer-weight image inside the repository, if pushed with it.
    """
    kind = task.kind
    pipeline_tag = "token-classification" if kind.per_token else "text-classification"
    base_id = hub_base_id(task.base.name_or_path)
    metrics = metrics or {}
    dataset = str(metrics.get("task") or "") or None
    scores = {split: _scalars(metrics.get(split)) for split in ("validation", "test")}
    scores = {split: values for split, values in scores.items() if values}
    results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=split,
            metric_type=name,
            metric_value=value,
            metric_name=f"{name} ({split})",
        )
        for split, values in scores.items()
        for name, value in values.items()
        if dataset
    ]
    name = repo_id or dataset or "adalayers-task"
    data = ModelCardData(
        base_model=base_id,
        library_name=LIBRARY_NAME,
        pipeline_tag=pipeline_tag,
        tags=[LIBRARY_NAME, "layer-mixing", "frozen-base", kind.name],
        eval_results=results or None,
        model_name=name if results else None,
    )
    repo = repo_id or "org/name"
    base = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else task.base.name_or_path
    labels = ", ".join(f"`{label}`" for label in task.labels[:20])
    if len(task.labels) > 20:
        labels += f" (and {len(task.labels) - 20} more)"
    percent = metrics.get("percent_of_base")
    added = f"{task.num_parameters():,}" + (
        f" ({percent:.3g} % of the base)" if isinstance(percent, (int, float)) else ""
    )
    pairs = {True: "sentence pairs (text, text_pair)", False: "single texts"}.get(
        task.text_pair, "single texts or pairs"
    )
    lines = [
        f"# {name}",
        "",
        "An adalayers side task"
        + (f" trained on `{dataset}`" if dataset else "")
        + f": a learned mix of the hidden states of the frozen base {base} and a small "
        f"{kind.name.replace('_', ' ')} head. The base is not in this repository and is never "
        "changed; the task reads the states the base computes anyway.",
        "",
        f"- **Task type:** `{kind.name}`",
    ]
    if labels:
        lines.append(f"- **Labels:** {labels}")
    lines += [
        f"- **Reads:** {'words of single texts' if kind.per_token else pairs}",
        f"- **Base:** {base}, fingerprint `{task.base.fingerprint}` (the task refuses another "
        f"base)",
        f"- **Parameters added:** {added}",
    ]
    if scores:
        names = list(dict.fromkeys(n for values in scores.values() for n in values))
        primary = metrics.get("metric")
        lines += ["", "## Results", ""]
        if primary:
            lines += [f"Best epoch chosen on validation `{primary}`.", ""]
        lines.append("| split | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for split, values in scores.items():
            cells = [f"{values[n]:.4f}" if n in values else "" for n in names]
            lines.append(f"| {split} | " + " | ".join(cells) + " |")
    lines += ["", "## Layer weights", ""]
    lines += [
        "How much each hidden state of the base (0 = embeddings) contributes to the task:",
        "",
    ]
    if figure:
        lines += [f"![learned layer weights]({figure})", ""]
    lines += [_weight_bars(task.mixer.layer_weights()), ""]
    short = repo.rsplit("/", 1)[-1]
    # a base trained from a local folder: say where to find it
    base_arg = "" if base_id else ', base="the base it was trained on (folder or hub id)"'
    lines += [
        "## Usage",
        "",
        "```python",
        "from adalayers import AdaLayers, Task, load_runs",
        "",
        f'task = Task.from_pretrained("{repo}")  # config.json + model.safetensors, no code run',
        f'runtime = load_runs({{"{short}": "{repo}"}}{base_arg})  # base loaded, task checked',
        'runtime.predict(["Some text."])',
        "# or onto a base you hold: AdaLayers(backbone, {"
        f'"{short}": Task.from_pretrained("{repo}", backbone)}})',
        "```",
        "",
        "```bash",
        f"adalayers info {repo}",
        f"adalayers serve {repo}  # POST /predict",
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# -- pushing ---------------------------------------------------------------------------------
def push_to_hub(
    task: Task | str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    metrics: Mapping[str, Any] | None = None,
    figure: str | os.PathLike | None = None,
) -> CommitInfo:
    """Upload a task to the Hub repository ``repo_id`` (created if needed) in one commit:
    ``config.json``, ``labels.json``, ``model.safetensors``, the :func:`model_card` as
    ``README.md`` and, if given, ``figure`` as ``layer_weights.png``.

    Args:
        task: a :class:`~adalayers.core.task.Task`, or a saved task folder (loaded first, so a
            broken folder is refused before anything is sent; its files are uploaded as they are).
        repo_id: ``org/name``.
        private: create the repository private (an existing one keeps its visibility).
        token: a Hub token (default: the saved login / ``HF_TOKEN``).
        revision: the branch to commit to (created from ``main`` if missing).
        commit_message: default ``"Upload adalayers task"``.
        create_pr: open a pull request instead of committing to the branch.
        metrics: a run's ``metrics.json``, for the card (see :func:`model_card`).
        figure: the layer-weight image (a run's ``layer_weights.png``).

    Returns:
        The commit (``.commit_url``, ``.oid``; ``.pr_url`` with ``create_pr``).

    Raises:
        FileNotFoundError: ``task`` is a folder that is not a saved task, or ``figure`` is
            missing.
    """
    import tempfile

    from adalayers.core.task import Task

    if not looks_like_repo_id(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repository id: write it as org/name")
    if figure is not None and not Path(figure).is_file():
        raise FileNotFoundError(f"{figure} not found (the layer-weight figure to upload)")
    with tempfile.TemporaryDirectory(prefix="adalayers-push-") as tmp:
        if isinstance(task, Task):
            folder = task.save_pretrained(Path(tmp) / "task")
        else:
            folder = Path(task)
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} is not a folder: give a saved task's folder")
            task = Task.from_pretrained(folder)
        card = model_card(
            task, repo_id=repo_id, metrics=metrics, figure=FIGURE_NAME if figure else None
        )
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
            for name in TASK_FILES
            if (folder / name).is_file()
        ]
        operations.append(
            CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(card).encode())
        )
        if figure is not None:
            operations.append(
                CommitOperationAdd(path_in_repo=FIGURE_NAME, path_or_fileobj=str(figure))
            )
        api = HfApi(token=token, library_name=LIBRARY_NAME)
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(url.repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(
            url.repo_id,
            operations,
            commit_message=commit_message or "Upload adalayers task",
            revision=revision,
            create_pr=create_pr,
        )
    logger.info("pushed the task to %s", commit.commit_url)
    return commit
