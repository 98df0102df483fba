"""The cone-beam pair kernels (operators3d/ct/_cone_kernels.py): values, transposition, paths."""

from __future__ import annotations

import math

import pytest
import torch

from operators3d.ct import ConeBeamCT, min_det_shape
from operators3d.ct import _cone_kernels as CK
from operators3d.ct import _cone_native as NATIVE


@pytest.fixture
def compiled(monkeypatch):
    """The compiled kernel library (tests skip when this machine cannot build it)."""
    lib, why = NATIVE.load()
    if lib is None:
        pytest.skip(f"no compiled cone kernel: {why}")
    return lib


def _tables(num_rows, num_q, num_r, width, gen, dtype=torch.float64):
    """Random pair tables: two row indices (the last row is the zero row), weights, slopes in
    ``[0.4, 1.6]``, ray columns in ray-major order."""
    row_index = torch.randint(0, num_rows, (num_q, 2), generator=gen).to(torch.int32)
    row_index[::7, 1] = num_rows  # some missing neighbours
    row_weight = torch.rand(num_q, 2, generator=gen, dtype=dtype)
    zslope = (0.4 + 1.2 * torch.rand(num_q, generator=gen, dtype=torch.float64)).to(dtype)
    ray = torch.sort(torch.randint(0, num_r, (num_q,), generator=gen)).values
    return row_index, row_weight, zslope, ray


def _src(num_rows, channels, length, gen, dtype=torch.float64):
    src = torch.zeros(num_rows + 1, channels, length + 3, dtype=dtype)
    src[:num_rows, :, 1 : length + 1] = torch.randn(num_rows, channels, length, generator=gen,
                                                    dtype=dtype)
    return src


def _reference(src, row_index, row_weight, zslope, ray, zcoord, zoff, num_r):
    """Sample by sample: linear interpolation along D of the in-plane pair, zero outside."""
    channels, width = src.shape[1], src.shape[2]
    length = width - 3
    out = torch.zeros(num_r, channels, zcoord.numel(), dtype=src.dtype)
    for q in range(row_index.shape[0]):
        line = (row_weight[q, 0] * src[int(row_index[q, 0])]
                + row_weight[q, 1] * src[int(row_index[q, 1])])[:, 1 : length + 1]
        for m, z in enumerate(zcoord.tolist()):
            pos = float(zslope[q]) * z + zoff
            j = math.floor(pos)
            f = pos - j
            for k, wk in ((j, 1 - f), (j + 1, f)):
                if 0 <= k < length:
                    out[int(ray[q]), :, m] += wk * line[:, k]
    return out


@pytest.mark.parametrize("windows", [False, True])  # every row / the rows a block reaches
@pytest.mark.parametrize("channels", [1, 3])
def test_pair_gather_matches_a_sample_by_sample_reference(monkeypatch, windows, channels):
    monkeypatch.setattr(CK, "ROW_WINDOWS", windows)
    gen = torch.Generator().manual_seed(1)
    num_rows, length, num_r, num_m = 11, 6, 5, 13
    src = _src(num_rows, channels, length, gen)
    tables = _tables(num_rows, 40, num_r, length + 3, gen)
    zcoord = (torch.arange(num_m, dtype=torch.float64) - 6) * 0.7
    for zoff in (2.5, 3.25, -4.0):  # the volume's middle, an offset, beyond the rows
        out = torch.zeros(num_r, channels, num_m, dtype=torch.float64)
        CK.pair_gather(src, *tables, zcoord, zoff, out, block_bytes=2000)
        ref = _reference(src, *tables, zcoord, zoff, num_r)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("windows", [False, True])
@pytest.mark.parametrize("channels", [1, 2])
def test_pair_scatter_is_the_exact_transpose(monkeypatch, windows, channels):
    monkeypatch.setattr(CK, "ROW_WINDOWS", windows)
    gen = torch.Generator().manual_seed(2)
    num_rows, length, num_r, num_m = 17, 9, 7, 21
    tables = _tables(num_rows, 90, num_r, length + 3, gen)
    zcoord = (torch.arange(num_m, dtype=torch.float64) - 10) * 0.6
    for zoff, block in ((4.0, 3000), (1.5, 1 << 20), (12.0, 1)):
        src = _src(num_rows, channels, length, gen)
        out = torch.zeros(num_r, channels, num_m, dtype=torch.float64)
        CK.pair_gather(src, *tables, zcoord, zoff, out, block_bytes=block)
        grad = torch.randn(num_r, channels, num_m, generator=gen, dtype=torch.float64)
        dst = torch.zeros_like(src)
        CK.pair_scatter(grad, *tables, zcoord, zoff, dst, block_bytes=block)
        lhs, rhs = (out * grad).sum(), (src * dst).sum()
        assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), abs(rhs), 1.0)


def test_row_windows_and_every_row_agree(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    num_rows, length, num_r, num_m = 9, 4, 6, 40  # thin slab, many rows: narrow windows
    src = _src(num_rows, 2, length, gen)
    row_index, row_weight, zslope, ray = _tables(num_rows, 60, num_r, length + 3, gen)
    order = torch.sort(zslope).indices  # as the projector's tables: by slope
    tables = (row_index[order], row_weight[order], zslope[order], ray[order])
    zcoord = (torch.arange(num_m, dtype=torch.float64) - 20) * 1.5
    for zoff in (2.0, -3.0, 9.5):  # through, below and above the rows' reach
        start, stop = CK.row_windows(tables[2], zcoord, zoff, length)
        assert (stop - start).max() < num_m // 2
        got = {}
        for windows in (False, True):
            monkeypatch.setattr(CK, "ROW_WINDOWS", windows)
            out = torch.zeros(num_r, 2, num_m, dtype=torch.float64)
            CK.pair_gather(src, *tables, zcoord, zoff, out, block_bytes=4000)
            grad = torch.randn(num_r, 2, num_m, generator=torch.Generator().manual_seed(4),
                               dtype=torch.float64)
            dst = torch.zeros_like(src)
            CK.pair_scatter(grad, *tables, zcoord, zoff, dst, block_bytes=4000)
            # Pads and the zero row collect what falls outside the volume: only it counts.
            got[windows] = (out, dst[:num_rows, :, 1 : length + 1])
        for a, b in zip(got[False], got[True]):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_row_windows_do_not_apply_to_few_rows_or_bad_slopes(monkeypatch):
    zslope = torch.tensor([0.5, 1.0], dtype=torch.float64)
    assert CK.row_windows(zslope, torch.arange(1.0), 0.0, 5) is None
    assert CK.row_windows(-zslope, torch.arange(20.0), 0.0, 5) is None
    start, stop = CK.row_windows(zslope, torch.arange(20.0, dtype=torch.float64) - 10, 2.0, 3)
    assert (start >= 0).all() and (stop <= 20).all() and (start < stop).all()
    monkeypatch.setattr(CK, "ROW_WINDOWS", False)
    assert CK.row_windows(zslope, torch.arange(20.0), 0.0, 5) is None


@pytest.mark.parametrize("kernel", ["torch", "torch-every-row", "c"])
@pytest.mark.parametrize("shape", [(12, 10, 14), (7, 16, 9)])
def test_cone_dot_test_whole_and_thin_slabs(monkeypatch, shape, kernel):
    if kernel == "c" and NATIVE.load()[0] is None:
        pytest.skip(f"no compiled cone kernel: {NATIVE.load()[1]}")
    monkeypatch.setenv("RECON3D_CONE_KERNEL", kernel.split("-")[0])
    monkeypatch.setattr(CK, "ROW_WINDOWS", kernel != "torch-every-row")
    angles = torch.arange(10, dtype=torch.float64) * 2 * math.pi / 10
    geo = dict(volume_shape=shape, angles=angles, src_dist=30.0, det_dist=12.0,
               det_spacing=(0.9, 1.2))
    op = ConeBeamCT(det_shape=min_det_shape(**geo), **geo)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = torch.randn(op.range_shape, generator=gen, dtype=torch.float64)
    lhs, rhs = (op(x) * y).sum(), (x * op.adjoint(y)).sum()
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    whole = op(x)
    total = torch.zeros_like(whole)
    for d0 in range(0, shape[0], 2):
        d1 = min(shape[0], d0 + 2)
        sub = op.slab(slice(d0, d1))
        hit = sub.rows_hit_by(slice(0, d1 - d0))
        total[hit] += sub.rows(hit)(x[d0:d1])
        piece = sub.rows(hit).adjoint(y[hit])
        torch.testing.assert_close(piece, op.adjoint(y)[d0:d1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the compiled kernel


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("slopes", ["positive", "mixed"])  # register carry / plain adjoint
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("long", [False, True])  # windows shorter / longer than CONE_LONG rows
def test_compiled_pairs_match_the_reference_and_torch(compiled, monkeypatch, channels, slopes,
                                                      threads, long):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(6)
    num_rows, length, num_r, num_m = (9, 45, 4, 70) if long else (13, 8, 6, 17)
    tables = list(_tables(num_rows, 70, num_r, length + 3, gen))
    if slopes == "mixed":
        tables[2] = tables[2] * torch.where(torch.arange(70) % 3 == 0, -1.0, 1.0).double()
    zcoord = (torch.arange(num_m, dtype=torch.float64) - num_m // 2) * 0.65
    for zoff in (length / 2 - 0.5, 0.25, -2.0, length + 1.75, 30.0):
        src = _src(num_rows, channels, length, gen)
        out = torch.zeros(num_r, channels, num_m, dtype=torch.float64)
        NATIVE.pair_gather(src, *tables, zcoord, zoff, out)
        torch.testing.assert_close(out, _reference(src, *tables, zcoord, zoff, num_r),
                                   rtol=1e-12, atol=1e-12)
        grad = torch.randn(num_r, channels, num_m, generator=gen, dtype=torch.float64)
        dst, ref = torch.zeros_like(src), torch.zeros_like(src)
        NATIVE.pair_scatter(grad, *tables, zcoord, zoff, dst)
        CK.pair_scatter(grad, *tables, zcoord, zoff, ref, block_bytes=3000)
        inner = (slice(0, num_rows), slice(None), slice(1, length + 1))  # pads collect junk
        torch.testing.assert_close(dst[inner], ref[inner], rtol=1e-12, atol=1e-12)
        lhs, rhs = (out * grad).sum(), (src * dst).sum()
        assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), abs(rhs), 1.0)


def test_compiled_float32_matches_torch_float32(compiled):
    gen = torch.Generator().manual_seed(7)
    num_rows, length, num_r, num_m = 10, 7, 5, 15
    row_index, row_weight, zslope, ray = _tables(num_rows, 50, num_r, length + 3, gen)
    tables = (row_index, row_weight.float(), zslope.float(), ray)
    zcoord = ((torch.arange(num_m, dtype=torch.float64) - 7) * 0.7).float()
    src = _src(num_rows, 2, length, gen).float()
    got, want = (torch.zeros(num_r, 2, num_m) for _ in range(2))
    NATIVE.pair_gather(src, *tables, zcoord, 3.5, got)
    CK.pair_gather(src, *tables, zcoord, 3.5, want, block_bytes=4000)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _cone_pair(shape, dtype=torch.float64):
    angles = torch.arange(11, dtype=torch.float64) * 2 * math.pi / 11
    geo = dict(volume_shape=shape, angles=angles, src_dist=25.0, det_dist=10.0,
               det_spacing=(0.9, 1.1))
    return ConeBeamCT(det_shape=min_det_shape(**geo), **geo)


@pytest.mark.parametrize("shape", [(12, 10, 14), (5, 6, 7)])
def test_compiled_operator_matches_the_torch_operator(compiled, monkeypatch, shape):
    op = _cone_pair(shape)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, *shape, generator=gen, dtype=torch.float64)  # a batch: two channels
    y = torch.randn(2, *op.range_shape, generator=gen, dtype=torch.float64)
    got = {}
    for kernel in ("torch", "c"):
        monkeypatch.setenv("RECON3D_CONE_KERNEL", kernel)
        piece = op.slab(slice(1, 4))
        rows = piece.rows_hit_by(slice(0, 3))
        got[kernel] = (op(x), op.adjoint(y), piece.rows(rows)(x[:, 1:4]),
                       piece.rows(rows).adjoint(y[:, rows]))
    for a, b in zip(got["torch"], got["c"]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert (got["c"][0] != 0).any()


def _offset_cone(shape, num_angles, distances, spacing, extra_rows, offsets):
    """A full-circle cone with ``extra_rows`` detector rows beyond the minimum and the volume
    and detector shifted by ``offsets = (d_offset, row_offset)``."""
    angles = torch.arange(num_angles, dtype=torch.float64) * 2 * math.pi / num_angles
    geo = dict(volume_shape=shape, angles=angles, src_dist=distances[0], det_dist=distances[1],
               det_spacing=spacing)
    rows, columns = min_det_shape(**geo)
    return ConeBeamCT(det_shape=(rows + extra_rows, columns), d_offset=offsets[0],
                      row_offset=offsets[1], **geo)


@pytest.mark.parametrize("threads", [1, 3])
def test_compiled_thin_slabs_and_single_rows_match_torch(compiled, monkeypatch, threads):
    """Every slab call is exact, not only their sum: each 1- and 3-slice slab, onto the rows it
    reaches and onto single detector rows (the compiled row bounds' vector path, its odd tails
    and its one-row fallback), forward and adjoint, equals the torch kernel's result."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    shape = (7, 9, 11)
    op = _offset_cone(shape, 13, (22.0, 9.0), (0.8, 1.05), 4, (0.6, -0.7))
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = torch.randn(op.range_shape, generator=gen, dtype=torch.float64)
    calls = []
    for thick in (1, 3):
        for d0 in range(0, shape[0], thick):
            d1 = min(shape[0], d0 + thick)
            sub = op.slab(slice(d0, d1))
            hit = sub.rows_hit_by(slice(0, d1 - d0))
            calls.append((sub.rows(hit), slice(d0, d1), hit))
            for v in (hit.start, (hit.start + hit.stop) // 2):
                calls.append((sub.rows(slice(v, v + 1)), slice(d0, d1), slice(v, v + 1)))
    got = {}
    for kernel in ("torch", "c"):
        monkeypatch.setenv("RECON3D_CONE_KERNEL", kernel)
        got[kernel] = [(piece(x[d]), piece.adjoint(y[v])) for piece, d, v in calls]
    for (pc, ac), (pt, at) in zip(got["c"], got["torch"]):
        torch.testing.assert_close(pc, pt, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ac, at, rtol=1e-12, atol=1e-12)
    assert all((pc != 0).any() for pc, _ in got["c"][::3])


def test_compiled_kernel_rejects_more_rows_than_its_row_bounds_hold(compiled):
    gen = torch.Generator().manual_seed(13)
    tables = _tables(3, 4, 2, 6, gen)
    zcoord = torch.zeros(1, dtype=torch.float64).expand(2**31)
    src = _src(3, 1, 3, gen)
    with pytest.raises(ValueError, match="2147483648 detector rows"):
        NATIVE.pair_gather(src, *tables, zcoord, 0.0, torch.zeros(2, 1, 1, dtype=torch.float64))


def test_without_a_compiler_auto_falls_back_to_torch_with_one_warning(monkeypatch, tmp_path):
    op = _cone_pair((5, 6, 7))
    x = torch.randn(5, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    monkeypatch.setenv("RECON3D_CONE_KERNEL", "torch")
    want = op(x)
    monkeypatch.setenv("RECON3D_CONE_KERNEL", "auto")
    monkeypatch.setenv("RECON3D_CACHE", str(tmp_path))
    monkeypatch.setattr(NATIVE, "_LOADED", {})
    monkeypatch.setattr(NATIVE, "_WARNED", set())
    for compiler, why in ((str(tmp_path / "no-such-cc"), "no C compiler"),
                          ("false", "exited with 1")):  # one that cannot compile
        monkeypatch.setenv("RECON3D_CC", compiler)
        with pytest.warns(RuntimeWarning, match=f"compiled CPU kernel unavailable.*{why}"):
            got = op(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not per call
            op.adjoint(got)
        monkeypatch.setenv("RECON3D_CONE_KERNEL", "c")
        with pytest.raises(RuntimeError, match=why):
            op(x)
        monkeypatch.setenv("RECON3D_CONE_KERNEL", "auto")
    left = sorted(p.suffix for p in tmp_path.iterdir())
    assert left == [".failed", ".failed"]  # notes of the failed builds; no half-written library
    monkeypatch.setenv("RECON3D_CONE_KERNEL", "fast")
    with pytest.raises(ValueError, match="RECON3D_CONE_KERNEL must be one of.*'fast'"):
        op(x)


def test_the_library_is_cached_by_source_and_compiler(compiled, monkeypatch, tmp_path):
    monkeypatch.setenv("RECON3D_CACHE", str(tmp_path))
    monkeypatch.setattr(NATIVE, "_LOADED", {})
    lib, why = NATIVE.load()
    assert lib is not None, why
    built = sorted(p.name for p in tmp_path.iterdir())
    assert len(built) == 1 and built[0].startswith("cone_c-") and built[0].endswith(".so")
    assert NATIVE.load()[0] is lib  # loaded once per process
    monkeypatch.setattr(NATIVE, "_LOADED", {})
    NATIVE.load()  # another process: finds the cached library, builds nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == built


@pytest.mark.parametrize("threads", [1, 3])
def test_compiled_fdk_backprojection_matches_torch(compiled, monkeypatch, threads):
    """FDK's voxel-driven backprojector runs on the compiled pair kernel (voxel columns as its
    rays): whole volume, a batch, a slab onto a window of rows, and an angle subset, equal to
    the torch path's result in float64 and float32."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    op = _offset_cone((9, 10, 12), 14, (24.0, 9.0), (0.85, 1.1), 2, (0.4, -0.3))
    gen = torch.Generator().manual_seed(21)
    y = torch.randn(2, *op.range_shape, generator=gen, dtype=torch.float64)
    piece = op.slab(slice(2, 6))
    hit = piece.rows_hit_by(slice(0, 4))
    window = piece.rows(slice(hit.start + 1, hit.stop - 1))
    subset = op.subset(slice(1, None, 3))
    calls = [(op, y), (op, y[0]), (window, y[0, hit.start + 1 : hit.stop - 1]),
             (subset, y[1, :, 1::3].contiguous())]
    native, used = NATIVE.pair_gather, []

    def spy(*args, **kwargs):
        used.append(1)
        return native(*args, **kwargs)

    monkeypatch.setattr(NATIVE, "pair_gather", spy)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        got = {}
        for kernel in ("torch", "c"):
            monkeypatch.setenv("RECON3D_CONE_KERNEL", kernel)
            used.clear()
            got[kernel] = [o.backproject(v.to(dtype), method="fdk") for o, v in calls]
            assert bool(used) == (kernel == "c")  # the compiled kernel ran, and only under "c"
        for c_out, t_out in zip(got["c"], got["torch"]):
            assert c_out.dtype == dtype
            scale = t_out.abs().max()
            torch.testing.assert_close(c_out / scale, t_out / scale, rtol=0, atol=tol)
        assert all((c_out != 0).any() for c_out in got["c"])
