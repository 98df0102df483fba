"""Cone beam by pieces: D-slabs of the volume and windows of detector rows, placed where they
sit, are exact pieces of the whole projector (sum of slabs = whole, window = rows of the
whole), with exact adjoints, and the row/slice helpers lose nothing."""

import dataclasses
import math

import pytest
import torch

from operators3d.ct import ConeBeamCT, cone_beam, fdk, min_det_shape, volume
from operators3d.ct.analytic import fdk_filter
from operators3d.testing import assert_gradients, check_operator

# Odd, non-cubic; a steep cone (source close) so slabs reach many rows and rows see many slices.
SHAPE = (9, 6, 7)
ANGLES = torch.tensor([0.0, 0.4, math.pi / 4, 1.7, math.pi, 3.9, 5.0, -0.6, 7.1],
                      dtype=torch.float64)


def _cone(shape=SHAPE, angles=ANGLES, src=9.0, det=5.0, spacing=(0.8, 1.1), voxel=1.0, **kw):
    geo = dict(volume_shape=shape, angles=angles, src_dist=src, det_dist=det,
               det_spacing=spacing, voxel_size=voxel)
    return ConeBeamCT(det_shape=min_det_shape(**geo), **geo, **kw)


def _x(shape=SHAPE, seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _partitions(depth):
    yield [(0, depth)]
    yield [(d, d + 1) for d in range(depth)]
    yield [(0, 2), (2, 3), (3, 7), (7, depth)]


def test_geometry_slabs_and_windows_sit_where_they_are():
    vol = volume(shape=SHAPE, voxel_size=0.7)
    slab = vol.slab(slice(2, 6))
    assert slab.shape == (4,) + SHAPE[1:] and slab.d_offset == 2 + (4 - SHAPE[0]) / 2
    # Coordinates of a slab (and of a slab of a slab) are the parent's, bit for bit.
    assert torch.equal(slab.z_coords(), vol.z_coords()[2:6])
    assert torch.equal(slab.slab(slice(1, 3)).z_coords(), vol.z_coords()[3:5])
    assert slab.slab(slice(1, 3)) == vol.slab(slice(3, 5))
    geom = cone_beam(angles=ANGLES, src_dist=9, det_dist=5, det_shape=(15, 20),
                     det_spacing=(0.8, 1.1))
    window = geom.rows(slice(5, 11))
    assert window.det_shape == (6, 20) and window.row_offset == 5 + (6 - 15) / 2
    assert torch.equal(window.row_heights(), geom.row_heights()[5:11])
    assert torch.equal(window.rows(slice(2, 5)).row_heights(), geom.row_heights()[7:10])
    assert window.subset([0, 2]).row_offset == window.row_offset
    assert "row_offset" in repr(window) and "row_offset" not in repr(geom)
    with pytest.raises(dataclasses.FrozenInstanceError):
        window.row_offset = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="ConeGeometry.rows: empty slab"):
        geom.rows(slice(3, 3))
    with pytest.raises(ValueError, match="volume: d_offset must be finite"):
        volume(shape=SHAPE, d_offset=math.inf)


def test_sum_of_slabs_is_the_whole_projection():
    op = _cone()
    x = _x()
    whole = op(x)
    for parts in _partitions(SHAPE[0]):
        total = torch.zeros_like(whole)
        for d0, d1 in parts:
            rows = op.rows_hit_by(slice(d0, d1))
            total[rows] += op.slab(slice(d0, d1)).rows(rows)(x[d0:d1])
        torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)


def test_adjoint_of_a_slab_is_the_slab_of_the_adjoint():
    op = _cone()
    y = torch.randn(op.range_shape, dtype=torch.float64)
    whole = op.adjoint(y)
    for d0, d1 in [(0, 2), (2, 3), (3, 7), (7, 9)]:
        rows = op.rows_hit_by(slice(d0, d1))
        piece = op.slab(slice(d0, d1)).rows(rows).adjoint(y[rows])
        torch.testing.assert_close(piece, whole[d0:d1], rtol=1e-12, atol=1e-12)


def test_a_row_window_is_those_rows_of_the_whole():
    op = _cone()
    x = _x()
    whole = op(x)
    num_v = op.range_shape[0]
    for v0, v1 in [(0, 1), (0, 4), (3, 8), (5, num_v), (num_v - 1, num_v)]:
        window = op.rows(slice(v0, v1))
        assert window.range_shape == (v1 - v0,) + op.range_shape[1:]
        torch.testing.assert_close(window(x), whole[v0:v1], rtol=1e-13, atol=1e-13)
        # Only the slices the window sees matter.
        seen = window.slices_seen_by(slice(0, v1 - v0))
        assert seen == op.slices_seen_by(slice(v0, v1))
        kept = torch.zeros_like(x)
        kept[seen] = x[seen]
        torch.testing.assert_close(window(kept), whole[v0:v1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("src, det", [(9.0, 5.0), (30.0, 20.0)])
def test_helpers_are_conservative_and_tight(src, det):
    # Every row outside rows_hit_by(slab) is exactly zero and every slice outside
    # slices_seen_by(window) has exactly zero weight, for every slab and window; and neither
    # takes much more than what is touched (a row/slice of margin each side, plus the
    # rounding of the support to whole rows).
    op = _cone(src=src, det=det)
    num_d = SHAPE[0]
    num_v = op.range_shape[0]
    ones = torch.ones(SHAPE, dtype=torch.float64)
    for d0 in range(num_d):
        for d1 in range(d0 + 1, num_d + 1):
            proj = op.slab(slice(d0, d1))(ones[d0:d1])
            rows = op.rows_hit_by(slice(d0, d1))
            touched = torch.nonzero(proj.abs().sum((1, 2))).flatten()
            assert rows.start <= int(touched.min()) and int(touched.max()) < rows.stop
            assert rows.stop - rows.start <= len(touched) + 8
    y = torch.ones(op.range_shape, dtype=torch.float64)
    for v0 in range(num_v):
        for v1 in range(v0 + 1, num_v + 1):
            back = op.rows(slice(v0, v1)).adjoint(y[v0:v1])
            seen = op.slices_seen_by(slice(v0, v1))
            touched = torch.nonzero(back.abs().sum((1, 2))).flatten()
            if len(touched):
                assert seen.start <= int(touched.min()) and int(touched.max()) < seen.stop
                assert seen.stop - seen.start <= len(touched) + 5


def test_pieces_nest_and_match_offset_constructors():
    op = _cone()
    x = _x()
    inner = op.slab(slice(2, 8)).slab(slice(1, 5)).rows(slice(3, 12)).rows(slice(2, 6))
    direct = op.slab(slice(3, 7)).rows(slice(5, 9))
    assert inner.volume_geometry == direct.volume_geometry
    torch.testing.assert_close(inner(x[3:7]), direct(x[3:7]), rtol=0, atol=0)
    g = op.geometry
    built = ConeBeamCT(volume_shape=(4,) + SHAPE[1:], angles=ANGLES, src_dist=g.src_dist,
                       det_dist=g.det_dist, det_shape=(4, g.det_shape[1]),
                       det_spacing=g.det_spacing, d_offset=3 + (4 - SHAPE[0]) / 2,
                       row_offset=5 + (4 - g.det_shape[0]) / 2, allow_truncation=True)
    torch.testing.assert_close(built(x[3:7]), direct(x[3:7]), rtol=0, atol=0)
    assert "d_offset=0.5" in repr(direct) and "row_offset=-11" in repr(direct)
    sub = direct.subset([1, 4, 5])
    torch.testing.assert_close(sub(x[3:7]), direct(x[3:7])[:, [1, 4, 5]], rtol=0, atol=0)
    with pytest.raises(AttributeError, match="immutable"):
        direct.geometry = g


def test_detector_checks_follow_the_offsets():
    op = _cone()
    # A slab on the whole detector is seen entirely; far off-centre it is not.
    op.slab(slice(0, 3))  # no error
    g = op.geometry
    geo = dict(volume_shape=(3,) + SHAPE[1:], angles=ANGLES, src_dist=g.src_dist,
               det_dist=g.det_dist, det_shape=g.det_shape, det_spacing=g.det_spacing)
    with pytest.raises(ValueError, match=r"detector is too small.*d_offset=40"):
        ConeBeamCT(d_offset=40.0, **geo)
    ConeBeamCT(d_offset=40.0, allow_truncation=True, **geo)
    # A window's helpers: a slab far below a high window reaches none of its rows.
    top = op.rows(slice(g.det_shape[0] - 2, g.det_shape[0]))
    none = top.rows_hit_by(slice(0, 1))
    assert none.start == none.stop
    assert top.slab(slice(0, 1))(_x()[0:1]).abs().max() == 0


@pytest.mark.parametrize("piece", ["slab", "window", "both"])
def test_pieces_pass_the_operator_battery(piece):
    op = _cone()
    if piece in ("slab", "both"):
        op = op.slab(slice(2, 7))
    if piece in ("window", "both"):
        op = op.rows(slice(3, op.range_shape[0] - 4))
    errors = check_operator(op, rtol=1e-10)
    assert errors["adjoint"] < 1e-10


def test_gradcheck_of_a_piece():
    angles = torch.tensor([0.2, 1.9, 3.5], dtype=torch.float64)
    op = _cone(shape=(5, 4, 3), angles=angles, src=12.0, det=6.0, spacing=2.0)
    assert_gradients(op.slab(slice(1, 3)).rows(slice(1, 4)))


def test_fdk_by_slabs_and_row_blocks_is_the_whole_fdk():
    angles = torch.arange(24, dtype=torch.float64) * 2 * math.pi / 24
    op = _cone(angles=angles)
    y = op(_x().abs())
    whole = fdk(y, op, filter="hann")
    for d0, d1 in [(0, 3), (3, 4), (4, 9)]:
        slab = op.slab(slice(d0, d1))
        rows = op.rows_hit_by(slice(d0, d1))
        total = torch.zeros(d1 - d0, *SHAPE[1:], dtype=torch.float64)
        for r0 in range(rows.start, rows.stop, 3):
            r1 = min(r0 + 3, rows.stop)
            total += fdk(y[r0:r1], slab.rows(slice(r0, r1)), filter="hann")
        torch.testing.assert_close(total, whole[d0:d1], rtol=1e-12, atol=1e-12)


def test_fdk_filter_is_row_and_angle_local():
    angles = torch.arange(12, dtype=torch.float64) * 2 * math.pi / 12
    op = _cone(angles=angles)
    y = op(_x().abs())
    q = fdk_filter(y, op, "cosine")
    torch.testing.assert_close(op.backproject(q, method="fdk") * (math.pi / 12),
                               fdk(y, op, "cosine"), rtol=0, atol=0)
    window = op.rows(slice(4, 9))
    torch.testing.assert_close(fdk_filter(y[4:9], window, "cosine"), q[4:9],
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(fdk_filter(y[:, 1::3], op.subset(slice(1, None, 3)), "cosine"),
                               q[:, 1::3], rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="fdk_filter: filter must be one of"):
        fdk_filter(y, op, "ramp")


@pytest.mark.gpu
def test_cuda_pieces_match_cpu():
    op = _cone()
    piece = op.slab(slice(2, 7)).rows(slice(3, 12))
    x = _x()[2:7]
    y = torch.randn(piece.range_shape, dtype=torch.float64)
    fx, ay = piece(x), piece.adjoint(y)
    piece.to("cuda")
    torch.testing.assert_close(piece(x.cuda()).cpu(), fx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(piece.adjoint(y.cuda()).cpu(), ay, rtol=1e-10, atol=1e-10)
    check_operator(piece)



def test_tables_are_cached_shared_by_pieces_and_bounded(monkeypatch):
    from operators3d.ct import _kernels as K
    from operators3d.ct import _table_cache

    _table_cache.clear()
    op = _cone(table_bytes=1)  # one chunk per angle: several cache entries
    x = _x()
    first = op(x)
    held = _table_cache.held_bytes("cpu")
    assert 0 < held <= K.CPU_TABLE_CACHE_BYTES
    torch.testing.assert_close(op(x), first, rtol=0, atol=0)  # served from the cache
    assert _table_cache.held_bytes("cpu") == held
    rows = op.rows_hit_by(slice(2, 5))
    piece = op.slab(slice(2, 5)).rows(rows)  # a thin piece reuses the whole's tables
    piece(x[2:5])
    piece.adjoint(first[rows])
    assert _table_cache.held_bytes("cpu") == held
    op(x.float())  # another dtype: tables of its own
    assert _table_cache.held_bytes("cpu") > held
    # A budget smaller than the tables: the first chunks stay, the rest are rebuilt per call;
    # another geometry (group) evicts them.
    _table_cache.clear()
    monkeypatch.setattr(K, "CPU_TABLE_CACHE_BYTES", held // 3)
    torch.testing.assert_close(op(x), first, rtol=0, atol=0)
    kept = _table_cache.held_bytes("cpu")
    assert 0 < kept <= held // 3
    torch.testing.assert_close(op(x), first, rtol=0, atol=0)
    assert _table_cache.held_bytes("cpu") == kept
    op.subset(slice(0, 4))(x)
    assert 0 < _table_cache.held_bytes("cpu") <= held // 3
    _table_cache.clear()
    assert _table_cache.held_bytes() == 0


def test_cached_step_length_factors_are_keyed_by_the_in_plane_geometry():
    """The in-plane step-length factors live in the table cache beside the tables: pieces reuse
    them, and operators that differ in a quantity they depend on (column spacing, distances,
    voxel size, angles) never get each other's."""
    from operators3d.ct import _table_cache

    variants = [_cone(), _cone(spacing=(0.8, 1.3)), _cone(src=11.0), _cone(voxel=0.9),
                _cone(angles=ANGLES + 0.1)]
    x = _x()
    fresh = []
    for op in variants:
        _table_cache.clear()
        fresh.append((op(x), op.adjoint(op(x))))
    _table_cache.clear()
    for _ in range(2):  # all in one cache, in turn
        for op, (y, back) in zip(variants, fresh):
            torch.testing.assert_close(op(x), y, rtol=0, atol=0)
            torch.testing.assert_close(op.adjoint(y), back, rtol=0, atol=0)
    held = _table_cache.held_bytes("cpu")
    op, (y, _) = variants[1], fresh[1]
    rows = op.rows_hit_by(slice(3, 5))
    torch.testing.assert_close(op.slab(slice(3, 5)).rows(rows)(x[3:5]) + op.slab(slice(0, 3))
                               .rows(rows)(x[:3]) + op.slab(slice(5, 9)).rows(rows)(x[5:]),
                               y[rows], rtol=1e-12, atol=1e-12)
    assert _table_cache.held_bytes("cpu") == held  # the pieces added nothing
    _table_cache.clear()


@pytest.mark.parametrize("src, det", [(9.0, 5.0), (30.0, 20.0)])
def test_compiled_and_torch_kernels_give_the_same_pieces(monkeypatch, src, det):
    from operators3d.ct import _cone_native

    if _cone_native.load()[0] is None:
        pytest.skip(f"no compiled cone kernel: {_cone_native.load()[1]}")
    op = _cone(src=src, det=det)
    x = _x()
    y = torch.randn(op.range_shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    got = {}
    for kernel in ("torch", "c"):
        monkeypatch.setenv("RECON3D_CONE_KERNEL", kernel)
        parts = []
        for d0, d1 in [(0, 2), (2, 3), (3, 7), (7, 9)]:
            rows = op.rows_hit_by(slice(d0, d1))
            piece = op.slab(slice(d0, d1)).rows(rows)
            parts += [piece(x[d0:d1]), piece.adjoint(y[rows])]
        window = op.rows(slice(4, 11))
        got[kernel] = [op(x), op.adjoint(y), window(x), window.adjoint(y[4:11])] + parts
    for a, b in zip(got["torch"], got["c"]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("RECON3D_CONE_KERNEL", "c")
    check_operator(op.slab(slice(3, 7)).rows(op.rows_hit_by(slice(3, 7))))
