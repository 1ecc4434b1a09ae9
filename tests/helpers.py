"""Plain helpers shared by the test files: tiny backbones built from configs, tiny data sets,
configs, and small test doubles.

Fixtures live in ``conftest.py``; everything a test file imports lives here, so that no test
file imports another one (or ``conftest``, which pytest loads as a plugin, not as a module to
import from). ``tests/`` is on ``sys.path`` under pytest's default (prepend) import mode, so test
files say ``from helpers import write_cola``.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml

# -- tiny random backbones of every supported family (no network) ------------------------------
WORDS = (
    "the a an of to and in is was it this that movie film good bad great terrible john mary "
    "london paris acme corp said he she they we love hate book read not very story plot actor "
    "on at for with by from new york city sentence pair label"
).split()

FAMILIES = ("bert", "roberta", "deberta", "mpnet", "bart", "t5", "gpt2", "llama")


def make_tokenizer(folder: Path, max_length: int = 64) -> T.PreTrainedTokenizerFast:
    """A small uncased WordPiece tokenizer: whole words plus single letters as fallback."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", "'"]
    vocab += WORDS + letters + [f"##{c}" for c in letters]
    folder.mkdir(parents=True, exist_ok=True)
    ids = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    tokenizer = T.BertTokenizerFast(vocab=ids, model_max_length=max_length)
    assert len(tokenizer) == len(ids), "the tiny tokenizer lost its vocabulary"
    return tokenizer


def tiny_config(family: str, vocab_size: int) -> T.PretrainedConfig:
    common = {"vocab_size": vocab_size, "pad_token_id": 0}
    if family in ("bert", "roberta", "deberta", "mpnet"):
        cls = {
            "bert": T.BertConfig,
            "roberta": T.RobertaConfig,
            "deberta": T.DebertaV2Config,
            "mpnet": T.MPNetConfig,
        }[family]
        extra = (
            {"max_position_embeddings": 80}
            if family != "roberta"
            else {"max_position_embeddings": 82}
        )
        return cls(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=37,
            **extra,
            **common,
        )
    if family == "bart":
        return T.BartConfig(
            d_model=32,
            encoder_layers=3,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            max_position_embeddings=80,
            decoder_start_token_id=2,
            bos_token_id=2,
            eos_token_id=3,
            forced_eos_token_id=None,
            **common,
        )
    if family == "t5":
        return T.T5Config(
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=3,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            eos_token_id=3,
            **common,
        )
    if family == "gpt2":
        return T.GPT2Config(
            n_embd=32, n_layer=3, n_head=4, n_positions=80, bos_token_id=2, eos_token_id=3, **common
        )
    if family == "llama":
        return T.LlamaConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=80,
            bos_token_id=2,
            eos_token_id=3,
            **common,
        )
    raise ValueError(family)


def build_tiny(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random ``family`` model and its tokenizer to ``folder``."""
    tokenizer = make_tokenizer(folder)
    torch.manual_seed(seed)
    model = T.AutoModel.from_config(tiny_config(family, len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_sentence_transformer(base: Path, folder: Path, max_seq_length: int = 48) -> Path:
    """Save ``base`` (a tiny model folder) as a sentence-transformers model in ``folder``:
    ``modules.json``, the transformer, mean pooling (``1_Pooling/``) and normalisation, as
    all-MiniLM-L6-v2 is laid out. Needs sentence-transformers."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    transformer = Transformer(str(base), max_seq_length=max_seq_length)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
    model.save(str(folder))
    return folder


def causal_llama(
    folder: Path,
    *,
    hidden: int = 64,
    layers: int = 3,
    seed: int = 0,
    tied: bool = True,
    chat_template: str | None = None,
) -> Path:
    """Save a tiny random ``LlamaForCausalLM`` (head size 32, which vLLM's CPU kernels take) and
    its tokenizer to ``folder``: the engine-side tests' model."""
    tokenizer = make_tokenizer(folder, max_length=512)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    config = T.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        vocab_size=len(tokenizer),
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=tied,
    )
    T.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- tiny data sets ----------------------------------------------------------------------------
GOOD = "the movie was good . a great story . mary read the book .".split(" . ")
BAD = "movie the was . good a the of . the the the and".split(" . ")


def write_cola(root: Path, n_train: int = 80, n_dev: int = 30, seed: int = 0) -> Path:
    """GLUE CoLA files under ``root/glue/CoLA``: ``n_train`` and ``n_dev`` rows, labels 0, 1, ...
    (1: one of three sentences; 0: one of three word salads). Returns ``root``, the
    ``--data-dir``."""
    rng = random.Random(seed)
    folder = root / "glue" / "CoLA"
    folder.mkdir(parents=True)

    def rows(n):
        out = []
        for i in range(n):
            label = i % 2
            words = (GOOD if label else BAD)[rng.randrange(3)].split()
            out.append(f"src\t{label}\t{'' if label else '*'}\t{' '.join(words)} .")
        return "\n".join(out) + "\n"

    (folder / "train.tsv").write_text(rows(n_train))
    (folder / "dev.tsv").write_text(rows(n_dev))
    return root


CONLL_SENTENCES = [
    [("john", "B-PER"), ("read", "O"), ("a", "O"), ("book", "O")],
    [("mary", "B-PER"), ("said", "O"), ("in", "O"), ("london", "B-LOC")],
    [("acme", "B-ORG"), ("corp", "I-ORG"), ("said", "O")],
]


def write_conll(root: Path) -> Path:
    """CoNLL-2003 files under ``root/conll2003``: 30 train, 9 valid, 9 test sentences cycling
    through ``CONLL_SENTENCES``. Returns ``root``, the ``--data-dir``."""
    folder = root / "conll2003"
    folder.mkdir(parents=True)
    for split, n in (("train", 30), ("valid", 9), ("test", 9)):
        lines = ["-DOCSTART- -X- -X- O", ""]
        for i in range(n):
            lines += [f"{w} NN O {t}" for w, t in CONLL_SENTENCES[i % 3]] + [""]
        (folder / f"{split}.txt").write_text("\n".join(lines))
    return root


def write_config(path: Path, base: Path, task: str = "cola", **train) -> Path:
    """A training config for ``task`` on the tiny ``base``: a small mixer and head, 3 epochs of
    batches of 8 unless ``train`` overrides them."""
    config = {
        "base": str(base),
        "data": {"task": task, "max_length": 32},
        "task": {
            "mixer": {
                "dim": 8,
                "alpha": 16,
                "dropout": 0.1,
                "positional": "learned",
                "max_positions": 32,
            },
            "head": {"num_heads": 2, "num_layers": 1, "ff_dim": 16, "dropout": 0.1},
        },
        "train": {"epochs": 3, "batch_size": 8, "lr": 3e-3, "early_stopping": 0, **train},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_token_predictions(run: Path, test: dict) -> None:
    """The run's test predictions: one record a sentence with its gold tags (those of
    ``write_conll``), a predicted tag a word, and the run's test F1."""
    from adalayers.core.metrics import compute_metrics

    records = read_jsonl(run / "predictions_test.jsonl")
    sents = [[tag for _, tag in sentence] for sentence in CONLL_SENTENCES]
    assert [r["tags"] for r in records] == [sents[i % 3] for i in range(9)]
    assert [len(r["predicted_tags"]) for r in records] == [len(r["tags"]) for r in records]
    again = compute_metrics(
        "token_classification",
        [r["tags"] for r in records],
        [r["predicted_tags"] for r in records],
    )
    assert again["f1"] == pytest.approx(test["f1"], abs=1e-12)


def byte_level_tokenizer() -> T.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, words keep their leading space) trained on a
    few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["john lives in london", "mary read the book", "acme corp said it lives"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"]))
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<s>")


# -- training-loop doubles and child processes -------------------------------------------------
class StopAfter(dict):
    """A signal flag that turns on after ``n`` checks (a Ctrl-C in the middle of an epoch)."""

    def __init__(self, n):
        super().__init__(stop=False)
        self.n = n

    def __getitem__(self, key):
        self.n -= 1
        return self.n < 0


def child_env(cpu_world: bool = False) -> dict[str, str]:
    """The environment of a child ``adalayers`` process; ``cpu_world``: a torchrun world of CPU
    processes (gloo) even where a GPU is visible, which one GPU could not hold two ranks of."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent)] + sys.path)
    if cpu_world:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def train_args(config: Path, data: Path, run: Path, *extra: str) -> list[str]:
    """``adalayers train`` arguments (for ``adalayers.cli.main``): ``config`` on ``data`` into
    ``run``, quiet, then ``extra``."""
    return [
        "train",
        "--config",
        str(config),
        "--data-dir",
        str(data),
        "--output-dir",
        str(run),
        "--quiet",
        *extra,
    ]
