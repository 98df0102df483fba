"""A failed checkpoint save (issue 13, points 1 and 7): no ``.tmp`` files left, ``latest`` not
moved, the previous save still resumable, and one line (``StorageFullError`` naming the path and
the bytes needed) instead of a raw ``OSError`` or "basic_ios::clear".

The manager runs on one process with a stand-in engine whose ``save_checkpoint`` writes a
DeepSpeed-like shard with ``torch.save`` (DeepSpeed's writer), so each failure is placed exactly;
the last case fills a real 1 MiB tmpfs where mounting is permitted.
"""

from __future__ import annotations

import errno
import gc
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.errors import Recon3dError, StorageFullError
from pipeline.train.checkpoint import CheckpointManager, read_checkpoint
from pipeline.train.distributed import DistContext

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


class _Engine:
    """DeepSpeed's save as seen by the manager: one model-state shard per tag."""

    def __init__(self, numel: int = 64, fail: BaseException | None = None) -> None:
        self.module = nn.Linear(numel, 1, bias=False)
        self.fail = fail

    def save_checkpoint(self, directory: str, tag: str, save_latest: bool = False) -> None:
        path = Path(directory) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict()}, path / "mp_rank_00_model_states.pt")
        if self.fail is not None:
            raise self.fail


def _save(manager: CheckpointManager, engine: _Engine, step: int):
    return manager.save(engine, step, {"step": step, "rng": {}}, {"note": "test"})


def _assert_intact(directory: Path, step: int) -> None:
    """``latest`` names ``step``, which is complete and loads; no temporary or partial files."""
    assert (directory / "latest").read_text() == f"step_{step:08d}"
    leftovers = [p for p in directory.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    info = read_checkpoint(directory)
    assert info.step == step
    assert CheckpointManager(directory, CTX).rank_state(info, 0)["step"] == step
    assert sorted(p.name for p in directory.iterdir()) == ["latest", f"step_{step:08d}"]


@pytest.fixture
def saved(tmp_path) -> CheckpointManager:
    manager = CheckpointManager(tmp_path / "checkpoints", CTX)
    _save(manager, _Engine(), 3)
    return manager


def test_enospc_in_deepspeed_save(saved):
    """ENOSPC raised inside DeepSpeed's save: one StorageFullError naming the step folder."""
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(StorageFullError) as info:
        _save(saved, _Engine(fail=full), 6)
    text = str(info.value)
    assert str(saved.directory / "step_00000006") in text and "bytes needed" in text and "\n" not in text
    _assert_intact(saved.directory, 3)


def test_write_failure_from_torch_writer_on_full_disk(saved, monkeypatch):
    """torch's C++ writer failing ("basic_ios::clear", no errno) on a full disk: StorageFullError."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 0))
    with pytest.raises(StorageFullError, match="step_00000006"):
        _save(saved, _Engine(fail=RuntimeError("basic_ios::clear: iostream error")), 6)
    monkeypatch.undo()
    _assert_intact(saved.directory, 3)


def test_other_failure_in_deepspeed_save_is_one_line(saved):
    """A write failure with space left is a one-line Recon3dError; nothing partial stays."""
    with pytest.raises(Recon3dError, match=r"checkpoint save failed writing .*step_00000006: .*file write failed"):
        _save(saved, _Engine(fail=RuntimeError("[enforce fail at inline_container.cc:626] . "
                                               "PytorchStreamWriter failed writing file data/0: file write failed")), 6)
    _assert_intact(saved.directory, 3)


def test_enospc_writing_rank_state(saved, monkeypatch):
    """ENOSPC half-way through a rank file: its .tmp is removed, the error names the rank file."""
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if "recon3d" in str(f):
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(StorageFullError) as info:
        _save(saved, _Engine(), 6)
    assert "recon3d/rank_00000.pt" in str(info.value) and "bytes needed" in str(info.value)
    monkeypatch.undo()
    _assert_intact(saved.directory, 3)


def test_enospc_writing_manifest(saved, monkeypatch):
    """ENOSPC on the manifest's fsync: no .tmp, no manifest, latest stays on the previous save."""
    real_fsync = os.fsync

    def failing_fsync(fd):
        if "manifest.json.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StorageFullError, match="manifest.json"):
        _save(saved, _Engine(), 6)
    monkeypatch.undo()
    _assert_intact(saved.directory, 3)
    _save(saved, _Engine(), 6)  # with space back, the next save works
    assert read_checkpoint(saved.directory).step == 6


def test_full_tmpfs(tmp_path):
    """A real 1 MiB tmpfs: the second, larger save fills it; one line, the first save intact."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount here")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.decode().strip()}")
    try:
        manager = CheckpointManager(mount / "checkpoints", CTX)
        _save(manager, _Engine(), 3)
        with pytest.raises(StorageFullError) as info:
            _save(manager, _Engine(numel=600_000), 6)  # 2.4 MB of weights
        text = str(info.value)
        del info  # its traceback holds torch's failed writer, whose file keeps the mount busy
        assert "step_00000006" in text and "bytes needed" in text and "\n" not in text
        _assert_intact(manager.directory, 3)
    finally:
        gc.collect()
        if subprocess.run(["umount", str(mount)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)
