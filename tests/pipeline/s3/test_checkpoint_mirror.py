"""``checkpoint.mirror``: each complete save copied to an s3:// URL (moto on 127.0.0.1), ``latest``
written after the step folder, old copies pruned like ``keep_last``, and a failing store a
warning rather than a lost run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.train.checkpoint import OWN, MANIFEST, CheckpointManager, tag_of
from pipeline.train.distributed import DistContext
from pipeline.train.mirror import CheckpointMirror

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def _fake_save(directory: Path, step: int) -> Path:
    """A complete save's files, as :class:`CheckpointManager` leaves them."""
    path = directory / tag_of(step)
    (path / OWN).mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(bytes([step % 256]) * 1000)
    (path / OWN / "rank_00000.pt").write_bytes(b"rank state")
    (path / OWN / MANIFEST).write_text(json.dumps({"step": step}))
    (directory / "latest").write_text(path.name)
    return path


def test_mirror_copies_each_save_then_latest_and_prunes(s3, tmp_path):
    mirror = CheckpointMirror(s3.url("run-mirror/"), keep_last=2, storage_options=s3.options)
    for step in (10, 20, 30):
        mirror.push(_fake_save(tmp_path, step))
        assert s3.fs.cat_file(f"{s3.name}/run-mirror/latest") == tag_of(step).encode()
    keys = s3.keys()
    assert {k.split("/")[2] for k in keys} == {"latest", tag_of(20), tag_of(30)}
    assert s3.fs.cat_file(f"{s3.name}/run-mirror/{tag_of(30)}/mp_rank_00_model_states.pt") == bytes([30]) * 1000
    assert f"{s3.name}/run-mirror/{tag_of(30)}/{OWN}/{MANIFEST}" in keys


def test_mirror_keeps_the_best_save(s3, tmp_path):
    mirror = CheckpointMirror(s3.url("m"), keep_last=1, storage_options=s3.options)
    mirror.push(_fake_save(tmp_path, 1))
    (tmp_path / "best.json").write_text(json.dumps({"tag": tag_of(1)}))
    mirror.push(_fake_save(tmp_path, 2), best=tag_of(1))
    names = {k.split("/")[2] for k in s3.keys()}
    assert names == {"latest", "best.json", tag_of(1), tag_of(2)}


def test_a_failing_mirror_is_a_warning(s3, tmp_path):
    manager = CheckpointManager(tmp_path, CTX, mirror="s3://no-such-bucket-recon3d/run", storage_options=s3.options)
    warnings: list[str] = []
    assert not manager.push_mirror(_fake_save(tmp_path, 5), warnings.append)
    assert len(warnings) == 1 and "no-such-bucket-recon3d" in warnings[0]
    assert "local checkpoint is complete" in warnings[0]
    good = CheckpointManager(tmp_path, CTX, mirror=s3.url("ok"), storage_options=s3.options)
    assert good.push_mirror(tmp_path / tag_of(5), warnings.append) and len(warnings) == 1
    assert s3.fs.cat_file(f"{s3.name}/ok/latest") == tag_of(5).encode()


def test_only_rank_0_mirrors(tmp_path):
    other = DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), backend=None)
    assert CheckpointManager(tmp_path, other, mirror="memory://x").mirror is None


def test_a_mounted_folder_as_mirror(tmp_path):
    run, backup = tmp_path / "checkpoints", tmp_path / "backup"
    manager = CheckpointManager(run, CTX, keep_last=1, mirror=str(backup))
    for step in (1, 2):
        manager._start_mirror(_fake_save(run, step))
        assert manager.finish_mirror() is True and manager.finish_mirror() is None
    assert (backup / "latest").read_text() == tag_of(2)
    assert sorted(p.name for p in backup.iterdir()) == ["latest", tag_of(2)]
    assert (backup / tag_of(2) / OWN / MANIFEST).is_file()
