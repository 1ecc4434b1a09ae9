"""Running saved tasks on top of :mod:`adalayers.core`: many tasks on one forward
(:mod:`.runtime`, ``attach`` around a model that generates) and the HTTP server: its limits
(:mod:`.config`), what it runs (:mod:`.predictor`), the micro-batcher (:mod:`.batcher`), the
FastAPI app (:mod:`.app`) and its start-up (:mod:`.server`). Nothing here imports
:mod:`adalayers.training` or parses arguments (that is :mod:`adalayers.cli`)."""
