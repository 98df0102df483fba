"""The process group as the lower layers see it: this process's rank and the world size.

``pipeline.data`` (the slab stream shards its samples by rank) must not import
``pipeline.train``; it asks here. The set-up of the process group and the collectives of
training are in :mod:`pipeline.train.distributed`.
"""

from __future__ import annotations

__all__ = ["rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
