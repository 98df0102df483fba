"""Two processes (gloo, FileStore rendezvous): disjoint rank shards that cover the epoch, and an
exact mid-epoch resume on every rank."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _worker(rank: int, store_path: str, scans: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        from pipeline.data import SlabStream, SlabStreamConfig

        config = SlabStreamConfig(scans=tuple(scans), num_workers=1, seed=11, remainder="pad",
                                  multiprocessing_context="fork")
        stream = SlabStream(config)  # rank and world size from torch.distributed
        assert (stream.rank, stream.world_size) == (rank, WORLD)
        epoch = [(s.meta["position"], s.meta["scan_index"], s.meta["d_slice"]) for s in stream]

        # Mid-epoch resume: stop after 2 samples, save, resume in a fresh stream.
        partial = SlabStream(config)
        it = iter(partial)
        head = [next(it).meta["position"] for _ in range(2)]
        state = partial.state_dict()
        resumed = SlabStream(config)
        resumed.load_state_dict(state)
        tail = [s.meta["position"] for s in resumed]

        gathered: list = [None] * WORLD
        dist.all_gather_object(gathered, {"epoch": epoch, "resume": head + tail})
        if rank == 0:
            torch.save(gathered, os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_disjoint_cover_and_resume(tmp_path, mri_scan, ct_scan):
    scans = [mri_scan, ct_scan]
    mp.spawn(_worker, args=(str(tmp_path / "store"), scans, str(tmp_path)), nprocs=WORLD, join=True)
    results = torch.load(tmp_path / "result.pt", weights_only=False)
    epochs = [r["epoch"] for r in results]
    positions = [[p for p, _, _ in e] for e in epochs]
    # 9 slabs, padded to 10: every rank gets 5, positions are disjoint and cover 0..9.
    assert [len(p) for p in positions] == [5, 5]
    assert not set(positions[0]) & set(positions[1])
    assert sorted(positions[0] + positions[1]) == list(range(10))
    slabs = {(s, tuple(d)) for e in epochs for _, s, d in e}
    assert len(slabs) == 9  # every slab of both scans (one repeated as padding)
    for r in range(WORLD):
        assert results[r]["resume"] == positions[r]
