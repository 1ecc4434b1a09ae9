"""Resumable training state as tensors plus JSON: nothing in a checkpoint can run code.

A run folder may come from someone else, so ``--resume`` must be as safe as loading a task.
A checkpoint folder holds:

    tensors.safetensors   every tensor of the state (task weights, optimiser moments, RNG states)
    state.json            the rest of the state as JSON, with a reference in place of each tensor
    trainer_state.json    the loop's counters (epoch, step, best score, ...)

``state.json`` is the nested state (``task``, ``optimizer``, ``scheduler``, ``rng``) in which
every tensor is replaced by ``{"__tensor__": key}`` and every tuple by ``{"__tuple__": [...]}``;
nothing else is allowed in it. Loading reads the safetensors file (no pickle) and puts the
tensors back. A checkpoint is written to a temporary folder beside the old one and renamed over
it, so a crash or a full disk leaves the previous checkpoint whole.

Checkpoints of earlier versions (``state.pt``, a pickle) are read with
``torch.load(weights_only=True)``, which refuses anything but tensors, containers and the
NumPy arrays of the RNG state.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adalayers.core._folders import follow_umask
from adalayers.errors import CheckpointError

logger = logging.getLogger(__name__)

TENSORS = "tensors.safetensors"
STATE = "state.json"
TRAINER_STATE = "trainer_state.json"
LEGACY = "state.pt"

__all__ = [
    "CheckpointError",
    "has_checkpoint",
    "load_state",
    "rng_state",
    "save_state",
    "set_rng_state",
]


def has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint (of this version or an earlier one)."""
    return (folder / STATE).is_file() or (folder / LEGACY).is_file()


# -- the nested state <-> JSON + tensors ---------------------------------------------------------
def _flatten(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = path or "root"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": _flatten(torch.from_numpy(value.copy()), tensors, path)}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str | int):
                raise TypeError(f"checkpoint key {k!r} at {path!r} is neither str nor int")
        # JSON keys are strings: remember which were ints (an optimiser's parameter ids)
        return {
            "__dict__": [
                [k, _flatten(v, tensors, f"{path}.{k}" if path else str(k))]
                for k, v in value.items()
            ]
        }
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    raise TypeError(f"checkpoint value at {path!r} has type {type(value).__name__}")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(value, list):
        return [_unflatten(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise CheckpointError(f"{where}: unexpected object {sorted(value)}")
    ((tag, body),) = value.items()
    if tag == "__tensor__":
        if body not in tensors:
            raise CheckpointError(f"{where}: tensor {body!r} is missing from {TENSORS}")
        return tensors[body]
    if tag == "__ndarray__":
        return _unflatten(body, tensors, where).numpy()
    if tag == "__tuple__":
        return tuple(_unflatten(v, tensors, where) for v in body)
    if tag == "__dict__":
        return {k: _unflatten(v, tensors, where) for k, v in body}
    if tag == "__float__" and body in ("inf", "-inf", "nan"):
        return float(body)
    raise CheckpointError(f"{where}: unexpected entry {tag!r}")


# -- random number generators ------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The state of every generator training draws from (torch, CUDA, Python, NumPy)."""
    return {
        "torch": torch.get_rng_state(),
        # dropout on a GPU draws from its own generator
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(rng["torch"])
    cuda = rng.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(rng["numpy"]))


# -- saving and loading ---------------------------------------------------------------------------
def save_state(
    target: Path,
    state: dict[str, Any],
    trainer_state: dict[str, Any],
    *,
    before_commit: Callable[[], None] | None = None,
) -> None:
    """Write a checkpoint to ``target``, replacing the one there only once it is complete.

    Args:
        target: the checkpoint folder.
        state: nested dicts, lists and tuples of tensors, NumPy arrays and JSON scalars.
        trainer_state: the loop's counters (JSON).
        before_commit: called after everything is written, before the rename (tests).

    Raises:
        CheckpointError: the checkpoint could not be written (a full disk, for instance); the
            previous checkpoint, if any, is left as it was and no temporary folder remains.
    """
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        tensors: dict[str, torch.Tensor] = {}
        layout = _flatten(state, tensors, "")
        save_file(tensors, str(tmp / TENSORS))
        for name, payload in ((STATE, layout), (TRAINER_STATE, trainer_state)):
            with (tmp / name).open("w") as fh:
                json.dump(payload, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
        follow_umask(tmp)  # safetensors writes 0600 whatever the umask
        if before_commit is not None:
            before_commit()
    except (OSError, RuntimeError, SafetensorError) as err:  # a full disk, among others
        shutil.rmtree(tmp, ignore_errors=True)
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC
        full = full or "No space left" in str(err) or "os error 28" in str(err)
        reason = "no space left on the device" if full else f"{type(err).__name__}: {err}"
        kept = f"the previous checkpoint in {target} is kept" if target.exists() else "none kept"
        raise CheckpointError(
            f"cannot write the checkpoint {target} ({reason}); {kept}. Free space and continue "
            f"with: adalayers train --resume --output-dir {target.parent}"
        ) from err
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint folder without running any code from it.

    Returns:
        ``(state, trainer_state)`` as :func:`save_state` was given them.

    Raises:
        FileNotFoundError: ``folder`` holds no checkpoint.
        CheckpointError: a file of it cannot be read; the message names it.
    """
    if (folder / STATE).is_file():
        try:
            tensors = load_file(str(folder / TENSORS))
        except Exception as err:  # missing, truncated or not safetensors
            raise _unreadable(folder, TENSORS, err) from err
        try:
            layout = json.loads((folder / STATE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _unreadable(folder, STATE, err) from err
        state = _unflatten(layout, tensors, folder / STATE)
    elif (folder / LEGACY).is_file():
        state = _load_legacy(folder)
    else:
        raise FileNotFoundError(f"{folder} has no checkpoint to resume from")
    try:
        trainer_state = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _unreadable(folder, TRAINER_STATE, err) from err
    if not isinstance(state, dict) or not isinstance(trainer_state, dict):
        raise CheckpointError(f"{folder}: the checkpoint does not hold a training state")
    return state, trainer_state


def _load_legacy(folder: Path) -> dict[str, Any]:
    """An earlier version's ``state.pt``: tensors and containers only, never a pickled object."""
    safe = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    reconstruct = getattr(np, "_core", np.core).multiarray._reconstruct  # noqa: NPY201
    try:
        with torch.serialization.safe_globals([*safe, reconstruct]):
            return torch.load(folder / LEGACY, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # not a pickle at all, or truncated
            raise _unreadable(folder, LEGACY, err) from err
        raise CheckpointError(  # a foreign object: refused, never constructed
            f"{folder / LEGACY} holds objects other than tensors and containers; it was not "
            f"loaded, since unpickling them could run code. Delete {folder} to train "
            f"{folder.parent} again from the start"
        ) from err
    except Exception as err:  # a truncated or foreign file
        raise _unreadable(folder, LEGACY, err) from err


def _unreadable(folder: Path, name: str, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{folder / name} cannot be read ({type(err).__name__}: {str(err)[:300]}); delete "
        f"{folder} to train {folder.parent} again from the start"
    )
