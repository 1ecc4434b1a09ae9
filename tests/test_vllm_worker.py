"""serving/integrations/vllm_worker.py without vLLM: the collector's bookkeeping under a
scheduler written here (continuous batching, chunked prefill, preemption with recompute,
aborts, decode steps, prefix-cache hits), against the stacked reference on each whole prompt.

The model is a stand-in with vLLM's layout (``model.embed_tokens``, ``model.layers`` returning
``(hidden, residual)``, ``model.norm``) whose states depend on the token and its position only,
so the reference is exact; the real engine is in test_vllm.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import causal_llama
from torch import nn

from adalayers.core.backbone import BaseInfo
from adalayers.core.task import Task, TaskConfig
from adalayers.serving.integrations.vllm_worker import (
    TASKS_ARG,
    SideTaskCollector,
    same_request,
)

D, LAYERS, VOCAB = 16, 3, 50


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, D)

    def forward(self, hidden, residual):
        total = hidden if residual is None else hidden + residual
        return torch.tanh(self.linear(total)), total  # vLLM's (hidden, residual) pair


class Norm(nn.Module):
    def forward(self, hidden, residual):
        total = hidden + residual
        return F.layer_norm(total, (D,)), total


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, D)
        self.positions = nn.Embedding(128, D)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm = Norm()

    def forward(self, input_ids, positions):
        hidden = self.embed_tokens(input_ids) + self.positions(positions)  # like RoPE: after
        residual = None  # the embedding's output, which is state 0
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return self.norm(hidden, residual)[0]

    def states(self, input_ids):
        """The L + 1 states of one whole prompt, as Hugging Face reports them: (1, T, D) each."""
        embedded = self.embed_tokens(input_ids)
        hidden = embedded + self.positions(torch.arange(len(input_ids)))
        out, residual = [embedded], None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
            out.append(hidden + residual)
        out[-1] = self.norm(hidden, residual)[0]
        return [s.unsqueeze(0) for s in out]


@dataclass
class Request:
    ids: list[int]
    extra: dict | None = None
    computed: int = 0
    generated: list[int] = field(default_factory=list)


class Runner:
    """The parts of vLLM's model runner the collector reads."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = SimpleNamespace(model=Inner())
        self.model_config = SimpleNamespace(hf_config=SimpleNamespace(hidden_size=D), model="fake")
        self.input_batch = SimpleNamespace(req_ids=[])
        self.requests: dict[str, SimpleNamespace] = {}
        self.forwards = 0

    def execute_model(self, schedule):
        ids, positions = [], []
        for req in self.input_batch.req_ids:
            state = self.requests[req]
            n = schedule.num_scheduled_tokens[req]
            tokens = state.all_ids
            for p in range(state.computed, state.computed + n):
                ids.append(tokens[p] if p < len(tokens) else 7)
                positions.append(p)
        if ids:
            self._model_forward(input_ids=torch.tensor(ids), positions=torch.tensor(positions))
        return None

    def _model_forward(self, input_ids, positions):
        self.forwards += 1
        return self.model.model(input_ids, positions)


class Scheduler:
    """Runs steps of (request, tokens) through the runner the way vLLM's scheduler would."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.finished: set[str] = set()

    def add(self, req: str, ids: list[int], extra: dict | None = None) -> None:
        self.runner.requests[req] = SimpleNamespace(
            num_prompt_tokens=len(ids),
            prompt_token_ids=list(ids),
            all_ids=list(ids),
            computed=0,
            sampling_params=SimpleNamespace(extra_args=extra),
        )

    def step(self, plan: dict[str, int]) -> None:
        runner = self.runner
        runner.input_batch.req_ids = list(plan)
        schedule = SimpleNamespace(
            num_scheduled_tokens=dict(plan), finished_req_ids=set(self.finished)
        )
        self.finished.clear()
        runner.execute_model(schedule)
        for req, n in plan.items():
            state = runner.requests[req]
            state.computed += n
            while len(state.all_ids) < state.computed + 1:
                state.all_ids.append(7)  # a generated token

    def preempt(self, req: str) -> None:
        """Recompute: the request starts again from position 0 (prompt and output)."""
        self.runner.requests[req].computed = 0

    def finish(self, req: str) -> None:
        self.finished.add(req)


def make_tasks() -> dict[str, Task]:
    base = BaseInfo(
        name_or_path="fake",
        num_states=LAYERS + 1,
        hidden_size=D,
        states="decoder",
        fingerprint="0" * 16,
    )
    torch.manual_seed(1)
    seq = TaskConfig("sequence_classification", ["a", "b"], {"dim": 8}, {"num_heads": 2})
    tok = TaskConfig("token_classification", ["O", "X"], {"dim": 8}, {"num_heads": 2})
    reg = TaskConfig("regression", [], {"dim": 8, "positional": "learned", "max_positions": 64})
    return {
        "seq": Task(seq, base).eval(),
        "tok": Task(tok, base).eval(),
        "reg": Task(reg, base).eval(),
    }


def reference(runner: Runner, tasks: dict[str, Task], ids: list[int]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        states = runner.model.model.states(torch.tensor(ids))
        mask = torch.ones(1, len(ids), dtype=torch.long)
        return {name: task(states, mask)[0] for name, task in tasks.items()}


@pytest.fixture
def setup():
    runner = Runner()
    tasks = make_tasks()
    collector = SideTaskCollector(tasks, runner)
    yield runner, Scheduler(runner), tasks, collector
    collector.close()


def check(result, expected, names=None) -> None:
    assert "logits" in result, result
    names = names or list(expected)
    assert sorted(result["logits"]) == sorted(names)
    for name in names:
        got = torch.tensor(result["logits"][name])
        torch.testing.assert_close(got, expected[name], atol=1e-5, rtol=1e-5)


PROMPTS = {
    "a": [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    "b": [20, 21, 22],
    "c": [30, 31, 32, 33, 34, 35, 36],
}


def test_batched_and_chunked_prompts_equal_each_whole_prompt(setup):
    runner, sched, tasks, collector = setup
    for req, ids in PROMPTS.items():
        sched.add(req, ids)
    # a's prompt over three steps, b whole in step 1, c split over steps 2-3; then decoding
    sched.step({"a": 4, "b": 3})
    sched.step({"a": 4, "b": 1, "c": 5})
    sched.step({"a": 3, "b": 1, "c": 2})
    assert collector.stats["heads"] == 3  # each head ran once, when its prompt completed
    results = collector.take(["a", "b", "c"])
    for req, ids in PROMPTS.items():
        check(results[req], reference(runner, tasks, ids))
    assert not collector.prompts and not collector.results


def test_decode_steps_cost_nothing(setup):
    runner, sched, tasks, collector = setup
    sched.add("a", PROMPTS["a"])
    sched.step({"a": 11})
    steps, rows = collector.stats["prompt_steps"], collector.stats["prompt_rows"]
    calls = []
    for module in [runner.model.model.embed_tokens]:
        module.register_forward_hook(lambda *a: calls.append(1))
    for _ in range(5):
        sched.step({"a": 1})
    assert collector.stats["prompt_steps"] == steps and collector.stats["prompt_rows"] == rows
    assert collector._rows is None
    check(collector.take(["a"])["a"], reference(runner, tasks, PROMPTS["a"]))


def test_preemption_with_recompute_counts_nothing_twice(setup):
    runner, sched, tasks, collector = setup
    sched.add("a", PROMPTS["a"])
    sched.add("c", PROMPTS["c"])
    sched.step({"a": 6, "c": 7})  # c complete; a half done
    sched.preempt("a")  # a's KV is dropped: it is recomputed from position 0
    sched.step({"a": 8})
    sched.step({"a": 3})
    sched.step({"c": 1})
    sched.preempt("c")  # c already labelled: its recompute (prompt + output) is not tapped
    heads = collector.stats["heads"]
    sched.step({"c": 9})
    assert collector.stats["heads"] == heads == 2
    results = collector.take(["a", "c"])
    check(results["a"], reference(runner, tasks, PROMPTS["a"]))
    check(results["c"], reference(runner, tasks, PROMPTS["c"]))


def test_abort_mid_prefill_frees_the_buffers(setup):
    runner, sched, tasks, collector = setup
    sched.add("a", PROMPTS["a"])
    sched.add("b", PROMPTS["b"])
    sched.step({"a": 5, "b": 3})
    assert list(collector.prompts) == ["a"]
    sched.finish("a")  # aborted before its prefill completed
    sched.step({"b": 1})
    assert not collector.prompts
    assert list(collector.take()) == ["b"]
    assert collector.done == {"b"}  # still running (decoding)
    sched.finish("b")
    sched.step({})
    assert not collector.done and not collector.prompts and not collector.results


def test_requests_name_their_tasks(setup):
    runner, sched, tasks, collector = setup
    sched.add("one", PROMPTS["b"], {TASKS_ARG: ["tok"]})
    sched.add("two", PROMPTS["c"], {TASKS_ARG: "seq, reg"})
    sched.add("none", PROMPTS["a"], {TASKS_ARG: []})
    sched.add("bad", PROMPTS["b"], {TASKS_ARG: ["nope"]})
    sched.step({"one": 3, "two": 7, "none": 11, "bad": 3})
    results = collector.take()
    check(results["one"], reference(runner, tasks, PROMPTS["b"]), ["tok"])
    check(results["two"], reference(runner, tasks, PROMPTS["c"]), ["seq", "reg"])
    assert "none" not in results
    assert "unknown task(s) ['nope']" in results["bad"]["error"]
    assert "'reg'" in results["bad"]["error"]  # lists the known names


def test_a_prefix_read_from_the_cache_is_refused_not_guessed(setup):
    runner, sched, tasks, collector = setup
    sched.add("a", PROMPTS["a"])
    runner.requests["a"].computed = 4  # its first 4 tokens came from the prefix cache
    sched.step({"a": 7})
    error = collector.take(["a"])["a"]["error"]
    assert "prefix cache" in error and "skip_reading_prefix_cache" in error


def test_results_are_found_by_the_client_id():
    assert same_request("7", "7-1a2b3c4d")
    assert same_request("7", "7")
    assert not same_request("7", "17-1a2b3c4d") and not same_request("7", "7-1-1a2b3c4d")


def test_a_task_of_another_width_is_refused():
    runner = Runner()
    other = BaseInfo(
        name_or_path="other",
        num_states=LAYERS + 1,
        hidden_size=32,
        states="decoder",
        fingerprint="1" * 16,
    )
    task = Task(TaskConfig("sequence_classification", ["a", "b"], {"dim": 8}), other)
    with pytest.raises(ValueError, match="width 32.*width 16"):
        SideTaskCollector({"t": task}, runner)


def test_close_restores_the_runner(setup):
    runner, sched, tasks, collector = setup
    collector.close()
    assert "execute_model" not in vars(runner) and "_model_forward" not in vars(runner)
    assert not runner.model.model.embed_tokens._forward_hooks


# -- the client's check of a task against the engine's model folder (no engine needed) --------
def test_the_engine_model_is_checked_by_its_weights(tmp_path):
    from adalayers.core.backbone import load_backbone
    from adalayers.core.task import BaseMismatchError
    from adalayers.serving.integrations.vllm import check_engine_model

    mine = causal_llama(tmp_path / "mine", hidden=32, layers=2, tied=False)  # an lm_head of its own
    other = causal_llama(tmp_path / "other", hidden=32, layers=2, seed=1)  # other weights
    config = TaskConfig("sequence_classification", ["a", "b"], {"dim": 8}, {"num_heads": 2})
    task = Task(config, load_backbone(str(mine)).info())
    check_engine_model({"t": task}, mine)  # the causal LM's folder: its lm_head is not the base
    with pytest.raises(BaseMismatchError, match=r"'t' was trained on base .*different weights"):
        check_engine_model({"t": task}, other)


def test_every_mixer_mode_equals_its_whole_prompt():
    """``mode: scalar_mix`` streams the raw states (d wide) and ``mode: dynamic`` an online
    softmax: both, batched and chunked, equal the stacked reference."""
    runner = Runner()
    torch.manual_seed(2)
    tasks = {
        mode: Task(
            TaskConfig("sequence_classification", ["a", "b"], {"dim": 8, "mode": mode}),
            make_tasks()["seq"].base,
        ).eval()
        for mode in ("scalar_mix", "dynamic")
    }
    tasks["tok_dynamic"] = Task(  # two heads: two softmaxes over the layers per token
        TaskConfig("token_classification", ["O", "X"], {"dim": 8, "mode": "dynamic", "heads": 2}),
        make_tasks()["tok"].base,
    ).eval()
    for name in ("dynamic", "tok_dynamic"):
        with torch.no_grad():  # a zero query is the static mix: make the weights per token
            tasks[name].mixer.query.normal_()
    collector = SideTaskCollector(tasks, runner)
    sched = Scheduler(runner)
    for req, ids in PROMPTS.items():
        sched.add(req, ids)
    sched.step({"a": 4, "b": 3})
    sched.step({"a": 4, "b": 1, "c": 5})
    sched.step({"a": 3, "b": 1, "c": 2})
    results = collector.take(["a", "b", "c"])
    for req, ids in PROMPTS.items():
        check(results[req], reference(runner, tasks, ids))
    collector.close()


def test_a_prompt_beyond_the_learned_positions_gets_an_error_not_a_crash(setup):
    runner, sched, tasks, collector = setup
    sched.add("long", list(range(1, 40)) + list(range(1, 40)))  # 78 > reg's max_positions=64
    sched.add("ok", PROMPTS["b"])
    sched.step({"long": 40, "ok": 3})
    sched.step({"long": 38, "ok": 1})
    results = collector.take()
    assert "max_positions=64" in results["long"]["error"] and "reg" in results["long"]["error"]
    check(results["ok"], reference(runner, tasks, PROMPTS["b"]))
    assert not collector.prompts  # nothing held for the refused prompt
    ids = list(range(1, 40)) * 2
    sched.add("long_seq", ids, {TASKS_ARG: ["seq", "tok"]})  # no learned positions: no limit
    sched.step({"long_seq": 78})
    unlimited = {name: tasks[name] for name in ("seq", "tok")}
    check(collector.take(["long_seq"])["long_seq"], reference(runner, unlimited, ids))


def test_a_failing_tap_fails_its_requests_not_the_step(setup, monkeypatch):
    runner, sched, tasks, collector = setup
    sched.add("a", PROMPTS["a"])
    sched.add("b", PROMPTS["b"])
    sched.step({"a": 4, "b": 3})  # b complete; a half done
    sched.add("c", PROMPTS["c"])

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    key = frozenset({"seq", "tok", "reg"})
    taps = collector._tap_sets[key][1]
    monkeypatch.setitem(taps, 2, [broken])
    sched.step({"a": 7, "c": 7})  # the engine's step still runs to its end
    assert runner.forwards == 2
    results = collector.take()
    check(results["b"], reference(runner, tasks, PROMPTS["b"]))
    for req in ("a", "c"):
        assert (
            "side tasks failed on state 2" in results[req]["error"]
            and "boom" in results[req]["error"]
        )
    assert not collector.prompts


def test_a_failing_head_fails_its_request_only(setup, monkeypatch):
    runner, sched, tasks, collector = setup
    expected = reference(runner, {"seq": tasks["seq"]}, PROMPTS["b"])

    def broken(*args, **kwargs):
        raise RuntimeError("head broke")

    monkeypatch.setattr(collector.tasks["tok"].head, "forward", broken)
    sched.add("a", PROMPTS["a"], {TASKS_ARG: ["tok"]})
    sched.add("b", PROMPTS["b"], {TASKS_ARG: ["seq"]})
    sched.step({"a": 11, "b": 3})
    results = collector.take()
    assert "head broke" in results["a"]["error"]
    check(results["b"], expected)
    assert not collector.prompts
