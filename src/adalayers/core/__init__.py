"""The method, with no training and no serving: the frozen backbone and its layer taps, the layer
mixer, the heads, a task (mixer + head, saved and loaded as a small folder), the text encoders,
decoding and metrics.

    text -> tokenizer (encoding) -> frozen backbone (backbone, taps) -> mixer -> head (heads)
         -> logits -> prediction (decoding) / score (metrics)

Nothing here imports :mod:`adalayers.training` or :mod:`adalayers.serving` (checked by the
import-linter contracts in ``pyproject.toml``).
"""
