"""Errors a user can cause and the CLI reports in one line (no heavy imports here)."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which file and what to do."""
