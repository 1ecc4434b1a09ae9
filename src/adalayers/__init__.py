"""adalayers: side tasks on a frozen transformer, from the hidden states it already computes.

text -> tokenizer -> frozen backbone (layer taps) -> layer mixer -> task head -> prediction
"""

from adalayers.backbone import DEFAULT_BASE, Backbone, BaseInfo, load_backbone
from adalayers.encoding import InputError
from adalayers.heads import HeadConfig
from adalayers.mixer import LayerMixer, MixerConfig
from adalayers.model import (
    AdaLayers,
    BaseMismatchError,
    MultiTaskOutput,
    PairMismatchError,
    Task,
    TaskConfig,
)
from adalayers.runtime import attach, load_runs

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BASE",
    "AdaLayers",
    "Backbone",
    "BaseInfo",
    "BaseMismatchError",
    "HeadConfig",
    "InputError",
    "LayerMixer",
    "MixerConfig",
    "MultiTaskOutput",
    "PairMismatchError",
    "Task",
    "TaskConfig",
    "attach",
    "load_backbone",
    "load_runs",
]
