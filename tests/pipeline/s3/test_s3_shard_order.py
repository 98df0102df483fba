"""The slab stream over a sharded scan on s3:// (moto on 127.0.0.1): ``order: auto`` is
shard-local there, and an epoch costs one GET per stored object (shard) of each array it reads,
not one per slab; the samples are those of the shuffled order's plain reads."""

from __future__ import annotations

import pytest
import torch

from pipeline.data import SlabStream, SlabStreamConfig

# D 12 in chunks of 1, 4 chunks per shard: 12 slabs in 3 shards per array.
SIMULATE = ["simulate", "mri", "--shape", "12", "16", "16", "--coils", "2", "--acceleration", "2",
            "--calibration", "4", "--phantom", "shepp-logan", "--chunk-depth", "1", "--shard-chunks", "4",
            "--workers", "1", "--no-progress"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_gets_each_shard_once(s3, scan_url, requests, num_workers):
    config = SlabStreamConfig(scans=(scan_url,), storage_options=s3.options, num_workers=num_workers, seed=3)
    stream = SlabStream(config)
    assert stream.sampler.order == "shard_local"
    requests.lines.clear()
    samples = list(stream)
    assert len(samples) == 12
    # 3 shards of 4 slabs: each fetched whole (200), once, for each array the slab reads
    assert requests.gets("measurements") == [200] * 3
    assert requests.gets("coil_maps") == [200] * 3
    # the same slabs in the shuffled order read slab by slab: ranges (206) of the shards
    shuffled = SlabStream(config.model_copy(update={"order": "shuffle"}))
    requests.lines.clear()
    reference = {s.meta["d_slice"]: s for s in shuffled}
    assert len(requests.gets("measurements")) >= 12 and 200 not in requests.gets("measurements")
    assert sorted(reference) == sorted(s.meta["d_slice"] for s in samples)
    for s in samples:
        r = reference[s.meta["d_slice"]]
        assert torch.equal(s.y, r.y) and torch.equal(s.op.coil_maps, r.op.coil_maps)


def test_two_ranks_get_each_shard_at_most_once_each(s3, scan_url, requests):
    config = SlabStreamConfig(scans=(scan_url,), storage_options=s3.options, num_workers=2, seed=4,
                              remainder="uneven")
    requests.lines.clear()
    slabs = []
    for rank in range(2):
        slabs += [s.meta["d_slice"] for s in SlabStream(config, rank=rank, world_size=2)]
    assert sorted(slabs) == [(d, d + 1) for d in range(12)]
    # each rank's 6 slabs lie in 2 shards (one shared at the blocks' edge): 4 whole GETs
    gets = requests.gets("measurements")
    assert gets == [200] * 4
