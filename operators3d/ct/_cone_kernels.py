"""Cone-beam kernels over compact (ray column, plane) pairs: the forward and its exact transpose.

A cone ray column (one angle, one detector column) crosses the in-plane grid at ``S`` planes,
but only an interval of them meets the volume (about two thirds of ``A·U·S`` in the 128³
benchmark: the square's corners and the detector's edges miss it); the rest have two zero
weights. The cone projector's cached tables (:meth:`~operators3d.ct.ConeBeamCT._ray_tables`)
therefore keep only the *pairs* ``q = (ray column r, plane s)`` that meet the volume, sorted
by D-slope (see *Row windows* below):

* ``row_index, row_weight (Q, 2)``: the two D-rows the ray column crosses in plane ``s`` and
  their in-plane (Joseph) weights;
* ``zslope (Q,)``: D-position per unit of detector height at that plane;
* ``ray (Q,)``: the ray column ``r`` of each pair.

Forward (:func:`pair_gather`), per block of pairs: ``index_select`` of both D-rows of every
pair (whole contiguous rows), their in-plane interpolation into a line ``(C, P)``, then, for
the ``M`` detector rows, both D-neighbours of each row's position fetched by 1-D
``index_select`` from the flat lines (the upper one from the same buffer shifted by one entry;
int32 indices, no expansion over channels), ``lerp``, and an ``index_add_`` of whole
``(C, M)`` rows into the pair's ray column, which sums the planes.

Adjoint (:func:`pair_scatter`), the exact transpose with the same tables: ``index_select`` of
the ray columns' ``(C, M)`` rows, the two shares ``(1 − frac)·g`` and ``frac·g`` scattered into
a line with 1-D ``scatter_add_``, and the line, weighted, added into both D-rows
(``index_add_`` of whole rows). D-positions and fractions come from
the same arithmetic in both directions (:func:`_positions`), so the entries agree.

Row windows: a pair's detector rows reach the data (D-positions in ``(−1, length)``) only in
an interval of rows (:func:`row_windows`, exact bounds from the affine heights, one row of
margin); a block computes only the union of its pairs' intervals. The pairs are sorted by
slope, so a block's intervals nearly coincide: a whole volume skips the rows that pass above
or below it at the far planes, a thin D-slab computes a few rows per pair instead of all the
rows its shadow covers. Skipped rows only ever met zero pads, so the result does not change.

Everything is plain torch (no device-specific code); blocks reuse their buffers (fresh
multi-megabyte temporaries cost page faults comparable to the arithmetic) and are kept to
about ``block_bytes`` so that the per-sample passes stay in cache on CPU. These are the CUDA
kernels and the CPU fallback: on CPU the projector uses by default the compiled kernels of
:mod:`~operators3d.ct._cone_native` (same tables, same position arithmetic), which the tests
compare with these.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pair_gather", "pair_scatter", "pair_block"]


def pair_block(num_q: int, channels: int, width: int, num_m: int, itemsize: int,
               block_bytes: int) -> int:
    """Pairs per block: gathered rows, the line and the per-sample temporaries."""
    per_q = channels * (4 * width + 6 * num_m) * itemsize + num_m * 16
    return max(1, min(num_q, block_bytes // max(1, per_q)))


#: Compute each block of pairs only over the detector rows its pairs can reach (the tables
#: are sorted by D-slope, so the pairs of a block reach nearly the same rows); False computes
#: every row (the tests compare both).
ROW_WINDOWS = True


def row_windows(zslope: torch.Tensor, zcoord: torch.Tensor, zoff: float, length: int):
    """Per pair, the detector rows ``[start, stop)`` whose D-position can touch data.

    Rows ``v`` with ``zslope · zcoord[v] + zoff`` outside ``(−1, length)`` interpolate only
    zero pads, so skipping them changes nothing; the window is widened by a row each side
    against rounding (``zcoord`` is affine in ``v``). Returns ``None`` when windows do not
    apply (:data:`ROW_WINDOWS` off, fewer than 2 rows, or a non-positive slope): then every
    row is computed.

    Shape:
        ``zslope (Q,)``, ``zcoord (M,)`` → ``start, stop (Q,)`` int64.
    """
    num_m = zcoord.numel()
    if not ROW_WINDOWS or num_m < 2 or zslope.numel() == 0 or not bool((zslope > 0).all()):
        return None
    z0, dz = float(zcoord[0]), float(zcoord[-1] - zcoord[0]) / (num_m - 1)
    if not dz > 0:
        return None
    inv = 1 / zslope.to(torch.float64)
    lo = torch.floor(((-1 - zoff) * inv - z0) / dz) - 1
    hi = torch.ceil(((length - zoff) * inv - z0) / dz) + 2
    return lo.clamp(0, num_m).to(torch.int64), hi.clamp(0, num_m).to(torch.int64)


def _block_rows(windows, q0: int, q1: int, num_m: int) -> tuple[int, int]:
    """The rows ``[v0, v1)`` that some pair of the block can reach (every row without
    windows; ``v1 ≤ v0`` when none)."""
    if windows is None:
        return 0, num_m
    start, stop = windows
    return int(start[q0:q1].min()), int(stop[q0:q1].max())


def _blocks(windows, num_q: int, q_step: int, num_m: int):
    """``(q0, q1, v0, v1)`` of each block of ``q_step`` pairs that reaches some row."""
    for q0 in range(0, num_q, q_step):
        q1 = min(num_q, q0 + q_step)
        v0, v1 = _block_rows(windows, q0, q1, num_m)
        if v1 > v0:
            yield q0, q1, v0, v1


def _index_dtype(count: int) -> torch.dtype:
    return torch.int32 if count < 2**31 - 2 else torch.int64


class _Buffers:
    """Per-call scratch for :func:`_positions` (reused by every block: no page faults).

    ``size`` samples of one channel, ``flat`` samples of all channels; indices are computed in
    ``index_dtype`` (int32 where it fits: float→int32 and int32 arithmetic are several times
    cheaper than int64 on CPU) and widened into ``wide`` when the caller needs int64
    (``scatter_add_``).
    """

    def __init__(self, size: int, flat: int, dtype, index_dtype, device, wide: bool) -> None:
        self.pos = torch.empty(size, dtype=dtype, device=device)
        self.floor = torch.empty(size, dtype=dtype, device=device)
        self.index = torch.empty(size, dtype=index_dtype, device=device)
        self.flat = torch.empty(flat, dtype=index_dtype, device=device)
        self.wide = torch.empty(flat if wide else 0, dtype=torch.int64, device=device)


def _positions(zslope, zcoord, zoff: float, length: int, base, buf: _Buffers):
    """Flat sample indices ``(m·C·n,)`` into the block's lines and fractions ``(m, 1, n)``.

    The same arithmetic as :func:`~operators3d.ct._kernels.z_tables` (``zslope · zcoord``
    plus the fraction of ``zoff`` plus one, clamped, floored; the whole part of ``zoff`` is
    folded into ``base``), so pieces and the whole get bitwise the same weights.
    ``zcoord`` is ``(n,)`` or ``(m, 1, n)``; ``base (m, C, 1)`` holds each line's flat offset
    plus ``floor(zoff)``. The indices are int64 when ``buf.wide`` is allocated.
    """
    whole = math.floor(zoff)
    m, n = zslope.shape[0], zcoord.shape[-1]
    pos = torch.mul(zslope.view(m, 1, 1), zcoord, out=buf.pos[: m * n].view(m, 1, n))
    pos.add_(zoff - whole + 1).clamp_(-whole, length + 1 - whole)
    low = torch.floor(pos, out=buf.floor[: m * n].view(m, 1, n))
    frac = pos.sub_(low)
    index = buf.index[: m * n].view(m, 1, n)
    index.copy_(low)
    count = m * base.shape[1] * n
    flat = torch.add(index, base, out=buf.flat[:count].view(m, base.shape[1], n)).view(-1)
    if buf.wide.numel():
        flat = buf.wide[:count].copy_(flat)
    return flat, frac


def _sizes(row_index: torch.Tensor, lines: torch.Tensor, zcoord: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(pairs, channels, padded row width, row length, output rows) of a pair kernel."""
    channels, width = lines.shape[1], lines.shape[2]
    return row_index.shape[0], channels, width, width - 3, zcoord.numel()


def _plan(num_q: int, channels: int, width: int, num_m: int, lines: torch.Tensor, zoff: float,
          block_bytes: int, *, scatter: bool):
    """The pairs per block, the flat offset of each (pair, channel) line and the reused buffers."""
    q_step = pair_block(num_q, channels, width, num_m, lines.element_size(), block_bytes)
    idt = _index_dtype(q_step * channels * width + abs(zoff) + 2)
    base = (torch.arange(q_step * channels, device=lines.device, dtype=idt) * width).view(
        q_step, channels, 1) + math.floor(zoff)
    buf = _Buffers(q_step * num_m, q_step * channels * num_m, lines.dtype, idt, lines.device, scatter)
    return q_step, base, buf


def pair_gather(
    src: torch.Tensor,
    row_index: torch.Tensor,
    row_weight: torch.Tensor,
    zslope: torch.Tensor,
    ray: torch.Tensor,
    zcoord: torch.Tensor,
    zoff: float,
    out: torch.Tensor,
    *,
    block_bytes: int,
) -> None:
    """``out[ray[q]] += Σ_k w[q, k] · interp(src[idx[q, k]], zslope[q] · zcoord + zoff)``.

    Shape:
        ``src (rows, C, P)`` padded rows (zeros at ``0``, ``P − 2``, ``P − 1``; see
        :func:`~operators3d.ct._kernels.z_tables`); ``row_index, row_weight (Q, 2)``;
        ``zslope, ray (Q,)``; ``zcoord (M,)``; ``out (R, C, M)`` (accumulated into).
    """
    num_q, channels, width, length, num_m = _sizes(row_index, src, zcoord)
    dtype, device = src.dtype, src.device
    flat = src.view(src.shape[0], channels * width)
    out_rows = out.view(out.shape[0], channels * num_m)
    q_step, base, buf = _plan(num_q, channels, width, num_m, src, zoff, block_bytes, scatter=False)
    g = torch.empty(q_step * 2, channels * width, dtype=dtype, device=device)
    line = torch.empty(q_step, channels, width, dtype=dtype, device=device)
    lo = torch.empty(q_step * channels * num_m, dtype=dtype, device=device)
    hi = torch.empty_like(lo)
    full = torch.empty(q_step, channels, num_m, dtype=dtype, device=device)
    for q0, q1, v0, v1 in _blocks(row_windows(zslope, zcoord, zoff, length), num_q, q_step, num_m):
        m, nm = q1 - q0, v1 - v0
        gm = g[: 2 * m]
        torch.index_select(flat, 0, row_index[q0:q1].reshape(-1), out=gm)
        gv = gm.view(m, 2, channels, width)
        w = row_weight[q0:q1, :, None, None]
        lm = torch.mul(gv[:, 0], w[:, 0], out=line[:m])
        lm.addcmul_(gv[:, 1], w[:, 1])  # (m, C, P): in-plane interpolation
        fi, frac = _positions(zslope[q0:q1], zcoord[v0:v1], zoff, length, base[:m], buf)
        lf = lm.view(-1)
        n = m * channels * nm
        a = torch.index_select(lf, 0, fi, out=lo[:n]).view(m, channels, nm)
        b = torch.index_select(lf[1:], 0, fi, out=hi[:n]).view(m, channels, nm)
        if nm == num_m:
            val = a.lerp_(b, frac.view(m, 1, nm))
        else:  # whole rows, zero outside the block's rows: index_add_ of contiguous rows
            val = full[:m]
            val[:, :, :v0].zero_()
            val[:, :, v1:].zero_()
            torch.lerp(a, b, frac.view(m, 1, nm), out=val[:, :, v0:v1])
        out_rows.index_add_(0, ray[q0:q1], val.view(m, channels * num_m))


def pair_scatter(
    grad: torch.Tensor,
    row_index: torch.Tensor,
    row_weight: torch.Tensor,
    zslope: torch.Tensor,
    ray: torch.Tensor,
    zcoord: torch.Tensor,
    zoff: float,
    dst: torch.Tensor,
    *,
    block_bytes: int,
) -> None:
    """The exact transpose of :func:`pair_gather`: ``dst += Gᵀ grad`` (same tables).

    Shape:
        ``grad (R, C, M)``; ``dst (rows, C, P)``; the rest as in :func:`pair_gather`.
    """
    num_q, channels, width, length, num_m = _sizes(row_index, dst, zcoord)
    dtype, device = dst.dtype, dst.device
    flat = dst.view(dst.shape[0], channels * width)
    q_step, base, buf = _plan(num_q, channels, width, num_m, dst, zoff, block_bytes, scatter=True)
    gg = torch.empty(q_step, channels * num_m, dtype=dtype, device=device)
    hi = torch.empty(q_step, channels, num_m, dtype=dtype, device=device)
    line = torch.empty(q_step, channels, width, dtype=dtype, device=device)
    pair = torch.empty(q_step, 2, channels, width, dtype=dtype, device=device)
    for q0, q1, v0, v1 in _blocks(row_windows(zslope, zcoord, zoff, length), num_q, q_step, num_m):
        m, nm = q1 - q0, v1 - v0
        g = gg.view(-1)[: m * channels * nm].view(m, channels, nm)
        torch.index_select(grad[:, :, v0:v1], 0, ray[q0:q1], out=g)
        zc = zcoord[v0:v1]
        fi, frac = _positions(zslope[q0:q1], zc, zoff, length, base[:m], buf)
        h = hi.view(-1)[: m * channels * nm].view(m, channels, nm)
        torch.mul(g, frac.view(m, 1, nm), out=h)
        lo = g.sub_(h)  # (1 − frac) · g
        lm = line[:m]
        lm.zero_()
        lf = lm.view(-1)
        lf.scatter_add_(0, fi, lo.view(-1))
        lf[1:].scatter_add_(0, fi, h.view(-1))
        pm = torch.mul(lm[:, None], row_weight[q0:q1, :, None, None], out=pair[:m])
        # int64: index_add_ of rows takes a fast path with int64 indices (about 3× on CPU).
        rows = row_index[q0:q1].reshape(-1).to(torch.int64)
        flat.index_add_(0, rows, pm.view(2 * m, channels * width))
