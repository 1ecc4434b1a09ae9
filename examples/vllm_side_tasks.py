"""SmolLM2-135M generates in vLLM while two side tasks label every prompt from its prefill.

The tasks are ordinary adalayers runs on the same base: a sentiment task (IMDB) and an NER
task (CoNLL-2003), trained on samples of the real datasets on first use (``ADALAYERS_DATA_DIR``;
about 5 minutes on 2 CPU cores; see ``side_task_runs.py``). Then vLLM (CPU build:
``make install-vllm``) loads SmolLM2, the tasks are attached inside its worker, and ``generate``
returns each completion with its prompt's labels::

    .venv-vllm/bin/python examples/vllm_side_tasks.py
"""

from __future__ import annotations

import argparse
import os
import time

from side_task_runs import PROMPTS, show, train_missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    folders = train_missing()

    from vllm import LLM, SamplingParams

    from adalayers.core.models import smollm2_path
    from adalayers.serving.integrations.vllm import SideTasks, engine_args

    start = time.perf_counter()
    llm = LLM(str(smollm2_path()), **engine_args(dtype="bfloat16", max_model_len=512))
    side = SideTasks(llm, [f"{name}={run}" for name, run in folders.items()])
    print(f"engine and tasks ready in {time.perf_counter() - start:.0f} s", flush=True)

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    for output in side.generate(PROMPTS, params):
        show(output.prompt, output.side_tasks, output.outputs[0].text)


if __name__ == "__main__":  # vLLM's engine core spawns processes
    main()
