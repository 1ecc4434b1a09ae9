import itertools

import pytest
import torch

from adalayers.core.decoding import bio_transitions, check_iob2, decode_words, viterbi
from adalayers.core.heads import HeadConfig
from adalayers.core.task import TaskConfig
from adalayers.training.evaluate import _token_predictions

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def valid(tags: list[str]) -> bool:
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            return False
        previous = tag
    return True


def test_transitions_follow_iob2():
    start, allowed = bio_transitions(LABELS)
    assert start.tolist() == [True, True, False, True, False]
    for i, a in enumerate(LABELS):
        for j, b in enumerate(LABELS):
            follows = not b.startswith("I-") or (a != "O" and a[2:] == b[2:])
            assert bool(allowed[i, j]) == follows, (a, b)


@pytest.mark.parametrize("words", [1, 2, 3, 5])
def test_viterbi_is_the_best_valid_sequence_by_brute_force(words):
    start, allowed = bio_transitions(LABELS)
    generator = torch.Generator().manual_seed(words)
    for _ in range(20):
        log_probs = torch.randn(words, len(LABELS), generator=generator).log_softmax(-1) * 3
        path = viterbi(log_probs, start, allowed)
        best = max(
            (
                seq
                for seq in itertools.product(range(len(LABELS)), repeat=words)
                if valid([LABELS[t] for t in seq])
            ),
            key=lambda seq: sum(log_probs[w, t].item() for w, t in enumerate(seq)),
        )
        assert path == list(best)


def test_bio_equals_argmax_when_argmax_is_valid_and_fixes_it_when_not():
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0, 0.0], [5.0, 0, 0, 0, 0]])
    assert decode_words(logits, LABELS, "bio")[0] == decode_words(logits, LABELS, "argmax")[0]
    # argmax: O I-PER (a stray I-); bio turns it into O B-PER, the better valid sequence
    stray = torch.tensor([[5.0, 0, 0, 0, 0], [0.0, 2.0, 3.0, 0.0, 0.0]])
    assert decode_words(stray, LABELS, "argmax")[0] == [0, 2]
    tags, scores = decode_words(stray, LABELS, "bio")
    assert tags == [0, 1]
    assert scores[1] == pytest.approx(stray[1].softmax(-1)[1].item())
    assert decode_words(torch.zeros(0, len(LABELS)), LABELS, "bio") == ([], [])


def test_bio_output_is_always_valid():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(12, len(LABELS), generator=generator) * 4
        tags, _ = decode_words(logits, LABELS, "bio")
        assert valid([LABELS[t] for t in tags])


def test_evaluation_predictions_decode_each_sentence_on_its_labelled_tokens():
    class Tags:
        labels = LABELS
        decoding = "bio"

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, len(LABELS), generator=generator) * 4  # (B, T, C)
    labels = torch.full((3, 7), -100)
    labels[0, [1, 2, 4]] = 0  # first sub-tokens of 3 words; the rest ignored
    labels[1, [1, 2, 3, 4, 5]] = 0
    labels[2, [1]] = 0
    pred = _token_predictions(logits, labels, Tags())
    assert (pred[labels == -100] == -100).all()
    for row in range(3):
        scored = labels[row] != -100
        expected, _ = decode_words(logits[row][scored], LABELS, "bio")
        assert pred[row][scored].tolist() == expected
    Tags.decoding = "argmax"
    argmax = _token_predictions(logits, labels, Tags())
    assert argmax.tolist() == logits.argmax(-1).masked_fill(labels == -100, -100).tolist()


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="head.decoding must be auto, argmax or bio"):
        HeadConfig(decoding="crf")
    with pytest.raises(ValueError, match="IOB2"):
        check_iob2(["O", "S-PER", "E-PER"])
    with pytest.raises(ValueError, match="head.decoding=bio needs IOB2"):
        TaskConfig("token_classification", ["O", "PER"], head={"decoding": "bio"})
    with pytest.raises(ValueError, match="head.decoding=bio is for token-classification"):
        TaskConfig("sequence_classification", ["a", "b"], head={"decoding": "bio"})
    assert TaskConfig("token_classification", LABELS, head={"decoding": "bio"}).head.decoding
