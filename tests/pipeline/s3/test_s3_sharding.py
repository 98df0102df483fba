"""``--shard-chunks auto`` (the default): an output given as an s3:// URL (moto on 127.0.0.1) is
sharded — one object per shard of several chunks — a local one keeps one file per chunk, and
the values are the same; ``--shard-chunks 0`` turns it off on a URL too."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import zarr

from pipeline.cli import main
from pipeline.data.format import CodecConfig
from pipeline.errors import InputError

SIMULATE = ["simulate", "mri", "--shape", "6", "16", "16", "--coils", "2", "--acceleration", "2",
            "--calibration", "4", "--phantom", "shepp-logan", "--chunk-depth", "1", "--workers", "2",
            "--no-progress"]
PREPROCESS = ["preprocess", "--outputs", "adjoint", "--workers", "2", "--no-progress"]
RECONSTRUCT = ["reconstruct", "--method", "adjoint", "--chunks", "2", "8", "8", "--slab", "4", "--workers", "2",
               "--no-progress"]


def _arrays(target: str, options: dict[str, Any] | None = None) -> dict[str, zarr.Array]:
    group = zarr.open_group(target, mode="r", storage_options=options)
    return {name: a for name, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}


def _sharded(array: zarr.Array) -> bool:
    """Whether the array's stored codecs are zarr's sharding codec (its metadata, as written)."""
    codecs = json.loads(json.dumps(array.metadata.to_dict()["codecs"], default=str))
    return any(c.get("name") == "sharding_indexed" for c in codecs)


def _run(scan: str, out: str, extra: list[str]) -> None:
    assert main([*SIMULATE, "--out", scan, *extra]) == 0
    assert main([*PREPROCESS, scan, *extra]) == 0
    assert main([*RECONSTRUCT, "--scan", scan, "--out", out, *extra]) == 0


def test_s3_outputs_are_sharded_local_ones_not_values_equal(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("RECON3D_STORAGE_OPTIONS", s3.options_json)
    local_scan, local_out = str(tmp_path / "scan.zarr"), str(tmp_path / "out.ome.zarr")
    remote_scan, remote_out = s3.url("scan.zarr"), s3.url("out.ome.zarr")
    _run(local_scan, local_out, [])
    _run(remote_scan, remote_out, [])

    for local, remote, must in ((local_scan, remote_scan, {"measurements", "reference", "coil_maps",
                                                           "derived/adjoint"}),
                                (local_out, remote_out, {"0", "complex"})):
        here, there = _arrays(local), _arrays(remote, s3.options)
        assert sorted(here) == sorted(there) and must <= set(there)
        for name in must:
            assert _sharded(there[name]) and not _sharded(here[name]), name
            np.testing.assert_array_equal(there[name][...], here[name][...], err_msg=name)
    # one object per shard: the 6 slices of 1-slice chunks are one shard per array
    keys = [k for k in s3.keys() if "/measurements/c/" in k]
    assert len(keys) == 1, keys


def test_shard_chunks_zero_keeps_chunks_on_s3(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("RECON3D_STORAGE_OPTIONS", s3.options_json)
    assert main([*SIMULATE, "--out", s3.url("scan.zarr"), "--shard-chunks", "0"]) == 0
    arrays = _arrays(s3.url("scan.zarr"), s3.options)
    assert not any(_sharded(a) for a in arrays.values())
    assert len([k for k in s3.keys() if "/measurements/c/" in k]) == 6


def test_chunks_per_shard():
    auto = CodecConfig()
    assert auto.shard_chunks == "auto" and CodecConfig(shard_chunks="3").shard_chunks == 3
    assert auto.chunks_per_shard(8 << 20, 100, object_store=False) == 0
    assert auto.chunks_per_shard(8 << 20, 100, object_store=True) == 8  # 64 MiB
    assert auto.chunks_per_shard(8 << 20, 5, object_store=True) == 5  # capped by the depth
    assert auto.chunks_per_shard(100 << 20, 5, object_store=True) == 0  # a chunk already ≥ 64 MiB
    assert CodecConfig(shard_chunks=2).chunks_per_shard(1, 9, object_store=False) == 2
    with pytest.raises(InputError, match="shard_chunks"):
        CodecConfig(shard_chunks="many")
