"""The HTTP server, hit with a real HTTP client on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from adalayers.backbone import load_backbone  # noqa: E402
from adalayers.model import AdaLayers, Task, TaskConfig  # noqa: E402
from adalayers.serve import BackgroundServer, Predictor, create_app  # noqa: E402

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

    def predict(self, texts, tasks=None, batch_size=32):
        self.entered.set()
        assert self.release.wait(30)
        return super().predict(texts, tasks, batch_size)


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
