"""The multi-task runtime: loading runs, attaching to a held model, tasks during generate()."""

from __future__ import annotations

import pytest
import torch
import transformers as T
import yaml

from adalayers.core.backbone import load_backbone
from adalayers.core.multitask import AdaLayers
from adalayers.core.task import BaseMismatchError, Task, TaskConfig
from adalayers.serving.runtime import attach, load_runs, resolve_run

PROMPTS = ["the movie was very good and the plot was great", "bad plot", "john read a book"]
GENERATE = {"max_new_tokens": 6, "do_sample": False, "num_beams": 1}


def make_tasks(backbone, seed=0, layers=None):
    torch.manual_seed(seed)
    seq = Task(
        TaskConfig(
            "sequence_classification",
            ["neg", "pos"],
            mixer={"dim": 8, "alpha": 10.0, "positional": "learned", "max_positions": 64},
            head={"num_heads": 2},
        ),
        backbone.info(),
    )
    tok = Task(
        TaskConfig(
            "token_classification",
            ["O", "B-PER", "I-PER"],
            mixer={"dim": 8, "alpha": 10.0, "layers": layers},
            head={"num_heads": 2, "num_layers": 1, "ff_dim": 16},
        ),
        backbone.info(),
    )
    for task in (seq, tok):
        torch.nn.init.normal_(task.mixer.p)
    return {"sentiment": seq, "ner": tok}


def hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_always_called)
        for m in model.modules()
    )


def encode(tokenizer, texts, side="right"):
    tokenizer.padding_side = side
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    enc.pop("token_type_ids", None)
    return dict(enc)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bart", "t5"])
def test_generate_unchanged_and_tasks_read_the_prompt(tiny_model_dir, family):
    folder = tiny_model_dir(family)
    backbone = load_backbone(folder)
    tasks = make_tasks(backbone)
    seq2seq = family in ("bart", "t5")
    cls = T.AutoModelForSeq2SeqLM if seq2seq else T.AutoModelForCausalLM
    lm = cls.from_pretrained(folder).eval()
    tokenizer = backbone.tokenizer
    # a decoder generates from left-padded prompts; an encoder-decoder reads right-padded ones
    inputs = encode(tokenizer, PROMPTS, side="right" if seq2seq else "left")
    bare = lm.generate(**inputs, **GENERATE)
    hooks = hook_count(lm)
    with attach(lm, tasks, tokenizer=tokenizer) as side:
        assert hook_count(lm) > hooks
        tapped = lm.generate(**inputs, **GENERATE)
        logits = side.logits
        predictions = side.predictions()
    assert torch.equal(tapped, bare), "generate() output changed with tasks attached"
    assert hook_count(lm) == hooks
    # the tasks saw the prompts (from the prefill / encoder pass), not the last decoding step
    reference = AdaLayers(backbone, tasks).eval()
    for i, prompt in enumerate(PROMPTS):
        alone = encode(tokenizer, [prompt])
        expected = reference(alone).logits
        n = alone["input_ids"].shape[1]
        torch.testing.assert_close(
            logits["sentiment"][i], expected["sentiment"][0], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(logits["ner"][i, :n], expected["ner"][0], atol=1e-5, rtol=0)
        # every prompt token is labelled but the special ones (BOS, EOS): training never labels them
        ids = alone["input_ids"][0].tolist()
        words = [t for t in ids if t not in set(tokenizer.all_special_ids)]
        assert predictions[i]["ner"]["tokens"] == tokenizer.convert_ids_to_tokens(words)
        assert len(predictions[i]["ner"]["labels"]) == len(words)
        assert predictions[i]["sentiment"]["label"] in ("neg", "pos")


def test_each_new_prompt_replaces_the_last(tiny_model_dir):
    folder = tiny_model_dir("llama")
    backbone = load_backbone(folder)
    tasks = make_tasks(backbone)
    lm = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    reference = AdaLayers(backbone, tasks).eval()
    with attach(lm, tasks) as side:
        with pytest.raises(RuntimeError, match="no input captured"):
            side.logits  # noqa: B018
        for prompt in PROMPTS[1:]:
            inputs = encode(backbone.tokenizer, [prompt])
            lm.generate(**inputs, **GENERATE)
            expected = reference(inputs).logits["sentiment"]
            torch.testing.assert_close(side.logits["sentiment"], expected, atol=1e-5, rtol=0)
            lm(**inputs)  # a plain forward is a new sequence too
            torch.testing.assert_close(side.logits["sentiment"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "bart"])
def test_attach_to_a_held_model_is_bit_identical(tiny_model_dir, family, tmp_path):
    folder = tiny_model_dir(family)
    backbone = load_backbone(folder)
    tasks = make_tasks(backbone, layers=[0, 1])
    folders = [tasks[name].save_pretrained(tmp_path / name) for name in tasks]
    held = (T.BertModel if family == "bert" else T.BartForConditionalGeneration).from_pretrained(
        folder
    )
    held.train()  # the caller's own mode and flags come back after detach
    held.get_input_embeddings().weight.requires_grad_(False)
    flags = [p.requires_grad for p in held.parameters()]
    inputs = encode(backbone.tokenizer, PROMPTS)
    with torch.no_grad():
        bare = held.eval()(**inputs)
    held.train()
    with attach(held, folders) as side:  # tasks from their saved folders, named after them
        assert set(side.tasks) == {"sentiment", "ner"}
        assert not held.training and not any(p.requires_grad for p in held.parameters())
        with torch.no_grad():
            out = held(**inputs)
        logits = side.logits
    for key in ("last_hidden_state", "logits"):
        if key in bare:
            assert torch.equal(out[key], bare[key]), key
    expected = AdaLayers.from_pretrained(backbone, dict(zip(tasks, folders)))(inputs).logits
    real = inputs["attention_mask"].bool()  # padding positions' token logits are not compared
    torch.testing.assert_close(logits["sentiment"], expected["sentiment"], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits["ner"][real], expected["ner"][real], atol=1e-6, rtol=0)
    assert held.training and [p.requires_grad for p in held.parameters()] == flags
    assert hook_count(held) == 0


def test_tasks_tap_only_the_layers_they_use(tiny_model_dir):
    backbone = load_backbone(tiny_model_dir("bert"))
    tasks = make_tasks(backbone, layers=[0, 1])
    del tasks["sentiment"]  # leaves one task reading states 0 and 1
    with attach(backbone, tasks):
        hooked = [len(b._forward_hooks) + len(b._forward_pre_hooks) for b in backbone.blocks]
    assert hooked == [2, 0, 0]  # state 0: pre-hook of block 1; state 1: its output
    assert hook_count(backbone.model) == 0


def test_failed_forward_keeps_the_last_result_and_detach_is_clean(tiny_model_dir):
    backbone = load_backbone(tiny_model_dir("gpt2"))
    side = attach(backbone, make_tasks(backbone))
    inputs = encode(backbone.tokenizer, PROMPTS[:1])
    with pytest.raises(ValueError, match="input_ids"), side:
        backbone.model(**inputs)
        before = side.logits["sentiment"].clone()
        backbone.model(attention_mask=inputs["attention_mask"])  # fails inside the attachment
    assert torch.equal(side.logits["sentiment"], before)
    assert not side.attached and hook_count(backbone.model) == 0
    side.detach()  # a second detach is a no-op
    assert "detached" in repr(side)


def test_attach_refuses_another_base(tiny_model_dir):
    backbone = load_backbone(tiny_model_dir("bert"))
    tasks = make_tasks(backbone)
    other = T.BertModel.from_pretrained(tiny_model_dir("bert", seed=1))
    with pytest.raises(BaseMismatchError, match="trained on base"):
        attach(other, tasks)
    assert hook_count(other) == 0
    with pytest.raises(ValueError, match="no tasks"):
        attach(other, {})
    with pytest.raises(TypeError, match="wrap the folder in a list"):
        attach(other, "runs/x")


def test_load_runs_from_run_and_task_folders(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("bert")
    backbone = load_backbone(folder)
    tasks = make_tasks(backbone)
    run = tmp_path / "sst2-run"
    tasks["sentiment"].save_pretrained(run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"base": str(folder), "task": "x"}))
    bare_task = tasks["ner"].save_pretrained(tmp_path / "conll")
    assert resolve_run(run) == (run / "model", str(folder))
    assert resolve_run(bare_task) == (bare_task, None)
    runtime = load_runs([run, f"entities={bare_task}"])
    assert list(runtime.tasks) == ["sst2-run", "entities"]
    assert not runtime.training
    inputs = encode(backbone.tokenizer, PROMPTS)
    got = runtime(inputs).logits
    expected = AdaLayers(backbone, tasks).eval()(inputs).logits
    torch.testing.assert_close(got["sst2-run"], expected["sentiment"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["entities"], expected["ner"], atol=1e-6, rtol=0)
    assert torch.equal(got["sst2-run"], expected["sentiment"])
    # the base comes from the task when no run config names it
    alone = load_runs([bare_task])
    assert alone.backbone.fingerprint() == backbone.fingerprint()
    with pytest.raises(ValueError, match="NAME=PATH"):
        load_runs([run, run / "model"])
    with pytest.raises(FileNotFoundError, match="not a training run"):
        load_runs([tmp_path])
    with pytest.raises(BaseMismatchError):
        load_runs([run], base=tiny_model_dir("bert", seed=1))


def test_from_pretrained_checks_names(tiny_model_dir, tmp_path):
    backbone = load_backbone(tiny_model_dir("bert"))
    tasks = make_tasks(backbone)
    a = tasks["sentiment"].save_pretrained(tmp_path / "a" / "task")
    b = tasks["ner"].save_pretrained(tmp_path / "b" / "task")
    with pytest.raises(ValueError, match="share the name"):
        AdaLayers.from_pretrained(backbone, [a, b])
    runtime = AdaLayers.from_pretrained(None, {"s": a, "n": b})
    assert list(runtime.tasks) == ["s", "n"]
    assert runtime.backbone.name_or_path == str(tiny_model_dir("bert"))


def test_shared_taps_equal_separate_mixers_with_different_widths(tiny_model_dir):
    backbone = load_backbone(tiny_model_dir("bert"))
    tasks = make_tasks(backbone)
    torch.manual_seed(3)
    tasks["wide"] = Task(
        TaskConfig("regression", [], mixer={"dim": 16, "layers": [1, 3]}, head={"num_heads": 2}),
        backbone.info(),
    )
    runtime = AdaLayers(backbone, tasks).eval()
    inputs = encode(backbone.tokenizer, PROMPTS)
    streamed = runtime.features(inputs)
    stacked = runtime.features(inputs, stream=False)
    assert streamed["wide"].shape[-1] == 16 and streamed["ner"].shape[-1] == 8
    for name in tasks:
        torch.testing.assert_close(streamed[name], stacked[name], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_smollm2_generate_with_attached_tasks():
    pytest.importorskip("gguf")
    from adalayers.core.backbone import Backbone
    from adalayers.core.models import smollm2_path

    try:
        folder = smollm2_path()
    except ImportError as err:
        pytest.skip(str(err))
    tokenizer = T.AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    backbone = Backbone(model.model, tokenizer)  # tasks trained on the base part of the LM
    tasks = make_tasks(backbone)
    inputs = encode(tokenizer, ["What is the capital of France?", "Hello"], side="left")
    bare = model.generate(**inputs, **GENERATE)
    with attach(model, tasks, tokenizer=tokenizer) as side:
        tapped = model.generate(**inputs, **GENERATE)
        logits = side.logits
    assert torch.equal(tapped, bare)
    alone = encode(tokenizer, ["What is the capital of France?"])
    expected = AdaLayers(backbone, tasks).eval()(alone).logits
    torch.testing.assert_close(logits["sentiment"][:1], expected["sentiment"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_minilm_attach_keeps_embeddings_bit_identical(minilm_path):
    backbone = load_backbone(minilm_path)
    tasks = make_tasks(backbone)
    model = T.AutoModel.from_pretrained(minilm_path).eval()
    inputs = encode(backbone.tokenizer, PROMPTS)
    with torch.inference_mode():
        bare = model(**inputs).last_hidden_state
        with attach(model, tasks) as side:
            tapped = model(**inputs).last_hidden_state
            logits = side.logits
        expected = AdaLayers(backbone, tasks).eval()(inputs).logits
    assert torch.equal(bare, tapped)
    torch.testing.assert_close(logits["sentiment"], expected["sentiment"], atol=1e-5, rtol=0)


def test_continuing_sequence_is_found_under_either_cache_name():
    from transformers import DynamicCache

    from adalayers.serving.runtime import _continues_a_sequence

    empty = DynamicCache()
    held = DynamicCache()
    held.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), layer_idx=0)
    assert held.get_seq_length() == 3
    for name in ("cache", "past_key_values"):
        assert not _continues_a_sequence({name: None})
        assert not _continues_a_sequence({name: empty})
        assert _continues_a_sequence({name: held})
    assert _continues_a_sequence({"past_key_values": ((torch.zeros(1), torch.zeros(1)),)})
    assert not _continues_a_sequence({"input_ids": torch.zeros(1, 3)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_and_attached_tasks_on_cuda_match_the_cpu(tiny_model_dir, tmp_path):
    """Serving on a GPU: runs loaded with ``device="cuda"``, and tasks attached to a model on
    the GPU during generate(), give the CPU's logits and the same generated tokens."""
    folder = tiny_model_dir("gpt2")
    backbone = load_backbone(folder)
    tasks = make_tasks(backbone)
    for name, task in tasks.items():
        task.save_pretrained(tmp_path / name)
    inputs = encode(backbone.tokenizer, PROMPTS, side="left")
    cpu = load_runs({n: tmp_path / n for n in tasks}, base=folder)(inputs).logits
    gpu_runtime = load_runs({n: tmp_path / n for n in tasks}, base=folder, device="cuda")
    gpu = gpu_runtime({k: v.cuda() for k, v in inputs.items()}).logits
    for name in tasks:
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], atol=1e-4, rtol=1e-4)
    lm = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    bare = lm.generate(**inputs, **GENERATE)
    lm.cuda()
    with attach(lm, tasks, tokenizer=backbone.tokenizer) as side:
        tapped = lm.generate(**{k: v.cuda() for k, v in inputs.items()}, **GENERATE)
        predictions = side.predictions()
    assert torch.equal(tapped.cpu(), bare)
    assert [p["sentiment"]["label"] for p in predictions] == [
        ["neg", "pos"][int(i)] for i in cpu["sentiment"].argmax(-1)
    ]


def test_attached_pair_tasks_read_pairs_as_predict_does(tiny_model_dir):
    from dataclasses import replace

    from adalayers.core.task import PairMismatchError

    backbone = load_backbone(tiny_model_dir("bert"))
    single = make_tasks(backbone)["sentiment"]
    nli = Task(replace(single.config, text_pair=True), backbone.info())
    nli.load_state_dict(single.state_dict())
    texts, pairs = ["the movie was good", "bad plot"], ["a great film", "the story"]
    expected = AdaLayers(backbone, {"nli": nli}).predict(texts, pairs)
    tokenizer = backbone.tokenizer
    with attach(backbone, {"nli": nli}) as side:
        backbone.model(**tokenizer(texts, pairs, padding=True, return_tensors="pt"))
        got = side.predictions()
        assert [g["nli"]["label"] for g in got] == [e["nli"]["label"] for e in expected]
        for g, e in zip(got, expected):
            assert g["nli"]["score"] == pytest.approx(e["nli"]["score"], abs=1e-5)
        backbone.model(**tokenizer(texts, padding=True, return_tensors="pt"))
        with pytest.raises(PairMismatchError, match="input row 0 holds one text .* 'nli' reads"):
            side.predictions()
    alone = Task(replace(single.config, text_pair=False), backbone.info())
    with attach(backbone, {"sentiment": alone, "old": single}) as side:
        backbone.model(**tokenizer(texts, padding=True, return_tensors="pt"))
        assert len(side.predictions()) == 2  # single texts; "old" (saved before) takes both
        backbone.model(**tokenizer(texts, pairs, padding=True, return_tensors="pt"))
        with pytest.raises(PairMismatchError, match="holds a sentence pair .* 'sentiment'"):
            side.predictions()


def test_a_mapping_of_names_may_point_at_run_folders(cola_run):
    """``attach(model, {"name": RUN})`` resolves a run folder (its ``model/``) as the list form
    does, and the task predicts as the run's own task."""
    backbone = load_backbone(cola_run.config.base)
    inputs = encode(backbone.tokenizer, PROMPTS)
    with attach(backbone, {"acceptability": cola_run.folder}) as side:
        backbone.hidden_states(inputs)
        got = side.logits["acceptability"]
    task = Task.from_pretrained(cola_run.folder / "model", backbone)
    expected = AdaLayers(backbone, {"acceptability": task}).eval()(inputs).logits
    torch.testing.assert_close(got, expected["acceptability"], atol=1e-6, rtol=0)
