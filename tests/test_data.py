import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

from adalayers.training.config import DataConfig
from adalayers.training.data import load_task_data, read_conll, readers, split_validation

# --------------------------------------------------------------------------- fixtures


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


CONLL_TRAIN = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A tiny copy of every benchmark in its official format."""
    root = tmp_path / "datasets"
    train = [{"id": f"tr{i}", "text": f"review {i}", "label": i % 2} for i in range(40)]
    _write(root / "imdb/train.jsonl.gz", _jsonl(train))
    _write(root / "imdb/test.jsonl.gz", _jsonl([{"id": "t", "text": "fine", "label": 1}] * 6))
    # CoLA: no header; an unbalanced quote must not swallow the following lines (QUOTE_NONE)
    cola = [f"gj04\t{int(i % 4 != 0)}\t\tSentence {i}." for i in range(40)]
    cola[3] = 'gj04\t1\t\t"Stop it, he said.'
    _write(root / "glue/CoLA/train.tsv", "\n".join(cola) + "\n")
    _write(root / "glue/CoLA/dev.tsv", "gj04\t0\t*\tBad one.\ngj04\t1\t\tGood one.")
    rte = ["index\tsentence1\tsentence2\tlabel"] + [
        f"{i}\tPremise {i}.\tHypothesis {i}.\t{['entailment', 'not_entailment'][i % 2]}"
        for i in range(20)
    ]
    _write(root / "glue/RTE/train.tsv", "\n".join(rte) + "\n")
    _write(root / "glue/RTE/dev.tsv", "\n".join(rte[:5]) + "\n")
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    sts = [head] + [f"{i}\tg\tf\ty\t{i}\tn\tn\tA {i}.\tB {i}.\t{i / 4:.3f}" for i in range(20)]
    _write(root / "glue/STS-B/train.tsv", "\n".join(sts) + "\n")
    _write(root / "glue/STS-B/dev.tsv", "\n".join(sts[:4]) + "\n")
    _write(root / "conll2003/train.txt", CONLL_TRAIN)
    _write(root / "conll2003/valid.txt", "Rome NNP B-NP B-LOC\nwins VBZ B-VP O\n")
    _write(root / "conll2003/test.txt", "\n-DOCSTART- -X- -X- O\n\nAcme NNP B-NP B-ORG\n\n")
    return root


# --------------------------------------------------------------------------- benchmarks


def test_imdb_splits_and_labels(data_dir):
    task = load_task_data("imdb", data_dir)
    assert task.task_type == "sequence_classification"
    assert task.label_names == ["negative", "positive"]
    assert list(task.splits) == ["train", "validation", "test"]
    assert {s: len(d) for s, d in task.splits.items()} == {"train": 36, "validation": 4, "test": 6}
    assert Counter(task.splits["validation"]["label"]) == {"negative": 2, "positive": 2}
    assert task.splits["train"].column_names == ["text", "label"]
    assert set(task.splits["test"]["label"]) == {"positive"}


def test_cola_reads_without_header_and_ignores_quotes(data_dir):
    task = load_task_data("cola", data_dir)
    assert task.label_names == ["unacceptable", "acceptable"]
    texts = task.splits["train"]["text"][:] + task.splits["validation"]["text"][:]
    assert len(texts) == 40 and '"Stop it, he said.' in texts
    assert task.splits["test"]["text"] == ["Bad one.", "Good one."]  # dev.tsv, no final newline
    assert task.splits["test"]["label"] == ["unacceptable", "acceptable"]
    assert Counter(task.splits["validation"]["label"]) == {"acceptable": 3, "unacceptable": 1}


def test_rte_uses_header_names_not_positions(data_dir):
    # same data with the columns in another order must read the same
    lines = (data_dir / "glue/RTE/train.tsv").read_text().splitlines()
    shuffled = ["\t".join([c[3], c[2], c[0], c[1]]) for c in (line.split("\t") for line in lines)]
    (data_dir / "glue/RTE/train.tsv").write_text("\n".join(shuffled) + "\n")
    task = load_task_data("rte", data_dir)
    row = task.splits["test"][1]
    assert row == {"text": "Premise 1.", "text_pair": "Hypothesis 1.", "label": "not_entailment"}
    train = task.splits["train"]
    assert train.column_names == ["text", "text_pair", "label"]
    assert all(t.split()[1] == p.split()[1] for t, p in zip(train["text"], train["text_pair"]))


def test_stsb_is_regression(data_dir):
    task = load_task_data("stsb", data_dir)
    assert task.task_type == "regression" and task.label_names == []
    assert (len(task.splits["train"]), len(task.splits["validation"])) == (18, 2)
    assert task.splits["test"]["label"] == [0.0, 0.25, 0.5]
    assert isinstance(task.splits["train"]["label"][0], float)


def test_conll2003_sentences_tags_and_label_order(data_dir):
    task = load_task_data("conll2003", data_dir)
    assert task.task_type == "token_classification"
    assert task.label_names == ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER"]
    train = task.splits["train"]
    assert train["tokens"] == [
        ["EU", "rejects", "German", "call"],
        ["Peter", "Blackburn"],
        ["BRUSSELS", "1996-08-22"],
    ]
    assert train["tags"][1] == ["B-PER", "I-PER"]
    assert task.splits["validation"]["tokens"] == [["Rome", "wins"]]
    assert task.splits["test"]["tags"] == [["B-ORG"]]


def test_limit_keeps_first_examples_per_split(data_dir):
    full = load_task_data("cola", data_dir)
    task = load_task_data("cola", data_dir, limit=3)
    assert {s: len(d) for s, d in task.splits.items()} == {"train": 3, "validation": 3, "test": 2}
    assert task.splits["train"]["text"] == full.splits["train"]["text"][:3]
    with pytest.raises(ValueError, match="limit"):
        load_task_data("cola", data_dir, limit=0)


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("ADALAYERS_DATA_DIR", str(data_dir))
    assert len(load_task_data("rte").splits["test"]) == 4


# --------------------------------------------------------------------------- split


def test_split_is_deterministic_and_stratified():
    ds = Dataset.from_dict(
        {"text": [str(i) for i in range(200)], "label": ["a"] * 140 + ["b"] * 60}
    )
    train, val = split_validation(ds, seed=7, stratify_by="label")
    again_train, again_val = split_validation(ds, seed=7, stratify_by="label")
    assert val["text"] == again_val["text"] and train["text"] == again_train["text"]
    assert Counter(val["label"]) == {"a": 14, "b": 6}
    assert sorted(train["text"][:] + val["text"][:], key=int) == ds["text"][:]  # a partition
    assert split_validation(ds, seed=8, stratify_by="label")[1]["text"] != val["text"]
    assert len(split_validation(ds, seed=7)[1]) == 20  # random (unstratified) split


def test_split_seed_reaches_load_task_data(data_dir):
    a = load_task_data("imdb", data_dir, seed=1).splits["validation"]["text"]
    assert a == load_task_data("imdb", data_dir, seed=1).splits["validation"]["text"]
    assert a != load_task_data("imdb", data_dir, seed=2).splits["validation"]["text"]


def test_split_of_tiny_train_says_what_to_do():
    ds = Dataset.from_dict({"text": ["x", "y"], "label": ["a", "b"]})
    with pytest.raises(ValueError, match="separate validation file"):
        split_validation(ds, stratify_by="label")


# --------------------------------------------------------------------------- user files


def test_user_csv_with_column_mapping_and_quotes(tmp_path):
    rows = ["review,topic,stars"] + [
        f'"Good, {i}",t{i},{"pos" if i % 3 else "neg"}' for i in range(30)
    ]
    _write(tmp_path / "train.csv", "\n".join(rows) + "\n")
    task = load_task_data(
        "csv",
        tmp_path,
        files={"train": "train.csv"},
        columns={"text": "review", "text_pair": "topic", "label": "stars"},
    )
    assert task.label_names == ["neg", "pos"]
    assert Counter(task.splits["validation"]["label"]) == {"neg": 1, "pos": 2}
    first = task.splits["train"][0]
    assert first == {"text": "Good, 0", "text_pair": "t0", "label": "neg"}
    assert task.splits["test"]["text"] == task.splits["validation"]["text"]  # no test file


def test_user_jsonl_gz_tsv_and_regression(tmp_path):
    _write(tmp_path / "a.jsonl.gz", _jsonl({"text": f"t{i}", "label": i % 2} for i in range(10)))
    _write(tmp_path / "b.tsv", 'text\tlabel\n"quoted\t1\n')
    task = load_task_data(
        "jsonl",
        files={"train": tmp_path / "a.jsonl.gz", "validation": tmp_path / "b.tsv"},
        label_names=["0", "1"],
    )
    assert task.label_names == ["0", "1"]
    assert task.splits["validation"][0] == {"text": '"quoted', "label": "1"}
    assert len(task.splits["train"]) == 10
    reg = load_task_data("jsonl", files={"train": tmp_path / "a.jsonl.gz"}, task_type="regression")
    assert reg.label_names == [] and set(reg.splits["train"]["label"]) <= {0.0, 1.0}


def test_user_conll_with_custom_columns(tmp_path):
    _write(tmp_path / "t.conll", "w1\tX\tB-A\tjunk\nw2\tX\tI-A\tjunk\n\nw3\tX\tO\tjunk\n")
    task = load_task_data(
        "conll",
        files={"train": tmp_path / "t.conll", "validation": tmp_path / "t.conll"},
        columns={"tags": 2},
    )
    assert task.splits["train"]["tokens"] == [["w1", "w2"], ["w3"]]
    assert task.splits["train"]["tags"] == [["B-A", "I-A"], ["O"]]
    assert task.label_names == ["O", "B-A", "I-A"]


# --------------------------------------------------------------------------- bad input


def test_missing_file_names_path_and_setting(data_dir):
    (data_dir / "glue/CoLA/dev.tsv").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_task_data("cola", data_dir)
    msg = str(err.value)
    assert "glue/CoLA/dev.tsv" in msg and "--data-dir" in msg and "ADALAYERS_DATA_DIR" in msg


def test_missing_column_names_column_file_and_present(tmp_path):
    path = _write(tmp_path / "train.csv", "sentence,label\nhi,a\n")
    with pytest.raises(ValueError) as err:
        load_task_data("csv", files={"train": path})
    msg = str(err.value)
    assert "'text'" in msg and str(path) in msg and "['label', 'sentence']" in msg


def test_label_outside_label_names(tmp_path):
    path = _write(tmp_path / "train.jsonl", _jsonl([{"text": "a", "label": "maybe"}] * 20))
    with pytest.raises(ValueError) as err:
        load_task_data("jsonl", files={"train": path}, label_names=["yes", "no"])
    msg = str(err.value)
    assert "'maybe'" in msg and str(path) in msg and "['yes', 'no']" in msg


def test_unknown_label_in_benchmark_file(data_dir):
    _write(data_dir / "glue/CoLA/dev.tsv", "gj04\t2\t\tOdd.\n")
    with pytest.raises(ValueError, match=r"label '2' in .*dev\.tsv:1 is not one of .*\['0', '1'\]"):
        load_task_data("cola", data_dir)


def test_unknown_tag_in_user_conll(tmp_path):
    path = _write(tmp_path / "t.txt", "a B-X\n")
    with pytest.raises(ValueError, match=r"\['B-X'\] in .*t\.txt are not in the label set"):
        load_task_data("conll", files={"train": path}, label_names=["O", "B-PER"])


@pytest.mark.parametrize("content", ["text,label\n", "", "\n\n"])
def test_empty_file_names_file(tmp_path, content):
    path = _write(tmp_path / "train.csv", content)
    with pytest.raises(ValueError, match=f"{path} contains no examples"):
        load_task_data("csv", files={"train": path})


def test_empty_conll_file(tmp_path):
    path = _write(tmp_path / "t.txt", "-DOCSTART- -X- -X- O\n\n")
    with pytest.raises(ValueError, match=f"{path} contains no sentences"):
        load_task_data("conll", files={"train": path})


def test_malformed_conll_line_has_file_and_line(tmp_path):
    path = _write(tmp_path / "t.txt", "EU NNP B-NP B-ORG\nrejects\n")
    with pytest.raises(ValueError, match=f"{path}:2: malformed CoNLL line 'rejects'"):
        read_conll(path, token_col=0, tag_col=3)


def test_malformed_rows_have_file_and_line(data_dir, tmp_path):
    _write(data_dir / "glue/RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tonly two\n")
    with pytest.raises(ValueError, match=r"dev\.tsv:2: expected 4 TSV columns .* found 2"):
        load_task_data("rte", data_dir)
    path = _write(tmp_path / "x.jsonl", '{"text": "a", "label": "b"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=f"{path}:2: invalid JSON"):
        load_task_data("jsonl", files={"train": path})
    path = _write(tmp_path / "s.tsv", "text\tlabel\na\tnot-a-number\n")
    with pytest.raises(ValueError, match="label 'not-a-number' in .* is not a number"):
        load_task_data("csv", files={"train": path}, task_type="regression")
    path = _write(tmp_path / "e.csv", "text,label\na,\n")
    with pytest.raises(ValueError, match=f"{path}:2: empty value in column 'label'"):
        load_task_data("csv", files={"train": path})


def test_bad_arguments_are_named(data_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'sst2'"):
        load_task_data("sst2", data_dir)
    with pytest.raises(ValueError, match=r"needs files=\{'train'"):
        load_task_data("csv", files={"test": "x.csv"})
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['dev'\]"):
        load_task_data("csv", files={"train": "x.csv", "dev": "y.csv"})
    with pytest.raises(ValueError, match=r"unknown column key\(s\) \['sentence'\]"):
        load_task_data("csv", files={"train": "x.csv"}, columns={"sentence": "s"})
    with pytest.raises(ValueError, match="for user tasks"):
        load_task_data("cola", data_dir, columns={"text": "x"})
    with pytest.raises(FileNotFoundError, match=r"x\.csv.*--data-dir"):
        load_task_data("csv", tmp_path, files={"train": "x.csv"})
    with pytest.raises(ValueError, match="contradicts task_type 'regression'"):
        load_task_data("csv", files={"train": "x.csv"}, task_type="regression", label_names=["a"])
    with pytest.raises(ValueError, match="column indices"):
        load_task_data("conll", files={"train": "x.txt"}, columns={"tags": "ner"})
    with pytest.raises(ValueError, match="does not fit user format 'conll'"):
        load_task_data("conll", files={"train": "x.txt"}, task_type="regression")


# --------------------------------------------------------------------------- hub path (faked)


def _fake_hub(repo, config=None, revision=None):
    label = ClassLabel(names=["neg", "pos"] if repo == "stanfordnlp/imdb" else ["x", "y"])
    if repo == "eriktks/conll2003":
        tags = ClassLabel(names=["O", "B-PER", "I-PER"])
        feats = Features(tokens=List(Value("string")), ner_tags=List(tags))
        ds = Dataset.from_dict({"tokens": [["Ann", "Lee"]], "ner_tags": [[1, 2]]}, features=feats)
        return DatasetDict(train=ds, validation=ds, test=ds)
    if config == "cola":
        label = ClassLabel(names=["unacceptable", "acceptable"])
    feats = Features(sentence=Value("string"), text=Value("string"), label=label)
    rows = {"sentence": [f"s{i}" for i in range(20)], "text": [f"t{i}" for i in range(20)]}
    labelled = Dataset.from_dict({**rows, "label": [i % 2 for i in range(20)]}, features=feats)
    unlabelled = Dataset.from_dict({**rows, "label": [-1] * 20}, features=feats)
    if repo == "stanfordnlp/imdb":
        return DatasetDict(train=labelled, test=labelled, unsupervised=unlabelled)
    return DatasetDict(train=labelled, validation=labelled.select(range(4)), test=unlabelled)


def test_hub_path_maps_int_labels_to_names(monkeypatch):
    monkeypatch.delenv("ADALAYERS_DATA_DIR", raising=False)
    monkeypatch.setattr(readers.datasets, "load_dataset", _fake_hub)
    imdb = load_task_data("imdb")
    assert imdb.label_names == ["negative", "positive"]
    assert imdb.splits["test"]["label"][:2] == ["negative", "positive"]
    assert (len(imdb.splits["train"]), len(imdb.splits["validation"])) == (18, 2)
    cola = load_task_data("cola")
    assert cola.splits["test"]["label"] == ["unacceptable", "acceptable"] * 2  # GLUE dev
    conll = load_task_data("conll2003")
    assert conll.splits["test"][0] == {"tokens": ["Ann", "Lee"], "tags": ["B-PER", "I-PER"]}
    assert conll.label_names == ["O", "B-PER", "I-PER"]


def test_hub_failure_says_to_set_data_dir(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.delenv("ADALAYERS_DATA_DIR", raising=False)
    monkeypatch.setattr(readers.datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="(?s)nyu-mll/glue.*no network.*--data-dir"):
        load_task_data("rte")


# --------------------------------------------------------------------------- real datasets


def _real_data_dir() -> Path | None:
    env = os.environ.get("ADALAYERS_DATA_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "datasets"
    return path if (path / "glue").is_dir() else None


REAL = _real_data_dir()
needs_real = pytest.mark.skipif(
    REAL is None,
    reason="official datasets not found (set ADALAYERS_DATA_DIR or ../shared/datasets)",
)


@needs_real
def test_real_cola_counts():
    task = load_task_data("cola", REAL)
    train, val, test = (task.splits[s] for s in ("train", "validation", "test"))
    assert len(train) + len(val) == 8551 and len(test) == 1043
    assert Counter(train["label"][:] + val["label"][:]) == {
        "acceptable": 6023,
        "unacceptable": 2528,
    }
    assert Counter(test["label"]) == {"acceptable": 721, "unacceptable": 322}
    assert len(val) == round(0.1 * 6023) + round(0.1 * 2528)


@needs_real
def test_real_glue_pairs_counts():
    rte = load_task_data("rte", REAL).splits
    assert len(rte["train"]) + len(rte["validation"]) == 2490 and len(rte["test"]) == 277
    sts = load_task_data("stsb", REAL).splits
    assert len(sts["train"]) + len(sts["validation"]) == 5749 and len(sts["test"]) == 1500
    assert 0.0 <= min(sts["test"]["label"]) and max(sts["test"]["label"]) <= 5.0


@needs_real
def test_real_conll_counts():
    task = load_task_data("conll2003", REAL)
    sizes = {s: len(d) for s, d in task.splits.items()}
    assert sizes == {"train": 14041, "validation": 3250, "test": 3453}
    assert sum(len(t) for t in task.splits["train"]["tokens"]) == 203621
    assert task.label_names[0] == "O" and len(task.label_names) == 9
    b_per_test = sum(seq.count("B-PER") for seq in task.splits["test"]["tags"])
    assert b_per_test == 1617


@needs_real
def test_real_imdb_counts():
    task = load_task_data("imdb", REAL)
    train = task.splits["train"]["label"][:] + task.splits["validation"]["label"][:]
    assert Counter(train) == {"negative": 12500, "positive": 12500}
    assert Counter(task.splits["test"]["label"]) == {"negative": 12500, "positive": 12500}
    assert Counter(task.splits["validation"]["label"]) == {"negative": 1250, "positive": 1250}


def test_sample_draws_a_seeded_subset_in_file_order(data_dir):
    full = load_task_data("cola", data_dir)
    task = load_task_data("cola", data_dir, sample={"train": 3, "validation": 2})
    assert {s: len(d) for s, d in task.splits.items()} == {"train": 3, "validation": 2, "test": 2}
    texts = full.splits["train"]["text"]
    picked = [texts.index(t) for t in task.splits["train"]["text"]]
    assert picked == sorted(picked)  # file order kept
    again = load_task_data("cola", data_dir, sample={"train": 3, "validation": 2})
    assert again.splits["train"]["text"] == task.splits["train"]["text"]  # same seed, same subset
    other = load_task_data("cola", data_dir, sample=3, seed=7)
    assert other.splits["train"]["text"] != task.splits["train"]["text"]
    assert len(other.splits["train"]) == 3
    assert task.splits["test"]["text"] == full.splits["test"]["text"]  # not named: whole


def test_sample_is_representative_where_limit_is_not(tmp_path):
    # a file sorted by label (as IMDB's are): the first N are one class, a sample has both
    folder = tmp_path / "imdb"
    folder.mkdir()
    for split in ("train", "test"):
        rows = [{"text": f"{split} review {i}", "label": int(i >= 50)} for i in range(100)]
        with gzip.open(folder / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    first = load_task_data("imdb", tmp_path, limit=20)
    assert set(first.splits["test"]["label"]) == {"negative"}
    sampled = load_task_data("imdb", tmp_path, sample={"test": 20})
    assert set(sampled.splits["test"]["label"]) == {"negative", "positive"}


def test_sample_errors_name_the_key(data_dir):
    with pytest.raises(ValueError, match="unknown split"):
        load_task_data("cola", data_dir, sample={"dev": 3})
    with pytest.raises(ValueError, match="train must be a positive"):
        load_task_data("cola", data_dir, sample={"train": 0})
    with pytest.raises(ValueError, match="contradict"):
        load_task_data("cola", data_dir, sample=3, limit=3)
    with pytest.raises(ValueError, match="data.sample names the split 'dev'"):
        DataConfig(sample={"dev": 3})
    with pytest.raises(ValueError, match="data.limit and data.sample"):
        DataConfig(sample=3, limit=3)
