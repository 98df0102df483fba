"""Shared machinery of the CT projectors: block sizes, input checks and the gather kernels.

Every projector here reduces to the same two primitives on a table of row indices and
weights (built per chunk of angles from the geometry, never stored as a matrix):

* **gather–matvec** ``out[r] = Σ_k w[r, k] · src[idx[r, k]]``: ``index_select`` of whole
  contiguous rows (the separable D axis, batch folded in), then one batched matrix–vector
  product (``bmm``) per block of output rows. Used by the parallel-beam forward (rows = rays,
  k = (step, neighbour)) and its gather-form adjoint (rows = voxel columns, k = (angle, ray)).
* **two-stage gather** for geometries in which D is not separable (cone beam, FDK): first a
  weighted pair of rows (in-plane interpolation), then a linear interpolation along the row
  at positions that are affine in the output index (both neighbours fetched by 1-D
  ``index_select`` from the flat lines), summed over steps. FDK's backprojection uses this
  rectangular kernel; the cone projector runs the same scheme, and its exact transpose
  (``scatter_add_`` along the row, then ``index_add_`` of rows), over compact (ray column,
  plane) pairs (:mod:`._cone_kernels`).

Work is cut in blocks of about ``block_bytes`` of gathered data, reusing one buffer, so a
call's temporaries stay a fixed, small size whatever the volume: fresh multi-megabyte
allocations cost page faults comparable to the arithmetic itself.
"""

from __future__ import annotations

import math

import torch

#: Bytes of gathered rows per block, and of index/weight tables per chunk of angles.
CPU_BLOCK_BYTES = 2 << 20
CPU_TABLE_BYTES = 16 << 20
CUDA_BLOCK_BYTES = 256 << 20
CUDA_TABLE_BYTES = 512 << 20
#: Cone blocks on CPU: each torch call of a cone block does less work than a parallel one, so
#: 2 MiB blocks are bound by per-call overhead (2/8/32 MiB measured at 128³: 8 was fastest).
CPU_CONE_BLOCK_BYTES = 8 << 20
#: Bytes of cached cone tables per device kind, all operators together (_table_cache.py).
CPU_TABLE_CACHE_BYTES = 256 << 20
CUDA_TABLE_CACHE_BYTES = 2 << 30

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def block_bytes_for(device: torch.device, given: int | None) -> int:
    if given is not None:
        return max(1, int(given))
    return CUDA_BLOCK_BYTES if device.type == "cuda" else CPU_BLOCK_BYTES


def table_bytes_for(device: torch.device, given: int | None) -> int:
    if given is not None:
        return max(1, int(given))
    return CUDA_TABLE_BYTES if device.type == "cuda" else CPU_TABLE_BYTES


def cone_block_bytes_for(device: torch.device, given: int | None) -> int:
    """``given`` if set, else the cone's CPU block (:data:`CPU_CONE_BLOCK_BYTES`) or the CUDA
    default."""
    if given is None and device.type != "cuda":
        return CPU_CONE_BLOCK_BYTES
    return block_bytes_for(device, given)


def table_cache_bytes_for(device: torch.device) -> int:
    """Budget of :mod:`._table_cache` for one device."""
    return CUDA_TABLE_CACHE_BYTES if device.type == "cuda" else CPU_TABLE_CACHE_BYTES


def check_dtype(x: torch.Tensor, where: str) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where}: expected float32 or float64, got dtype {x.dtype}")


def index_dtype(num_rows: int) -> torch.dtype:
    return torch.int32 if num_rows < 2**31 - 1 else torch.int64


def gather_matvec(
    src: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    *,
    block_bytes: int,
    accumulate: bool,
    buffer: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``out[r] (+)= weight[r] @ src[index[r]]`` in blocks of rows.

    Shape:
        ``src (S, k, C)``: each index fetches ``k`` rows of ``C`` at once (a strided window
        over contiguous rows, e.g. both interpolation neighbours); ``index (R, n)``;
        ``weight (R, 1, n·k)``; ``out (R, 1, C)`` contiguous. Returns the gather buffer.

    Math:
        ``out[r, c] = Σ_{i,j} weight[r, 0, i·k + j] · src[index[r, i], j, c]``.
    """
    num_rows, n = index.shape
    n = n * src.shape[1]
    channels = src.shape[2]
    per_row = max(1, n * channels * src.element_size())
    rows = max(1, min(num_rows, block_bytes // per_row))
    need = rows * n * channels
    if buffer is None or buffer.numel() < need or buffer.dtype != src.dtype:
        buffer = torch.empty(need, dtype=src.dtype, device=src.device)
    for r0 in range(0, num_rows, rows):
        r1 = min(num_rows, r0 + rows)
        m = r1 - r0
        gathered = buffer[: m * n * channels].view(m * index.shape[1], src.shape[1], channels)
        torch.index_select(src, 0, index[r0:r1].reshape(-1), out=gathered)
        gathered = gathered.view(m, n, channels)
        if accumulate:
            out[r0:r1].baddbmm_(weight[r0:r1], gathered)
        else:
            torch.bmm(weight[r0:r1], gathered, out=out[r0:r1])
    return buffer


def z_tables(zslope: torch.Tensor, zcoord: torch.Tensor, zoff: float, length: int,
             index_dtype: torch.dtype = torch.int64):
    """Linear interpolation along a padded row at ``pos = zslope · zcoord + zoff``.

    The row holds ``length`` values at indices ``1..length`` of a padded row of
    ``length + 3`` entries (zeros at ``0``, ``length + 1``, ``length + 2``); positions are
    clamped to ``[−1, length]``, which only moves samples that fall on zeros anyway.

    ``zoff`` is split into a whole part and a fraction in ``[0, 1)``: the position is rounded
    as ``zslope · zcoord + fraction`` and the whole part is added to the index afterwards. A
    slab (or detector window) whose ``zoff`` differs from its parent's by a whole number of
    slices therefore gets bitwise the same interpolation weights as the parent, so projections
    of slabs sum to the projection of the whole up to the order of additions.

    Shape:
        ``zslope (R, S)``, ``zcoord (M,)`` → ``index, frac`` of shape ``(R, S, M)``:
        ``value = (1 − frac) · row[index] + frac · row[index + 1]``. The forward and its
        transpose both call this function, so they use identical tables. ``index`` has
        ``index_dtype`` (int32 converts several times faster than int64 on CPU).
    """
    whole = math.floor(zoff)
    shifted = torch.full((), zoff - whole + 1, dtype=zslope.dtype, device=zslope.device)
    pos = torch.mul(zslope[:, :, None], zcoord).add_(shifted).clamp_(-whole, length + 1 - whole)
    index = torch.floor(pos)
    frac = pos.sub_(index)
    return index.to(index_dtype).add_(whole), frac


def _flat_base(m: int, num_s: int, channels: int, width: int, device) -> torch.Tensor:
    """``(m, S, C, 1)`` offsets of each (ray, step, channel) line in a flat ``(m, S, C, P)``."""
    dtype = torch.int32 if m * num_s * channels * width < 2**31 - 2 else torch.int64
    base = torch.arange(m * num_s * channels, device=device, dtype=dtype) * width
    return base.view(m, num_s, channels, 1)


def _cone_rows(num_r: int, num_s: int, channels: int, width: int, num_m: int,
               itemsize: int, block_bytes: int) -> int:
    per_r = num_s * channels * (3 * width + 4 * num_m) * itemsize + num_s * num_m * 12
    return max(1, min(num_r, block_bytes // max(1, per_r)))


def two_stage_gather(
    src: torch.Tensor,
    row_index: torch.Tensor,
    row_weight: torch.Tensor,
    zslope: torch.Tensor,
    zcoord: torch.Tensor,
    zoff: float,
    out: torch.Tensor,
    *,
    block_bytes: int,
    accumulate: bool,
) -> None:
    """In-plane pair interpolation, then linear interpolation along the row, summed over steps.

    Shape:
        ``src (rows, C, P)`` padded rows (see :func:`z_tables`, ``P = length + 3``);
        ``row_index, row_weight (R, S, 2)``; ``zslope (R, S)``; ``zcoord (M,)``;
        ``out (R, C, M)``.

    Math:
        ``out[r, c, m] (+)= Σ_s Σ_k w[r, s, k] · interp(src[idx[r, s, k], c], pos[r, s, m])``,
        ``pos = zslope[r, s] · zcoord[m] + zoff`` (linear interpolation, zero outside).

    Kernel: the interpolated lines of a block are laid out flat ``(m, S, C, P)`` and both
    neighbours of every sample are fetched by 1-D ``index_select`` (one flat index, the upper
    neighbour from the same buffer shifted by one entry): no index expansion over channels
    and no int64 conversion (1-D gathers accept int32 indices), both costly on CPU.
    """
    num_r, num_s, _ = row_index.shape
    channels, width = src.shape[1], src.shape[2]
    length = width - 3
    num_m = zcoord.numel()
    flat = src.view(src.shape[0], channels * width)
    rows = _cone_rows(num_r, num_s, channels, width, num_m, src.element_size(), block_bytes)
    base = g = line = None
    for r0 in range(0, num_r, rows):
        r1 = min(num_r, r0 + rows)
        m = r1 - r0
        if base is None or base.shape[0] != m:
            base = _flat_base(m, num_s, channels, width, src.device)
            g = torch.empty(m * num_s * 2, channels * width, dtype=src.dtype, device=src.device)
            line = torch.empty(m, num_s, channels, width, dtype=src.dtype, device=src.device)
        torch.index_select(flat, 0, row_index[r0:r1].reshape(-1), out=g)
        gv = g.view(m, num_s, 2, channels, width)
        w = row_weight[r0:r1, :, :, None, None]
        torch.mul(gv[:, :, 0], w[:, :, 0], out=line)
        line.addcmul_(gv[:, :, 1], w[:, :, 1])  # (m, S, C, P): in-plane interpolation
        index, frac = z_tables(zslope[r0:r1], zcoord, zoff, length, base.dtype)
        fi = (index[:, :, None, :] + base).view(-1)  # (m, S, C, M) flat
        lf = line.view(-1)
        lo = lf.index_select(0, fi)
        hi = lf[1:].index_select(0, fi)
        val = lo.lerp_(hi, frac[:, :, None, :].expand(m, num_s, channels, num_m).reshape(-1))
        val = val.view(m, num_s, channels, num_m)
        if accumulate:
            out[r0:r1] += val.sum(1)
        else:
            torch.sum(val, 1, out=out[r0:r1])
