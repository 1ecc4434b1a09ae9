"""sentence-transformers: attach() to a SentenceTransformer (embeddings bit-identical, side
predictions from the same forward, in the order of encode()'s inputs), and the server's
embeddings mode (POST /embed as text-embeddings-inference answers it, plus side tasks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import build_tiny_sentence_transformer

pytest.importorskip(
    "sentence_transformers",
    reason="sentence-transformers is not installed (pip install -e '.[st]', or '.[dev]')",
)
from sentence_transformers import SentenceTransformer  # noqa: E402

from adalayers import attach  # noqa: E402
from adalayers.cli import main  # noqa: E402
from adalayers.core.backbone import fingerprint_files, load_backbone  # noqa: E402
from adalayers.core.encoding import InputError  # noqa: E402
from adalayers.core.multitask import AdaLayers  # noqa: E402
from adalayers.core.task import BaseMismatchError, Task, TaskConfig  # noqa: E402
from adalayers.serving.config import ServeConfig  # noqa: E402
from adalayers.serving.integrations.sentence_transformers import (  # noqa: E402
    embeddings_app,
    load_sentence_transformer,
)

# lengths vary so that encode() sorts them and cuts them into several batches
TEXTS = [
    "bad plot",
    "the movie was very good and the plot was great",
    "john read a book",
    "a",
    "mary said in london the film was terrible",
    "the story",
    "we love this film",
]
SCORE_ATOL = 1e-5  # predictions: padded to other lengths in other batches, same labels


def make_tasks(backbone, seed=0):
    torch.manual_seed(seed)
    info = backbone.info()
    tasks = {
        "sentiment": Task(
            TaskConfig(
                "sequence_classification",
                ["neg", "pos"],
                mixer={"dim": 8, "positional": "learned", "max_positions": 64},
                head={"num_heads": 2},
            ),
            info,
        ),
        "ner": Task(
            TaskConfig(
                "token_classification",
                ["O", "B-PER", "I-PER"],
                mixer={"dim": 8, "layers": [0, 2]},
                head={"num_heads": 2, "num_layers": 1, "ff_dim": 16},
            ),
            info,
        ),
        "score": Task(TaskConfig("regression", [], mixer={"dim": 8}, head={"num_heads": 2}), info),
    }
    for task in tasks.values():
        torch.nn.init.normal_(task.mixer.p)
    return tasks


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    """``(st_folder, backbone, tasks)``: the tiny BERT saved as a sentence-transformers model
    (modules.json, mean pooling, Normalize) and three tasks trained, so to speak, on it."""
    base = tiny_model_dir("bert")
    folder = build_tiny_sentence_transformer(base, tmp_path_factory.mktemp("st") / "model")
    backbone = load_backbone(base)
    return folder, backbone, make_tasks(backbone)


def load(folder):
    return SentenceTransformer(str(folder), device="cpu")


def hook_count(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_always_called)
        for m in model.modules()
    )


def check_predictions(got, expected, tasks):
    """attach's predictions against AdaLayers.predict on the same texts; returns the texts (as
    tokens) whose token labels were compared word for word."""
    assert len(got) == len(expected)
    checked = []
    for row, ref in zip(got, expected):
        assert row["sentiment"]["label"] == ref["sentiment"]["label"]
        assert row["sentiment"]["score"] == pytest.approx(ref["sentiment"]["score"], abs=SCORE_ATOL)
        assert row["score"]["value"] == pytest.approx(ref["score"]["value"], abs=SCORE_ATOL)
        # token tasks: attach labels every token the model read but [CLS] and [SEP], which
        # training never labels; where each word is one token, as AdaLayers.predict labels words
        tokens = row["ner"]["tokens"]
        assert "[CLS]" not in tokens and "[SEP]" not in tokens
        assert len(row["ner"]["labels"]) == len(tokens) == len(row["ner"]["scores"])
        assert set(row["ner"]["labels"]) <= set(tasks["ner"].labels)
        if tokens == ref["ner"]["words"]:
            assert row["ner"]["labels"] == ref["ner"]["labels"]
            checked.append(tokens)
    return checked


def test_encode_is_bit_identical_and_predictions_follow_its_inputs(tiny):
    folder, backbone, tasks = tiny
    model = load(folder)
    bare = model.encode(TEXTS, batch_size=3)  # three batches, sorted by length
    bare_tensor = model.encode(TEXTS, batch_size=3, convert_to_tensor=True)
    bare_normed = model.encode(TEXTS, normalize_embeddings=True)
    hooks = hook_count(model)
    expected = AdaLayers(backbone, tasks).eval().predict(TEXTS)
    with attach(model, tasks) as side:
        assert hook_count(model) > hooks and "encode" in vars(model)
        tapped = model.encode(TEXTS, batch_size=3)
        predictions = side.predictions()
        logits, mask = side.logits, side.attention_mask
        assert torch.equal(model.encode(TEXTS, batch_size=3, convert_to_tensor=True), bare_tensor)
        assert np.array_equal(model.encode(TEXTS, normalize_embeddings=True), bare_normed)
        reversed_rows = (model.encode(TEXTS[::-1], batch_size=2), side.predictions())
    assert np.array_equal(tapped, bare), "encode() changed with tasks attached"
    assert check_predictions(predictions, expected, tasks)  # some texts are one token a word
    assert logits["sentiment"].shape == (len(TEXTS), 2) and logits["ner"].shape[:2] == mask.shape
    assert mask.sum(1).tolist() == [len(p["ner"]["tokens"]) + 2 for p in predictions]
    # other batches pad to other lengths: the same vectors up to float rounding
    np.testing.assert_allclose(reversed_rows[0], bare[::-1], rtol=0, atol=1e-6)
    check_predictions(reversed_rows[1], expected[::-1], tasks)
    # detached: hooks gone, encode and preprocess are the class's again, flags restored
    assert hook_count(model) == hooks
    assert "encode" not in vars(model) and "preprocess" not in vars(model)
    assert np.array_equal(model.encode(TEXTS, batch_size=3), bare)


def test_what_is_read_one_input_repeats_features_and_pauses(tiny):
    folder, backbone, tasks = tiny
    model = load(folder)
    reference = AdaLayers(backbone, tasks).eval()
    with attach(model, tasks) as side:
        with pytest.raises(RuntimeError, match="no input captured"):
            side.predictions()
        vector = model.encode("john read a book")  # one text, not a list
        assert vector.shape == (model.get_embedding_dimension(),)
        check_predictions(side.predictions(), reference.predict(["john read a book"]), tasks)
        same = "bad plot"  # one object three times, and an equal text from another object
        model.encode([same, "a", same, "bad " + "plot".strip(), same])
        labels = [row["sentiment"]["label"] for row in side.predictions()]
        assert labels[0] == labels[2] == labels[3] == labels[4]
        # a forward of the model on features (not through encode): its rows, in its order
        features = model.preprocess(TEXTS[:2])
        with torch.inference_mode():
            model(features)
        check_predictions(side.predictions(), reference.predict(TEXTS[:2]), tasks)
        # the transformer called on its own is not read; nor is encode() while paused
        with torch.inference_mode():
            model[0].auto_model(**backbone.tokenizer(["a"], return_tensors="pt"))
            with side.paused():
                model.encode(["mary said"])
        with pytest.raises(ValueError, match="batch_size"):
            model.encode(["mary said"], batch_size=0)  # a failed encode() keeps the result
        assert len(side.predictions()) == 2
        assert model.encode([]).shape[0] == 0 and side.predictions() == []
        model.encode(["john read a book", ""])  # embeds the empty text; no task can read it
        with pytest.raises(InputError, match="index 1 holds only special tokens"):
            side.predictions()


def test_attach_checks_the_base_and_the_model(tiny, tiny_model_dir, tmp_path):
    folder, backbone, tasks = tiny
    model = load(folder)
    # the same weights as load_backbone's, so the same fingerprint, however they were loaded
    held = attach(model, tasks)
    assert held.backbone.fingerprint() == backbone.fingerprint() == fingerprint_files(folder)
    with pytest.raises(ValueError, match="already has tasks attached"):
        attach(model, tasks)
    held.detach()
    other = make_tasks(load_backbone(tiny_model_dir("bert", seed=1)))
    with pytest.raises(BaseMismatchError, match="trained on base .* being attached to"):
        attach(model, other)
    assert "encode" not in vars(model)
    from sentence_transformers.sentence_transformer.modules import Normalize

    no_transformer = SentenceTransformer(modules=[Normalize()], device="cpu")
    with pytest.raises(TypeError, match="not a Hugging Face transformer"):
        attach(no_transformer, tasks)
    with pytest.raises(ValueError, match="not a sentence-transformers model"):
        load_sentence_transformer(tiny_model_dir("bert"))  # a plain transformers folder


def test_a_task_reading_fewer_positions_than_the_model_is_named(tiny, caplog):
    folder, backbone, tasks = tiny
    model = load(folder)
    model.max_seq_length = 80  # longer than the sentiment task's 64 positions
    with caplog.at_level("WARNING"), attach(model, tasks) as side:
        assert "task 'sentiment' reads at most 64 tokens" in caplog.text
        model.encode([" ".join(["word"] * 70)])
        with pytest.raises(ValueError, match="longer than the mixer's max_positions=64"):
            side.predictions()
        model.encode(TEXTS[:1])  # a short one is fine again
        assert len(side.predictions()) == 1


# -- the server's embeddings mode ---------------------------------------------------------------
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def served(tiny):
    folder, backbone, tasks = tiny
    model = load(folder)
    config = ServeConfig(max_batch_size=4, max_wait_ms=50, max_texts=8, max_chars=400)
    app = embeddings_app(model, tasks, config)
    with TestClient(app) as client:
        yield model, client


def floats(rows):
    return np.asarray(rows, dtype=np.float32)


def test_embed_answers_as_tei_and_as_sentence_transformers_encodes(served, tiny):
    model, client = served
    _, backbone, tasks = tiny
    texts = TEXTS[:4]
    with model._adalayers_attached.paused():  # the reference: encode alone
        normed = model.encode(texts, normalize_embeddings=True)
        plain = model.encode(texts)
        one = model.encode(["john read a book"], normalize_embeddings=True)
    answer = client.post("/embed", json={"inputs": texts})
    assert answer.status_code == 200
    assert np.array_equal(floats(answer.json()), normed)  # bit for bit, through JSON
    answer = client.post("/embed", json={"inputs": texts, "normalize": False})
    assert np.array_equal(floats(answer.json()), plain)
    answer = client.post("/embed", json={"inputs": "john read a book"})
    assert np.array_equal(floats(answer.json()), one)  # one text: a list of one vector
    # side tasks asked: the same vectors, and predictions from the same forward
    answer = client.post("/embed", json={"inputs": texts, "tasks": ["sentiment", "ner"]})
    body = answer.json()
    assert set(body) == {"embeddings", "predictions", "tasks"}
    assert body["tasks"] == ["sentiment", "ner"]
    assert np.array_equal(floats(body["embeddings"]), normed)
    expected = AdaLayers(backbone, tasks).eval().predict(texts)
    for row, ref in zip(body["predictions"], expected):
        assert set(row) == {"sentiment", "ner"}
        assert row["sentiment"]["label"] == ref["sentiment"]["label"]
        assert row["sentiment"]["score"] == pytest.approx(ref["sentiment"]["score"], abs=1e-5)
    # /predict is served as without embeddings (token tasks by word), /tasks says both
    answer = client.post("/predict", json={"texts": texts[:2], "tasks": ["ner"]})
    assert answer.json()["predictions"][0]["ner"]["words"] == texts[0].split()
    info = client.get("/tasks").json()
    assert info["embeddings"]["dimension"] == model.get_embedding_dimension()
    assert info["embeddings"]["normalized_by_model"] is True
    assert info["base"]["fingerprint"] == backbone.fingerprint()
    assert client.get("/health").json()["stats"]["texts"] >= 3 * len(texts) + 1 + 2


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"inputs": ["a", " "]}, 422, "input 1"),
        ({"inputs": []}, 422, "inputs is empty"),
        ({"inputs": ["a"] * 9}, 413, "the limit is 8"),
        ({"inputs": ["a" * 401]}, 413, "401 characters"),
        ({"inputs": [" ".join(["word"] * 60)]}, 413, "truncate"),
        ({"inputs": ["a"], "tasks": ["nope"]}, 400, "unknown task(s) ['nope']"),
        ({"inputs": ["a"], "prompt_name": "query"}, 422, "prompt_name"),
        ({"texts": ["a"]}, 422, "inputs"),
    ],
)
def test_bad_embed_requests_get_4xx_with_a_message(served, payload, status, message):
    _, client = served
    answer = client.post("/embed", json=payload)
    assert answer.status_code == status, answer.text
    assert message in json.dumps(answer.json())


def test_truncate_cuts_long_inputs_as_sentence_transformers_does(served):
    model, client = served
    long = " ".join(["word"] * 60)  # over the model's max_seq_length of 48
    answer = client.post("/embed", json={"inputs": [long], "truncate": True, "tasks": ["ner"]})
    assert answer.status_code == 200
    with model._adalayers_attached.paused():
        expected = model.encode([long], normalize_embeddings=True)
    assert np.array_equal(floats(answer.json()["embeddings"]), expected)
    assert len(answer.json()["predictions"][0]["ner"]["tokens"]) == model.max_seq_length - 2


def test_serve_embeddings_refuses_what_it_cannot_serve(tiny, tiny_model_dir, tmp_path, capsys):
    folder, backbone, tasks = tiny
    task = tasks["sentiment"].save_pretrained(tmp_path / "sentiment")
    not_st = str(tiny_model_dir("bert"))
    assert main(["serve", "--embeddings", not_st, str(task)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a sentence-transformers model" in err
    assert main(["serve", "--embeddings", str(tmp_path / "nope"), str(task)]) == 2
    assert "could not load sentence-transformers model" in capsys.readouterr().err
    assert main(["serve", "--embeddings", str(folder), "--base", not_st, str(task)]) == 2
    assert "give one of them" in capsys.readouterr().err
    other = make_tasks(load_backbone(tiny_model_dir("bert", seed=1)))["sentiment"]
    wrong = other.save_pretrained(tmp_path / "wrong")
    assert main(["serve", "--embeddings", str(folder), str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "was trained on base" in err and backbone.fingerprint() in err


schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.python import asgi as schemathesis_asgi  # noqa: E402


def test_fuzzed_embed_requests_get_no_5xx_and_match_the_schema(tiny):
    """schemathesis on POST /embed: valid requests are answered 200 (or a documented 4xx),
    invalid ones 4xx, every answer as the schema says."""
    folder, _, tasks = tiny
    app = embeddings_app(load(folder), tasks, ServeConfig(max_wait_ms=0, max_texts=3))
    config = schemathesis.Config.from_dict(
        {
            "checks": {
                "positive_data_acceptance": {"expected-statuses": ["2xx", "413", "422"]},
                "negative_data_rejection": {"expected-statuses": ["400", "413", "422"]},
            }
        }
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    schema = schema.include(path="/embed")
    seen = []

    @given(case=schema.as_strategy())
    @settings(
        max_examples=25,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        seen.append(case.operation.label)
        case.call_and_validate()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check()
    finally:
        torch.set_num_threads(threads)
        schemathesis_asgi.shutdown_lifespans()
    assert "POST /embed" in seen


# -- the real embedded MiniLM -------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_sentence_transformer_with_side_tasks(minilm_path, tmp_path):
    """The embedded all-MiniLM-L6-v2 as sentence-transformers loads it: tasks made on
    load_backbone's copy attach (same weights, same fingerprint), encode() is bit-identical,
    predictions equal AdaLayers.predict; a task saved with the version-1 fingerprint of
    load_backbone's MiniLM (before fingerprints were of the weights alone) attaches too."""
    model = SentenceTransformer(str(minilm_path), device="cpu")
    backbone = load_backbone("all-MiniLM-L6-v2")
    tasks = make_tasks(backbone)
    tasks["sentiment"] = Task(
        TaskConfig("sequence_classification", ["neg", "pos"], mixer={"dim": 32}),
        backbone.info(),
    )
    texts = [*TEXTS, "What is the capital of France?", "Paris is the capital of France."] * 5
    bare = model.encode(texts)
    with attach(model, tasks) as side:
        tapped = model.encode(texts)
        predictions = side.predictions()
    assert np.array_equal(bare, tapped)
    check_predictions(predictions, AdaLayers(backbone, tasks).eval().predict(texts), tasks)
    assert fingerprint_files(minilm_path) == backbone.fingerprint()
    folder = tasks["sentiment"].save_pretrained(tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["base"]["fingerprint_version"]  # as format 1 wrote it
    config["base"]["fingerprint"] = "9f1ff4a61d0c97c8"  # runs/*/model/config.json of then
    (folder / "config.json").write_text(json.dumps(config))
    with attach(model, [folder]) as side:
        model.encode(texts[:2])
        assert len(side.predictions()) == 2


@pytest.mark.slow
def test_the_embed_side_tasks_benchmark_runs(minilm_path, benchmark_script, tmp_path, monkeypatch):
    """benchmarks/embed_side_tasks.py, a short run: its three variants, its ratios."""
    script = benchmark_script("embed_side_tasks")
    argv = ["embed_side_tasks.py", "--batch", "4", "--length", "16", "--rounds", "2"]
    monkeypatch.setattr("sys.argv", [*argv, "--warmup", "1"])
    threads = torch.get_num_threads()
    try:
        script.main()
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "results" / "embed_side_tasks.json").read_text())
    assert result["embeddings_bit_identical_with_4_tasks"] is True
    assert set(result["cpu_seconds_median"]) == {"embed", "embed_tasks_4", "embed_copies_4"}
    assert all(len(ts) == 2 for ts in result["cpu_seconds_per_round"].values())
    assert result["ratio_copies_4_vs_embed"] > 2 * result["ratio_tasks_4_vs_embed"]
