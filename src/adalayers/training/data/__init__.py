"""Data: readers for the benchmark formats and user files
(:mod:`adalayers.training.data.readers`), and
of the inputs to predict on (:mod:`adalayers.training.data.inputs`)."""

from adalayers.training.data.inputs import Inputs, read_inputs
from adalayers.training.data.readers import (
    BENCHMARKS,
    ENV_VAR,
    SPLITS,
    TASK_TYPES,
    USER_FORMATS,
    TaskData,
    load_task_data,
    read_conll,
    resolve_data_dir,
    split_validation,
)

__all__ = [
    "BENCHMARKS",
    "ENV_VAR",
    "SPLITS",
    "Inputs",
    "TASK_TYPES",
    "USER_FORMATS",
    "TaskData",
    "load_task_data",
    "read_conll",
    "read_inputs",
    "resolve_data_dir",
    "split_validation",
]
