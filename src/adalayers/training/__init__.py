"""The training harness on top of :mod:`adalayers.core`: configs, data readers, the fit loop on
Accelerate, checkpoints, the feature cache, fine-tuning and baseline comparisons."""
