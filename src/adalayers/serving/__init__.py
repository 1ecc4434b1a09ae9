"""Running saved tasks on top of :mod:`adalayers.core`: many tasks on one forward
(:mod:`.runtime`, ``attach`` around a model that generates) and the HTTP server (:mod:`.serve`).
Nothing here imports :mod:`adalayers.training`."""
