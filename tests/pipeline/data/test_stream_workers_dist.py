"""Two processes (gloo, FileStore rendezvous): on every rank, reader threads and worker
processes deliver the same shard in the same order, and both resume exactly mid-epoch."""

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

        result = {}
        for worker_type in ("thread", "process"):
            config = SlabStreamConfig(scans=tuple(scans), num_workers=2, worker_type=worker_type, seed=5,
                                      remainder="pad", multiprocessing_context="fork")
            epoch = [(s.meta["position"], s.meta["d_slice"], s.y.sum().item()) for s in SlabStream(config)]
            partial = SlabStream(config)
            head = []
            for sample in partial:
                head.append(sample.meta["position"])
                if len(head) == 3:
                    break
            resumed = SlabStream(config)
            resumed.load_state_dict(partial.state_dict())
            result[worker_type] = {"epoch": epoch, "resume": head + [s.meta["position"] for s in resumed]}
        gathered: list = [None] * WORLD
        dist.all_gather_object(gathered, result)
        if rank == 0:
            torch.save(gathered, os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def test_threads_and_processes_agree_on_every_rank(tmp_path, mri_scan, ct_scan):
    mp.spawn(_worker, args=(str(tmp_path / "store"), [mri_scan, ct_scan], str(tmp_path)), nprocs=WORLD, join=True)
    results = torch.load(tmp_path / "result.pt", weights_only=False)
    positions = []
    for rank in range(WORLD):
        threads, processes = results[rank]["thread"], results[rank]["process"]
        assert threads["epoch"] == processes["epoch"]  # same keys, same order, same values
        rank_positions = [p for p, _, _ in threads["epoch"]]
        assert threads["resume"] == processes["resume"] == rank_positions
        positions += rank_positions
    assert sorted(positions) == list(range(10))  # 9 slabs padded to 10, disjoint across ranks
