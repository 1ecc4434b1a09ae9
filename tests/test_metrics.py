import math

import numpy as np
import pytest

from adalayers.core.metrics import (
    accuracy,
    compute_metrics,
    f1,
    matthews_corrcoef,
    ner_scores,
    pearson_spearman,
    primary_metric,
)


def test_accuracy_and_macro_f1_by_hand():
    y_true = ["a", "b", "a", "a"]
    y_pred = ["a", "b", "b", "a"]
    assert accuracy(y_true, y_pred) == 0.75
    # a: P=2/2, R=2/3 -> F1=0.8;  b: P=1/2, R=1/1 -> F1=2/3
    assert f1(y_true, y_pred) == pytest.approx((0.8 + 2 / 3) / 2)
    assert f1([1, 0, 1, 1], [1, 0, 0, 1], average="binary") == pytest.approx(0.8)
    assert f1(y_true, y_pred, average="binary", pos_label="b") == pytest.approx(2 / 3)


def test_mcc_matches_hand_formula():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, 1 - y_true)
    tp = np.sum((y_pred == 1) & (y_true == 1))
    tn = np.sum((y_pred == 0) & (y_true == 0))
    fp = np.sum((y_pred == 1) & (y_true == 0))
    fn = np.sum((y_pred == 0) & (y_true == 1))
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corrcoef(y_true.tolist(), y_pred.tolist()) == pytest.approx(expected)
    assert 0.2 < expected < 0.6  # the example is neither trivial nor degenerate


def test_mcc_is_zero_for_constant_predictions():
    assert matthews_corrcoef([0, 1, 1, 0], [1, 1, 1, 1]) == 0.0


def test_pearson_spearman_against_numpy():
    rng = np.random.default_rng(1)
    gold = rng.random(50) * 5
    pred = gold + rng.normal(0, 1, 50)
    out = pearson_spearman(gold.tolist(), pred.tolist())
    assert out["pearson"] == pytest.approx(np.corrcoef(gold, pred)[0, 1])
    ranks = np.argsort(np.argsort(gold)), np.argsort(np.argsort(pred))  # no ties here
    assert out["spearman"] == pytest.approx(np.corrcoef(*ranks)[0, 1])
    # monotone but non-linear: Spearman 1, Pearson below 1
    mono = pearson_spearman([1, 2, 3, 4], [1, 8, 27, 64])
    assert mono["spearman"] == pytest.approx(1.0) and mono["pearson"] < 0.99


def test_pearson_spearman_constant_input_is_zero_not_nan():
    assert pearson_spearman([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == {"pearson": 0.0, "spearman": 0.0}


def test_ner_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    # gold entities: PER, LOC, ORG; predicted: PER, ORG (wrong type at LOC), ORG -> 2 correct
    out = ner_scores(gold, pred)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(5 / 6)
    assert out["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert out["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert out["per_type"]["ORG"]["precision"] == pytest.approx(0.5)
    assert out["per_type"]["ORG"]["recall"] == 1.0
    assert out["per_type"]["ORG"]["f1"] == pytest.approx(2 / 3)


def test_ner_scores_conlleval_chunking():
    # conlleval starts a chunk at an I- tag after O: the prediction matches the gold PER ...
    assert ner_scores([["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]])["f1"] == 1.0
    # ... but a boundary error makes the whole entity wrong: P = 0/2, R = 0/1
    out = ner_scores([["B-PER", "I-PER", "O"]], [["B-PER", "O", "B-PER"]])
    assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["f1"] == 0.0
    assert out["per_type"]["PER"]["support"] == 1


def test_ner_scores_without_entities():
    out = ner_scores([["O", "O"]], [["O", "O"]])
    assert out["f1"] == 0.0 and out["accuracy"] == 1.0 and out["per_type"] == {}


def test_mismatched_or_empty_inputs_raise():
    with pytest.raises(ValueError, match="sentence 1: 2 gold tags but 1 predicted"):
        ner_scores([["O"], ["O", "O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="3 gold labels but 2 predictions"):
        accuracy([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no examples"):
        compute_metrics("regression", [], [])
    with pytest.raises(ValueError, match="average"):
        f1([1], [1], average="micro")


def test_compute_metrics_per_task_type():
    seq = compute_metrics("sequence_classification", [1, 0, 1, 1], [1, 0, 0, 1])
    assert set(seq) == {"accuracy", "f1_macro", "mcc"}
    assert seq["accuracy"] == 0.75 and all(isinstance(v, float) for v in seq.values())
    reg = compute_metrics("regression", [0.0, 1.0, 2.0], [0.0, 1.0, 2.0])
    assert reg == pytest.approx({"pearson": 1.0, "spearman": 1.0})
    tok = compute_metrics("token_classification", [["B-LOC", "O"]], [["B-LOC", "O"]])
    assert tok["f1"] == 1.0 and tok["per_type"]["LOC"]["support"] == 1
    with pytest.raises(ValueError, match="unknown task type 'ner'"):
        compute_metrics("ner", [], [])


@pytest.mark.parametrize(
    ("task", "metric"),
    [
        ("imdb", "accuracy"),
        ("cola", "mcc"),
        ("rte", "accuracy"),
        ("stsb", "pearson"),
        ("conll2003", "f1"),
        ("token_classification", "f1"),
        ("sequence_classification", "accuracy"),
        ("regression", "pearson"),
    ],
)
def test_primary_metric(task, metric):
    assert primary_metric(task) == metric


def test_primary_metric_names_a_key_of_compute_metrics():
    assert primary_metric("cola") in compute_metrics("sequence_classification", [0, 1], [0, 1])
    with pytest.raises(ValueError, match="no primary metric for 'csv'"):
        primary_metric("csv")
