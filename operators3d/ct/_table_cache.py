"""A process-wide, byte-bounded LRU cache of projector tables.

The cone projector's in-plane tables (row indices, weights, D-slopes and ray columns of the
(ray column, plane) pairs that meet the volume, and the two in-plane step-length factors per ray
column) depend only on the in-plane geometry, the angles, the chunk, the dtype and the device;
every D-slab and row window of one volume shares them. Keeping them here rather than on each
operator lets thin slabs reuse the whole's tables, and bounds the memory of all operators
together (``_kernels.CPU_TABLE_CACHE_BYTES`` on CPU, ``CUDA_TABLE_CACHE_BYTES`` per CUDA
device). When full, the least recently used entries of *other* groups (other geometries) go
first; entries of the caller's own group are never evicted for each other, since a projector
sweeps its chunks in a cycle and LRU would then never hit: tables beyond the budget are simply
rebuilt per call, the rest still served. A key names its device, so an operator
moved elsewhere builds (and caches) new tables and the old ones age out.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

import torch

from . import _kernels as K

__all__ = ["cached", "clear", "held_bytes"]

_ENTRIES: "OrderedDict[Hashable, tuple[tuple[torch.Tensor, ...], int, str, Hashable]]" = (
    OrderedDict()
)
_HELD: dict[str, int] = {}


def _nbytes(tables: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tables)


def cached(key: Hashable, group: Hashable, device: torch.device,
           build: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """The tables of ``key`` (built by ``build`` on a miss and kept if they fit, evicting
    other groups' entries if need be)."""
    hit = _ENTRIES.get(key)
    if hit is not None:
        _ENTRIES.move_to_end(key)
        return hit[0]
    tables = build()
    size, where = _nbytes(tables), str(device)
    budget = K.table_cache_bytes_for(torch.device(device))
    others = iter([k for k, v in _ENTRIES.items() if v[2] == where and v[3] != group])
    while _HELD.get(where, 0) + size > budget:
        old = next(others, None)
        if old is None:
            return tables
        _HELD[where] -= _ENTRIES.pop(old)[1]
    _ENTRIES[key] = (tables, size, where, group)
    _HELD[where] = _HELD.get(where, 0) + size
    return tables


def held_bytes(device: torch.device | str | None = None) -> int:
    """Bytes held for ``device`` (all devices if None)."""
    if device is None:
        return sum(_HELD.values())
    return _HELD.get(str(device), 0)


def clear() -> None:
    """Drop every cached table (e.g. to free memory between jobs)."""
    _ENTRIES.clear()
    _HELD.clear()
