"""A task folder written by an earlier version (format 1, as saved at commit f3474f3) still loads
and predicts: the saved-run format is an interface, whatever the package layout inside."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from adalayers import AdaLayers, Task, load_backbone

MIXER = {
    "dim": 8,
    "alpha": 64.0,
    "cutoff": 0.0,
    "entropy_weight": 0.0,
    "dropout": 0.0,
    "positional": "learned",
    "max_positions": 32,
    "layers": None,
    "single_layer": None,
    "freeze_distribution": False,
    "layer_dropout": 0.0,
    "mode": "adalayers",
}
HEAD = {
    "num_heads": 2,
    "num_layers": 1,
    "sequence_layers": 0,
    "ff_dim": 16,
    "dropout": 0.0,
    "decoding": "argmax",
}
MIXER_TENSORS = {"mixer.p": (4,), "mixer.positions": (32, 8), "mixer.weight": (4, 8, 32)}
ATTENTION = {"in_proj_bias": (24,), "in_proj_weight": (24, 8), "out_proj.bias": (8,)}
ATTENTION["out_proj.weight"] = (8, 8)
# the tensor names and shapes the earlier version wrote, read off its model.safetensors
TENSORS = {
    "sequence_classification": {
        **MIXER_TENSORS,
        **{f"head.attention.{k}": v for k, v in ATTENTION.items()},
        "head.out.bias": (2,),
        "head.out.weight": (2, 8),
    },
    "token_classification": {
        **MIXER_TENSORS,
        **{f"head.encoder.layers.0.self_attn.{k}": v for k, v in ATTENTION.items()},
        "head.encoder.layers.0.linear1.bias": (16,),
        "head.encoder.layers.0.linear1.weight": (16, 8),
        "head.encoder.layers.0.linear2.bias": (8,),
        "head.encoder.layers.0.linear2.weight": (8, 16),
        **{f"head.encoder.layers.0.norm{i}.{k}": (8,) for i in (1, 2) for k in ("bias", "weight")},
        "head.out.bias": (3,),
        "head.out.weight": (3, 8),
    },
}
LABELS = {
    "sequence_classification": ["neg", "pos"],
    "token_classification": ["O", "B-PER", "I-PER"],
}
PARAMETERS = {"sequence_classification": 1590, "token_classification": 1911}


def format_1_fingerprint(model) -> str:
    """The base fingerprint format 1 saved (``Backbone.fingerprint`` at f3474f3, verbatim): the
    config less a few keys, then each tensor's name, shape and float32 sample."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for key in (
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "architectures",
        "_attn_implementation_autoset",
    ):
        cfg.pop(key, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(torch.float32).cpu()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def write_format_1(folder, task_type, base) -> dict[str, torch.Tensor]:
    """A task folder exactly as format 1 laid it out; returns the weights written."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(shape, generator=gen) for k, shape in TENSORS[task_type].items()}
    save_file(weights, str(folder / "model.safetensors"))
    info = base.info()
    config = {
        "format_version": 1,
        "task_type": task_type,
        "labels": LABELS[task_type],
        "mixer": MIXER,
        "head": HEAD,
        "base": {
            "name_or_path": info.name_or_path,
            "num_states": info.num_states,
            "hidden_size": info.hidden_size,
            "states": "encoder",
            "fingerprint": format_1_fingerprint(base.model),  # no fingerprint_version then
        },
        "parameters": PARAMETERS[task_type],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "labels.json").write_text(json.dumps(LABELS[task_type]))
    return weights


@pytest.mark.parametrize("task_type", sorted(TENSORS))
def test_a_task_saved_by_format_1_loads_and_predicts(tmp_path, tiny_model_dir, task_type):
    base = load_backbone(str(tiny_model_dir("bert")))
    weights = write_format_1(tmp_path / "task", task_type, base)
    task = Task.from_pretrained(tmp_path / "task", base)
    state = task.state_dict()
    for name, tensor in weights.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    assert task.num_parameters() == PARAMETERS[task_type]
    assert task.config.head.decoding == "argmax"  # saved explicitly: kept
    runtime = AdaLayers(base, {"t": task}).eval()
    out = runtime.predict(["john read a book", "mary said"])
    assert len(out) == 2
    labels = set(LABELS[task_type])
    if task_type == "token_classification":
        assert all(set(o["t"]["labels"]) <= labels for o in out)
    else:
        assert all(o["t"]["label"] in labels for o in out)
        # saved before tasks recorded text_pair: both kinds of input are accepted
        assert len(runtime.predict(["john read"], ["a book"])) == 1


def test_a_format_1_fingerprint_is_compared_with_the_old_algorithm(tmp_path, tiny_model_dir):
    """A task saved with a version-1 fingerprint (no ``fingerprint_version``) still attaches to
    its base however that is held, keeps version 1 when saved again, and refuses another."""
    import transformers as T

    from adalayers import attach
    from adalayers.core.task import BaseMismatchError

    folder = tiny_model_dir("bert")
    base = load_backbone(str(folder))
    write_format_1(tmp_path / "task", "sequence_classification", base)
    task = Task.from_pretrained(tmp_path / "task", base)
    assert task.base.fingerprint_version == 1
    # the same weights through other loaders: a wrapper, use_cache off (sentence-transformers)
    for held in (
        T.BertForSequenceClassification.from_pretrained(folder),
        T.BertModel.from_pretrained(folder, use_cache=False),
    ):
        with attach(held, {"t": task}) as side:
            held(**base.tokenizer(["john read a book"], return_tensors="pt"))
            assert side.predictions()[0]["t"]["label"] in LABELS["sequence_classification"]
    again = Task.from_pretrained(task.save_pretrained(tmp_path / "again"), base)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["base"] == {
        **json.loads((tmp_path / "task" / "config.json").read_text())["base"],
        "fingerprint_version": 1,
    }
    assert again.base == task.base
    other = load_backbone(str(tiny_model_dir("bert", seed=1)))
    with pytest.raises(BaseMismatchError, match=r"version 1\).*different weights"):
        Task.from_pretrained(tmp_path / "task", other)
