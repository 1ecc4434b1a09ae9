"""serving/integrations/vllm_http.py: side tasks behind ``vllm serve`` (OpenAI-compatible), as
``adalayers serve --engine vllm`` starts it: every choice carries its prompt's labels, a
streamed response carries them in its first chunk, a request names its tasks.

Needs vLLM (``make install-vllm``); skipped without it. One server for the module (a tiny
random Llama, float32, chunked prefill forced small).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest
import torch
from helpers import causal_llama, child_env

pytest.importorskip("vllm", reason="vLLM is not installed: make install-vllm")
httpx = pytest.importorskip("httpx")

import transformers as T  # noqa: E402

from adalayers.core.backbone import load_backbone  # noqa: E402
from adalayers.core.multitask import AdaLayers  # noqa: E402
from adalayers.core.task import Task, TaskConfig  # noqa: E402
from adalayers.serving.integrations.vllm_http import vllm_serve_command  # noqa: E402

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_http")
    model = causal_llama(root / "llama", chat_template=TEMPLATE)
    tokenizer = T.AutoTokenizer.from_pretrained(model)
    backbone = load_backbone(str(model))
    torch.manual_seed(1)
    tasks = {
        "sentiment": Task(
            TaskConfig("sequence_classification", ["negative", "positive"], {"dim": 16}),
            backbone.info(),
        ),
        "ner": Task(
            TaskConfig(
                "token_classification", ["O", "B-PER", "I-PER"], {"dim": 16}, {"decoding": "argmax"}
            ),
            backbone.info(),
        ),
    }
    runs = [f"{name}={task.save_pretrained(root / name)}" for name, task in tasks.items()]
    port = free_port()
    extra = ["--dtype", "float32", "--max-model-len", "256", "--max-num-batched-tokens", "64"]
    argv, env = vllm_serve_command(runs, str(model), port=port, extra=extra)
    env = {**child_env(), **{k: v for k, v in env.items() if k.startswith(("ADALAYERS", "VLLM"))}}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log = open(root / "server.log", "w")  # noqa: SIM115
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError((root / "server.log").read_text()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        process.kill()
        raise RuntimeError("vllm serve did not start: " + (root / "server.log").read_text()[-3000:])
    reference = AdaLayers(backbone, tasks).eval()
    yield url, reference, tokenizer, str(model)
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def expected(reference, ids):
    ids = torch.tensor([ids])
    out = reference({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return {name: value[0] for name, value in out.logits.items()}


def check_choice(choice, reference, tokenizer, ids):
    """A choice's labels against the reference on its prompt's token ``ids``; the token task
    labels every prompt token but the special ones (BOS, chat markers)."""
    tasks = choice["side_tasks"]
    logits = expected(reference, ids)
    labels = reference.tasks["sentiment"].labels
    assert tasks["sentiment"]["label"] == labels[int(logits["sentiment"].argmax())]
    probability = logits["sentiment"].softmax(-1).max().item()
    assert tasks["sentiment"]["score"] == pytest.approx(probability, abs=1e-4)
    special = set(tokenizer.all_special_ids)
    content = [j for j, token in enumerate(ids) if token not in special]
    assert tasks["ner"]["tokens"] == tokenizer.convert_ids_to_tokens([ids[j] for j in content])
    ner = reference.tasks["ner"].labels
    assert tasks["ner"]["labels"] == [ner[i] for i in logits["ner"][content].argmax(-1).tolist()]


def test_each_completion_choice_carries_its_prompts_labels(server):
    url, reference, tokenizer, model = server
    prompts = ["mary read a great story", " ".join(["the movie was good"] * 30)]
    body = {"model": model, "prompt": prompts, "max_tokens": 4, "temperature": 0}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 2
    for choice, prompt in zip(choices, prompts):
        check_choice(choice, reference, tokenizer, tokenizer(prompt)["input_ids"])
    first, second = (c["side_tasks"]["ner"]["tokens"] for c in choices)
    assert len(second) > 64 > len(first)  # the long prompt was prefilled in several chunks


def test_a_streamed_chat_carries_the_labels_in_its_first_chunk(server):
    url, reference, tokenizer, model = server
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "john read the book in london"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    chunks = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    with_choices = [c for c in chunks if c.get("choices")]
    first = with_choices[0]["choices"][0]
    assert "side_tasks" in first, first  # before any generated text
    ids = tokenizer.apply_chat_template(
        body["messages"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    check_choice(first, reference, tokenizer, list(ids))
    assert not any("side_tasks" in c["choices"][0] for c in with_choices[1:])


def test_a_request_names_its_tasks(server):
    url, _, _, model = server
    body = {"model": model, "prompt": "the movie", "max_tokens": 2, "side_tasks": ["sentiment"]}
    choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert list(choice["side_tasks"]) == ["sentiment"]
    body["side_tasks"] = []
    choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert "side_tasks" not in choice and "side_tasks_error" not in choice


def test_an_unknown_task_is_a_400_naming_the_known_ones(server):
    url, _, _, model = server
    body = {"model": model, "prompt": "the movie", "max_tokens": 2, "side_tasks": ["nope"]}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "['nope']" in message and "'ner'" in message and "'sentiment'" in message
