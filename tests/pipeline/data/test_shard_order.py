"""The slab stream's ``shard_local`` order (issue 17.1): each rank takes a stored object's slabs one
after another, the order is a pure function of the seed and epoch, every slab comes once per
epoch on disjoint ranks, a resumed stream continues it exactly, and the whole-shard reads behind
it give the values of plain reads, each shard read once."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import CodecConfig, SlabStream, SlabStreamConfig, open_scan
from pipeline.data._objectstore import ShardCache
from pipeline.data.format import CorruptChunkError
from pipeline.data.sampler import _interleave_blocks

from scan_factories import make_ct, make_mri

# MRI: D 10 in chunks of 1, shards of 3 (3, 3, 3, 1 slabs); CT: D 8, shards of 4 (4, 4): 18 slabs
# in 6 stored objects.
MRI_SHARD, CT_SHARD = 3, 4


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("sharded")
    mri, ct = root / "mri.zarr", root / "ct.zarr"
    make_mri(mri, chunk_depth=1, codec=CodecConfig(shard_chunks=MRI_SHARD))
    make_ct(ct, chunk_depth=1, codec=CodecConfig(shard_chunks=CT_SHARD))
    return str(mri), str(ct)


def _config(scans, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("order", "shard_local")
    return SlabStreamConfig(scans=tuple(scans), **kw)


def _shard(key) -> tuple[int, int]:
    return key.scan, key.d0 // (MRI_SHARD if key.scan == 0 else CT_SHARD)


def _runs(keys) -> list[tuple[int, int]]:
    """The stored objects of ``keys`` in order, consecutive repeats merged."""
    return [shard for shard, _ in itertools.groupby(_shard(k) for k in keys)]


def test_interleaved_blocks_deal_each_rank_its_block():
    seq = list(range(11))
    for w in (1, 2, 3, 4):
        laid = _interleave_blocks(seq, w)
        blocks = [laid[r::w] for r in range(w)]
        assert [x for b in blocks for x in b] == seq  # consecutive blocks, in order
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_auto_keeps_local_scans_in_the_shuffled_order(sharded):
    auto = SlabStream(_config(sharded, order="auto", seed=3))
    shuffle = SlabStream(_config(sharded, order="shuffle", seed=3))
    assert auto.sampler.order == "shuffle" and auto.keys() == shuffle.keys()
    assert auto.dataset.shards is None
    assert len(_runs(shuffle.keys())) > 6  # shuffled slabs jump between stored objects
    with pytest.raises(ValueError, match="needs mode 'measurements'"):
        _config(sharded, mode="image", crop_shape=(1, 4, 4))


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("remainder", ["pad", "drop", "uneven"])
def test_ranks_take_stored_objects_one_after_another(sharded, world_size, remainder):
    streams = [SlabStream(_config(sharded, seed=5, remainder=remainder), rank=r, world_size=world_size)
               for r in range(world_size)]
    keys = [s.keys() for s in streams]
    base = {(k.scan, k.d0) for k in streams[0].base}
    for ks in keys:
        runs = _runs(ks)
        if remainder != "pad" or ks is not keys[-1]:  # padding repeats the first slabs at the end
            assert len(runs) == len(set(runs)), f"a rank came back to a stored object: {runs}"
        else:
            assert len(set(runs)) >= len(runs) - 1
    # Ranks are disjoint and cover the epoch as the remainder says.
    positions = [k.position for ks in keys for k in ks]
    assert len(positions) == len(set(positions))
    slabs = [(k.scan, k.d0) for ks in keys for k in ks]
    if remainder == "uneven":
        assert sorted(slabs) == sorted(base)
    elif remainder == "drop":
        assert len(slabs) == len(set(slabs)) == 18 - 18 % world_size
    else:
        assert set(slabs) == base and len({len(ks) for ks in keys}) == 1
    # Whole stored objects: at most world_size - 1 of them are split between two ranks.
    shards_per_rank = [set(_runs(ks)) for ks in keys]
    split = sum(len(a & b) for a, b in itertools.combinations(shards_per_rank, 2))
    assert split <= world_size - 1 + (remainder == "pad")


def test_order_is_a_pure_function_of_seed_and_epoch(sharded):
    a, b = SlabStream(_config(sharded, seed=1)), SlabStream(_config(sharded, seed=1))
    assert a.keys() == b.keys()
    first = [(k.scan, k.d0) for k in a.keys()]
    assert sorted(first) == sorted((k.scan, k.d0) for k in a.base)
    assert first != [(k.scan, k.d0) for k in SlabStream(_config(sharded, seed=2)).keys()]
    a.set_epoch(1)
    again = [(k.scan, k.d0) for k in a.keys()]
    assert again != first and len(_runs(a.keys())) == 6
    # shuffle=False: the stored order, object by object
    plain = SlabStream(_config(sharded, shuffle=False)).keys()
    assert [(k.scan, k.d0) for k in plain][:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]


def test_mid_epoch_resume_yields_exactly_the_rest(sharded):
    config = _config(sharded, num_workers=2, prefetch_factor=2, seed=7)
    full = list(SlabStream(config))
    stream = SlabStream(config)
    assert stream.dataset.shards is not None
    seen = []
    for sample in stream:
        seen.append(sample)
        if len(seen) == 5:
            break  # mid-object: the readers have read ahead into it
    state = stream.state_dict()
    resumed = SlabStream(config)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [s.meta["position"] for s in seen + rest] == [s.meta["position"] for s in full]
    for a, b in zip(seen + rest, full):
        assert a.meta["d_slice"] == b.meta["d_slice"] and torch.equal(a.y, b.y)
    # states of the shuffled order (or from before ``order`` existed) do not load here
    shuffled = SlabStream(_config(sharded, order="shuffle", seed=7))
    with pytest.raises(ValueError, match="shard_local"):
        shuffled.load_state_dict(state)


def test_resume_at_another_world_size_covers_the_rest_once(sharded):
    config = _config(sharded, remainder="uneven", seed=9)
    ranks = [SlabStream(config, rank=r, world_size=2) for r in range(2)]
    done = []
    for stream in ranks:
        it = iter(stream)
        done += [(s.meta["scan_index"], s.meta["d_slice"][0]) for s in itertools.islice(it, 3)]
    state = ranks[0].state_dict()
    rest = []
    for r in range(3):
        stream = SlabStream(config, rank=r, world_size=3)
        stream.load_state_dict(state)
        rest += [(k.scan, k.d0) for k in stream.keys()]
        assert stream.state_dict()["order_world_size"] == 2
    assert sorted(done + rest) == sorted((k.scan, k.d0) for k in ranks[0].base)
    # the next epoch is laid out for the new world size, stored object by stored object again
    stream.set_epoch(1)
    assert stream.state_dict()["order_world_size"] == 3
    assert len(_runs(stream.keys())) == len(set(_runs(stream.keys())))


def test_shard_reads_give_plain_values_reading_each_shard_once(sharded, monkeypatch):
    from pipeline.data.scan import ScanArray

    whole = []
    plain_read = ScanArray.read

    def counted(self, d_slice=None, *, check_finite=True):
        if self.d_axis is not None and d_slice is not None and d_slice.stop - d_slice.start > 1:
            whole.append((self.scan, self.name, d_slice.start))
        return plain_read(self, d_slice, check_finite=check_finite)

    monkeypatch.setattr(ScanArray, "read", counted)
    samples = list(SlabStream(_config(sharded, num_workers=2, seed=11, include_reference=True)))
    assert len(samples) == 18
    # every multi-slice read is a whole shard, each once per array: MRI 3 shards of 3 (the
    # fourth is 1 slice, read as it is) × measurements, coil maps, reference; CT 2 × 2 arrays
    assert len(whole) == len(set(whole)) == 3 * 3 + 2 * 2
    monkeypatch.setattr(ScanArray, "read", plain_read)
    mri, ct = (open_scan(p) for p in sharded)
    for s in samples:
        scan = mri if s.meta["scan_index"] == 0 else ct
        d = slice(*s.meta["d_slice"])
        np.testing.assert_array_equal(s.y.numpy(), scan.measurements.read(d))
        np.testing.assert_array_equal(s.meta["reference"].numpy(), scan.reference.read(d))
        if scan is mri:
            y, op = scan.slab(d)
            assert torch.equal(s.op.coil_maps, op.coil_maps) and torch.equal(s.op.mask, op.mask)


def test_the_cache_holds_at_most_two_shards_per_array(sharded):
    arr = open_scan(sharded[1]).measurements  # CT: shards D 0:4, 4:8
    cache = ShardCache(shards_per_array=2)
    expected = arr.read()
    for d in (0, 1, 5, 2, 6, 3):
        np.testing.assert_array_equal(cache.read(arr, "ct", d, d + 1, check_finite=True), expected[d : d + 1])
    assert cache.held() == 2
    one = ShardCache(shards_per_array=1)
    one.read(arr, "ct", 0, 1, check_finite=True)
    one.read(arr, "ct", 4, 5, check_finite=True)
    assert one.held() == 1


def test_a_corrupt_chunk_fails_only_its_own_slab(sharded, tmp_path):
    import shutil

    path = tmp_path / "ct.zarr"
    shutil.copytree(sharded[1], path)
    shard_file = Path(path) / "measurements" / "c" / "0" / "0" / "0"  # D 0:4
    data = bytearray(shard_file.read_bytes())
    # the shard index at its end: (offset, nbytes) per chunk, little-endian, then a CRC32C
    offset, nbytes = struct.unpack_from("<QQ", data, len(data) - 4 - 16 * CT_SHARD + 16 * 2)  # chunk 2
    data[offset + nbytes // 2] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    stream = SlabStream(_config((str(path),), num_workers=0, shuffle=False))
    it = iter(stream)
    assert [next(it).meta["d_slice"] for _ in range(2)] == [(0, 1), (1, 2)]  # the shard's other slabs read
    with pytest.raises(CorruptChunkError, match=r"chunk \(2, 0, 0\) \(D 2:3\)"):
        next(it)


def test_a_prefetched_shard_is_read_once(sharded, monkeypatch):
    from pipeline.data.scan import ScanArray

    arr = open_scan(sharded[1]).measurements
    reads = []
    plain_read = ScanArray.read

    def counted(self, d_slice=None, *, check_finite=True):
        reads.append((d_slice.start, d_slice.stop))
        return plain_read(self, d_slice, check_finite=check_finite)

    monkeypatch.setattr(ScanArray, "read", counted)
    cache = ShardCache(shards_per_array=2)
    cache.prefetch(arr, "ct", 5, 6, check_finite=True)
    cache.prefetch(arr, "ct", 6, 7, check_finite=True)  # held (being read): nothing more
    values = [cache.read(arr, "ct", d, d + 1, check_finite=True) for d in (4, 5, 6, 7)]
    assert reads == [(4, 8)]
    np.testing.assert_array_equal(np.concatenate(values, axis=0), plain_read(arr, slice(4, 8)))


def test_shards_are_dropped_once_their_slabs_are_read(sharded):
    stream = SlabStream(_config(sharded, num_workers=2, prefetch_factor=4, seed=13))
    held = []
    for _ in stream:
        held.append(stream.dataset.shards.held())
    # one shard per reader thread and one fetched ahead, of each array (MRI: 2, CT: 1)
    assert max(held) <= 3 * 2
    assert stream.dataset.shards.held() == 0
