"""glibc's allocator, tuned per kind of job (no-ops where the C library is not glibc).

glibc serves a block of at least its *mmap threshold* with a fresh ``mmap`` and unmaps it on
free; the threshold starts at 128 KiB and rises to at most 32 MiB as large blocks are freed.
A 3D feature map of a slab (8×256×256 voxels × 16 channels in float32 is 32 MiB) is above it,
so by default every such tensor costs a fresh mapping whose pages the kernel faults in and
zeroes one by one. Two jobs want opposite things:

* **training** (:func:`keep_freed_memory`) allocates and frees the same tensor sizes every
  step: serving them from the heap and keeping freed pages makes a step cheaper (MC + EI on
  an 8×256×256 8-coil MRI slab, U-Net [16, 32], 1 thread: 2.99–3.31 s against 4.37–5.14 s,
  BENCHMARKS.md issue 5); the process holds its high-water mark, which a training job
  reaches every step anyway;
* **reconstruction** (:func:`return_freed_memory_to_os`) walks slabs of varying size and must
  stay far below the scan size: every large block is returned as soon as it is freed.

Both change process-wide settings, so only job entry points (``recon3d train``,
``recon3d reconstruct --memory lean``) call them, never library code. ``RECON3D_MALLOC=default``
leaves glibc's defaults in place.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

__all__ = ["keep_freed_memory", "return_freed_memory_to_os", "malloc_trim", "heap_for_small_work"]

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
#: glibc's default trim threshold (128 KiB), which a fixed mmap threshold leaves in place.
_GLIBC_TRIM_THRESHOLD = 128 << 10
#: The mmap threshold :func:`return_freed_memory_to_os` set, if it did (``None``: not lean).
_LEAN: list[int | None] = [None]


def _mallopt(*settings: tuple[int, int]) -> bool:
    if os.environ.get("RECON3D_MALLOC", "").lower() == "default":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return all(bool(libc.mallopt(param, int(value))) for param, value in settings)
    except (OSError, AttributeError):
        return False


def keep_freed_memory(mmap_threshold: int = 1 << 30, top_pad: int = 64 << 20) -> bool:
    """Serve blocks below ``mmap_threshold`` (1 GiB) from the heap and keep freed pages
    (trim threshold 2 GiB − 1, the largest glibc takes): for training steps. Returns whether
    glibc took the settings."""
    return _mallopt((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, (1 << 31) - 1),
                    (_M_TOP_PAD, top_pad))


def return_freed_memory_to_os(threshold: int = 1 << 20) -> bool:
    """Serve blocks of ``threshold`` bytes or more by ``mmap`` and unmap them on free.

    glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which
    slab-sized tensors come from heap arenas that keep their pages when the tensors are freed:
    a job that allocates and frees slabs of varying size then holds hundreds of MiB it does not
    use. Fixing the threshold returns every large freed block at once, at the price of page
    faults on every fresh block (benchmarks/reconstruct.py, 4.25 GiB MRI scan, U-Net: peak 264
    instead of 408 MiB over idle, 169 instead of 130 s). Returns whether it could be set.
    """
    ok = _mallopt((_M_MMAP_THRESHOLD, threshold))
    if ok:
        _LEAN[0] = int(threshold)
    return ok


@contextmanager
def heap_for_small_work(threshold: int = 1 << 30) -> Iterator[None]:
    """Within a lean job, serve blocks below ``threshold`` from the heap for a while, then
    return to the lean setting and trim.

    For work whose tensors are small but allocated thousands of times (the parameter
    calibration of ``recon3d reconstruct``: iterative solvers on a few slices), where fresh
    mappings cost as much system time as the arithmetic (TV on CT: 59 of 111 s). A no-op
    outside a lean job.
    """
    lean = _LEAN[0]
    if lean is None or not _mallopt((_M_MMAP_THRESHOLD, threshold), (_M_TRIM_THRESHOLD, threshold)):
        yield
        return
    try:
        yield
    finally:
        _mallopt((_M_MMAP_THRESHOLD, lean), (_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD))
        malloc_trim()


def malloc_trim() -> None:
    """Hand freed heap pages back to the OS now (glibc's ``malloc_trim(0)``)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
