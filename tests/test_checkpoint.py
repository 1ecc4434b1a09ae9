"""Checkpoints: tensors plus JSON that never run code, written whole or not at all."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import StopAfter, write_cola, write_config

from adalayers.cli import main
from adalayers.training import checkpoint as ckpt
from adalayers.training import train as train_module
from adalayers.training.config import load_config


@pytest.fixture(scope="module")
def cola_config(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("cola")
    data = write_cola(root / "data", n_train=40, n_dev=12)
    return load_config(write_config(root / "cfg.yaml", tiny_model_dir("bert")), data_dir=str(data))


@pytest.fixture(scope="module")
def straight(cola_config, tmp_path_factory) -> Path:
    """A run of ``cola_config`` that nothing interrupted."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train_module.fit(cola_config, run, quiet=True)
    return run


def _history(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "history.jsonl").read_text().split("\n") if line]
    for r in records:
        r.pop("seconds")
    return records


class _Exploit:
    """A pickle that runs a shell command when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_state_round_trips_through_tensors_and_json(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max")
    state = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),  # best = -inf
        "rng": ckpt.rng_state(),
        "misc": {"nan": math.nan, "tuple": (1, (2.5, "x")), 7: None},
    }
    ckpt.save_state(tmp_path / "checkpoint", state, {"epoch": 3})
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "state.json",
        "tensors.safetensors",
        "trainer_state.json",
    ]
    for path in (tmp_path / "checkpoint", *(tmp_path / "checkpoint").iterdir()):
        mask = 0o777 if path.is_dir() else 0o666
        assert path.stat().st_mode & 0o777 == mask & ~umask, path
    back, counters = ckpt.load_state(tmp_path / "checkpoint")
    assert counters == {"epoch": 3}
    assert back["scheduler"]["best"] == -math.inf and math.isnan(back["misc"]["nan"])
    assert back["misc"]["tuple"] == (1, (2.5, "x")) and back["misc"][7] is None
    assert list(back["optimizer"]["state"]) == [0, 1]  # int parameter ids stay ints
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values()):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    before = (torch.rand(3), np.random.rand(3), __import__("random").random())
    ckpt.set_rng_state(back["rng"])
    after = (torch.rand(3), np.random.rand(3), __import__("random").random())
    # the saved state was taken before `before` was drawn: restoring it draws `before` again
    torch.testing.assert_close(before[0], after[0])
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]


def test_a_crafted_state_json_is_refused(tmp_path):
    ckpt.save_state(tmp_path / "c", {"w": torch.ones(2)}, {})
    (tmp_path / "c" / "state.json").write_text('{"__dict__": [["w", {"__import__": "os"}]]}')
    with pytest.raises(ckpt.CheckpointError, match=r"state\.json: unexpected entry"):
        ckpt.load_state(tmp_path / "c")
    (tmp_path / "c" / "tensors.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(ckpt.CheckpointError, match=r"tensors\.safetensors cannot be read"):
        ckpt.load_state(tmp_path / "c")


def test_resume_never_runs_code_from_a_checkpoint(straight, tmp_path, capsys):
    """A run folder from someone else: its pickled state.pt is refused, nothing runs."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    folder = run / train_module.CHECKPOINT_DIR
    for name in ("state.json", "tensors.safetensors"):
        (folder / name).unlink()
    marker = tmp_path / "pwned"
    torch.save({"task": _Exploit(marker)}, folder / "state.pt")  # what an attacker would ship
    code = main(["train", "--resume", "--output-dir", str(run), "--quiet"])
    assert code == 2 and not marker.exists()
    err = capsys.readouterr().err
    assert f"{folder / 'state.pt'} holds objects other than tensors" in err and "Delete" in err
    # a plain unpickle of the same file does run it: the test would see an unsafe loader
    torch.load(folder / "state.pt", weights_only=False)
    assert marker.exists()


def test_a_checkpoint_of_the_previous_format_still_resumes(
    cola_config, straight, tmp_path, monkeypatch
):
    """``state.pt`` as earlier versions wrote it (tensors, NumPy RNG state) loads with
    ``weights_only=True`` and resumes to the straight run."""

    @contextmanager
    def stop_after_7_steps():
        yield StopAfter(7)

    with monkeypatch.context() as m:
        m.setattr(train_module, "_stop_on_signals", stop_after_7_steps)
        with pytest.raises(train_module.TrainingInterrupted):
            train_module.fit(cola_config, tmp_path / "cut", quiet=True)
    folder = tmp_path / "cut" / train_module.CHECKPOINT_DIR
    state, _ = ckpt.load_state(folder)
    torch.save(state, folder / "state.pt")  # the old layout: one pickle of the same dict
    for name in ("state.json", "tensors.safetensors"):
        (folder / name).unlink()
    train_module.fit(cola_config, tmp_path / "cut", resume=True, quiet=True)
    assert _history(tmp_path / "cut") == _history(straight)


@contextmanager
def small_tmpfs(path: Path, size: str = "4m"):
    """A tmpfs of ``size`` at ``path``, or a skip where this process cannot mount one."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its file system is full."""
    filler = folder / "filler"
    with filler.open("wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one(
    cola_config, straight, tmp_path, monkeypatch
):
    """The disk fills up as epoch 2's checkpoint is written: a clear error, no temporary folder,
    the epoch-1 checkpoint intact; after freeing space, resume gives each epoch once and the
    straight run's history."""
    with small_tmpfs(tmp_path / "disk") as disk:
        run = disk / "run"
        save = train_module._save_checkpoint
        filler: list[Path] = []

        def fill_then_save(run_, task, optimizer, scheduler, state):
            if state.epoch == 2 and not filler:
                filler.append(_fill(disk))
            return save(run_, task, optimizer, scheduler, state)

        with monkeypatch.context() as m:
            m.setattr(train_module, "_save_checkpoint", fill_then_save)
            with pytest.raises(ckpt.CheckpointError, match="no space left on the device") as err:
                train_module.fit(cola_config, run, quiet=True)
        assert "previous checkpoint" in str(err.value) and "--resume" in str(err.value)
        assert not (run / ".checkpoint.tmp").exists()
        _, counters = ckpt.load_state(run / train_module.CHECKPOINT_DIR)
        assert counters["epoch"] == 1  # the last whole checkpoint
        assert [r["epoch"] for r in _history(run)] == [1, 2]  # written before the failed save
        filler[0].unlink()
        train_module.fit(cola_config, run, resume=True, quiet=True)
        assert _history(run) == _history(straight)
