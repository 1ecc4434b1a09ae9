"""Defined behaviour on bad or awkward input."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from helpers import byte_level_tokenizer

from adalayers.core.backbone import load_backbone
from adalayers.core.encoding import InputError
from adalayers.core.multitask import AdaLayers
from adalayers.core.task import Task, TaskConfig


@pytest.fixture
def backbone(tiny_model_dir):
    return load_backbone(tiny_model_dir("bert"))


def seq_runtime(backbone):
    torch.manual_seed(0)
    task = Task(
        TaskConfig(
            "sequence_classification", ["neg", "pos"], mixer={"dim": 8}, head={"num_heads": 2}
        ),
        backbone.info(),
    )
    return AdaLayers(backbone, {"s": task})


def tok_runtime(backbone):
    torch.manual_seed(0)
    task = Task(
        TaskConfig(
            "token_classification",
            ["O", "B-PER", "I-PER"],
            mixer={"dim": 8},
            head={"num_heads": 2, "num_layers": 1, "ff_dim": 16},
        ),
        backbone.info(),
    )
    return AdaLayers(backbone, {"ner": task})


@pytest.mark.parametrize("make", [seq_runtime, tok_runtime])
@pytest.mark.parametrize("bad", ["", "   \n\t"])
def test_empty_text_is_rejected_by_index(backbone, make, bad):
    with pytest.raises(ValueError, match="index 1 is empty or whitespace"):
        make(backbone).predict(["good film", bad])


@pytest.mark.parametrize("make", [seq_runtime, tok_runtime])
def test_non_string_input(backbone, make):
    with pytest.raises(TypeError, match="index 0 is int"):
        make(backbone).predict([3])
    with pytest.raises(TypeError, match="single string"):
        make(backbone).predict("good film")


def test_long_sequence_input_is_truncated_with_warning(backbone, caplog):
    runtime = seq_runtime(backbone)
    long_text = " ".join(["good"] * 200)  # the tiny base takes 64 tokens
    with caplog.at_level(logging.WARNING, logger="adalayers"):
        out = runtime.predict([long_text, "bad"])
    assert "truncated" in caplog.text
    assert out[0]["s"]["label"] in ("neg", "pos")
    # the prediction equals that of the text cut to the base's length by hand
    cut = " ".join(["good"] * 62)
    assert runtime.predict([cut])[0]["s"] == pytest.approx(out[0]["s"])


def test_long_token_input_gets_a_prediction_for_every_word(backbone):
    runtime = tok_runtime(backbone)
    words = (["john", "read", "a", "book", "in", "london", "."] * 30)[:200]
    words[57] = "acmexyz"  # split into several sub-tokens
    out = runtime.predict([words, "mary said"])
    assert out[0]["ner"]["words"] == words
    assert len(out[0]["ner"]["labels"]) == len(words) == 200
    assert len(out[1]["ner"]["labels"]) == 2
    assert set(out[0]["ner"]["labels"]) <= {"O", "B-PER", "I-PER"}
    # a short input is not windowed: the same words alone give the same per-word predictions
    short = runtime.predict([words[:20]])[0]["ner"]
    again = runtime.predict([words[:20]])[0]["ner"]
    assert short == again


def test_windows_choose_the_most_central_copy(backbone):
    from adalayers.core.encoding import encode_words, word_logits

    words = [["john", "acmexyz"] * 50]  # "acmexyz" splits into several sub-tokens
    windows = encode_words(backbone.tokenizer, words, max_length=32, stride=8)
    assert len(windows.sample) > 1
    # logits that encode (window, position): each word must come from a window where it
    # sits far from both edges, and every word must be covered exactly once
    n, t = len(windows.sample), len(windows.word_ids[0])
    logits = torch.stack(
        [torch.stack([torch.tensor([float(w), float(p)]) for p in range(t)]) for w in range(n)]
    )
    rows = word_logits(windows, logits, [100])[0]
    assert rows.shape == (100, 2)
    for word, (w, p) in enumerate(rows.tolist()):
        assert windows.word_ids[int(w)][int(p)] == word
        # brute force: the context of this word's start in every window that holds it
        contexts = []
        for ids, starts in zip(windows.word_ids, windows.starts):
            content = [i for i, x in enumerate(ids) if x is not None]
            contexts += [
                min(t - content[0], content[-1] - t)
                for t, x in enumerate(ids)
                if x == word and starts[t]
            ]
        assert contexts, f"word {word} starts in no window"
        ids = windows.word_ids[int(w)]
        content = [i for i, x in enumerate(ids) if x is not None]
        assert min(p - content[0], content[-1] - p) == max(contexts)


def test_sentence_pairs(backbone):
    runtime = seq_runtime(backbone)
    out = runtime.predict(["the movie"], pairs=["a good film"])
    assert out[0]["s"]["label"] in ("neg", "pos")
    with pytest.raises(ValueError, match="1 texts but 2 pair"):
        runtime.predict(["the movie"], pairs=["a", "b"])


def test_words_are_tokenised_as_ordinary_text_for_byte_level_bpe():
    from adalayers.core.encoding import tokenize_words

    tokenizer = byte_level_tokenizer()
    words = ["john", "lives", "in", "london"]
    enc, word_ids, starts = tokenize_words(tokenizer, [words])
    # the same ids as the sentence itself: every word after the first keeps its leading space
    assert enc["input_ids"][0] == tokenizer("john lives in london")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert [t for t, w in zip(tokens, word_ids[0]) if w == 1][0].startswith("Ġ")
    assert sorted({w for w in word_ids[0] if w is not None}) == [0, 1, 2, 3]
    assert sum(starts[0]) == 4  # one start per word


def test_words_match_split_into_words_for_wordpiece(backbone):
    from adalayers.core.encoding import tokenize_words

    words = [["john", "read", "acmexyz", "."], ["mary", "said"]]
    enc, word_ids, starts = tokenize_words(backbone.tokenizer, words)
    reference = backbone.tokenizer(words, is_split_into_words=True)
    assert enc["input_ids"] == reference["input_ids"]
    assert word_ids == [reference.word_ids(0), reference.word_ids(1)]
    assert [sum(s) for s in starts] == [4, 2]


# -- input that is empty once invisible characters or the tokenizer drop what it holds ----------
INVISIBLE = [
    "\u200b",  # zero-width space
    "\x00",  # NUL
    "\ufeff",  # byte order mark
    "\u0301",  # a combining mark with nothing to combine with
    "\x07\x1b",  # control characters
    "\ufe0f",  # emoji variation selector
    " \u200d\u2060 \u00ad ",  # joiners, word joiner, soft hyphen between spaces
]


@pytest.mark.parametrize("make", [seq_runtime, tok_runtime])
@pytest.mark.parametrize("bad", INVISIBLE)
def test_invisible_only_text_is_rejected_by_index(backbone, make, bad):
    # before: a token task raised IndexError in word_logits, a sequence task gave a label
    with pytest.raises(InputError, match="index 1 is empty once invisible") as caught:
        make(backbone).predict(["good film", bad])
    assert caught.value.index == 1


@pytest.mark.parametrize("make", [seq_runtime, tok_runtime])
def test_text_the_tokenizer_drops_is_rejected_by_index(backbone, make):
    # U+FFFD is a visible symbol, but the (BERT) tokenizer drops it: nothing reaches the model
    assert backbone.tokenizer("\ufffd", add_special_tokens=False)["input_ids"] == []
    with pytest.raises(InputError, match="index 2 is empty once tokenized"):
        make(backbone).predict(["good film", "bad", "\ufffd \ufffd"])


@pytest.mark.parametrize("make", [seq_runtime, tok_runtime])
def test_lone_surrogate_is_rejected_by_index(backbone, make):
    # before: "TextEncodeInput must be Union[...]" from the tokenizer
    with pytest.raises(InputError, match=r"index 1 holds a lone surrogate U\+D800 at character 3"):
        make(backbone).predict(["good film", "bad\ud800 plot"])


def test_invisible_characters_inside_a_text_are_kept(backbone):
    seq = seq_runtime(backbone).predict(["good\u200b film \ufe0f"])
    assert seq[0]["s"]["label"] in ("neg", "pos")
    tok = tok_runtime(backbone).predict(["john \u200b read"])[0]["ner"]
    assert tok["words"] == ["john", "\u200b", "read"] and len(tok["labels"]) == 3


def test_pair_texts_are_checked_too(backbone):
    with pytest.raises(InputError, match="pair text at index 0 is empty once invisible"):
        seq_runtime(backbone).predict(["the movie"], pairs=["\u200b"])


def test_encoders_refuse_inputs_that_tokenise_to_nothing(backbone):
    from adalayers.core.encoding import Windows, encode_sequences, encode_words, word_logits

    tokenizer = backbone.tokenizer
    with pytest.raises(InputError, match="input at index 1 is empty once tokenized"):
        encode_words(tokenizer, [["john"], ["\ufffd"]], max_length=32)
    with pytest.raises(InputError, match="input at index 0 is empty once invisible"):
        encode_words(tokenizer, [["\u200b"]], max_length=32)
    with pytest.raises(InputError, match="text at index 1 is empty once tokenized"):
        encode_sequences(tokenizer, ["good", "\ufffd"], None, max_length=32)
    with pytest.raises(InputError, match="pair text at index 0 holds a lone surrogate"):
        encode_sequences(tokenizer, ["good"], ["\udfff"], max_length=32)
    # a window holding no word (only special tokens) no longer crashes word_logits
    windows = Windows({}, [0, 0], [[None, 0, None], [None, None, None]], [[False, True, False]] * 2)
    rows = word_logits(windows, torch.arange(12.0).reshape(2, 3, 2), [1])
    assert rows[0].tolist() == [[2.0, 3.0]]


def test_attached_tasks_refuse_a_row_of_special_tokens_only(backbone):
    from adalayers.serving.runtime import attach

    tasks = {"s": seq_runtime(backbone).tasks["s"]}
    inputs = backbone.tokenizer(["good film", "\u200b"], padding=True, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    with attach(backbone.model, tasks, tokenizer=backbone.tokenizer) as side:
        with torch.no_grad():
            backbone.model(**inputs)
        assert side.logits["s"].shape == (2, 2)  # the raw logits stay readable
        with pytest.raises(InputError, match="input at index 1 holds only special tokens"):
            side.predictions()


def test_vllm_token_tasks_read_the_special_ids_once_per_tokenizer():
    from adalayers.serving.integrations.vllm import special_ids

    class Tokenizer:
        reads = 0

        @property
        def all_special_ids(self):
            Tokenizer.reads += 1
            return [0, 2]

    first, second = Tokenizer(), Tokenizer()
    assert special_ids(first) == special_ids(first) == {0, 2}
    assert Tokenizer.reads == 1
    assert special_ids(second) == {0, 2} and Tokenizer.reads == 2  # one read per tokenizer


# -- the HTTP server: 422 for such texts, and the connection survives every error ---------------
@pytest.fixture(scope="module")
def keepalive(tiny_model_dir):
    """A real server on a free port and one keep-alive ``http.client`` connection to it; texts
    equal to "boom" make the predictor fail with an unexpected error."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import http.client

    from adalayers.serving.app import create_app
    from adalayers.serving.predictor import Predictor
    from adalayers.serving.server import BackgroundServer

    class Boom(Predictor):
        def predict(self, texts, *args, **kwargs):
            if "boom" in texts:
                raise RuntimeError("boom")
            return super().predict(texts, *args, **kwargs)

    app = create_app(Boom(tok_runtime(load_backbone(tiny_model_dir("bert")))), max_wait_ms=0)
    with BackgroundServer(app) as server:
        connection = http.client.HTTPConnection(server.host, server.port, timeout=30)

        def post(texts):
            body = json.dumps({"texts": texts})
            connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, json.loads(response.read()), response.getheader("connection")

        yield post
        connection.close()


@pytest.mark.parametrize("bad", [*INVISIBLE, "\ufffd", "x\ud800"])
def test_server_answers_422_and_keeps_the_connection(keepalive, bad):
    # before: 500 for invisible-only texts, then a reset connection
    status, body, _ = keepalive(["john read", bad])
    assert status == 422
    assert re.match(r"(text|input) (at index )?1 (is empty|holds a lone surrogate)", body["detail"])
    status, body, _ = keepalive(["john read"])  # the same connection
    assert status == 200 and body["predictions"][0]["ner"]["words"] == ["john", "read"]


def test_server_error_500_keeps_the_connection(keepalive):
    # before: after a 500 uvicorn closed the socket without "Connection: close"
    status, body, connection = keepalive(["boom"])
    assert status == 500 and body == {"detail": "internal server error"}
    assert connection != "close"
    for _ in range(2):
        status, body, _ = keepalive(["john read"])
        assert status == 200 and len(body["predictions"]) == 1


# -- predict --input: lines split on "\n" only, files named in every error ---------------------
@pytest.fixture
def ner_run(tmp_path, tiny_model_dir):
    """A run folder (config naming the tiny base + a saved token task) for the CLI."""
    import yaml

    folder = tiny_model_dir("bert")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"base": str(folder)}))
    tok_runtime(load_backbone(folder)).tasks["ner"].save_pretrained(run / "model")
    return run


def predict_file(run, path, capsys):
    """``adalayers predict RUN --input PATH`` -> (exit code, output rows, stderr)."""
    from adalayers.cli import main

    capsys.readouterr()
    code = main(["predict", str(run), "--input", str(path)])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_predict_splits_lines_on_newline_only(ner_run, tmp_path, capsys):
    # before: str.splitlines() also split on U+2028, form feed, U+0085...: 2 lines, 5 inputs
    text = tmp_path / "in.txt"
    text.write_bytes("john \u2028read\r\nmary\x0csaid\x85 it\u2029\n\n".encode())
    code, rows, _ = predict_file(ner_run, text, capsys)
    assert code == 0
    assert [r["input"] for r in rows] == ["john \u2028read", "mary\x0csaid\x85 it\u2029"]
    assert rows[0]["words"] == ["john", "read"] and rows[1]["words"] == ["mary", "said", "it"]
    # before: a raw U+2028 inside a JSON string was reported as invalid JSON
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_bytes('{"text": "john\u2028read"}\r\n"mary said"\n'.encode())
    code, rows, _ = predict_file(ner_run, jsonl, capsys)
    assert code == 0 and [r["input"] for r in rows] == ["john\u2028read", "mary said"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        # before: a traceback (IndexError) and nothing for the other lines
        ("zw.txt", "john read\n\n\u200b\nmary said\n", "zw.txt:3: line is empty once invisible"),
        ("drop.txt", "john\n\ufffd\n", "drop.txt:2: line is empty once tokenized"),
        ("s.jsonl", '"john"\n{"text": "x\\ud800"}\n', "s.jsonl:2: line holds a lone surrogate"),
        ("e.jsonl", '"john"\n{"tokens": []}\n', "e.jsonl:2: line is empty or whitespace"),
        ("t.jsonl", '{"tokens": ["a", 3]}\n', "t.jsonl:1: expected a string, or an object"),
    ],
)
def test_predict_refuses_a_bad_line_before_predicting(
    ner_run, tmp_path, capsys, name, content, message
):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    code, rows, err = predict_file(ner_run, path, capsys)
    assert code == 2 and rows == []
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # before: "'utf-8' codec can't decode byte 0x89 in position 0", no file named
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "bin.txt:1: not UTF-8 text (byte 0x89"),
        (b"fine\nline\xff\xfe two\n", "bin.txt:2: not UTF-8 text (byte 0xff"),
        (b"fine\nab\x00\x00cd\n", "bin.txt:2: holds a NUL byte; is it a binary file?"),
    ],
)
def test_predict_names_a_binary_file(ner_run, tmp_path, capsys, content, message):
    path = tmp_path / "bin.txt"
    path.write_bytes(content)
    code, rows, err = predict_file(ner_run, path, capsys)
    assert code == 2 and rows == []
    assert message in err and "predict --input reads UTF-8 text" in err


def test_predict_reads_a_byte_order_mark_as_no_text(ner_run, tmp_path, capsys):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf"john read"\n')  # a BOM made json.loads fail
    code, rows, _ = predict_file(ner_run, path, capsys)
    assert code == 0 and rows[0]["input"] == "john read"


# -- read_inputs: the one reader of predict --input (txt, JSONL, CSV / TSV, sentence pairs) -----
def test_read_inputs_takes_the_runs_columns_and_pairs(tmp_path):
    from adalayers.training.data import read_inputs

    columns = {"text": "sentence1", "text_pair": "sentence2", "label": "label"}
    table = tmp_path / "pairs.csv"  # the file a task was trained on, label column and all
    table.write_text('sentence1,sentence2,label\n"a, b",c,1\n\n"two\nlines",d\u2028e,0\n')
    inputs = read_inputs(table, columns)
    assert inputs.texts == ["a, b", "two\nlines"] and inputs.pairs == ["c", "d\u2028e"]
    assert inputs.lines == [2, 4] and inputs.where(1) == f"{table}:4"
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("text\ttext_pair\nx\ty\n")  # the standard names where no column is set
    assert (read_inputs(tsv).texts, read_inputs(tsv).pairs) == (["x"], ["y"])
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"sentence1": "a", "sentence2": "b"}\n{"text": "c", "text_pair": "d"}\n')
    inputs = read_inputs(jsonl, columns)
    assert (inputs.texts, inputs.pairs, inputs.lines) == (["a", "c"], ["b", "d"], [1, 2])
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: expected a string, or an object"):
        read_inputs(jsonl)  # without the run's columns only the standard names count


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("m.jsonl", '{"text": "a", "text_pair": "b"}\n"c"\n', "m.jsonl:2: has no 'text_pair'"),
        ("n.jsonl", '{"text": "a", "text_pair": 3}\n', "n.jsonl:1: 'text_pair' must be a string"),
        ("h.csv", "review,label\na,1\n", "h.csv:1: the header has no column 'text'"),
        ("r.csv", "text,label\na,1\nb\n", "r.csv:3: expected 2 CSV columns (text, label)"),
        ("e.csv", "text\n", "e.csv holds no inputs"),
        ("z.csv", "text\nab\x00\n", "z.csv:2: holds a NUL byte"),
    ],
)
def test_read_inputs_names_file_and_line(tmp_path, name, content, message):
    from adalayers.training.data import read_inputs

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        read_inputs(path)
    assert message in str(err.value)


def test_predict_names_the_line_of_a_bad_pair_text(tmp_path, tiny_model_dir, capsys):
    import yaml

    folder = tiny_model_dir("bert")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"base": str(folder)}))
    seq_runtime(load_backbone(folder)).tasks["s"].save_pretrained(run / "model")
    path = tmp_path / "pairs.csv"
    path.write_text("text,text_pair\njohn read,a book\nmary said,\u200b\n")
    code, rows, err = predict_file(run, path, capsys)
    assert code == 2 and rows == []
    assert f"{path}:3: text_pair is empty once invisible characters are dropped" in err
    path.write_text("text,text_pair\njohn read,a book\nmary said,it\n")
    code, rows, err = predict_file(run, path, capsys)
    assert code == 0, err
    assert [(r["input"], r["input_pair"]) for r in rows] == [
        ("john read", "a book"),
        ("mary said", "it"),
    ]
    expected = seq_runtime(load_backbone(folder)).predict(["john read"], ["a book"])
    assert rows[0]["score"] == pytest.approx(expected[0]["s"]["score"], abs=1e-6)
