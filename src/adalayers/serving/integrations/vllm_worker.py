"""The worker side of side tasks in vLLM: taps on the decoder, one feature buffer per prompt.

vLLM V1 runs the model in a worker process. :class:`SideTaskExtension` is mixed into that
worker through vLLM's ``worker_extension_cls`` and driven from the client with
``LLM.collective_rpc`` (see :mod:`adalayers.serving.integrations.vllm`). Nothing in the client
is patched, and the engine's own computation is untouched: the taps only read.

What one scheduler step looks like to the taps, and what they do with it:

* **Continuous batching.** The step's tokens of all requests are flattened into one
  ``(N, d)`` tensor, request after request in the order of ``input_batch.req_ids``, each with
  ``num_scheduled_tokens[req]`` tokens at the positions the step's ``positions`` gives. Before
  the forward, the step is planned: for each request, which rows are prompt tokens (position
  below the prompt length) and where they go in its prompt.
* **Streaming.** Every state ``i`` (the embeddings, each decoder layer's output, the final
  norm's output: the ``L + 1`` states Hugging Face reports) passes through the same
  :func:`~adalayers.core.taps.stream_taps` as in :class:`~adalayers.core.multitask.AdaLayers`,
  on the step's prompt rows only. The step leaves one ``(rows, k)`` sum per task; no layer is
  kept.
* **Chunked prefill.** Each prompt owns a ``(prompt_len, k)`` buffer per task it wants, filled
  at the rows' positions as chunks arrive. When every position is filled the head runs once
  and the buffer is freed.
* **Preemption with recompute.** A recomputed prompt writes the same values to the same
  positions (nothing is added twice); a prompt whose head already ran is skipped.
* **Prefix caching.** A prefix read from the cache is never computed, so its states never
  appear: a request that wants side tasks must not read the prefix cache
  (``SamplingParams.skip_reading_prefix_cache=True``, which the client sets). A request that
  arrives with a computed prefix anyway gets an error in place of its labels.
* **Aborts and finished requests.** ``finished_req_ids`` (aborts included) free the request's
  buffers. Finished results wait, at most :data:`MAX_RESULTS` of them, until the client takes
  them.
* **Decode steps** hold no prompt rows: the taps return at once.

Llama-family decoder layers (Llama, Mistral, Qwen2, Qwen3, SmolLM2) return ``(hidden,
residual)`` from the fused add-norm; the state Hugging Face reports after layer ``i`` is their
sum, and after the last layer the final norm's output.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adalayers.core.taps import stream_taps
from adalayers.core.task import Task

logger = logging.getLogger(__name__)

EXTENSION = "adalayers.serving.integrations.vllm_worker.SideTaskExtension"
"""What to pass as ``worker_extension_cls`` to ``vllm.LLM`` or ``vllm serve``."""
TASKS_ARG = "adalayers_tasks"
"""The ``SamplingParams.extra_args`` key (``vllm_xargs`` over HTTP) naming the tasks a request
wants: a list of names or a comma-separated string; absent: every task; empty: none."""
TESTED_VLLM = "0.32.0"
"""The vLLM version the worker side was written and tested against (its model runner's
``execute_model``, ``_model_forward``, ``input_batch.req_ids`` and ``requests``)."""
MAX_RESULTS = 4096
"""Finished requests whose results wait for the client; the oldest are dropped beyond this."""


@dataclass
class _Prompt:
    """One request's prompt while its prefill runs."""

    length: int
    token_ids: list[int]
    names: list[str]
    features: dict[str, torch.Tensor]  # name -> (length, k)
    filled: torch.Tensor  # (length,) bool


@dataclass
class _Segment:
    """The prompt rows of one request in one step."""

    req: str
    start: int  # first row in the step's packed prompt rows
    count: int
    position: int  # position of the first row in the prompt


def _rows(x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _decoder(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.ModuleList, nn.Module]:
    """The embedding, the decoder layers and the final norm of a vLLM decoder model."""
    inner = getattr(model, "model", None)
    parts = [getattr(inner, name, None) for name in ("embed_tokens", "layers", "norm")]
    if inner is None or any(part is None for part in parts):
        raise ValueError(
            f"adalayers taps in vLLM support Llama-style decoders (model.embed_tokens, "
            f"model.layers, model.norm); {type(model).__name__} has another layout"
        )
    embed, layers, norm = parts
    return inner, embed, layers, norm


def _max_positions(task: Task) -> int | None:
    """The longest input a task's learned positions cover, or ``None`` (no limit)."""
    positions = task.mixer.positions
    return None if positions is None else int(positions.shape[0])


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class SideTaskCollector:
    """Taps one vLLM model runner for a set of tasks and turns each prompt into task logits.

    Args:
        tasks: task name -> task (on CPU; run in float32).
        runner: the worker's model runner (``worker.model_runner``).
    """

    def __init__(self, tasks: dict[str, Task], runner: Any) -> None:
        self.tasks = {name: task.eval().float() for name, task in tasks.items()}
        self.runner = runner
        _, embed, layers, norm = _decoder(runner.model)
        self.num_states = len(layers) + 1
        hidden = getattr(runner.model_config.hf_config, "hidden_size", None)
        for name, task in self.tasks.items():
            if task.base.num_states != self.num_states or task.base.hidden_size != hidden:
                raise ValueError(
                    f"task {name!r} was trained on {task.base.describe()} with "
                    f"{task.base.num_states} states of width {task.base.hidden_size}; the "
                    f"engine's model {runner.model_config.model!r} has {self.num_states} states "
                    f"of width {hidden}"
                )
        self.prompts: dict[str, _Prompt] = {}
        self.done: set[str] = set()
        self.results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.stats = {"steps": 0, "prompt_steps": 0, "prompt_rows": 0, "heads": 0}
        self._schedule: Any = None
        self._rows: torch.Tensor | slice | None = None  # the step's prompt rows
        self._segments: list[_Segment] = []
        self._buffers: dict[str, torch.Tensor | None] = {}
        self._taps: dict[int, list[Callable[[int, torch.Tensor], None]]] = {}
        self._tap_sets: dict[frozenset[str], tuple[dict, dict]] = {}
        self._handles = [embed.register_forward_hook(self._hook(0))]
        for i, layer in enumerate(layers[:-1]):
            self._handles.append(layer.register_forward_hook(self._hook(i + 1, pair=True)))
        self._handles.append(norm.register_forward_hook(self._hook(self.num_states - 1)))
        self._saved = {name: vars(runner).get(name) for name in ("execute_model", "_model_forward")}
        self._execute = runner.execute_model
        self._forward = runner._model_forward
        runner.execute_model = self._execute_model  # this worker's runner only
        runner._model_forward = self._model_forward

    def close(self) -> None:
        """Remove the hooks and restore the runner's methods; drop every buffer."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name, saved in self._saved.items():
            if saved is None:
                vars(self.runner).pop(name, None)
            else:
                setattr(self.runner, name, saved)
        self.prompts.clear()
        self.results.clear()
        self.done.clear()

    # -- the taps --------------------------------------------------------------------------------
    def _hook(self, index: int, pair: bool = False) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            rows = self._rows
            if rows is None:  # a decode-only step, or no request wants tasks
                return
            callbacks = self._taps.get(index)
            if not callbacks:
                return
            try:
                with torch.inference_mode():
                    if pair and isinstance(output, tuple):  # the residual pair's sum, rows only
                        z = _rows(output[0], rows) + _rows(output[1], rows)
                    else:
                        z = _rows(_first(output), rows)
                    z = z.unsqueeze(0)  # (1, rows, d)
                    for callback in callbacks:
                        callback(index, z)
            except Exception as err:  # never the engine's step: the step's prompts get an error
                self._fail_step(f"side tasks failed on state {index}: {err!r}")

        return hook

    # -- one step ----------------------------------------------------------------------------------
    def _execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        for req in scheduler_output.finished_req_ids:  # finished or aborted: free its buffers
            self.prompts.pop(req, None)
            self.done.discard(req)
        self._schedule = scheduler_output
        try:
            return self._execute(scheduler_output, *args, **kwargs)
        finally:
            self._schedule = None
            self._rows = None

    def _model_forward(self, *args: Any, **kwargs: Any) -> Any:
        self.stats["steps"] += 1
        positions = kwargs.get("positions")
        if positions is None and len(args) > 1:
            positions = args[1]
        self._plan(positions)
        output = self._forward(*args, **kwargs)
        if self._rows is not None:
            self._store()
            self._rows = None
        return output

    def _wanted(self, req: str, state: Any) -> list[str] | str:
        """Task names the request asks for (``extra_args``), or an error message."""
        extra = getattr(state.sampling_params, "extra_args", None) or {}
        wanted = extra.get(TASKS_ARG) if isinstance(extra, dict) else None
        if wanted is None:
            return list(self.tasks)
        if isinstance(wanted, str):
            wanted = [name.strip() for name in wanted.split(",") if name.strip()]
        if not isinstance(wanted, list) or not all(isinstance(n, str) for n in wanted):
            return f"{TASKS_ARG} must be a list of task names, got {wanted!r}"
        unknown = [name for name in wanted if name not in self.tasks]
        if unknown:
            return f"unknown task(s) {unknown}; this engine has {sorted(self.tasks)}"
        return list(dict.fromkeys(wanted))

    def _plan(self, positions: torch.Tensor | None) -> None:
        """Find the prompt rows of this step and the request each belongs to."""
        self._rows, self._segments = None, []
        schedule = self._schedule
        if schedule is None or positions is None or positions.dim() != 1:
            return
        batch = self.runner.input_batch
        rows: list[torch.Tensor] = []
        names: set[str] = set()
        offset = packed = 0
        for req in batch.req_ids:
            if req is None:
                continue
            count = schedule.num_scheduled_tokens.get(req, 0)
            start, offset = offset, offset + count
            if count == 0 or req in self.done:
                continue
            state = self.runner.requests[req]
            length = state.num_prompt_tokens
            first = int(positions[start])
            if first >= length:  # decoding: tasks read the prompt only
                continue
            prompt = self.prompts.get(req)
            if prompt is None:
                prompt = self._begin(req, state, length, first)
                if prompt is None:
                    continue
            take = min(count, length - first)
            rows.append(torch.arange(start, start + take))
            self._segments.append(_Segment(req, packed, take, first))
            packed += take
            names.update(prompt.names)
        if not rows:
            return
        first_row, last_row = int(rows[0][0]), int(rows[-1][-1])
        if last_row - first_row + 1 == packed:  # one run of rows (a prefill-only step): a view
            self._rows = slice(first_row, last_row + 1)
        else:
            self._rows = torch.cat(rows)
        key = frozenset(names)
        if key not in self._tap_sets:
            buffers: dict[str, torch.Tensor | None] = dict.fromkeys(key)
            mixers = {name: self.tasks[name].mixer for name in key}
            self._tap_sets[key] = (buffers, stream_taps(mixers, buffers))
        self._buffers, self._taps = self._tap_sets[key]
        for name in self._buffers:
            self._buffers[name] = None
        self.stats["prompt_steps"] += 1
        self.stats["prompt_rows"] += packed

    def _begin(self, req: str, state: Any, length: int, first: int) -> _Prompt | None:
        wanted = self._wanted(req, state)
        if isinstance(wanted, str):
            self._finish(req, {"error": wanted})
            return None
        if not wanted:
            self.done.add(req)
            return None
        if first > 0:  # its first rows came from the prefix cache: never computed here
            self._finish(
                req,
                {
                    "error": f"the first {first} prompt tokens were read from the prefix cache, so "
                    f"the side tasks never saw them: send requests that want side tasks with "
                    f"skip_reading_prefix_cache=True, or start the engine with prefix caching off"
                },
            )
            return None
        too_long = [
            f"{name} (max_positions={limit})"
            for name in wanted
            if (limit := _max_positions(self.tasks[name])) is not None and length > limit
        ]
        if too_long:
            self._finish(
                req,
                {
                    "error": f"the prompt's {length} tokens are more than these tasks' learned "
                    f"positions allow: {', '.join(too_long)}; send a shorter prompt or ask for "
                    f"other tasks"
                },
            )
            return None
        features = {
            name: torch.zeros(length, self.tasks[name].mixer.stream_width) for name in wanted
        }
        ids = list(state.prompt_token_ids or [])
        prompt = _Prompt(length, ids, wanted, features, torch.zeros(length, dtype=torch.bool))
        self.prompts[req] = prompt
        return prompt

    def _store(self) -> None:
        """Copy the step's sums into each prompt's buffers; run the heads of complete prompts."""
        for segment in self._segments:
            prompt = self.prompts.get(segment.req)
            if prompt is None:
                continue
            where = slice(segment.position, segment.position + segment.count)
            rows = slice(segment.start, segment.start + segment.count)
            for name in prompt.names:
                buffer = self._buffers[name]
                if buffer is None:  # a task reading no state (every weight zero): all zeros
                    continue
                prompt.features[name][where] = buffer[0, rows].float()
            prompt.filled[where] = True
            if bool(prompt.filled.all()):
                self._complete(segment.req, prompt)

    def _complete(self, req: str, prompt: _Prompt) -> None:
        logits: dict[str, list] = {}
        mask = torch.ones(1, prompt.length, dtype=torch.long)
        del self.prompts[req]
        self.stats["heads"] += 1
        try:
            with torch.inference_mode():
                for name in prompt.names:
                    task = self.tasks[name]
                    features = task.mixer.finish(prompt.features[name].unsqueeze(0))  # (1, T, k)
                    logits[name] = task.head(features, mask)[0].float().tolist()  # (C,)/(T, C)
        except Exception as err:  # a head's failure is this request's, not the engine's
            logger.warning("side tasks of request %s failed: %r", req, err)
            self._finish(req, {"error": f"side tasks failed: {err!r}"})
            return
        self._finish(req, {"logits": logits, "token_ids": prompt.token_ids})

    def _fail_step(self, message: str) -> None:
        """A tap raised: every prompt of this step gets ``message`` and loses its buffers; the
        engine's step goes on untouched."""
        logger.warning("%s", message)
        for segment in self._segments:
            if self.prompts.pop(segment.req, None) is not None:
                self._finish(segment.req, {"error": message})
        self._rows, self._segments = None, []

    def _finish(self, req: str, result: dict[str, Any]) -> None:
        self.done.add(req)
        self.results[req] = result
        while len(self.results) > MAX_RESULTS:
            dropped, _ = self.results.popitem(last=False)
            logger.warning("side-task results of request %s were never fetched; dropped", dropped)

    def take_prefix(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Remove and return the results of every request whose engine id starts with
        ``prefix + "-"`` (the sub-requests of one HTTP request), keyed by engine id."""
        keys = [key for key in self.results if key.startswith(prefix + "-")]
        return {key: self.results.pop(key) for key in keys}

    def take(self, request_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Remove and return the results of ``request_ids`` (the ids the client gave; the
        engine's own ids add a random suffix), or of every finished request."""
        if request_ids is None:
            out = dict(self.results)
            self.results.clear()
            return out
        out = {}
        for external in request_ids:
            for key in [key for key in self.results if same_request(external, key)]:
                out[external] = self.results.pop(key)
        return out


def same_request(external: str, internal: str) -> bool:
    """Whether ``internal`` is the engine's id of the request the client called ``external``:
    vLLM appends ``-`` and 8 random characters (unless ``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION``
    is set)."""
    return internal == external or (
        internal.startswith(external + "-") and len(internal) == len(external) + 9
    )


class SideTaskExtension:
    """Methods vLLM adds to its worker (``worker_extension_cls``); call them through
    ``LLM.collective_rpc``. Arguments and results are plain Python data."""

    def adalayers_install(self, folders: dict[str, str]) -> dict[str, Any]:
        """Load the saved tasks (name -> task folder) and tap the model; replaces earlier ones.

        Returns what the engine's model looks like to the tasks (states, width, model path).
        """
        runner = self.model_runner  # type: ignore[attr-defined]
        config = runner.vllm_config
        if config.parallel_config.tensor_parallel_size != 1 or (
            config.parallel_config.pipeline_parallel_size != 1
        ):
            raise ValueError("adalayers side tasks in vLLM need tensor and pipeline parallel 1")
        if not config.model_config.enforce_eager:
            raise ValueError(
                "adalayers side tasks in vLLM need enforce_eager=True (the taps are forward "
                "hooks, which compiled graphs do not run)"
            )
        if config.speculative_config is not None:
            raise ValueError("adalayers side tasks in vLLM do not support speculative decoding")
        missing = [
            name
            for name in ("execute_model", "_model_forward", "input_batch", "requests", "model")
            if not hasattr(runner, name)
        ]
        if missing:
            raise ValueError(
                f"this vLLM's model runner ({type(runner).__name__}) lacks {missing}: adalayers "
                f"side tasks were written against vLLM {TESTED_VLLM}"
            )
        self.adalayers_close()
        tasks = {name: Task.from_pretrained(folder) for name, folder in folders.items()}
        self._adalayers = SideTaskCollector(tasks, runner)
        return {
            "num_states": self._adalayers.num_states,
            "hidden_size": runner.model_config.hf_config.hidden_size,
            "model": str(runner.model_config.model),
            "tasks": sorted(tasks),
        }

    def adalayers_results(self, request_ids: list[str] | None = None) -> dict[str, Any]:
        """Take finished prompts' results: request id -> ``{"logits": {task: list}}`` or
        ``{"error": message}`` (all of them, keyed by the engine's ids, without ids)."""
        collector = getattr(self, "_adalayers", None)
        return {} if collector is None else collector.take(request_ids)

    def adalayers_results_prefix(self, prefix: str) -> dict[str, Any]:
        """Take the results of the requests whose engine id starts with ``prefix + "-"``."""
        collector = getattr(self, "_adalayers", None)
        return {} if collector is None else collector.take_prefix(prefix)

    def adalayers_stats(self) -> dict[str, int]:
        """Live buffers and step counters (tests check that nothing leaks)."""
        collector = getattr(self, "_adalayers", None)
        if collector is None:
            return {}
        return {
            **collector.stats,
            "open_prompts": len(collector.prompts),
            "waiting_results": len(collector.results),
        }

    def adalayers_close(self) -> None:
        """Remove the taps and every buffer."""
        collector = getattr(self, "_adalayers", None)
        if collector is not None:
            collector.close()
            self._adalayers = None
