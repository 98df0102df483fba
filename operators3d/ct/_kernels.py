"""Shared machinery of the CT projectors: block sizes, input checks and the gather kernels.

Every projector here reduces to the same two primitives on a table of row indices and
weights (built per chunk of angles from the geometry, never stored as a matrix):

* **gather–matvec** ``out[r] = Σ_k w[r, k] · src[idx[r, k]]``: ``index_select`` of whole
  contiguous rows (the separable D axis, batch folded in), then one batched matrix–vector
  product (``bmm``) per block of output rows. Used by the parallel-beam forward (rows = rays,
  k = (step, neighbour)) and its gather-form adjoint (rows = voxel columns, k = (angle, ray)).
* **two-stage gather** for geometries in which D is not separable (cone beam, FDK): first a
  weighted pair of rows (in-plane interpolation), then a linear interpolation along the row
  at positions that are affine in the output index (``torch.gather``), summed over steps.
  Its exact transpose scatters with the same tables (``scatter_add_`` along the row, then
  ``index_add_`` of rows).

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


def z_tables(zslope: torch.Tensor, zcoord: torch.Tensor, zoff: float, length: int):
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
        transpose both call this function, so they use identical tables.
    """
    whole = math.floor(zoff)
    shifted = torch.full((), zoff - whole + 1, dtype=zslope.dtype, device=zslope.device)
    pos = torch.addcmul(shifted, zslope[:, :, None], zcoord).clamp_(-whole, length + 1 - whole)
    index = torch.floor(pos)
    frac = pos.sub_(index)
    return index.add_(whole).to(torch.int64), frac


def _expand_channels(index: torch.Tensor, channels: int) -> torch.Tensor:
    index = index[:, :, None, :]
    if channels == 1:
        return index
    return index.expand(index.shape[0], index.shape[1], channels, index.shape[3])


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
    """
    num_r, num_s, _ = row_index.shape
    channels, width = src.shape[1], src.shape[2]
    length = width - 3
    num_m = zcoord.numel()
    flat = src.view(src.shape[0], channels * width)
    per_r = num_s * (channels * (3 * width + 3 * num_m) + 3 * num_m) * src.element_size()
    rows = max(1, min(num_r, block_bytes // max(1, per_r)))
    for r0 in range(0, num_r, rows):
        r1 = min(num_r, r0 + rows)
        m = r1 - r0
        g = flat.index_select(0, row_index[r0:r1].reshape(-1)).view(m, num_s, 2, channels, width)
        w = row_weight[r0:r1, :, :, None, None]
        line = g[:, :, 0] * w[:, :, 0]
        line.addcmul_(g[:, :, 1], w[:, :, 1])  # (m, S, C, P): in-plane interpolation
        index, frac = z_tables(zslope[r0:r1], zcoord, zoff, length)
        index = _expand_channels(index, channels)
        lo = torch.gather(line, 3, index)
        hi = torch.gather(line[..., 1:], 3, index)
        val = lo.lerp_(hi, frac[:, :, None, :])
        if accumulate:
            out[r0:r1] += val.sum(1)
        else:
            torch.sum(val, 1, out=out[r0:r1])


def two_stage_scatter(
    grad: torch.Tensor,
    row_index: torch.Tensor,
    row_weight: torch.Tensor,
    zslope: torch.Tensor,
    zcoord: torch.Tensor,
    zoff: float,
    dst: torch.Tensor,
    *,
    block_bytes: int,
) -> None:
    """The exact transpose of :func:`two_stage_gather`: ``dst += Gᵀ grad`` (same tables).

    Shape:
        ``grad (R, C, M)``; ``dst (rows, C, P)``; the rest as in :func:`two_stage_gather`.
    """
    num_r, num_s, _ = row_index.shape
    channels, width = dst.shape[1], dst.shape[2]
    length = width - 3
    num_m = zcoord.numel()
    flat = dst.view(dst.shape[0], channels * width)
    per_r = num_s * (channels * (4 * width + 3 * num_m) + 3 * num_m) * dst.element_size()
    rows = max(1, min(num_r, block_bytes // max(1, per_r)))
    line = None
    for r0 in range(0, num_r, rows):
        r1 = min(num_r, r0 + rows)
        m = r1 - r0
        index, frac = z_tables(zslope[r0:r1], zcoord, zoff, length)
        index = _expand_channels(index, channels)
        frac = frac[:, :, None, :]
        g = grad[r0:r1, None, :, :]  # (m, 1, C, M)
        hi = g * frac
        lo = g - hi  # (1 − frac) · g
        if line is None or line.shape[0] != m:
            line = torch.empty(m, num_s, channels, width, dtype=dst.dtype, device=dst.device)
        line.zero_()
        line.scatter_add_(3, index, lo)
        line[..., 1:].scatter_add_(3, index, hi)
        w = row_weight[r0:r1, :, :, None, None]
        pair = line[:, :, None] * w  # (m, S, 2, C, P)
        flat.index_add_(0, row_index[r0:r1].reshape(-1), pair.view(m * num_s * 2, channels * width))
