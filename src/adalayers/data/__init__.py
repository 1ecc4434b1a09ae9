"""Data: readers for the benchmark formats and user files (see :mod:`adalayers.data.readers`)."""

from adalayers.data.readers import (
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
    "TASK_TYPES",
    "USER_FORMATS",
    "TaskData",
    "load_task_data",
    "read_conll",
    "resolve_data_dir",
    "split_validation",
]
