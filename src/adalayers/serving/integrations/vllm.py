"""Side tasks inside vLLM: every request's prompt labelled from the prefill the engine runs anyway.

The taps live in vLLM's worker process (:mod:`adalayers.serving.integrations.vllm_worker`);
this module is the client side: it checks the saved tasks against the engine's model, installs
them through ``LLM.collective_rpc`` and turns each request's logits into predictions with the
task's own kind, exactly as :meth:`~adalayers.core.multitask.AdaLayers.predict` does.

Offline::

    from adalayers.serving.integrations.vllm import SideTasks, engine_args
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":  # vLLM's engine core spawns processes
        llm = LLM(model_path, **engine_args(dtype="bfloat16", max_model_len=2048))
        side = SideTasks(llm, ["runs/sentiment", "runs/ner"])
        outputs = side.generate(prompts, SamplingParams(max_tokens=128))
        outputs[0].side_tasks  # {"sentiment": {"label": ..., "score": ...}, "ner": {...}}

Over HTTP, ``adalayers serve --engine vllm MODEL RUN...`` starts ``vllm serve`` with the
worker extension and :class:`~adalayers.serving.integrations.vllm_http.SideTaskMiddleware`.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adalayers.core.backbone import FINGERPRINT_VERSION, BaseInfo, fingerprint_files
from adalayers.core.task import BaseMismatchError, Task
from adalayers.serving.integrations.vllm_worker import EXTENSION, TASKS_ARG
from adalayers.serving.runtime import _task_names, content_positions, resolve_run

__all__ = ["SideTasks", "engine_args", "postprocess", "check_engine_model"]


def engine_args(**kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` with the adalayers worker extension.

    Adds ``worker_extension_cls`` and ``enforce_eager=True`` (the taps are forward hooks,
    which CUDA graphs and compiled graphs do not run).

    Raises:
        ValueError: ``enforce_eager=False`` or another ``worker_extension_cls`` was asked for.
    """
    if kwargs.get("enforce_eager") is False:
        raise ValueError("adalayers side tasks need enforce_eager=True; drop enforce_eager=False")
    other = kwargs.get("worker_extension_cls")
    if other not in (None, EXTENSION):
        raise ValueError(f"worker_extension_cls is taken by adalayers ({EXTENSION}), got {other}")
    return {**kwargs, "enforce_eager": True, "worker_extension_cls": EXTENSION}


def resolve_tasks(tasks: Sequence[str | os.PathLike] | Mapping[str, Any]) -> dict[str, Path]:
    """Task name -> saved task folder, from run folders, task folders or ``NAME=PATH``."""
    named = dict(tasks) if isinstance(tasks, Mapping) else _task_names(list(tasks))
    if not named:
        raise ValueError("no tasks given")
    return {name: resolve_run(path)[0] for name, path in named.items()}


def check_engine_model(tasks: Mapping[str, Task], model: str | os.PathLike) -> None:
    """Refuse tasks trained on another base than the engine's model folder ``model``.

    Compares the number of hidden states and the width with the model's ``config.json`` and,
    where the tasks recorded one, the weights' fingerprint with that of the folder's
    safetensors files.

    Raises:
        BaseMismatchError: naming the task's base and the engine's model.
    """
    folder = Path(model)
    config_file = folder / "config.json"
    if not config_file.is_file():
        return  # a Hub id the engine resolved itself: checked in the worker (states, width)
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)
    layers, width = config.get("num_hidden_layers"), config.get("hidden_size")
    fingerprint = None
    for name, task in tasks.items():
        base: BaseInfo = task.base
        problems = []
        if layers is not None and base.num_states != layers + 1:
            problems.append(f"{base.num_states} vs {layers + 1} hidden states")
        if width is not None and base.hidden_size != width:
            problems.append(f"hidden size {base.hidden_size} vs {width}")
        # the weights: a task saved with the version-1 fingerprint (which hashed the loaded
        # model's config) cannot be compared with the files; its states and width were
        if not problems and base.fingerprint_version == FINGERPRINT_VERSION:
            if fingerprint is None:
                fingerprint = fingerprint_files(folder)
            if base.fingerprint != fingerprint:
                problems.append("different weights")
        if problems:
            raise BaseMismatchError(
                f"task {name!r} was trained on base {base.describe()} but the vLLM engine runs "
                f"{str(folder)!r} ({'; '.join(problems)}). Attach it to an engine of the base it "
                f"was trained on, or retrain it on this one."
            )


_SPECIAL: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The tokenizer's special token ids, read once per tokenizer (a Hugging Face tokenizer
    rebuilds ``all_special_ids`` on every access, and each prompt's token tasks ask)."""
    try:
        return _SPECIAL[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = frozenset(getattr(tokenizer, "all_special_ids", None) or ())
    with contextlib.suppress(TypeError):  # not weakly referable: read it every time
        _SPECIAL[tokenizer] = ids
    return ids


def postprocess(
    task: Task, logits: Any, token_ids: Sequence[int] | None = None, tokenizer: Any = None
) -> dict[str, Any]:
    """One prompt's task logits -> its prediction, as :class:`AdaLayers` gives it.

    Args:
        task: the task.
        logits: (C,) for a sequence task, (T, C) for a token task (nested lists or a tensor).
        token_ids: the prompt's token ids. A token task labels every prompt token but the
            tokenizer's special tokens (chat-template markers, BOS), which training never
            labels; they are named as ``tokenizer`` spells them.
        tokenizer: the engine's tokenizer.
    """
    import torch

    values = torch.as_tensor(logits, dtype=torch.float32)
    if not task.kind.per_token:
        return task.kind.postprocess(task, values)
    ids = list(token_ids or [])
    if tokenizer is not None and ids:
        keep = content_positions(ids, special_ids(tokenizer))
        values, ids = values[keep], [ids[j] for j in keep]
    tokens = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else ids
    return task.kind.postprocess(task, values, tokens=list(tokens))


class SideTasks:
    """Saved tasks attached to a ``vllm.LLM`` built with :func:`engine_args`.

    Args:
        llm: the engine.
        tasks: training run folders or task folders (``NAME=PATH`` names one), or a mapping
            name -> folder.

    Raises:
        BaseMismatchError: a task was trained on another base than the engine's model.
        ValueError: the engine was not built with :func:`engine_args`.
    """

    def __init__(self, llm: Any, tasks: Sequence[str | os.PathLike] | Mapping[str, Any]) -> None:
        self.llm = llm
        folders = resolve_tasks(tasks)
        self.tasks = {name: Task.from_pretrained(folder) for name, folder in folders.items()}
        model = llm.llm_engine.model_config.model
        check_engine_model(self.tasks, model)
        try:
            info = llm.collective_rpc(
                "adalayers_install", args=({n: str(f) for n, f in folders.items()},)
            )
        except AttributeError as err:
            raise ValueError(
                f"the vLLM engine has no adalayers worker extension ({err}): build it with "
                f"LLM(model, **engine_args(...))"
            ) from err
        self.engine = info[0]

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def check_names(self, tasks: Sequence[str] | None) -> list[str]:
        """The task names a request asks for (default: all); unknown ones raise a ValueError
        listing the known names."""
        if tasks is None:
            return self.names
        if isinstance(tasks, str):
            tasks = [tasks]
        unknown = [name for name in tasks if name not in self.tasks]
        if unknown:
            raise ValueError(f"unknown side task(s) {unknown}; this engine has {self.names}")
        return list(tasks)

    def sampling_params(self, params: Any = None, tasks: Sequence[str] | None = None) -> Any:
        """A copy of ``params`` (default ``SamplingParams()``) asking for ``tasks`` (default
        all) and not reading the prefix cache, whose tokens the taps would never see."""
        from vllm import SamplingParams

        names = self.check_names(tasks)
        params = (params or SamplingParams()).clone()
        params.extra_args = {**(params.extra_args or {}), TASKS_ARG: names}
        params.skip_reading_prefix_cache = bool(names) or params.skip_reading_prefix_cache
        return params

    def generate(
        self,
        prompts: Any,
        sampling_params: Any = None,
        *,
        tasks: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """``llm.generate`` with side tasks: each ``RequestOutput`` gains ``side_tasks`` (task
        name -> prediction) and ``side_tasks_error`` (a message, or ``None``)."""
        if isinstance(sampling_params, Sequence):
            params: Any = [self.sampling_params(p, tasks) for p in sampling_params]
        else:
            params = self.sampling_params(sampling_params, tasks)
        outputs = self.llm.generate(prompts, params, **kwargs)
        self.attach_results(outputs)
        return outputs

    def chat(self, messages: Any, sampling_params: Any = None, *, tasks=None, **kwargs: Any):
        """``llm.chat`` with side tasks on the rendered prompt (see :meth:`generate`)."""
        outputs = self.llm.chat(messages, self.sampling_params(sampling_params, tasks), **kwargs)
        self.attach_results(outputs)
        return outputs

    def attach_results(self, outputs: Sequence[Any]) -> None:
        """Fetch the side-task results of finished ``outputs`` and set them on each."""
        results = self.fetch([o.request_id for o in outputs])
        tokenizer = self.llm.get_tokenizer()
        for output in outputs:
            found = results.get(output.request_id)
            output.side_tasks, output.side_tasks_error = None, None
            if found is None:
                continue
            if "error" in found:
                output.side_tasks_error = found["error"]
                continue
            ids = output.prompt_token_ids
            output.side_tasks = self.predictions(found["logits"], ids, tokenizer)

    def fetch(self, request_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Take the raw results (``{"logits": ...}`` or ``{"error": ...}``) of requests."""
        return self.llm.collective_rpc("adalayers_results", args=(list(request_ids),))[0]

    def predictions(
        self, logits: Mapping[str, Any], token_ids: Sequence[int] | None, tokenizer: Any = None
    ) -> dict[str, Any]:
        """Task name -> prediction from one prompt's logits."""
        return {
            name: postprocess(self.tasks[name], v, token_ids, tokenizer)
            for name, v in logits.items()
        }

    def stats(self) -> dict[str, int]:
        """The worker's live buffers and step counters."""
        return self.llm.collective_rpc("adalayers_stats")[0]

    def detach(self) -> None:
        """Remove the taps from the engine; it runs as if they had never been there."""
        self.llm.collective_rpc("adalayers_close")
