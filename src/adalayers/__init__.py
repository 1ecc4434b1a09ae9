"""adalayers: side tasks on a frozen transformer, from the hidden states it already computes.

text -> tokenizer -> frozen backbone (layer taps) -> layer mixer -> task head -> prediction
"""

from adalayers.core.backbone import DEFAULT_BASE, Backbone, BaseInfo, load_backbone
from adalayers.core.encoding import InputError
from adalayers.core.heads import HeadConfig
from adalayers.core.mixer import LayerMixer, MixerConfig
from adalayers.core.multitask import AdaLayers, MultiTaskOutput
from adalayers.core.task import (
    BaseMismatchError,
    PairMismatchError,
    Task,
    TaskConfig,
)
from adalayers.serving.runtime import attach, load_runs

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
