"""Property-based tests (hypothesis): any list of Unicode strings gives one prediction per input
or an :class:`~adalayers.core.encoding.InputError` (a ``ValueError``) naming the bad input's index,
never another exception: not from ``AdaLayers.predict``, not from the encoders, not from the
``predict --input`` reader.

The strings mix any code point (lone surrogates included), the categories that tokenizers drop
(controls, format characters, combining marks, separators, private and unassigned code points)
and the tiny vocabulary's words, so that both outcomes come up often. Run with
``--hypothesis-show-statistics`` to see how many examples each property tried.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import WORDS, byte_level_tokenizer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adalayers.core.backbone import load_backbone
from adalayers.core.encoding import (
    InputError,
    check_texts,
    check_words,
    encode_sequences,
    encode_words,
    word_logits,
)
from adalayers.core.multitask import AdaLayers
from adalayers.core.task import Task, TaskConfig

AWKWARD = list(
    " \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u2028\u2029\u3000"  # whitespace Python knows
    "\x00\x07\x1b\x7f\u200b\u200c\u200d\u2060\ufeff\u00ad"  # controls and format characters
    "\u0301\u20dd\ufe0f\U000e0100"  # combining marks, variation selectors
    "\ufffd\ue000\U0010ffff\ud800\udfff"  # replacement character, private use, surrogates
    "a\u00e9\u4e2d\U0001f600.,!"
)
CHARS = st.one_of(
    st.characters(exclude_categories=()),  # any code point, surrogates included
    st.characters(categories=["C", "M", "Z"]),
    st.sampled_from(AWKWARD),
)


def strings(min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[str]:
    """Strings of CHARS (``st.text`` would leave the surrogates out)."""
    return st.lists(CHARS, min_size=min_size, max_size=max_size).map("".join)


PIECES = st.one_of(strings(max_size=4), st.sampled_from(WORDS))
TEXTS = st.one_of(
    strings(min_size=1),
    st.lists(PIECES, min_size=1, max_size=8).map(" ".join),
    st.lists(st.sampled_from(WORDS), min_size=40, max_size=90).map(" ".join),  # windows
)
INPUTS = st.lists(TEXTS, min_size=1, max_size=3)
WORD_LISTS = st.lists(strings(min_size=1, max_size=5), max_size=6)
TOKEN_INPUTS = st.lists(st.one_of(TEXTS, WORD_LISTS), min_size=1, max_size=3)

FAST = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny forwards: one thread is ~30x faster than two fighting for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backbone(tiny_model_dir):
    return load_backbone(tiny_model_dir("bert"))


@pytest.fixture(scope="module")
def runtimes(backbone):
    """``seq``: a sequence task alone (texts checked as texts); ``both``: a sequence and a token
    task from one forward (inputs checked as words)."""
    torch.manual_seed(0)
    seq = Task(
        TaskConfig("sequence_classification", ["neg", "pos"], mixer={"dim": 8}),
        backbone.info(),
    )
    tok = Task(
        TaskConfig(
            "token_classification",
            ["O", "B-PER", "I-PER"],
            mixer={"dim": 8},
            head={"num_heads": 2, "num_layers": 1, "ff_dim": 16},
        ),
        backbone.info(),
    )
    return {
        "seq": AdaLayers(backbone, {"s": seq}).eval(),
        "both": AdaLayers(backbone, {"s": seq, "ner": tok}).eval(),
    }


@pytest.fixture(scope="module")
def tokenizers(backbone):
    return {"wordpiece": backbone.tokenizer, "byte-level": byte_level_tokenizer()}


def assert_names_the_bad_input(err: InputError, inputs: list, check) -> None:
    """The error names an index in range; that input fails alone; the inputs before it pass."""
    event(f"refused: {err.reason.split(' (')[0].split(';')[0].split(' U+')[0]}")
    assert 0 <= err.index < len(inputs)
    assert f"index {err.index} " in str(err)
    with pytest.raises(InputError) as alone:
        check([inputs[err.index]])
    assert alone.value.index == 0
    if err.index:
        check(inputs[: err.index])


def words_of(item) -> list[str]:
    return item.split() if isinstance(item, str) else list(item)


@FAST
@given(texts=INPUTS)
def test_sequence_predict_gives_one_label_per_text_or_names_the_bad_one(runtimes, texts):
    runtime = runtimes["seq"]
    try:
        out = runtime.predict(texts, batch_size=3)
    except InputError as err:
        tokenizer = runtime.backbone.tokenizer
        assert_names_the_bad_input(err, texts, lambda x: check_texts(x, "text", tokenizer))
        return
    event("predicted")
    assert len(out) == len(texts)
    for row in out:
        assert row["s"]["label"] in ("neg", "pos") and 0.5 <= row["s"]["score"] <= 1.0


@FAST
@given(inputs=TOKEN_INPUTS)
def test_token_predict_labels_every_word_or_names_the_bad_input(runtimes, inputs):
    runtime = runtimes["both"]
    try:
        out = runtime.predict(inputs, batch_size=3)
    except InputError as err:
        tokenizer = runtime.backbone.tokenizer
        assert_names_the_bad_input(err, inputs, lambda x: check_words(x, tokenizer))
        return
    event("predicted")
    assert len(out) == len(inputs)
    for item, row in zip(inputs, out):
        words = words_of(item)
        ner = row["ner"]
        assert ner["words"] == words
        assert len(ner["labels"]) == len(ner["scores"]) == len(words)
        assert set(ner["labels"]) <= {"O", "B-PER", "I-PER"}
        assert all(math.isfinite(s) for s in ner["scores"])
        assert row["s"]["label"] in ("neg", "pos")


@FAST
@pytest.mark.parametrize("name", ["wordpiece", "byte-level"])
@given(texts=INPUTS)
def test_encode_sequences_gives_one_row_per_text_or_names_the_bad_one(tokenizers, name, texts):
    tokenizer = tokenizers[name]
    try:
        enc = encode_sequences(tokenizer, texts, None, max_length=16)
    except InputError as err:
        assert_names_the_bad_input(err, texts, lambda x: check_texts(x, "text", tokenizer))
        return
    event("encoded")
    assert enc["input_ids"].shape[0] == len(texts) and enc["input_ids"].shape[1] <= 16
    # every row holds at least one token besides the special ones
    special = tokenizer.num_special_tokens_to_add(pair=False)
    assert (enc["attention_mask"].sum(1) > special).all()


@FAST
@pytest.mark.parametrize("name", ["wordpiece", "byte-level"])
@given(inputs=TOKEN_INPUTS)
def test_encode_words_covers_every_input_or_names_the_bad_one(tokenizers, name, inputs):
    tokenizer = tokenizers[name]
    words = [words_of(item) for item in inputs]
    try:
        windows = encode_words(tokenizer, words, max_length=16, stride=4)
    except InputError as err:
        assert_names_the_bad_input(err, words, lambda x: check_words(x, tokenizer))
        return
    event("encoded")
    assert sorted(set(windows.sample)) == list(range(len(words)))
    num_windows, length = windows.inputs["input_ids"].shape
    logits = torch.randn(num_windows, length, 3)
    rows = word_logits(windows, logits, [len(w) for w in words])
    assert [r.shape for r in rows] == [(len(w), 3) for w in words]


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(strings(max_size=10), min_size=1, max_size=6), crlf=st.booleans())
def test_input_file_lines_are_split_on_newlines_only(tmp_path_factory, lines, crlf):
    """Whatever a line holds besides "\\n", it is one input (blank lines skipped); the reader
    raises only a ValueError naming the file."""
    from adalayers.training.data import read_inputs

    lines = [line.replace("\n", " ").replace("\r", " ") for line in lines]
    path = tmp_path_factory.mktemp("lines") / "in.txt"
    path.write_bytes(("\r\n" if crlf else "\n").join(lines).encode("utf-8", "surrogatepass"))
    expected = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if expected and expected[0][0] == 1 and expected[0][1].startswith("\ufeff"):
        expected[0] = (1, expected[0][1][1:])  # a leading byte order mark is dropped
        expected = [(n, line) for n, line in expected if line.strip()]
    try:
        inputs = read_inputs(path)
        items, numbers = inputs.texts, inputs.lines
    except ValueError as err:
        assert str(err).startswith(str(path))
        bad = any("\x00" in line or _has_surrogate(line) for line in lines)
        assert bad or not expected, str(err)  # a file of one byte order mark holds no inputs
        return
    assert list(zip(numbers, items)) == expected


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)
