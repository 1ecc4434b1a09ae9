"""Side tasks on the engines where models run: vLLM (worker taps) and sentence-transformers."""
