"""Defined behaviour on bad or awkward input."""

from __future__ import annotations

import logging

import pytest
import torch

from adalayers.backbone import load_backbone
from adalayers.model import AdaLayers, Task, TaskConfig


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
    from adalayers.encoding import encode_words, word_logits

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


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["john lives in london", "mary read the book", "acme corp said it lives"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<s>")


def test_words_are_tokenised_as_ordinary_text_for_byte_level_bpe():
    from adalayers.encoding import tokenize_words

    tokenizer = _byte_level_tokenizer()
    words = ["john", "lives", "in", "london"]
    enc, word_ids, starts = tokenize_words(tokenizer, [words])
    # the same ids as the sentence itself: every word after the first keeps its leading space
    assert enc["input_ids"][0] == tokenizer("john lives in london")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert [t for t, w in zip(tokens, word_ids[0]) if w == 1][0].startswith("Ġ")
    assert sorted({w for w in word_ids[0] if w is not None}) == [0, 1, 2, 3]
    assert sum(starts[0]) == 4  # one start per word


def test_words_match_split_into_words_for_wordpiece(backbone):
    from adalayers.encoding import tokenize_words

    words = [["john", "read", "acmexyz", "."], ["mary", "said"]]
    enc, word_ids, starts = tokenize_words(backbone.tokenizer, words)
    reference = backbone.tokenizer(words, is_split_into_words=True)
    assert enc["input_ids"] == reference["input_ids"]
    assert word_ids == [reference.word_ids(0), reference.word_ids(1)]
    assert [sum(s) for s in starts] == [4, 2]
