"""The HTTP server, hit with a real HTTP client on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from adalayers.cli import build_parser  # noqa: E402
from adalayers.core.backbone import load_backbone  # noqa: E402
from adalayers.core.multitask import AdaLayers  # noqa: E402
from adalayers.core.task import Task, TaskConfig  # noqa: E402
from adalayers.serving.app import create_app  # noqa: E402
from adalayers.serving.config import ServeConfig  # noqa: E402
from adalayers.serving.predictor import Predictor  # noqa: E402
from adalayers.serving.server import DRAIN_MARGIN, BackgroundServer  # noqa: E402

TEXTS = ["the movie was very good", "bad plot", "john read a book in london ."]


@pytest.fixture(scope="module")
def runtime(tiny_model_dir):
    backbone = load_backbone(tiny_model_dir("bert"))
    torch.manual_seed(0)
    seq = Task(
        TaskConfig(
            "sequence_classification", ["neg", "pos"], mixer={"dim": 8}, head={"num_heads": 2}
        ),
        backbone.info(),
    )
    tok = Task(
        TaskConfig(
            "token_classification",
            ["O", "B-PER"],
            mixer={"dim": 8, "layers": [0, 2]},
            head={"num_heads": 2, "num_layers": 0},
        ),
        backbone.info(),
    )
    torch.nn.init.normal_(seq.mixer.p)
    return AdaLayers(backbone, {"sentiment": seq, "ner": tok}).eval()


@pytest.fixture(scope="module")
def server(runtime):
    app = create_app(runtime, max_batch_size=8, max_wait_ms=100, max_texts=4, max_chars=200)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        yield srv, client


class Gate(Predictor):
    """A predictor that holds every batch until released (to fill the queue on purpose)."""

    def __init__(self, runtime):
        super().__init__(runtime)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = self.finished = 0

    def predict(self, texts, tasks=None, batch_size=32, before_forward=None, pairs=None):
        self.calls += 1
        self.entered.set()
        assert self.release.wait(30)
        out = super().predict(texts, tasks, batch_size, before_forward, pairs)
        self.finished += 1
        return out


def wait_for(condition, timeout=10.0):
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, "condition not reached"
        time.sleep(0.01)


def test_health_tasks_and_openapi(server, runtime):
    srv, client = server
    assert srv.host == "127.0.0.1"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["max_queue"] == 256
    info = client.get("/tasks").json()
    assert info["base"]["fingerprint"] == runtime.backbone.fingerprint()
    sentiment = info["tasks"]["sentiment"]
    assert sentiment["labels"] == ["neg", "pos"]
    assert sentiment["task_type"] == "sequence_classification"
    weights = sentiment["layer_weights"]
    assert list(weights) == ["0", "1", "2", "3"] and sum(weights.values()) == pytest.approx(1.0)
    expected = runtime.tasks["sentiment"].mixer.layer_weights()
    assert weights["3"] == pytest.approx(expected[3])
    assert list(info["tasks"]["ner"]["layer_weights"]) == ["0", "2"]
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/tasks", "/health"} <= set(schema["paths"])
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].endswith("PredictRequest")


def test_predict_matches_the_library_and_batches(server, runtime):
    _, client = server
    expected = runtime.predict(TEXTS)
    response = client.post("/predict", json={"texts": TEXTS})
    assert response.status_code == 200, response.text
    assert response.json()["tasks"] == ["sentiment", "ner"]
    got = response.json()["predictions"]
    assert [p["sentiment"]["label"] for p in got] == [p["sentiment"]["label"] for p in expected]
    assert got[2]["ner"]["words"] == TEXTS[2].split()
    for g, e in zip(got, expected):
        assert g["sentiment"]["score"] == pytest.approx(e["sentiment"]["score"], abs=1e-5)
        assert g["ner"]["labels"] == e["ner"]["labels"]
    only = client.post("/predict", json={"texts": TEXTS[:1], "tasks": ["sentiment"]}).json()
    assert list(only["predictions"][0]) == ["sentiment"] and only["tasks"] == ["sentiment"]
    # concurrent requests share forwards (the batch stays open 100 ms for others to join)
    before = client.get("/health").json()["stats"]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda t: client.post("/predict", json={"texts": [t]}), TEXTS * 2))
    assert [a.status_code for a in answers] == [200] * 6
    for answer, e in zip(answers, expected * 2):
        assert answer.json()["predictions"][0]["sentiment"]["label"] == e["sentiment"]["label"]
    after = client.get("/health").json()["stats"]
    assert after["requests"] - before["requests"] == 6
    assert after["batches"] - before["batches"] < 6


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"texts": "not a list"}, 422, "list"),
        ({"text": ["typo in the key"]}, 422, "texts"),
        ({"texts": []}, 422, "at least 1"),
        ({"texts": ["fine", "   "]}, 422, "text 1 is empty"),
        ({"texts": ["fine", 3]}, 422, "string"),
        ({"texts": ["fine"], "tasks": ["sentimnet"]}, 400, "unknown task(s) ['sentimnet']"),
        ({"texts": ["a"] * 5}, 413, "limit is 4"),
        ({"texts": ["a" * 201]}, 413, "201 characters"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(server, payload, status, message):
    _, client = server
    response = client.post("/predict", json=payload)
    assert response.status_code == status
    assert message in response.text


def test_malformed_json_and_oversized_bodies(server):
    _, client = server
    response = client.post(
        "/predict", content=b'{"texts": ["a"', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and "JSON" in response.text
    big = b'{"texts": ["' + b"a" * 1_100_000 + b'"]}'
    response = client.post("/predict", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "1000000 bytes" in response.text

    def chunks():  # no Content-Length: the limit counts what arrives
        yield b'{"texts": ["'
        for _ in range(12):
            yield b"a" * 100_000
        yield b'"]}'

    response = client.post(
        "/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert client.get("/health").json()["status"] == "ok"  # still up


def test_full_queue_answers_503_and_the_server_stays_up(runtime):
    gate = Gate(runtime)
    app = create_app(gate, max_batch_size=1, max_wait_ms=0, max_queue=2)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(client.post, "/predict", json={"texts": ["a"]})
            assert gate.entered.wait(10)  # the worker holds request 1
            queued = [pool.submit(client.post, "/predict", json={"texts": [t]}) for t in "bc"]
            wait_for(lambda: client.get("/health").json()["queue"] == 2)
            refused = client.post("/predict", json={"texts": ["d"]})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1" and "queue full" in refused.text
            gate.release.set()
            assert [f.result().status_code for f in [first, *queued]] == [200, 200, 200]
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["stats"]["rejected"] == 1
        assert client.post("/predict", json={"texts": ["e"]}).status_code == 200


def test_graceful_shutdown_finishes_queued_requests(runtime):
    gate = Gate(runtime)
    app = create_app(gate, max_batch_size=1, max_wait_ms=0)
    srv = BackgroundServer(app).start()
    client = httpx.Client(base_url=srv.url, timeout=30)
    with ThreadPoolExecutor(3) as pool:
        in_flight = [pool.submit(client.post, "/predict", json={"texts": [t]}) for t in "ab"]
        assert gate.entered.wait(10)
        stopping = pool.submit(srv.stop)
        time.sleep(0.2)
        assert srv.thread.is_alive()  # waits for the requests it accepted
        gate.release.set()
        assert [f.result().status_code for f in in_flight] == [200, 200]
        stopping.result()
    assert not srv.thread.is_alive()
    with pytest.raises(httpx.TransportError):
        client.get("/health")
    client.close()


def test_limits_are_checked(runtime):
    with pytest.raises(ValueError, match="max_queue must be positive"):
        create_app(runtime, max_queue=0)
    with pytest.raises(ValueError, match="no tasks"):
        create_app(AdaLayers(runtime.backbone))


def test_the_limits_are_one_config_and_the_cli_flags(runtime):
    """ServeConfig: the app's limits, the CLI's flags and the OpenAPI schema's constraints."""
    args = build_parser().parse_args(
        ["serve", "runs/a", "--max-tokens", "512", "--drain-seconds", "2.5"]
    )
    limits = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(ServeConfig)}
    assert ServeConfig(**limits) == ServeConfig(max_tokens=512, drain_seconds=2.5)
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        ServeConfig(max_tokens=0)
    with pytest.raises(ValueError, match="drain_seconds must be >= 0"):
        create_app(runtime, drain_seconds=-1)
    with pytest.raises(TypeError, match="max_tokenz"):
        create_app(runtime, max_tokenz=5)
    app = create_app(runtime, ServeConfig(max_texts=3), max_chars=50, shutdown_timeout=7)
    assert app.state.config == ServeConfig(max_texts=3, max_chars=50, drain_seconds=7)
    schema = app.openapi()
    texts = schema["components"]["schemas"]["PredictRequest"]["properties"]["texts"]
    assert texts["maxItems"] == 3 and texts["items"]["maxLength"] == 50
    answers = schema["paths"]["/predict"]["post"]["responses"]
    assert "16384" in answers["413"]["description"]
    assert answers["503"]["headers"]["Retry-After"]["required"]


def test_long_token_inputs_run_a_bounded_number_of_windows_per_forward(runtime):
    """Defect 8: all windows of a long text went through one forward (memory grew with the
    text); now at most batch_size windows run at once, with the results of one forward."""
    long = " ".join(["john read a book in london before the film ."] * 30)  # 300 words
    other = " ".join(["mary said the plot was very bad ."] * 25)
    inputs = [long, TEXTS[2], other]
    rows = []
    hook = runtime.register_forward_pre_hook(
        lambda module, args: rows.append(args[0]["input_ids"].shape[0])
    )
    try:
        batched = runtime.predict(inputs, batch_size=2)
        per_forward = list(rows)
        rows.clear()
        whole = runtime.predict(inputs, batch_size=1000)  # every window in one forward
    finally:
        hook.remove()
    windows = rows[0]
    assert windows >= 10  # the long texts did become many windows
    assert max(per_forward) == 2 and sum(per_forward) == windows
    for got, expected in zip(batched, whole):
        assert got["ner"]["words"] == expected["ner"]["words"]
        assert got["ner"]["labels"] == expected["ner"]["labels"]
        assert got["ner"]["scores"] == pytest.approx(expected["ner"]["scores"], abs=1e-5)
        assert got["sentiment"]["label"] == expected["sentiment"]["label"]
        assert got["sentiment"]["score"] == pytest.approx(expected["sentiment"]["score"], abs=1e-5)


def test_a_request_over_the_token_budget_gets_413(runtime):
    """Defect 8: one allowed request could hold the only worker for minutes; now a request's
    tokens are bounded (a sequence task reads at most the base's length of each text)."""
    long = " ".join(["john read a book in london ."] * 20)
    tokens = len(runtime.backbone.tokenizer(long)["input_ids"])
    assert tokens > 100 >= runtime.max_length
    app = create_app(runtime, max_chars=2000, max_tokens=100)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        refused = client.post("/predict", json={"texts": [long]})
        assert refused.status_code == 413
        assert f"{tokens} tokens" in refused.text and "limit per request is 100" in refused.text
        assert client.post("/predict", json={"texts": [long], "tasks": ["ner"]}).status_code == 413
        fine = client.post("/predict", json={"texts": [long], "tasks": ["sentiment"]})
        assert fine.status_code == 200, fine.text
        assert client.get("/health").json()["stats"]["requests"] == 1


def test_drain_time_over_answers_503_and_stops_the_work(runtime):
    """Defect 9: the drain was capped at 30 s and what it could not finish got 500 while the
    worker kept computing it; now the drain time is a setting, and what is left at its end gets
    503 with Retry-After and is not computed."""
    gate = Gate(runtime)
    app = create_app(gate, max_batch_size=1, max_wait_ms=0, drain_seconds=0.5)
    srv = BackgroundServer(app).start()
    assert srv.server.config.timeout_graceful_shutdown == 0.5 + DRAIN_MARGIN
    client = httpx.Client(base_url=srv.url, timeout=30)
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(client.post, "/predict", json={"texts": ["a"]})
        assert gate.entered.wait(10)  # the worker holds request 1
        queued = pool.submit(client.post, "/predict", json={"texts": ["b"]})
        wait_for(lambda: client.get("/health").json()["queue"] == 1)
        start = time.perf_counter()
        stopping = pool.submit(srv.stop)
        answers = [running.result(20), queued.result(20)]  # the worker is still held
        waited = time.perf_counter() - start
        assert [a.status_code for a in answers] == [503, 503]
        for answer in answers:
            assert answer.headers["retry-after"] == "5"
            assert "not finished in the drain time" in answer.text
        assert 0.4 < waited < 5
        gate.release.set()
        stopping.result(30)
    assert not srv.thread.is_alive()
    assert gate.calls == 1 and gate.finished == 0  # request 1 stopped before its forward
    assert app.state.batcher["batcher"].stats["aborted"] == 2
    client.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_server_on_cuda_answers_as_the_cpu_runtime(runtime):
    """The same runtime moved to the GPU serves the CPU's predictions."""
    import copy

    expected = runtime.predict(TEXTS)
    on_gpu = copy.deepcopy(runtime).cuda()
    app = create_app(on_gpu, max_batch_size=8, max_wait_ms=10)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        response = client.post("/predict", json={"texts": TEXTS})
    assert response.status_code == 200, response.text
    for g, e in zip(response.json()["predictions"], expected):
        assert g["sentiment"]["label"] == e["sentiment"]["label"]
        assert g["sentiment"]["score"] == pytest.approx(e["sentiment"]["score"], abs=1e-4)
        assert g["ner"]["labels"] == e["ner"]["labels"]


@pytest.mark.slow
def test_the_locust_load_benchmark_runs_its_three_phases(tiny_model_dir, benchmark_script):
    """benchmarks/load_test.py end to end on a tiny base, a few seconds per phase."""
    if importlib.util.find_spec("locust") is None:  # not imported here: it patches the stdlib
        pytest.skip("locust (the bench extra) is not installed")
    script = benchmark_script("load_test")
    base = tiny_model_dir("bert")
    argv = ["--base", str(base), "--tasks", "2", "--seconds", "3", "--overload-seconds", "3"]
    argv += ["--burst", "64", "--drain-users", "8", "--drain-words", "40", "--drain-after", "1"]
    result = script.main(argv)
    assert result["steady"]["only_200"] and result["steady"]["answers"]["200"] > 0
    assert result["overload"]["only_200_or_503"] and result["overload"]["health_after"] == "ok"
    assert result["overload"]["answers"].get("503 queue full", 0) > 0
    assert result["drain"]["no_5xx_but_503"] and result["drain"]["exit_code"] in (0, -15)
    assert result["server_memory_mib"]["before"]["rss_mib"] > 0


# -- fuzzing the API from its OpenAPI schema ---------------------------------------------------
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.python import asgi as schemathesis_asgi  # noqa: E402


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_get_no_5xx_and_answers_match_the_schema(runtime, mode):
    """schemathesis, in process: requests built from the schema (valid ones, then invalid ones)
    get no 5xx, and every answer matches what the schema documents."""
    app = create_app(runtime, max_batch_size=8, max_wait_ms=0, max_texts=3, max_chars=50)
    # The schema cannot say "a text must hold a visible character" (U+200B, NUL, a lone
    # combining mark: 422) nor state the token budget (413): schema-valid requests may get those.
    # A limit the schema does state (maxItems, maxLength) is answered 413, a rejection too.
    config = schemathesis.Config.from_dict(
        {
            "checks": {
                "positive_data_acceptance": {"expected-statuses": ["2xx", "413", "422"]},
                "negative_data_rejection": {"expected-statuses": ["400", "413", "422"]},
            }
        }
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    seen = []

    @given(case=schema.as_strategy(schemathesis.GenerationMode(mode)))
    @settings(
        max_examples=30,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        seen.append(case.operation.label)
        case.call_and_validate()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~100 tiny forwards: on a busy 2-core machine threads only wait
    try:
        check()
    finally:
        torch.set_num_threads(threads)
        schemathesis_asgi.shutdown_lifespans()  # the app's lifespan (its batcher) ends here
    assert "POST /predict" in seen


# -- sentence pairs ------------------------------------------------------------------------------
PAIRS = [["the movie was good", "a great film"], ["bad plot", "the story was good"]]


@pytest.fixture(scope="module")
def pair_server(runtime):
    """A task trained on pairs (nli) beside one trained on single texts and a token task."""
    info = runtime.backbone.info()
    torch.manual_seed(1)
    nli = Task(
        TaskConfig(
            "sequence_classification",
            ["different", "same"],
            mixer={"dim": 8},
            head={"num_heads": 2},
            text_pair=True,
        ),
        info,
    )
    torch.nn.init.normal_(nli.mixer.p)
    single = runtime.tasks["sentiment"]
    sentiment = Task(dataclasses.replace(single.config, text_pair=False), info)
    sentiment.load_state_dict(single.state_dict())
    tasks = {"nli": nli, "sentiment": sentiment, "ner": runtime.tasks["ner"]}
    both = AdaLayers(runtime.backbone, tasks).eval()
    app = create_app(both, max_wait_ms=100, max_texts=4, max_chars=200, max_tokens=40)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        yield both, client


def test_pairs_are_served_as_the_library_predicts_them(pair_server):
    both, client = pair_server
    texts, pairs = [a for a, _ in PAIRS], [b for _, b in PAIRS]
    expected = AdaLayers(both.backbone, {"nli": both.tasks["nli"]}).predict(texts, pairs)
    response = client.post("/predict", json={"pairs": PAIRS, "tasks": ["nli"]})
    assert response.status_code == 200, response.text
    got = [p["nli"] for p in response.json()["predictions"]]
    assert [g["label"] for g in got] == [e["nli"]["label"] for e in expected]
    for g, e in zip(got, expected):
        assert g["score"] == pytest.approx(e["nli"]["score"], abs=1e-5)
    alone = AdaLayers(both.backbone, {"nli": both.tasks["nli"]}).predict(texts, texts)
    assert [g["score"] for g in got] != pytest.approx([a["nli"]["score"] for a in alone])
    # requests of pairs and of single texts at once: each runs with its own kind of input
    single = {"texts": texts, "tasks": ["sentiment"]}
    with ThreadPoolExecutor(4) as pool:
        bodies = [{"pairs": PAIRS, "tasks": ["nli"]}, single] * 2
        answers = list(pool.map(lambda body: client.post("/predict", json=body), bodies))
    assert [a.status_code for a in answers] == [200] * 4
    assert answers[0].json() == answers[2].json() == response.json()
    sentiment = AdaLayers(both.backbone, {"sentiment": both.tasks["sentiment"]})
    expected = [p["sentiment"]["score"] for p in sentiment.predict(texts)]
    got = [p["sentiment"]["score"] for p in answers[1].json()["predictions"]]
    assert got == pytest.approx(expected, abs=1e-5)
    tasks = client.get("/tasks").json()["tasks"]
    assert {n: t["text_pair"] for n, t in tasks.items()} == {
        "nli": True,
        "sentiment": False,
        "ner": False,
    }


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        # before: the extra field was ignored and the texts answered alone, with 200
        (
            {"texts": ["a b"], "text_pairs": ["c d"], "tasks": ["sentiment"]},
            422,
            "unknown field(s) ['text_pairs']",
        ),
        ({"texts": ["a"], "pairs": [["a", "b"]]}, 422, "exactly one of 'texts'"),
        ({"tasks": ["nli"]}, 422, "exactly one of 'texts'"),
        ({"pairs": [["a"]]}, 422, "Field required"),
        (
            {"texts": ["the movie"], "tasks": ["nli"]},
            422,
            "task 'nli' was trained on sentence pairs: send 'pairs'",
        ),
        ({"pairs": PAIRS}, 422, "task 'sentiment' was trained on single texts, not sentence"),
        ({"pairs": PAIRS, "tasks": ["ner"]}, 422, "task 'ner' labels the words of single texts"),
        ({"pairs": [["fine", "  "]], "tasks": ["nli"]}, 422, "pair 0, text_pair is empty"),
        ({"pairs": [["a", "b" * 201]], "tasks": ["nli"]}, 413, "pair 0, text_pair has 201"),
        ({"pairs": [["a", "b"]] * 5, "tasks": ["nli"]}, 413, "5 pairs in one request"),
        # the token budget counts both texts: 20 + 20 words and 3 special tokens (one: 22)
        ({"pairs": [["the " * 20, "film " * 20]], "tasks": ["nli"]}, 413, "pair 0: 43"),
    ],
)
def test_pair_requests_that_do_not_fit_get_4xx(pair_server, payload, status, message):
    _, client = pair_server
    response = client.post("/predict", json=payload)
    assert response.status_code == status, response.text
    assert message in response.text


def test_the_schema_states_pairs(runtime):
    schema = create_app(runtime, max_texts=3, max_chars=50).openapi()
    request = schema["components"]["schemas"]["PredictRequest"]
    pairs = request["properties"]["pairs"]
    assert pairs["maxItems"] == 3 and pairs["items"]["minItems"] == pairs["items"]["maxItems"] == 2
    assert pairs["items"]["prefixItems"][1]["maxLength"] == 50
    assert request["oneOf"] == [{"required": ["texts"]}, {"required": ["pairs"]}]
    assert request["additionalProperties"] is False
