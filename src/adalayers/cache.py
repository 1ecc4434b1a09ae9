"""A stored cache of the frozen base's hidden states, so training epochs never run the base.

The base is frozen: its states for a training set never change. :func:`build_cache` runs it once
and writes the per-token states of the chosen layers (no padding) into memory-mapped files:

    <dir>/<key>/<split>/shard-<rank>-of-<world>/
        index.npy            (n, 3) int64: example index, first row, number of tokens
        layer-<i>.bin        (rows, d) states of hidden state i, in the storage dtype
        scale-<i>.bin        (rows,) float32 per-row scales (int8 storage only)
        progress.json        chunks written so far, with a CRC-32 of every file range
        COMPLETE             written last
        verified.json        size, inode and times of each file when its checksums last passed

``key`` is a hash of the base's fingerprint, the layers, the storage dtype and the token ids
and labels of the split (which covers the tokenizer, the max length and the data files), so a
stale store is never used. Interrupted builds resume chunk by chunk; a store whose checksums do
not match (truncated, corrupted) is detected on open and rebuilt, never silently read. Reading
every checksum means reading the whole store, so a file whose size, inode and modification and
change times are those recorded in ``verified.json`` after its checksums last passed is not read
again; any write, truncation, copy or replacement changes them (``verify=True`` checks
everything regardless). Under ``accelerate launch`` every process writes its own shard and
training reads all shards. A shard is checked and built under a lock file beside it
(``.shard-<rank>-of-<world>.lock``), so processes that open one store at once (two trainings,
the rows of ``adalayers compare --jobs``) build it once: the others wait, then find it
complete.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from adalayers.backbone import Backbone

logger = logging.getLogger(__name__)

_NP_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "int8": np.int8, "float32": np.float32}
FORMAT = 1
VERIFIED = "verified.json"
RACY_SECONDS = 2.0
"""A file changed this close to the moment its checksums passed is checked again next time:
file times are coarse on some file systems (2 s on FAT), so a write within that window may not
move them."""


class CacheCorrupted(RuntimeError):
    """A store's files do not match their checksums."""


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


class StackedStates(dict):
    """State index -> (B, T, d) views of one stacked (n, B, T, d) tensor (``.stacked``), so a
    mixer that reads them all needs no copy."""

    def __init__(self, layers: Sequence[int], stacked: torch.Tensor) -> None:
        super().__init__({layer: stacked[j] for j, layer in enumerate(layers)})
        self.layers = list(layers)
        self.stacked = stacked


# -- one shard -------------------------------------------------------------------------------
@dataclass
class _Shard:
    folder: Path
    layers: list[int]
    hidden_size: int
    dtype: str

    def files(self) -> dict[str, tuple[Path, int]]:
        """file name -> (path, bytes per row)."""
        row_bytes = self.hidden_size * np.dtype(_NP_DTYPES[self.dtype]).itemsize
        out = {f"layer-{i}.bin": (self.folder / f"layer-{i}.bin", row_bytes) for i in self.layers}
        if self.dtype == "int8":
            out.update({f"scale-{i}.bin": (self.folder / f"scale-{i}.bin", 4) for i in self.layers})
        return out

    def memmaps(self, rows: int, mode: str) -> dict[str, np.memmap]:
        maps = {}
        for i in self.layers:
            maps[f"layer-{i}.bin"] = np.memmap(
                self.folder / f"layer-{i}.bin",
                dtype=_NP_DTYPES[self.dtype],
                mode=mode,
                shape=(max(rows, 1), self.hidden_size),
            )
            if self.dtype == "int8":
                maps[f"scale-{i}.bin"] = np.memmap(
                    self.folder / f"scale-{i}.bin",
                    dtype=np.float32,
                    mode=mode,
                    shape=(max(rows, 1),),
                )
        return maps

    def progress(self) -> dict[str, Any]:
        path = self.folder / "progress.json"
        return json.loads(path.read_text()) if path.is_file() else {"chunks": []}

    def write_progress(self, progress: dict[str, Any]) -> None:
        _write_json(self.folder / "progress.json", progress)

    def verify(self, rows: int, *, full: bool = False) -> bool:
        """Raise :class:`CacheCorrupted` unless every chunk's CRC matches.

        Files unchanged since their checksums last passed (:meth:`unchanged`) are not read again
        unless ``full``. Returns whether any file was read.
        """
        files = self.files()
        if not full and self.unchanged(files):
            return False
        self._verify_all(rows, files)
        self.record_verified(files)
        return True

    def unchanged(self, files: dict[str, tuple[Path, int]]) -> bool:
        """Every file is as :meth:`record_verified` found it after its checksums passed."""
        path = self.folder / VERIFIED
        try:
            recorded = json.loads(path.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return set(recorded) == set(files) and all(
            _identity(p) == recorded[name] for name, (p, _) in files.items()
        )

    def record_verified(self, files: dict[str, tuple[Path, int]]) -> None:
        """Note each file's identity, unless one changed too recently (:data:`RACY_SECONDS`) for
        a later write to be sure to show: then nothing is noted and the next open reads all."""
        cutoff = time.time_ns() - int(RACY_SECONDS * 1e9)
        identities = {name: _identity(p) for name, (p, _) in files.items()}
        if any(max(ident[2], ident[3]) >= cutoff for ident in identities.values()):
            (self.folder / VERIFIED).unlink(missing_ok=True)
            return
        _write_json(self.folder / VERIFIED, {"files": identities})

    def _verify_all(self, rows: int, files: dict[str, tuple[Path, int]]) -> None:
        for path, row_bytes in files.values():
            expected = max(rows, 1) * row_bytes
            if not path.is_file() or path.stat().st_size != expected:
                raise CacheCorrupted(
                    f"{path}: size {path.stat().st_size if path.is_file() else 0}"
                    f" bytes, expected {expected}"
                )
        for chunk in self.progress()["chunks"]:
            for name, (path, row_bytes) in files.items():
                if (
                    _crc(
                        path,
                        chunk["row_start"] * row_bytes,
                        (chunk["row_end"] - chunk["row_start"]) * row_bytes,
                    )
                    != chunk["crc"][name]
                ):
                    raise CacheCorrupted(
                        f"{path}: checksum mismatch in rows "
                        f"{chunk['row_start']}..{chunk['row_end']}"
                    )


def _write_json(path: Path, payload: Any) -> None:
    """Replace ``path`` with ``payload`` as JSON through a temporary file beside it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per process: no clash
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


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


# -- building --------------------------------------------------------------------------------
def _batches(lengths: list[int], positions: list[int], max_tokens: int) -> Iterator[list[int]]:
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
    """Write (or finish writing) one shard holding ``examples`` of the tokenised split ``ds``."""
    shard.folder.mkdir(parents=True, exist_ok=True)
    lengths_all = ds["length"][:]
    lengths = [lengths_all[i] for i in examples]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rows = int(starts[-1])
    index = (
        np.stack(
            [
                np.asarray(examples, dtype=np.int64),
                starts[:-1],
                np.asarray(lengths, dtype=np.int64),
            ],
            axis=1,
        )
        if examples
        else np.zeros((0, 3), dtype=np.int64)
    )
    index_path = shard.folder / "index.npy"
    if index_path.is_file() and not np.array_equal(np.load(index_path), index):
        raise CacheCorrupted(f"{index_path} does not match the split; rebuilding")
    np.save(index_path, index)
    fresh = not all(p.is_file() for p, _ in shard.files().values())
    maps = shard.memmaps(rows, "w+" if fresh else "r+")
    progress = {"chunks": []} if fresh else shard.progress()
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
    for c in range(done, n_chunks):
        lo, hi = c * chunk_examples, min((c + 1) * chunk_examples, len(examples))
        for batch in _batches(lengths, list(range(lo, hi)), max_batch_tokens):
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
    (shard.folder / "COMPLETE").write_text(str(rows))


# -- the store -------------------------------------------------------------------------------
class FeatureStore:
    """All shards of one cached split, read through memory maps.

    Args:
        folder: ``<dir>/<key>/<split>``.
        layers: the hidden states it holds.
        hidden_size: their width.
        dtype: storage precision.
    """

    def __init__(self, folder: Path, layers: list[int], hidden_size: int, dtype: str) -> None:
        self.folder = folder
        self.layers = list(layers)
        self.hidden_size = hidden_size
        self.dtype = dtype
        self._where: dict[int, tuple[dict[str, np.memmap], int, int]] = {}
        for sub in sorted(folder.glob("shard-*")):
            shard = _Shard(sub, self.layers, hidden_size, dtype)
            index = np.load(sub / "index.npy")
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
        OSError: the store would not fit the free disk (the message gives both sizes).
    """
    layers = sorted(layers)
    key = store_key(backbone, layers, dtype, ds)
    root = Path(root) if root is not None else default_cache_dir()
    folder = root / key / split
    shard = _Shard(folder / f"shard-{rank}-of-{world}", layers, backbone.hidden_size, dtype)
    examples = list(range(rank, len(ds), world))
    lengths = ds["length"][:]
    rows = sum(lengths[i] for i in examples)
    folder.mkdir(parents=True, exist_ok=True)
    # one process at a time checks, finishes or builds this shard (two trainings, or the rows
    # of `compare --jobs`, may open one store together); the others wait, then find it complete
    with FileLock(folder / f".{shard.folder.name}.lock"):
        if (shard.folder / "COMPLETE").is_file():
            try:
                read = shard.verify(rows, full=verify)
                logger.info(
                    "cache hit: %s (%s)",
                    shard.folder,
                    "checksums read" if read else "unchanged since its checksums passed",
                )
            except CacheCorrupted as err:
                logger.warning("cache store is damaged (%s); rebuilding %s", err, shard.folder)
                shutil.rmtree(shard.folder)
        if not (shard.folder / "COMPLETE").is_file():
            need = estimate_bytes(rows, len(layers), backbone.hidden_size, dtype)
            free = shutil.disk_usage(folder).free
            logger.info(
                "caching %s: %d examples, %d tokens x %d layers -> %.1f MiB (%s) in %s",
                split,
                len(examples),
                rows,
                len(layers),
                need / 2**20,
                dtype,
                shard.folder,
            )
            if need > free:
                raise OSError(
                    f"the feature cache for {split} needs {need / 2**30:.2f} GiB but only "
                    f"{free / 2**30:.2f} GiB are free under {root}; free space, set "
                    f"cache.dir / ADALAYERS_CACHE_DIR elsewhere, cache fewer layers "
                    f"(cache.layers) or use cache.dtype: int8"
                )
            if shard.folder.is_dir() and (shard.folder / "progress.json").is_file():
                try:  # resume only over chunks that still check out
                    _verify_chunks(shard)
                except CacheCorrupted as err:
                    logger.warning(
                        "partial cache damaged (%s); starting %s again", err, shard.folder
                    )
                    shutil.rmtree(shard.folder)
            build_shard(
                backbone,
                ds,
                shard,
                examples,
                chunk_examples=chunk_examples,
                progress_bar=progress_bar,
            )
    meta = folder.parent / "meta.json"
    if rank == 0:
        _write_json(
            meta,
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
    store = FeatureStore(folder, layers, backbone.hidden_size, dtype)
    if len(store) != len(ds):
        raise CacheCorrupted(
            f"{folder} holds {len(store)} of {len(ds)} examples (shards from a "
            f"different number of processes?)"
        )
    return store


def _verify_chunks(shard: _Shard) -> None:
    files = shard.files()
    for chunk in shard.progress()["chunks"]:
        for name, (path, rb) in files.items():
            if (
                not path.is_file()
                or _crc(path, chunk["row_start"] * rb, (chunk["row_end"] - chunk["row_start"]) * rb)
                != chunk["crc"][name]
            ):
                raise CacheCorrupted(f"{path}: chunk {chunk['examples']} does not check out")


# -- choosing the layers worth caching -------------------------------------------------------
@torch.inference_mode()
def probe_layers(
    backbone: Backbone,
    ds: Any,
    task_type: str,
    num_labels: int,
    max_examples: int = 2000,
    seed: int = 0,
) -> dict[int, float]:
    """A training-free score per hidden state: held-out quality of a ridge probe.

    Sequence tasks probe the masked mean of the tokens, token tasks each word's first sub-token.
    Classification scores accuracy, regression the Pearson correlation; 80% fit / 20% score.
    """
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(ds))[:max_examples].tolist()
    feats: dict[int, list[torch.Tensor]] = {i: [] for i in range(backbone.num_states)}
    targets: list[torch.Tensor] = []
    lengths = ds["length"][:]
    pad_id = backbone.tokenizer.pad_token_id
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in ds.column_names]
    for batch in _batches(lengths, picks, 8192):
        rows = ds.select(batch)
        width = max(lengths[p] for p in batch)
        inputs = {}
        for column in columns:
            pad = pad_id if column == "input_ids" else 0
            inputs[column] = torch.tensor([r + [pad] * (width - len(r)) for r in rows[column][:]])
        states = backbone.hidden_states({k: v.to(backbone.device) for k, v in inputs.items()})
        labels = rows["labels"][:]
        mask = inputs["attention_mask"].float()
        if task_type == "token_classification":
            lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
            keep = lab != -100
            targets.append(lab[keep])
            for i, z in enumerate(states):
                feats[i].append(z.float().cpu()[keep])
        else:
            targets.append(torch.tensor(labels, dtype=torch.float32))
            for i, z in enumerate(states):
                pooled = (z.float().cpu() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                feats[i].append(pooled)
    y = torch.cat(targets)
    n = len(y)
    split = int(0.8 * n)
    order = torch.from_numpy(rng.permutation(n))
    fit_idx, test_idx = order[:split], order[split:]
    scores = {}
    for i, chunks in feats.items():
        x = torch.cat(chunks).double()
        x = (x - x[fit_idx].mean(0)) / (x[fit_idx].std(0) + 1e-6)
        x = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
        if task_type == "regression":
            target = y.double()[:, None]
        else:
            target = torch.nn.functional.one_hot(y.long(), num_labels).double()
        a = x[fit_idx]
        w = torch.linalg.solve(
            a.T @ a + 10.0 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ target[fit_idx]
        )
        pred = x[test_idx] @ w
        if task_type == "regression":
            p, t = pred[:, 0], y.double()[test_idx]
            scores[i] = float(torch.corrcoef(torch.stack([p, t]))[0, 1])
        else:
            scores[i] = float((pred.argmax(-1) == y[test_idx].long()).double().mean())
    return scores
