"""Write a folder all at once, with the permissions an ordinary file would get (no imports of
ours).

``tempfile.mkdtemp`` makes its folder 0700 and safetensors writes its files 0600, whatever the
umask: left as they are, a run saved by one user could not be served by another. Everything
written through :func:`write_folder` ends up as ``open()`` / ``mkdir`` would have made it:
folders ``0777 & ~umask``, files ``0666 & ~umask`` (0755 / 0644 under the usual umask 022).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where the system allows.

    ``os.umask`` can only be read by setting it, which races with other threads creating files;
    Linux reports it in ``/proc/self/status``, used when present.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes ``mkdir`` / ``open`` would have given.

    Symbolic links are left alone (``chmod`` would change their targets).
    """
    mask = current_umask()
    root = Path(root)
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write ``folder`` beside its target and rename it into place.

    A crash never leaves a half-written folder; an existing ``folder`` is replaced.

    Args:
        folder: where the result goes.
        write: fills the (empty) folder it is given.

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        follow_umask(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
