"""A stored cache of the frozen base's hidden states, so training epochs never run the base.

The base is frozen: its states for a training set never change. :func:`build_cache` runs it once
and writes the per-token states of the chosen layers (no padding) into memory-mapped files:

    <dir>/<key>/meta.json    base, layers, dtype and width of the store (a description)
    <dir>/<key>/<split>/shard-<rank>-of-<world>/
        index.npy            (n, 3) int64: example index, first row, number of tokens
        layer-<i>.bin        (rows, d) states of hidden state i, in the storage dtype
        scale-<i>.bin        (rows,) float32 per-row scales (int8 storage only)
        progress.json        rows, examples, the CRC-32 of index.npy and of every chunk of every
                             data file written so far, and a CRC-32 of itself
        COMPLETE             the number of rows, written last
        verified.json        size, inode and times of each file above when its checks last passed

``key`` is a hash of the base's fingerprint, the layers, the storage dtype and the token ids
and labels of the split (which covers the tokenizer, the max length and the data files), so a
stale store is never used. Every file of a shard is checked: progress.json against its own
checksum, index.npy against the checksum in it and against the split, the chunks for covering
every row, every data file against its chunks' checksums, COMPLETE against the row count. A
shard that fails (truncated, corrupted, edited) is rebuilt with a warning naming the file, never
silently read; an interrupted build resumes over the chunks that still check out. Reading every
checksum means reading the whole store, so a shard whose files all have the size, inode and
modification and change times recorded in ``verified.json`` after its checks last passed is not
read again; any write, truncation, copy or replacement changes them (``verify=True`` checks
everything regardless). A damaged verified.json only means reading everything; a damaged
meta.json is written again.

The data files are allocated in full (``posix_fallocate``) before they are memory-mapped: a
write through a map into a sparse file on a full disk kills the process with SIGBUS, so a disk
too small fails before any state is computed, with a message, leaving nothing behind. Under
``accelerate launch`` every process writes its own shard and training reads the shards of its
world. A shard is checked and built under a lock file beside it (``.shard-<rank>-of-<world>.lock``,
which holds no data), so processes that open one store at once (two trainings, the rows of
``adalayers compare --jobs``) build it once: the others wait, then find it complete.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from adalayers.core.backbone import Backbone
from adalayers.core.mixer import StackedStates
from adalayers.training.progress import ProgressLog

logger = logging.getLogger(__name__)

_NP_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "int8": np.int8, "float32": np.float32}
FORMAT = 1
VERIFIED = "verified.json"
PROGRESS = "progress.json"
INDEX = "index.npy"
COMPLETE = "COMPLETE"
RACY_SECONDS = 2.0
"""A file changed this close to the moment its checksums passed is checked again next time:
file times are coarse on some file systems (2 s on FAT), so a write within that window may not
move them."""
_FULL = (errno.ENOSPC, errno.EDQUOT)


class CacheCorrupted(OSError):
    """A file of a store is damaged: it does not match its checksum, or cannot be read.

    The message starts with the file's path. An ``OSError``, so the CLI reports it as a message.
    """


class CacheNoSpace(OSError):
    """The file system holding the cache is too full for a store (``errno.ENOSPC``)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def default_cache_dir() -> Path:
    return (
        Path(os.environ.get("ADALAYERS_CACHE_DIR", Path.home() / ".cache" / "adalayers"))
        / "features"
    )


def bytes_per_row(hidden_size: int, dtype: str) -> int:
    """Bytes one token of one layer takes on disk."""
    size = {"float16": 2, "bfloat16": 2, "int8": 1, "float32": 4}[dtype]
    return hidden_size * size + (4 if dtype == "int8" else 0)


def estimate_bytes(num_tokens: int, num_layers: int, hidden_size: int, dtype: str) -> int:
    return num_tokens * num_layers * bytes_per_row(hidden_size, dtype)


def store_key(backbone: Backbone, layers: Sequence[int], dtype: str, ds: Any) -> str:
    """Hash of base, layers, storage dtype and the split's token ids and labels."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "format": FORMAT,
                "base": backbone.fingerprint(),
                "layers": list(layers),
                "dtype": dtype,
                "tokenizer": type(backbone.tokenizer).__name__,
                "vocab": len(backbone.tokenizer),
            }
        ).encode()
    )
    for column in ("input_ids", "token_type_ids", "labels"):
        if column in ds.column_names:
            for row in ds[column][:]:
                h.update(np.asarray(row, dtype=np.float64).tobytes())
                h.update(b"|")
    return h.hexdigest()[:20]


def shard_index(examples: Sequence[int], lengths: Sequence[int]) -> np.ndarray:
    """(n, 3) int64 rows of index.npy: example, first row, number of tokens (rows in order)."""
    if not examples:
        return np.zeros((0, 3), dtype=np.int64)
    counts = np.asarray([lengths[i] for i in examples], dtype=np.int64)  # (n,)
    starts = np.cumsum(counts) - counts  # (n,)
    return np.stack([np.asarray(examples, dtype=np.int64), starts, counts], axis=1)  # (n, 3)


# -- encoding rows ---------------------------------------------------------------------------
def _encode(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, d) float -> storage array (+ per-row scale for int8)."""
    x = x.float()
    if dtype == "int8":
        scale = x.abs().amax(-1).clamp_min(1e-12) / 127.0  # (rows,)
        q = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return q.numpy(), scale.numpy().astype(np.float32)
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None
    return x.numpy().astype(_NP_DTYPES[dtype]), None


def _decode(
    rows: np.ndarray, scale: np.ndarray | None, dtype: str, convert: bool = True
) -> torch.Tensor:
    """Storage rows (a fresh array, not a memory map) -> a tensor (float32 if ``convert``;
    else float16/bfloat16 stay as they are, int8 is scaled to float32)."""
    if dtype == "int8":
        return torch.from_numpy(np.array(rows)).float() * torch.from_numpy(np.array(scale))[:, None]
    if dtype == "bfloat16":
        x = torch.from_numpy(np.array(rows).view(np.int16)).view(torch.bfloat16)
    else:
        x = torch.from_numpy(np.array(rows))
    return x.float() if convert else x


# -- one shard -------------------------------------------------------------------------------
@dataclass
class _Shard:
    folder: Path
    layers: list[int]
    hidden_size: int
    dtype: str

    def files(self) -> dict[str, tuple[Path, int]]:
        """Data file name -> (path, bytes per row)."""
        row_bytes = self.hidden_size * np.dtype(_NP_DTYPES[self.dtype]).itemsize
        out = {f"layer-{i}.bin": (self.folder / f"layer-{i}.bin", row_bytes) for i in self.layers}
        if self.dtype == "int8":
            out.update({f"scale-{i}.bin": (self.folder / f"scale-{i}.bin", 4) for i in self.layers})
        return out

    def checked_files(self) -> dict[str, Path]:
        """Every file of a finished shard that its checks cover (all but verified.json)."""
        names = (INDEX, PROGRESS, COMPLETE)
        return {name: self.folder / name for name in names} | {
            name: path for name, (path, _) in self.files().items()
        }

    def memmaps(self, rows: int, mode: str) -> dict[str, np.memmap]:
        """Data file name -> its memory map.

        Raises:
            CacheCorrupted: a file is missing or shorter than ``rows`` rows.
        """
        maps = {}
        for name, (path, row_bytes) in self.files().items():
            kind = np.float32 if name.startswith("scale-") else _NP_DTYPES[self.dtype]
            shape = (
                (max(rows, 1),) if name.startswith("scale-") else (max(rows, 1), self.hidden_size)
            )
            try:
                maps[name] = np.memmap(path, dtype=kind, mode=mode, shape=shape)
            except (OSError, ValueError) as err:
                raise CacheCorrupted(
                    f"{path}: cannot be mapped as {max(rows, 1) * row_bytes} bytes ({err})"
                ) from err
        return maps

    # progress.json: the checksums, checked against its own
    def load_progress(self) -> dict[str, Any]:
        """progress.json, checked against its own checksum and for its fields.

        Raises:
            CacheCorrupted: it is missing, unreadable, damaged or from an older format.
        """
        path = self.folder / PROGRESS
        try:
            progress = json.loads(path.read_text())
            body = {k: v for k, v in progress.items() if k != "crc"}
            good = progress.get("crc") == _json_crc(body)
        except (OSError, ValueError, AttributeError) as err:
            raise CacheCorrupted(f"{path}: unreadable ({err})") from err
        if not good:
            raise CacheCorrupted(
                f"{path}: does not match its own checksum (damaged or edited, or written by an "
                f"adalayers that did not check it)"
            )
        fields = {"rows": int, "examples": int, "index_crc": int, "chunks": list}
        wrong = [k for k, kind in fields.items() if not isinstance(body.get(k), kind)]
        if wrong:
            raise CacheCorrupted(f"{path}: field(s) {wrong} missing or of the wrong type")
        return body

    def write_progress(self, progress: dict[str, Any]) -> None:
        body = {k: v for k, v in progress.items() if k != "crc"}
        _write_json(self.folder / PROGRESS, {**body, "crc": _json_crc(body)})

    def load_index(self, progress: dict[str, Any], expected: np.ndarray | None) -> np.ndarray:
        """index.npy, checked against progress.json's checksum, for consistency, and against
        ``expected`` (the split's) when given.

        Raises:
            CacheCorrupted: it is missing, damaged or not the split's.
        """
        path = self.folder / INDEX
        try:
            crc = _crc(path, 0, path.stat().st_size)
        except OSError as err:
            raise CacheCorrupted(f"{path}: unreadable ({err})") from err
        if crc != progress["index_crc"]:
            raise CacheCorrupted(f"{path}: checksum mismatch (damaged or edited)")
        try:
            index = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise CacheCorrupted(f"{path}: unreadable ({err})") from err
        n, rows = progress["examples"], progress["rows"]
        if index.shape != (n, 3) or index.dtype != np.int64:
            raise CacheCorrupted(f"{path}: {index.dtype} {index.shape}, expected int64 ({n}, 3)")
        if n and (
            (index[:, 2] < 0).any()
            or index[0, 1] != 0
            or (index[1:, 1] != index[:-1, 1] + index[:-1, 2]).any()
            or index[-1, 1] + index[-1, 2] != rows
        ):
            raise CacheCorrupted(f"{path}: its rows do not follow one another up to {rows}")
        if expected is not None and not np.array_equal(index, expected):
            raise CacheCorrupted(f"{path}: does not match the split")
        return index

    def _check_chunks(self, progress: dict[str, Any], index: np.ndarray, *, complete: bool) -> None:
        """The chunks follow one another from the first example (to the last if ``complete``),
        on the index's row boundaries, with a checksum for every data file."""
        path, n, names = self.folder / PROGRESS, len(index), set(self.files())
        bounds = np.append(index[:, 1], progress["rows"]) if n else np.zeros(1, dtype=np.int64)
        end = 0
        for chunk in progress["chunks"]:
            try:
                lo, hi = chunk["examples"]
                good = (
                    lo == end
                    and lo < hi <= n
                    and chunk["row_start"] == bounds[lo]
                    and chunk["row_end"] == bounds[hi]
                    and set(chunk["crc"]) == names
                )
            except (KeyError, TypeError, ValueError) as err:
                raise CacheCorrupted(f"{path}: a chunk is malformed ({err!r})") from err
            if not good:
                raise CacheCorrupted(
                    f"{path}: chunk {chunk['examples']} does not follow example {end}"
                )
            end = hi
        if complete and end != n:
            raise CacheCorrupted(f"{path}: its chunks cover {end} of {n} examples")

    def _check_data(self, progress: dict[str, Any]) -> None:
        """Every data file has the size of the shard and matches each chunk's checksum."""
        files = self.files()
        for path, row_bytes in files.values():
            expected = max(progress["rows"], 1) * row_bytes
            size = path.stat().st_size if path.is_file() else 0
            if size != expected:
                raise CacheCorrupted(f"{path}: size {size} bytes, expected {expected}")
        for chunk in progress["chunks"]:
            start, end = chunk["row_start"], chunk["row_end"]
            for name, (path, row_bytes) in files.items():
                if _crc(path, start * row_bytes, (end - start) * row_bytes) != chunk["crc"][name]:
                    raise CacheCorrupted(f"{path}: checksum mismatch in rows {start}..{end}")

    def check_partial(self, expected: np.ndarray) -> dict[str, Any]:
        """Check what an interrupted build wrote; returns its progress to resume from.

        Raises:
            CacheCorrupted: a file is damaged (the message names it).
        """
        progress = self.load_progress()
        index = self.load_index(progress, expected)
        self._check_chunks(progress, index, complete=False)
        self._check_data(progress)
        return progress

    def verify(self, rows: int, *, full: bool = False, index: np.ndarray | None = None) -> bool:
        """Raise :class:`CacheCorrupted` unless every file of the finished shard checks out.

        Files unchanged since their checks last passed (:meth:`unchanged`) are not read again
        unless ``full``. ``index``: the split's index.npy, to compare with. Returns whether
        any file was read.
        """
        if not full and self.unchanged():
            return False
        path = self.folder / COMPLETE
        try:
            marked = path.read_text().strip()
        except (OSError, ValueError) as err:
            raise CacheCorrupted(f"{path}: unreadable ({err})") from err
        if marked != str(rows):
            raise CacheCorrupted(f"{path}: says {marked!r}, expected {rows} rows")
        progress = self.load_progress()
        if progress["rows"] != rows:
            raise CacheCorrupted(f"{self.folder / PROGRESS}: {progress['rows']} rows, not {rows}")
        self._check_chunks(progress, self.load_index(progress, index), complete=True)
        self._check_data(progress)
        self.record_verified()
        return True

    def unchanged(self) -> bool:
        """Every file is as :meth:`record_verified` found it after its checks passed. A damaged
        verified.json is named in a warning and means reading everything again."""
        path = self.folder / VERIFIED
        if not path.is_file():
            return False
        try:
            recorded = json.loads(path.read_text())["files"]
            if not isinstance(recorded, dict):
                raise TypeError(f"'files' is a {type(recorded).__name__}, not an object")
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("%s is damaged (%r); reading every checksum again", path, err)
            return False
        try:
            current = {name: _identity(p) for name, p in self.checked_files().items()}
        except OSError:
            return False
        return recorded == current

    def record_verified(self) -> None:
        """Note each file's identity, unless one changed too recently (:data:`RACY_SECONDS`) for
        a later write to be sure to show: then nothing is noted and the next open reads all."""
        cutoff = time.time_ns() - int(RACY_SECONDS * 1e9)
        identities = {name: _identity(p) for name, p in self.checked_files().items()}
        path = self.folder / VERIFIED
        try:
            if any(max(ident[2], ident[3]) >= cutoff for ident in identities.values()):
                path.unlink(missing_ok=True)
            else:
                _write_json(path, {"files": identities})
        except OSError as err:  # only a shortcut for later opens (a full disk, a read-only copy)
            logger.info("cannot note %s (%s); later opens read every checksum", path, err)


def _write_json(path: Path, payload: Any) -> None:
    """Replace ``path`` with ``payload`` as JSON through a temporary file beside it (removed if
    the write fails)."""
    _write_text(path, json.dumps(payload))


def _write_text(path: Path, text: str) -> None:
    # one per process and thread: two writers never share a temporary file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_crc(body: Any) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _identity(path: Path) -> list[int]:
    """Size, inode, modification and change time (ns): what any write or copy changes."""
    st = path.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _crc(path: Path, offset: int, length: int) -> int:
    crc = 0
    with path.open("rb") as fh:
        fh.seek(offset)
        remaining = length
        while remaining > 0:
            block = fh.read(min(remaining, 1 << 22))
            if not block:
                break
            crc = zlib.crc32(block, crc)
            remaining -= len(block)
    return crc


# -- disk space ------------------------------------------------------------------------------
def _allocate(path: Path, size: int, *, create: bool) -> None:
    """Make ``path`` ``size`` bytes with all its blocks reserved (``posix_fallocate``).

    Writing through a memory map into a sparse file kills the process with SIGBUS when the disk
    fills; with the blocks reserved first, a full disk is an ``OSError`` here instead. File
    systems that cannot reserve (rare: glibc emulates it) keep a sparse file.

    Raises:
        OSError: ``ENOSPC`` / ``EDQUOT`` when the blocks are not there.
    """
    with path.open("wb" if create else "r+b") as fh:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fh.fileno(), 0, size)
            except OSError as err:
                if err.errno in _FULL:
                    raise
                logger.debug("%s: cannot reserve its blocks (%s); it stays sparse", path, err)
        if os.fstat(fh.fileno()).st_size != size:
            fh.truncate(size)


def _disk_need(shard: _Shard, examples: int, rows: int, chunks: int) -> tuple[int, int]:
    """``(need, held)``: bytes the finished shard takes on disk (its data files, index.npy and
    progress.json, each in whole blocks) and bytes its files hold already."""
    sizes = [max(rows, 1) * rb for _, rb in shard.files().values()]
    sizes.append(128 + 24 * examples)  # index.npy: header + (n, 3) int64
    sizes.append(200 + chunks * (80 + 32 * len(shard.files())))  # progress.json
    block = (os.statvfs(shard.folder.parent).f_frsize if hasattr(os, "statvfs") else 0) or 4096
    need = sum(-(-size // block) * block for size in sizes)
    names = [path for path, _ in shard.files().values()] + [shard.folder / INDEX]
    return need, sum(p.stat().st_blocks * 512 for p in names if p.is_file())


def _file_system(path: Path) -> tuple[str, str]:
    """(device, mount point) of the file system holding ``path`` (an existing path)."""
    st = os.stat(path)
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    found = None
    try:  # fields: id parent major:minor root mount-point options ... - type source options
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[2] == device:
                found = (fields[fields.index("-") + 2], fields[4])  # the last mount wins
    except (OSError, ValueError, IndexError):
        pass
    if found is not None:
        unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), s)  # noqa: E731
        return unescape(found[0]), unescape(found[1])
    mount = Path(path).resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    return "the file system", str(mount)


def _mib(size: float) -> str:
    digits = 1 if size >= 10 * 2**20 else 2 if size >= 2**20 else 3
    return f"{size / 2**20:.{digits}f} MiB"


def _no_space(folder: Path, split: str, need: int, kept: str) -> CacheNoSpace:
    """The error for a store that does not fit: device, path, sizes, what was kept, what to do."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    device, mount = _file_system(existing)
    free = shutil.disk_usage(existing).free
    return CacheNoSpace(
        f"no space left on {device} ({folder}), needed {_mib(need)} for the {split} feature "
        f"cache, {_mib(free)} free on {mount}; {kept}free space, set "
        f"cache.dir / ADALAYERS_CACHE_DIR elsewhere, cache fewer layers (cache.layers) or use "
        f"cache.dtype: int8"
    )


# -- building --------------------------------------------------------------------------------
def token_batches(lengths: list[int], positions: list[int], max_tokens: int) -> Iterator[list[int]]:
    """Positions grouped by similar length into batches of at most ``max_tokens`` padded."""
    order = sorted(positions, key=lambda p: lengths[p])
    batch: list[int] = []
    for p in order:
        if batch and (len(batch) + 1) * lengths[p] > max_tokens:
            yield batch
            batch = []
        batch.append(p)
    if batch:
        yield batch


@torch.inference_mode()
def build_shard(
    backbone: Backbone,
    ds: Any,
    shard: _Shard,
    examples: list[int],
    *,
    chunk_examples: int = 1024,
    max_batch_tokens: int = 16384,
    progress_bar: bool = False,
) -> None:
    """Write (or finish writing) one shard holding ``examples`` of the tokenised split ``ds``.

    A shard with a progress.json is resumed from it: it must have passed
    :meth:`_Shard.check_partial` (:func:`open_or_build` sees to it). A new one gets index.npy,
    its data files allocated in full and a progress.json with no chunks before any state is
    computed.

    Raises:
        OSError: the disk is full (``ENOSPC``): the data files could not be allocated, or a
            small file not written.
    """
    shard.folder.mkdir(parents=True, exist_ok=True)
    lengths_all = ds["length"][:]
    lengths = [lengths_all[i] for i in examples]
    index = shard_index(examples, lengths_all)
    starts = np.append(index[:, 1], index[:, 2].sum()).astype(np.int64)
    rows = int(starts[-1])
    sizes = {path: max(rows, 1) * rb for path, rb in shard.files().values()}
    if (shard.folder / PROGRESS).is_file():
        progress = shard.load_progress()
        for path, size in sizes.items():  # fills the holes of a shard built sparse
            _allocate(path, size, create=False)
    else:
        for name in (COMPLETE, VERIFIED):
            (shard.folder / name).unlink(missing_ok=True)
        np.save(shard.folder / INDEX, index)
        for path, size in sizes.items():
            _allocate(path, size, create=True)
        index_crc = _crc(shard.folder / INDEX, 0, (shard.folder / INDEX).stat().st_size)
        progress = {"rows": rows, "examples": len(examples), "index_crc": index_crc, "chunks": []}
        shard.write_progress(progress)
    maps = shard.memmaps(rows, "r+")
    done = len(progress["chunks"])
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in ds.column_names]
    pad_id = backbone.tokenizer.pad_token_id
    n_chunks = (len(examples) + chunk_examples - 1) // chunk_examples
    from tqdm.auto import tqdm

    bar = tqdm(
        total=n_chunks,
        initial=done,
        desc=f"cache {shard.folder.parent.name}",
        disable=not progress_bar,
        leave=False,
    )
    log = ProgressLog(  # where there is no bar: a line every 30 s (nohup, CI, a scheduler)
        f"cache {shard.folder.parent.name}",
        len(examples),
        logger,
        enabled=not progress_bar,
        initial=min(done * chunk_examples, len(examples)),
    )
    for c in range(done, n_chunks):
        lo, hi = c * chunk_examples, min((c + 1) * chunk_examples, len(examples))
        for batch in token_batches(lengths, list(range(lo, hi)), max_batch_tokens):
            rows_ = ds.select([examples[p] for p in batch])
            width = max(lengths[p] for p in batch)
            inputs = {}
            for column in columns:
                pad = pad_id if column == "input_ids" else 0
                inputs[column] = torch.tensor(
                    [r + [pad] * (width - len(r)) for r in rows_[column][:]]
                )
            if "attention_mask" not in inputs:
                inputs["attention_mask"] = torch.tensor(
                    [[1] * lengths[p] + [0] * (width - lengths[p]) for p in batch]
                )
            inputs = {k: v.to(backbone.device) for k, v in inputs.items()}
            captured: dict[int, torch.Tensor] = {}

            def keep(i: int, z: torch.Tensor, captured: dict = captured) -> None:
                captured[i] = z.float().cpu()

            backbone.run(inputs, {i: [keep] for i in shard.layers})
            for i in shard.layers:
                z = captured[i]  # (B, T, d)
                for b, p in enumerate(batch):
                    values, scale = _encode(z[b, : lengths[p]], shard.dtype)
                    maps[f"layer-{i}.bin"][starts[p] : starts[p + 1]] = values
                    if scale is not None:
                        maps[f"scale-{i}.bin"][starts[p] : starts[p + 1]] = scale
            log.update(len(batch), len(batch))
        for m in maps.values():
            m.flush()
        row_start, row_end = int(starts[lo]), int(starts[hi])
        crc = {
            name: _crc(path, row_start * rb, (row_end - row_start) * rb)
            for name, (path, rb) in shard.files().items()
        }
        progress["chunks"].append(
            {"examples": [lo, hi], "row_start": row_start, "row_end": row_end, "crc": crc}
        )
        shard.write_progress(progress)
        bar.update(1)
    bar.close()
    _write_text(shard.folder / COMPLETE, str(rows))


# -- the store -------------------------------------------------------------------------------
class FeatureStore:
    """All finished shards of one cached split, read through memory maps.

    Args:
        folder: ``<dir>/<key>/<split>``.
        layers: the hidden states it holds.
        hidden_size: their width.
        dtype: storage precision.
        world: read only the shards of this many processes (``shard-*-of-<world>``); default
            every shard.

    Raises:
        CacheCorrupted: a shard's index.npy or data file cannot be read (the message names it).
    """

    def __init__(
        self,
        folder: Path,
        layers: list[int],
        hidden_size: int,
        dtype: str,
        world: int | None = None,
    ) -> None:
        self.folder = folder
        self.layers = list(layers)
        self.hidden_size = hidden_size
        self.dtype = dtype
        self._where: dict[int, tuple[dict[str, np.memmap], int, int]] = {}
        for sub in sorted(folder.glob(f"shard-*-of-{world}" if world else "shard-*")):
            if not (sub / COMPLETE).is_file():
                continue  # unfinished: holds no example yet
            shard = _Shard(sub, self.layers, hidden_size, dtype)
            path = sub / INDEX
            try:
                index = np.load(path, allow_pickle=False)
                if index.ndim != 2 or index.shape[1] != 3:
                    raise ValueError(f"shape {index.shape}, expected (n, 3)")
            except (OSError, ValueError, EOFError) as err:
                raise CacheCorrupted(
                    f"{path}: unreadable ({err}); open the store again to rebuild it"
                ) from err
            rows = int(index[:, 2].sum()) if len(index) else 0
            maps = shard.memmaps(rows, "r")
            for example, start, length in index.tolist():
                self._where[example] = (maps, start, length)

    def __len__(self) -> int:
        return len(self._where)

    def select(self, layers: Sequence[int]) -> FeatureStore:
        """A view of this store that reads only ``layers`` (a subset of the stored ones).

        Raises:
            ValueError: a layer is not stored here.
        """
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise ValueError(
                f"{self.folder} stores hidden states {self.layers}, not {missing}; "
                f"build a store with those layers (cache.all_layers: true stores every state)"
            )
        view = copy.copy(self)
        view.layers = sorted(layers)
        return view

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*.bin"))

    def example(self, index: int, layer: int) -> torch.Tensor:
        """(T, d) float32 states of one example."""
        maps, start, length = self._where[index]
        rows = maps[f"layer-{layer}.bin"][start : start + length]
        scale = maps[f"scale-{layer}.bin"][start : start + length] if self.dtype == "int8" else None
        return _decode(rows, scale, self.dtype)

    def batch(
        self, indices: Sequence[int], width: int, layers: Sequence[int] | None = None
    ) -> StackedStates:
        """State index -> (B, width, d) float32, zero-padded on the right (one stacked
        (n, B, width, d) tensor underneath)."""
        layers = self.layers if layers is None else list(layers)
        rows, index = self.rows(indices, layers)
        stacked = torch.zeros(len(layers), len(indices), width, self.hidden_size)  # (n, B, T, d)
        stacked[:, index[0], index[1]] = rows.float()  # one conversion, one scatter
        return StackedStates(layers, stacked)

    def rows(
        self, indices: Sequence[int], layers: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored rows of these examples' tokens, packed (no padding).

        Returns:
            ``(rows, index)``: rows (n, N, d) for the n ``layers`` and the N tokens of the
            examples in order (float16 / bfloat16 / float32 as stored; int8 scaled to
            float32), and index (2, N) int64: each row's position in ``indices`` and its
            token position.
        """
        layers = self.layers if layers is None else list(layers)
        groups = [
            (maps, np.asarray(spans, dtype=np.int64)) for maps, spans in self._groups(indices)
        ]
        total = int(sum(spans[:, 1].sum() for _, spans in groups))
        kind = np.float32 if self.dtype == "int8" else _NP_DTYPES[self.dtype]
        out = np.empty((len(layers), total, self.hidden_size), dtype=kind)  # (n, N, d)
        order: list[np.ndarray] = []
        offset = 0
        for maps, spans in groups:
            starts, lengths, bs = spans[:, 0], spans[:, 1], spans[:, 2]
            ti = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            rows = np.repeat(starts, lengths) + ti
            part = slice(offset, offset + len(rows))
            for j, layer in enumerate(layers):
                data = maps[f"layer-{layer}.bin"]
                if self.dtype == "int8":
                    scale = maps[f"scale-{layer}.bin"][rows]
                    np.multiply(data[rows], scale[:, None], out=out[j, part], dtype=np.float32)
                else:
                    np.take(data, rows, axis=0, out=out[j, part])  # no intermediate copy
            order.append(np.stack([np.repeat(bs, lengths), ti]))
            offset += len(rows)
        if self.dtype == "bfloat16":
            tensor = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(out)
        return tensor, torch.from_numpy(np.concatenate(order, axis=1))

    def _groups(self, indices: Sequence[int]) -> list[tuple[dict[str, np.memmap], list]]:
        groups: dict[int, tuple[dict[str, np.memmap], list[tuple[int, int, int]]]] = {}
        for b, i in enumerate(indices):
            maps, start, length = self._where[i]
            groups.setdefault(id(maps), (maps, []))[1].append((start, length, b))
        return list(groups.values())


def open_or_build(
    backbone: Backbone,
    ds: Any,
    split: str,
    layers: Sequence[int],
    *,
    dtype: str = "float16",
    root: str | os.PathLike | None = None,
    rank: int = 0,
    world: int = 1,
    chunk_examples: int = 1024,
    progress_bar: bool = False,
    barrier: Any = None,
    verify: bool = False,
) -> FeatureStore:
    """Open the store for this split, building (or finishing, or rebuilding) this process's
    shard first.

    A finished shard whose files do not check out, or an interrupted one whose progress does
    not, is rebuilt (from scratch) with a warning naming the damaged file.

    Args:
        backbone: the frozen base.
        ds: the tokenised split (columns ``input_ids``, ``attention_mask``, ``labels``,
            ``length``).
        split: its name (a folder of the store).
        layers: hidden states to store.
        dtype: storage precision.
        root: the cache folder (default :func:`default_cache_dir`).
        rank, world: this process and the number of processes (each writes its shard).
        chunk_examples: examples per checksummed chunk.
        progress_bar: show a progress bar.
        barrier: called after this process's shard is complete (e.g.
            ``accelerator.wait_for_everyone``) so every shard exists before reading.
        verify: read every checksum of a finished shard, even of files unchanged since their
            checksums last passed (``verified.json``).

    Raises:
        CacheNoSpace: the shard does not fit the free disk, checked before the build and when
            its files are allocated; the message names the device, the path and both sizes. A
            shard that had no chunk written is removed; an interrupted one keeps its chunks.
        CacheCorrupted: a shard of another process cannot be read, or the shards do not hold
            every example (the message names the file or folder).
    """
    layers = sorted(layers)
    key = store_key(backbone, layers, dtype, ds)
    root = Path(root) if root is not None else default_cache_dir()
    folder = root / key / split
    shard = _Shard(folder / f"shard-{rank}-of-{world}", layers, backbone.hidden_size, dtype)
    examples = list(range(rank, len(ds), world))
    index = shard_index(examples, ds["length"][:])
    rows = int(index[:, 2].sum())
    folder.mkdir(parents=True, exist_ok=True)
    # one process at a time checks, finishes or builds this shard (two trainings, or the rows
    # of `compare --jobs`, may open one store together); the others wait, then find it complete
    with FileLock(folder / f".{shard.folder.name}.lock"):
        if (shard.folder / COMPLETE).is_file():
            try:
                read = shard.verify(rows, full=verify, index=index)
                logger.info(
                    "cache hit: %s (%s)",
                    shard.folder,
                    "checksums read" if read else "unchanged since its checksums passed",
                )
            except CacheCorrupted as err:
                logger.warning("cache store is damaged (%s); rebuilding %s", err, shard.folder)
                shutil.rmtree(shard.folder)
        if not (shard.folder / COMPLETE).is_file():
            _build(backbone, ds, shard, split, examples, index, chunk_examples, progress_bar)
    if rank == 0:
        _note_meta(
            folder.parent / "meta.json",
            {
                "format": FORMAT,
                "base": backbone.name_or_path,
                "fingerprint": backbone.fingerprint(),
                "layers": layers,
                "dtype": dtype,
                "hidden_size": backbone.hidden_size,
            },
        )
    if barrier is not None:
        barrier()
    store = FeatureStore(folder, layers, backbone.hidden_size, dtype, world=world)
    if len(store) != len(ds):
        raise CacheCorrupted(
            f"{folder} holds {len(store)} of {len(ds)} examples in its shards of {world} "
            f"process(es); delete the folder to build it again"
        )
    return store


def _build(
    backbone: Backbone,
    ds: Any,
    shard: _Shard,
    split: str,
    examples: list[int],
    index: np.ndarray,
    chunk_examples: int,
    progress_bar: bool,
) -> None:
    """Resume the shard over its chunks that still check out, or build it anew, if it fits."""
    if (shard.folder / PROGRESS).is_file():
        try:
            shard.check_partial(index)
        except CacheCorrupted as err:
            logger.warning("partial cache damaged (%s); starting %s again", err, shard.folder)
            shutil.rmtree(shard.folder)
    elif shard.folder.is_dir():  # files of a build stopped before its first progress: no use
        shutil.rmtree(shard.folder)
    rows = int(index[:, 2].sum())
    chunks = -(-len(examples) // chunk_examples)
    need, held = _disk_need(shard, len(examples), rows, chunks)
    logger.info(
        "caching %s: %d examples, %d tokens x %d layers -> %.1f MiB (%s) in %s",
        split,
        len(examples),
        rows,
        len(shard.layers),
        estimate_bytes(rows, len(shard.layers), shard.hidden_size, shard.dtype) / 2**20,
        shard.dtype,
        shard.folder,
    )
    if need - held > shutil.disk_usage(shard.folder.parent).free:
        raise _no_space(shard.folder, split, need - held, "")
    try:
        build_shard(
            backbone,
            ds,
            shard,
            examples,
            chunk_examples=chunk_examples,
            progress_bar=progress_bar,
        )
    except OSError as err:
        if err.errno not in _FULL or isinstance(err, CacheCorrupted):
            raise
        try:
            written = len(shard.load_progress()["chunks"])
        except CacheCorrupted:
            written = 0
        if written:
            kept = f"its {written} chunk(s) written are kept and the next build resumes them; "
        else:
            shutil.rmtree(shard.folder, ignore_errors=True)
            kept = "nothing of it was kept; "
        raise _no_space(shard.folder, split, need, kept) from err


def _note_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write the store's description unless it is there already; a damaged one (unreadable,
    or describing another store) is named in a warning and written again."""
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        old = None
    except (OSError, ValueError) as err:
        logger.warning("%s is damaged (%r); writing it again", path, err)
        old = None
    else:
        same = ("format", "fingerprint", "layers", "dtype", "hidden_size")
        if not isinstance(old, dict) or any(old.get(k) != meta[k] for k in same):
            logger.warning("%s does not describe this store; writing it again", path)
            old = None
    if old != meta:
        _write_json(path, meta)
