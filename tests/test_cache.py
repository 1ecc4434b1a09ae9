"""The frozen-feature cache: equal to a fresh forward, resumable, checked, sharded."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections import namedtuple

import numpy as np
import pytest
import torch
from helpers import child_env, write_cola, write_config

from adalayers.core.backbone import load_backbone
from adalayers.core.task import Task, TaskConfig
from adalayers.training import batches
from adalayers.training import cache as cache_module
from adalayers.training import train as train_module
from adalayers.training.build import TaskModel
from adalayers.training.config import load_config
from adalayers.training.data import load_task_data


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    data_dir = write_cola(tmp_path / "data", n_train=120)
    backbone = load_backbone(tiny_model_dir("bert"))
    data = load_task_data("cola", data_dir)
    task = Task(
        TaskConfig(
            "sequence_classification", data.label_names, mixer={"dim": 8}, head={"num_heads": 2}
        ),
        backbone.info(),
    )
    ds = batches.tokenize(data, "train", backbone.tokenizer, task, 32)
    return backbone, ds, tmp_path / "cache"


def fresh_states(backbone, ds, index):
    row = ds[index]
    inputs = {
        "input_ids": torch.tensor([row["input_ids"]]),
        "attention_mask": torch.tensor([row["attention_mask"]]),
    }
    return backbone.hidden_states(inputs)


@pytest.mark.parametrize(
    ("dtype", "tol"), [("float32", 1e-5), ("float16", 1e-3), ("bfloat16", 8e-3), ("int8", None)]
)
def test_cached_states_equal_a_fresh_forward(setup, dtype, tol):
    backbone, ds, root = setup
    store = cache_module.open_or_build(
        backbone, ds, "train", [0, 2, 3], dtype=dtype, root=root, chunk_examples=40
    )
    assert len(store) == len(ds)
    for index in (0, 17, len(ds) - 1):
        states = fresh_states(backbone, ds, index)
        for layer in (0, 2, 3):
            got, want = store.example(index, layer), states[layer][0]
            assert got.shape == want.shape
            if dtype == "int8":  # per-row scale: error at most half a quantisation step
                step = want.abs().amax(-1, keepdim=True) / 127
                assert torch.all((got - want).abs() <= step / 2 + 1e-6)
            else:  # storage precision (float32: batch padding changes the last bits)
                torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max())
    size = sum(p.stat().st_size for p in store.folder.rglob("*.bin"))
    tokens = sum(ds["length"][:])
    assert size == cache_module.estimate_bytes(tokens, 3, backbone.hidden_size, dtype)


def test_interrupted_build_resumes_where_it_stopped(setup, monkeypatch):
    backbone, ds, root = setup
    calls = {"n": 0}
    real_run = backbone.run

    def counting_run(*args, **kwargs):
        calls["n"] += 1
        if calls.get("fail_after") and calls["n"] > calls["fail_after"]:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(backbone, "run", counting_run)
    calls["fail_after"] = 1  # dies inside the second chunk
    with pytest.raises(KeyboardInterrupt):
        cache_module.open_or_build(backbone, ds, "train", [1, 3], root=root, chunk_examples=40)
    shard = next(root.rglob("shard-0-of-1"))
    assert len(json.loads((shard / "progress.json").read_text())["chunks"]) == 1
    assert not (shard / "COMPLETE").exists()
    calls.update(n=0, fail_after=None)
    store = cache_module.open_or_build(backbone, ds, "train", [1, 3], root=root, chunk_examples=40)
    assert len(json.loads((shard / "progress.json").read_text())["chunks"]) == 3
    assert 0 < calls["n"] <= 2  # the first chunk was not computed again
    states = fresh_states(backbone, ds, 5)  # an example of the first chunk
    torch.testing.assert_close(store.example(5, 3), states[3][0], rtol=1e-3, atol=1e-3)


def _age_past_the_racy_window() -> None:
    time.sleep(cache_module.RACY_SECONDS + 0.2)


def _count_checksum_reads(monkeypatch) -> list:
    calls = []
    real = cache_module._crc

    def counting(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(cache_module, "_crc", counting)
    return calls


@pytest.mark.parametrize("verified_before", [False, True], ids=["fresh", "verified"])
@pytest.mark.parametrize("damage", ["flip", "flip-keep-mtime", "truncate"])
def test_damaged_store_is_detected_and_rebuilt(setup, caplog, damage, verified_before):
    backbone, ds, root = setup
    store = cache_module.open_or_build(backbone, ds, "train", [2], root=root, chunk_examples=40)
    shard = next(store.folder.glob("shard-*"))
    if verified_before:  # its checksums passed and were noted: opens skip reading them
        _age_past_the_racy_window()
        cache_module.open_or_build(backbone, ds, "train", [2], root=root)
        assert (shard / cache_module.VERIFIED).is_file()
    path = shard / "layer-2.bin"
    before = path.stat()
    raw = bytearray(path.read_bytes())
    if damage.startswith("flip"):
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
        if damage == "flip-keep-mtime":  # as `touch -r` or a restore would leave it
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
            assert path.stat().st_mtime_ns == before.st_mtime_ns
    else:
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    with caplog.at_level(logging.WARNING, logger="adalayers"):
        again = cache_module.open_or_build(backbone, ds, "train", [2], root=root)
    assert "rebuilding" in caplog.text
    middle = len(ds) // 2
    torch.testing.assert_close(
        again.example(middle, 2), fresh_states(backbone, ds, middle)[2][0], rtol=1e-3, atol=1e-3
    )


def test_a_store_unchanged_since_its_checksums_passed_is_not_read_again(setup, monkeypatch):
    backbone, ds, root = setup
    built = cache_module.open_or_build(backbone, ds, "train", [1, 2], root=root, chunk_examples=40)
    shard = next(built.folder.glob("shard-*"))
    middle = len(ds) // 2
    expected = built.example(middle, 2)
    _age_past_the_racy_window()
    reads = _count_checksum_reads(monkeypatch)
    cache_module.open_or_build(backbone, ds, "train", [1, 2], root=root)
    assert reads, "the first open after the build reads every checksum"
    assert (shard / cache_module.VERIFIED).is_file()
    reads.clear()
    again = cache_module.open_or_build(backbone, ds, "train", [1, 2], root=root)
    assert reads == []
    torch.testing.assert_close(again.example(middle, 2), expected, rtol=0, atol=0)
    cache_module.open_or_build(backbone, ds, "train", [1, 2], root=root, verify=True)
    assert {p.name for p in reads} == {"index.npy", "layer-1.bin", "layer-2.bin"}  # all


def test_a_file_changed_just_before_the_check_is_checked_again(setup, monkeypatch):
    """File times are coarse: a file touched within RACY_SECONDS of a passing check is not
    noted as verified, so a write in the same clock tick cannot go unseen."""
    backbone, ds, root = setup
    built = cache_module.open_or_build(backbone, ds, "train", [2], root=root, chunk_examples=40)
    shard = next(built.folder.glob("shard-*"))
    _age_past_the_racy_window()
    os.utime(shard / "layer-2.bin")  # changed now
    reads = _count_checksum_reads(monkeypatch)
    cache_module.open_or_build(backbone, ds, "train", [2], root=root)
    assert reads and not (shard / cache_module.VERIFIED).exists()
    reads.clear()
    cache_module.open_or_build(backbone, ds, "train", [2], root=root)
    assert reads  # still not trusted: read again


def test_a_different_split_or_base_never_reuses_a_store(setup, tiny_model_dir):
    backbone, ds, _ = setup
    key = cache_module.store_key(backbone, [1], "float16", ds)
    assert key != cache_module.store_key(backbone, [1, 2], "float16", ds)
    assert key != cache_module.store_key(backbone, [1], "int8", ds)
    assert key != cache_module.store_key(backbone, [1], "float16", ds.select(range(10)))
    other = load_backbone(tiny_model_dir("bert", seed=1))
    assert key != cache_module.store_key(other, [1], "float16", ds)


def test_one_store_opened_by_two_processes_at_once_is_built_once(setup, monkeypatch):
    """Two openers of one store (two trainings, the rows of ``compare --jobs``): the shard's
    lock lets one build it while the other waits, then opens the finished store."""
    import threading

    from filelock import FileLock

    backbone, ds, root = setup
    folder = root / cache_module.store_key(backbone, [0, 1], "float16", ds) / "train"
    folder.mkdir(parents=True)
    builds = []
    build_shard = cache_module.build_shard
    monkeypatch.setattr(
        cache_module, "build_shard", lambda *a, **k: (builds.append(1), build_shard(*a, **k))
    )
    stores = []

    def open_store():
        stores.append(cache_module.open_or_build(backbone, ds, "train", [0, 1], root=root))

    openers = [threading.Thread(target=open_store) for _ in range(2)]
    with FileLock(folder / ".shard-0-of-1.lock"):  # held by a third process for now
        for opener in openers:
            opener.start()
        time.sleep(1.0)
        assert all(opener.is_alive() for opener in openers)  # both wait...
        assert not (folder / "shard-0-of-1").exists()  # ...and write nothing meanwhile
    for opener in openers:
        opener.join(timeout=120)
    assert len(stores) == 2 and len(builds) == 1
    for index in (0, len(ds) - 1):
        torch.testing.assert_close(stores[0].example(index, 1), stores[1].example(index, 1))


def test_refuses_when_the_disk_is_too_small(setup, monkeypatch):
    backbone, ds, root = setup
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda p: Usage(10, 10, 100))
    with pytest.raises(cache_module.CacheNoSpace, match=r"^no space left on .* MiB free on "):
        cache_module.open_or_build(backbone, ds, "train", [0, 1], root=root)
    assert not any(root.rglob("*.bin"))


def test_cached_and_online_training_agree(tmp_path, tiny_model_dir):
    data = write_cola(tmp_path / "data", n_train=120)
    config_path = write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"), epochs=3)
    online = train_module.fit(
        load_config(config_path, data_dir=str(data)), tmp_path / "online", quiet=True
    )
    cached_config = load_config(
        config_path,
        ["train.cache=true", f"cache.dir={tmp_path / 'cache'}", "cache.dtype=float32"],
        data_dir=str(data),
    )
    cached = train_module.fit(cached_config, tmp_path / "cached", quiet=True)
    assert cached["cache"]["train"]["layers"] == [0, 1, 2, 3]
    for split in ("validation", "test"):
        for metric in ("accuracy", "mcc"):
            assert cached[split][metric] == pytest.approx(online[split][metric], abs=1e-6)
    a = Task.from_pretrained(tmp_path / "online" / "model").state_dict()
    b = Task.from_pretrained(tmp_path / "cached" / "model").state_dict()
    # float rounding differs (batched vs per-layer projections); Adam turns that into small
    # weight differences where the true gradient is ~0 (e.g. attention key biases)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-3)


def test_probe_keeps_the_best_layers_and_restricts_the_mixer(tmp_path, tiny_model_dir, capsys):
    data = write_cola(tmp_path / "data", n_train=120)
    config_path = write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"), epochs=1)
    from adalayers.cli import main

    assert (
        main(
            [
                "cache",
                "--config",
                str(config_path),
                "--data-dir",
                str(data),
                "--quiet",
                "--set",
                "cache.layers=2",
                "--set",
                f"cache.dir={tmp_path / 'c'}",
                "--set",
                "cache.probe_examples=50",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["layers"]) == 2
    assert summary["splits"]["train"]["examples"] == 108
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(config_path),
                "--data-dir",
                str(data),
                "--quiet",
                "--output-dir",
                str(run),
                "--set",
                "train.cache=true",
                "--set",
                "cache.layers=2",
                "--set",
                f"cache.dir={tmp_path / 'c'}",
                "--set",
                "cache.probe_examples=50",
            ]
        )
        == 0
    )
    capsys.readouterr()
    saved = load_config(run / "config.yaml")
    assert saved.task.mixer.layers == summary["layers"]
    task = Task.from_pretrained(run / "model")
    assert sorted(task.mixer.layer_weights()) == summary["layers"]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_write_their_own_shards(tmp_path, tiny_model_dir):
    data = write_cola(tmp_path / "data", n_train=120)
    config = write_config(tmp_path / "cfg.yaml", tiny_model_dir("bert"), epochs=1)
    root = tmp_path / "c"
    out = subprocess.run(
        [
            "torchrun",
            "--standalone",  # a free port: runs beside other tests
            "--nproc_per_node",
            "2",
            "-m",
            "adalayers.cli",
            "train",
            "--config",
            str(config),
            "--data-dir",
            str(data),
            "--output-dir",
            str(tmp_path / "run"),
            "--quiet",
            "--set",
            "train.cache=true",
            "--set",
            f"cache.dir={root}",
        ],
        capture_output=True,
        text=True,
        env=child_env(cpu_world=True),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    shards = sorted(p.name for p in root.rglob("shard-*") if p.parent.name == "train")
    assert shards == ["shard-0-of-2", "shard-1-of-2"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["validation"]["examples"] == 12
    index = np.concatenate(
        [np.load(p / "index.npy") for p in root.rglob("shard-*") if p.parent.name == "train"]
    )
    assert sorted(index[:, 0].tolist()) == list(range(108))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_packed_rows_are_the_padded_batch_without_padding(setup, dtype):
    backbone, ds, root = setup
    store = cache_module.open_or_build(
        backbone, ds, "train", [0, 2, 3], dtype=dtype, root=root, chunk_examples=40
    )
    indices = [5, 0, len(ds) - 1, 17]
    width = max(ds[i]["length"] for i in indices)
    rows, index = store.rows(indices, [3, 0])
    padded = store.batch(indices, width, [3, 0])
    assert rows.shape == (2, sum(ds[i]["length"] for i in indices), backbone.hidden_size)
    assert torch.equal(rows.float(), padded.stacked[:, index[0], index[1]])
    real = torch.zeros(len(indices), width, dtype=torch.bool)
    real[index[0], index[1]] = True
    assert int(real.sum()) == rows.shape[1]  # every real token exactly once
    assert not padded.stacked[:, ~real].any()  # padding is zero
    for j, layer in enumerate([3, 0]):
        b, t = 2, ds[indices[2]]["length"] - 1  # the last token of the third example
        assert torch.equal(padded[layer][b, t], store.example(indices[2], layer)[t])
        assert torch.equal(
            rows[j][(index[0] == b) & (index[1] == t)][0].float(), padded[layer][b, t]
        )


@pytest.mark.parametrize(
    "mixer",
    [
        {},
        {"single_layer": 2},
        {"mode": "scalar_mix", "cutoff": 0.0, "entropy_weight": 0.0},
        {"positional": "learned", "max_positions": 64},
    ],
)
def test_packed_mixer_equals_the_padded_mixer(setup, mixer):
    """The cache's packed path (rows of real tokens only) gives the padded form's features."""
    from adalayers.core.mixer import LayerMixer, MixerConfig

    backbone, ds, root = setup
    store = cache_module.open_or_build(backbone, ds, "train", [0, 1, 2, 3], root=root)
    torch.manual_seed(0)
    layer_mixer = LayerMixer(MixerConfig(dim=8, **mixer), 4, backbone.hidden_size).eval()
    with torch.no_grad():
        layer_mixer.p.copy_(torch.randn_like(layer_mixer.p))
    indices = [3, 9, 1]
    width = max(ds[i]["length"] for i in indices)
    rows, index = store.rows(indices)
    packed = layer_mixer.forward_rows(store.layers, rows, index, (len(indices), width))
    padded = layer_mixer(store.batch(indices, width))
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


def test_batches_read_only_the_states_the_mixer_uses(setup):
    backbone, ds, root = setup
    store = cache_module.open_or_build(backbone, ds, "train", [0, 1, 2, 3], root=root)
    features = [ds[i] for i in (2, 4)]
    full = batches.collate(features, 0, store)
    some = batches.collate(features, 0, store, layers=lambda: [3, 1])
    assert full["state_layers"].tolist() == [0, 1, 2, 3]
    assert some["state_layers"].tolist() == [1, 3]  # store order
    assert torch.equal(some["states"], full["states"][[1, 3]])
    assert torch.equal(some["state_rows"], full["state_rows"])


def test_a_state_that_comes_back_is_read_again(setup):
    """The loader collates one batch ahead; if the mixer weighs a state again that the batch
    lacks (the cutoff had removed it), the batch is read again before the forward."""
    from adalayers.core.task import Task, TaskConfig

    backbone, ds, root = setup
    store = cache_module.open_or_build(backbone, ds, "train", [0, 1, 2, 3], root=root)
    task = Task(
        TaskConfig("sequence_classification", ["a", "b"], mixer={"dim": 8}), backbone.info()
    )
    features = [ds[i] for i in (2, 4, 7)]
    stale = batches.collate(features, 0, store, layers=lambda: [3])  # read with only 3
    fresh = batches.collate(features, 0, store)
    batches.ensure_states(stale, store, task)  # the mixer weighs all four
    assert stale["state_layers"].tolist() == [0, 1, 2, 3]
    assert torch.equal(stale["states"], fresh["states"])
    assert torch.equal(stale["state_rows"], fresh["state_rows"])
    model = TaskModel(backbone, task).eval()
    batch = {k: v for k, v in stale.items() if k not in ("index", "labels")}
    with torch.no_grad():
        assert model(**batch).shape == (3, 2)


def test_cached_batches_carry_the_online_batch_mask_and_labels(setup):
    """The cached loader reads labels and lengths from lists (no token ids): its batches have
    the attention mask, labels and order of the online loader's, and the same batches."""
    from accelerate import Accelerator

    backbone, ds, root = setup
    store = cache_module.open_or_build(backbone, ds, "train", [0, 1, 2, 3], root=root)
    examples = batches.CachedExamples(ds)
    assert len(examples) == len(ds)
    assert examples["length"] == ds["length"][:]
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # as training makes it
    kwargs = {"shuffle": True, "seed": 5}
    online = list(batches.batch_loader(accelerator, ds, 7, 0, **kwargs))
    cached = list(batches.batch_loader(accelerator, examples, 7, 0, store=store, **kwargs))
    assert len(online) == len(cached) > 1
    for a, b in zip(online, cached):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["attention_mask"], b["attention_mask"])
        assert torch.equal(a["labels"], b["labels"])
        assert "input_ids" not in b and b["states"].shape[1] == int(a["attention_mask"].sum())


def test_cache_verify_benchmark_times_both_checks(setup, tmp_path, monkeypatch, benchmark_script):
    """benchmarks/cache_verify.py: the full check reads every file, the later one none."""
    import sys

    module = benchmark_script("cache_verify")
    backbone, ds, root = setup
    store = cache_module.open_or_build(
        backbone, ds, "train", [1, 2], root=root, dtype="int8", chunk_examples=40
    )
    _age_past_the_racy_window()
    monkeypatch.setattr(sys, "argv", ["cache_verify.py", str(root), "--name", "t"])  # cache.dir
    module.main()
    result = json.loads((tmp_path / "results" / "cache_verify-t.json").read_text())
    (shard,) = result["shards"]
    assert shard["shard"] == "train/shard-0-of-1" and shard["examples"] == len(ds)
    assert shard["full_check_read_files"] is True and shard["later_open_read_files"] is False
    assert shard["bytes"] == store.size_bytes() and result["dtype"] == "int8"


# -- integrity of every file of a store (issue 20, defect 5) -----------------------------------
def _shard_of(store):
    return next(store.folder.glob("shard-*"))


def _assert_rebuilt(caplog, name, store, backbone, ds, examples=(0, 1)):
    """A warning named the damaged file, and the store reads the base's states again."""
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(name in w and ("rebuilding" in w or "starting" in w) for w in warnings), warnings
    for index in examples:
        torch.testing.assert_close(
            store.example(index, 2), fresh_states(backbone, ds, index)[2][0], rtol=1e-3, atol=1e-3
        )


@pytest.mark.parametrize("verified_before", [False, True], ids=["verify", "verified-open"])
def test_swapped_index_offsets_are_detected(setup, caplog, verified_before):
    """Swapping two rows' offsets in index.npy made example 0 read example 1's states, and
    passed ``--verify``; also an open that trusts verified.json must see index.npy changed."""
    backbone, ds, root = setup
    store = cache_module.open_or_build(backbone, ds, "train", [2], root=root, chunk_examples=40)
    shard = _shard_of(store)
    if verified_before:
        _age_past_the_racy_window()
        cache_module.open_or_build(backbone, ds, "train", [2], root=root)
        assert (shard / cache_module.VERIFIED).is_file()
    index = np.load(shard / "index.npy")
    index[[0, 1], 1] = index[[1, 0], 1]
    np.save(shard / "index.npy", index)
    with caplog.at_level(logging.WARNING, logger="adalayers"):
        again = cache_module.open_or_build(
            backbone, ds, "train", [2], root=root, verify=not verified_before
        )
    _assert_rebuilt(caplog, "index.npy", again, backbone, ds)


def _interrupted_build(backbone, ds, root, monkeypatch):
    """A build stopped after its first chunk (of three)."""
    real_run = backbone.run
    calls = []

    def stop_in_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(backbone, "run", stop_in_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        cache_module.open_or_build(backbone, ds, "train", [2], root=root, chunk_examples=40)
    monkeypatch.setattr(backbone, "run", real_run)
    return next(root.rglob("shard-0-of-1"))


@pytest.mark.parametrize(
    ("name", "state"),
    [
        ("index.npy", "complete"),
        ("progress.json", "complete"),
        ("COMPLETE", "complete"),
        ("index.npy", "partial"),
        ("progress.json", "partial"),
    ],
)
def test_a_truncated_small_file_is_named_and_rebuilt(setup, caplog, monkeypatch, name, state):
    """A truncated index.npy or progress.json raised a bare numpy / JSON error (no file name,
    no rebuild), in a finished store and in one an interrupted build left to resume."""
    backbone, ds, root = setup
    if state == "complete":
        shard = _shard_of(
            cache_module.open_or_build(backbone, ds, "train", [2], root=root, chunk_examples=40)
        )
    else:
        shard = _interrupted_build(backbone, ds, root, monkeypatch)
    path = shard / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="adalayers"):
        again = cache_module.open_or_build(backbone, ds, "train", [2], root=root)
    _assert_rebuilt(caplog, name, again, backbone, ds)
    assert (shard / "COMPLETE").is_file()


@pytest.mark.parametrize("damage", ["chunk-dropped", "crc-rewritten"])
def test_a_damaged_progress_file_cannot_hide_a_flipped_byte(setup, caplog, damage):
    """progress.json holds the data checksums: dropping the chunk of a flipped data byte, or
    writing the damaged bytes' CRC into it, passed ``--verify``."""
    backbone, ds, root = setup
    store = cache_module.open_or_build(backbone, ds, "train", [2], root=root, chunk_examples=40)
    shard = _shard_of(store)
    data = shard / "layer-2.bin"
    row_bytes = backbone.hidden_size * 2
    raw = bytearray(data.read_bytes())
    raw[row_bytes // 2] ^= 0xFF  # a byte of example 0's first token
    data.write_bytes(bytes(raw))
    progress_path = shard / "progress.json"
    progress = json.loads(progress_path.read_text())
    first = progress["chunks"][0]
    if damage == "chunk-dropped":
        progress["chunks"] = progress["chunks"][1:]
    else:
        first["crc"]["layer-2.bin"] = cache_module._crc(
            data,
            first["row_start"] * row_bytes,
            (first["row_end"] - first["row_start"]) * row_bytes,
        )
    progress_path.write_text(json.dumps(progress))
    with caplog.at_level(logging.WARNING, logger="adalayers"):
        again = cache_module.open_or_build(backbone, ds, "train", [2], root=root, verify=True)
    _assert_rebuilt(caplog, "progress.json", again, backbone, ds)


def test_a_damaged_verified_record_means_reading_every_checksum(setup, caplog, monkeypatch):
    """verified.json only lets an open skip reading: damaged, it is named and every checksum is
    read again (a flipped byte behind it is still found)."""
    backbone, ds, root = setup
    store = cache_module.open_or_build(backbone, ds, "train", [2], root=root, chunk_examples=40)
    shard = _shard_of(store)
    verified = shard / cache_module.VERIFIED
    _age_past_the_racy_window()
    cache_module.open_or_build(backbone, ds, "train", [2], root=root)
    good = verified.read_text()
    reads = _count_checksum_reads(monkeypatch)
    for damaged in (good[: len(good) // 2], '{"files": ["layer-2.bin"]}', "[1, 2]"):
        verified.write_text(damaged)
        reads.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="adalayers"):
            cache_module.open_or_build(backbone, ds, "train", [2], root=root)
        assert "layer-2.bin" in {p.name for p in reads}, damaged
        assert str(verified) in caplog.text, damaged


def test_a_damaged_meta_file_is_named_and_written_again(setup, caplog):
    backbone, ds, root = setup
    store = cache_module.open_or_build(backbone, ds, "train", [2], root=root)
    meta = store.folder.parent / "meta.json"
    good = json.loads(meta.read_text())
    meta.write_text(meta.read_text()[:10])
    with caplog.at_level(logging.WARNING, logger="adalayers"):
        cache_module.open_or_build(backbone, ds, "train", [2], root=root)
    assert str(meta) in caplog.text
    assert json.loads(meta.read_text()) == good


# -- a full disk (issue 20, defect 4) ---------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (needs root and mount rights), unmounted afterwards."""
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    point = tmp_path / "tmpfs"
    point.mkdir()
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _in_a_child(work, *args, **kwargs) -> tuple[int, str]:
    """Run ``work(*args, **kwargs)`` in a forked process (a SIGBUS kills only it, and leaves
    no core): its exit code (negative: the signal) and the message of an ``OSError`` it raised."""
    import multiprocessing
    import resource

    def child(conn):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        torch.set_num_threads(1)  # the parent's thread pool does not survive a fork
        try:
            work(*args, **kwargs)
        except OSError as err:
            conn.send(str(err))
            os._exit(1)
        os._exit(0)

    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=child, args=(send,))
    process.start()
    process.join(timeout=120)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode, receive.recv() if receive.poll() else ""


def test_a_full_disk_fails_with_a_message_and_leaves_nothing(setup, small_tmpfs, monkeypatch):
    """The data fits the free space but index.npy and the files' last blocks do not: the old
    check let the build start, and the sparse memory maps died with SIGBUS (exit 135, no
    message). Now the check counts every block; and when the disk fills after the check (another
    writer), allocating the files fails before any state is computed."""
    import re

    backbone, ds, _ = setup
    layers = [0, 1, 2, 3]
    data = cache_module.estimate_bytes(sum(ds["length"][:]), 4, backbone.hidden_size, "float16")
    page = os.statvfs(small_tmpfs).f_frsize
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_tmpfs).free - -(-data // page) * page))
    assert data <= shutil.disk_usage(small_tmpfs).free < data + page
    root = small_tmpfs / "cache"

    def left():
        return [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")]

    code, message = _in_a_child(
        cache_module.open_or_build, backbone, ds, "train", layers, root=root
    )
    assert code == 1, f"exit code {code}"
    assert message.startswith(f"no space left on tmpfs ({root}"), message
    need, free = map(
        float, re.search(r"needed ([.\d]+) MiB .*, ([.\d]+) MiB free", message).groups()
    )
    assert need > free
    assert left() == []

    real, seen = shutil.disk_usage, []

    def empty_at_the_check(path):  # another writer fills the disk after the check
        seen.append(path)
        usage = real(path)
        return usage._replace(free=usage.total) if len(seen) == 1 else usage

    monkeypatch.setattr(cache_module.shutil, "disk_usage", empty_at_the_check)
    code, message = _in_a_child(
        cache_module.open_or_build, backbone, ds, "train", layers, root=root
    )
    monkeypatch.undo()
    assert code == 1, f"exit code {code}"
    assert message.startswith(f"no space left on tmpfs ({root}"), message
    assert "nothing of it was kept" in message
    assert left() == []  # nothing half-written

    filler.unlink()
    store = cache_module.open_or_build(backbone, ds, "train", layers, root=root)
    torch.testing.assert_close(
        store.example(0, 3), fresh_states(backbone, ds, 0)[3][0], rtol=1e-3, atol=1e-3
    )
    del store  # its memory maps, before the file system is unmounted
