"""CT: exact adjoints, gradients, analytic line integrals, slabs, the cone→parallel limit,
FBP/FDK, an independent reference (scikit-image) and bad-input errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from operators3d import ellipsoid_phantom, shepp_logan_3d
from operators3d.ct import (
    ConeBeamCT,
    ParallelBeamCT,
    cone_beam,
    default_det_count,
    fbp,
    fdk,
    min_det_shape,
    parallel_beam,
    volume,
)
from operators3d.testing import assert_gradients, check_operator

SHAPE = (5, 14, 11)
# Angles in any order and range: negative, beyond π and 2π, exactly 45° and 90°.
ANGLES = torch.tensor([0.0, 0.3, math.pi / 4, 1.0, math.pi / 2, 2.2, -0.7, 4.0, 7.5],
                      dtype=torch.float64)


def _cone(shape=SHAPE, angles=ANGLES, src=30.0, det=20.0, spacing=1.0, voxel=1.0, **kw):
    geo = dict(volume_shape=shape, angles=angles, src_dist=src, det_dist=det,
               det_spacing=spacing, voxel_size=voxel)
    return ConeBeamCT(det_shape=min_det_shape(**geo), **geo, **kw)


def _operators():
    return {
        "parallel": ParallelBeamCT(volume_shape=SHAPE, angles=ANGLES),
        "parallel_fine_detector": ParallelBeamCT(
            volume_shape=SHAPE, angles=ANGLES, det_spacing=0.45, voxel_size=1.3,
            det_count=default_det_count(SHAPE, 1.3, 0.45) + 3,
        ),
        "parallel_coarse_detector": ParallelBeamCT(
            volume_shape=SHAPE, angles=ANGLES, det_spacing=2.5, voxel_size=0.9
        ),
        "parallel_tiny_blocks": ParallelBeamCT(
            volume_shape=SHAPE, angles=ANGLES, block_bytes=1, table_bytes=1
        ),
        "parallel_slab": ParallelBeamCT(volume_shape=SHAPE, angles=ANGLES).slab(slice(1, 4)),
        "parallel_subset": ParallelBeamCT(volume_shape=SHAPE, angles=ANGLES).subset([1, 4, 7]),
        "cone": _cone(),
        "cone_anisotropic": _cone(spacing=(0.9, 1.2), voxel=0.8, det=8.0),
        "cone_tiny_blocks": _cone(block_bytes=1, table_bytes=1),
    }


@pytest.mark.parametrize("name", list(_operators()))
def test_operator_battery(name):
    # Dot test (unbatched and batched), linearity, normal, .H.H, no saved tensors; float64.
    errors = check_operator(_operators()[name], rtol=1e-10)
    assert errors["adjoint"] < 1e-10


@pytest.mark.parametrize("kind", ["parallel", "cone"])
def test_gradcheck(kind):
    angles = torch.tensor([0.2, 1.9, 3.5], dtype=torch.float64)
    if kind == "parallel":
        op = ParallelBeamCT(volume_shape=(2, 5, 4), angles=angles)
    else:
        op = _cone(shape=(2, 5, 4), angles=angles, src=12.0, det=6.0, spacing=2.0)
    assert_gradients(op)


def test_backward_is_the_adjoint():
    op = ParallelBeamCT(volume_shape=SHAPE, angles=ANGLES)
    x = torch.randn(2, *SHAPE, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, *op.range_shape, dtype=torch.float64)
    op(x).backward(g)
    torch.testing.assert_close(x.grad, op.adjoint(g), rtol=0, atol=0)


# ---------------------------------------------------------------- accuracy
def _disk(num_h, num_w, centre, radius, supersample=8):
    """Partial-volume rasterisation of a disk (fraction of each pixel inside)."""
    o = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample - 0.5
    y = (torch.arange(num_h, dtype=torch.float64) - (num_h - 1) / 2)[:, None, None, None]
    x = (torch.arange(num_w, dtype=torch.float64) - (num_w - 1) / 2)[None, :, None, None]
    y, x = y + o[None, None, :, None], x + o[None, None, None, :]
    inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2
    return inside.double().mean(dim=(2, 3))


def test_parallel_cylinder_matches_analytic_chords():
    num_h, num_w, (cx, cy), r = 64, 70, (6.0, -4.0), 24.0
    f = _disk(num_h, num_w, (cx, cy), r).expand(2, num_h, num_w)
    angles = torch.linspace(0, 2 * math.pi, 37, dtype=torch.float64)[:-1] + 0.1
    op = ParallelBeamCT(volume_shape=(2, num_h, num_w), angles=angles)
    p = op(f)
    assert torch.equal(p[0], p[1])
    s = torch.arange(op.det_count, dtype=torch.float64) - (op.det_count - 1) / 2
    dist = s[None, :] - (cx * torch.cos(angles)[:, None] + cy * torch.sin(angles)[:, None])
    chord = 2 * torch.sqrt((r**2 - dist**2).clamp_min(0))
    away = dist.abs() < r - 2  # two voxels from the disk's edge
    err = (p[0] - chord)[away].abs().max() / chord.max()
    assert err < 0.01, f"max error {float(err):.4f} of the maximum chord"
    assert p[0][dist.abs() > r + 2].abs().max() < 1e-12  # nothing outside the shadow


def test_parallel_units_scale_with_voxel_and_detector_size():
    f = _disk(32, 32, (2.0, 1.0), 10.0)[None]
    angles = torch.tensor([0.4, 1.3], dtype=torch.float64)
    base = ParallelBeamCT(volume_shape=(1, 32, 32), angles=angles)
    big = ParallelBeamCT(volume_shape=(1, 32, 32), angles=angles, voxel_size=2.0,
                         det_spacing=2.0, det_count=base.det_count)
    torch.testing.assert_close(big(f), 2 * base(f), rtol=1e-12, atol=1e-12)


def test_slab_is_exact():
    op = ParallelBeamCT(volume_shape=SHAPE, angles=ANGLES)
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    y = torch.randn(3, *op.range_shape, dtype=torch.float64)
    slab = op.slab(slice(1, 4))
    assert slab.domain_shape == (3,) + SHAPE[1:]
    torch.testing.assert_close(slab(x[:, 1:4]), op(x)[:, 1:4], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(slab.adjoint(y[:, 1:4]), op.adjoint(y)[:, 1:4],
                               rtol=1e-14, atol=1e-14)


def test_subset_selects_angles():
    op = ParallelBeamCT(volume_shape=SHAPE, angles=ANGLES)
    x = torch.randn(SHAPE, dtype=torch.float64)
    torch.testing.assert_close(op.subset([2, 5])(x), op(x)[:, [2, 5]], rtol=1e-14, atol=1e-14)


def test_float32_matches_float64():
    for op in (ParallelBeamCT(volume_shape=SHAPE, angles=ANGLES), _cone()):
        x = torch.randn(SHAPE, dtype=torch.float64)
        y = torch.randn(op.range_shape, dtype=torch.float64)
        torch.testing.assert_close(op(x.float()).double(), op(x), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(op.adjoint(y.float()).double(), op.adjoint(y),
                                   rtol=1e-5, atol=1e-4)


def _ball(shape, centre, radius, supersample=4):
    o = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample - 0.5

    def axis(n):
        return (torch.arange(n, dtype=torch.float64) - (n - 1) / 2)[:, None] + o[None, :]

    d, h, w = shape
    z = axis(d)[:, None, None, :, None, None]
    y = axis(h)[None, :, None, None, :, None]
    x = axis(w)[None, None, :, None, None, :]
    inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius**2
    return inside.double().mean(dim=(3, 4, 5))


def test_cone_ball_matches_analytic_chords():
    shape, centre, r = (40, 48, 44), (4.0, -3.0, 2.5), 14.0
    f = _ball(shape, centre, r)
    angles = torch.linspace(0, 2 * math.pi, 7, dtype=torch.float64)[:-1] + 0.2
    src, det, pitch = 80.0, 60.0, 2.0
    op = _cone(shape=shape, angles=angles, src=src, det=det, spacing=pitch)
    num_v, num_a, num_u = op.range_shape
    p = op(f)
    # Each ray from the source S through pixel P: chord = 2 sqrt(r² − dist(centre, ray)²).
    th = angles[None, :, None].expand(num_v, num_a, num_u)
    s_u = (pitch * (torch.arange(num_u) - (num_u - 1) / 2)).double()[None, None, :].expand_as(th)
    z_v = (pitch * (torch.arange(num_v) - (num_v - 1) / 2)).double()[:, None, None].expand_as(th)
    source = torch.stack((src * torch.sin(th), -src * torch.cos(th), torch.zeros_like(th)), -1)
    pixel = torch.stack((-det * torch.sin(th) + s_u * torch.cos(th),
                         det * torch.cos(th) + s_u * torch.sin(th), z_v), -1)
    direction = (pixel - source) / (pixel - source).norm(dim=-1, keepdim=True)
    m = source - torch.tensor(centre, dtype=torch.float64)
    along = (m * direction).sum(-1)
    dist = (m - along[..., None] * direction).norm(dim=-1)
    chord = 2 * torch.sqrt((r**2 - dist**2).clamp_min(0))
    away = dist < r - 2
    err = (p - chord)[away].abs().max() / (2 * r)
    assert away.sum() > 1000
    assert err < 0.02, f"max error {float(err):.4f} of the diameter"


def test_cone_tends_to_parallel():
    shape = (6, 20, 17)
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    par = ParallelBeamCT(volume_shape=shape, angles=ANGLES)
    cone = ConeBeamCT(volume_shape=shape, angles=ANGLES, src_dist=1e7, det_dist=1,
                      det_shape=(shape[0], par.det_count))
    a, b = cone(x), par(x)
    assert float((a - b).norm() / b.norm()) < 0.01
    y = torch.randn(par.range_shape, dtype=torch.float64)
    c, d = cone.adjoint(y), par.adjoint(y)
    assert float((c - d).norm() / d.norm()) < 0.01


def test_cone_skips_only_rays_that_miss_the_volume():
    # The cone projector traces only the detector columns whose rays can meet the volume;
    # tracing every column must give the same projections (the rest are exactly zero).
    op = _cone(spacing=0.7, det=12.0)
    x = torch.randn(SHAPE, dtype=torch.float64)
    y = torch.randn(op.range_shape, dtype=torch.float64)
    fx, ay = op(x), op.adjoint(y)
    assert bool((op._column_hi - op._column_lo < op.range_shape[2]).any())
    op.__dict__["_column_lo"] = torch.zeros_like(op._column_lo)
    op.__dict__["_column_hi"] = torch.full_like(op._column_hi, op.range_shape[2])
    torch.testing.assert_close(op(x), fx, rtol=0, atol=0)
    torch.testing.assert_close(op.adjoint(y), ay, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------- reconstructions
def _flat_interior(x, margin=2):
    """Voxels inside the object whose in-plane neighbourhood (± margin) is uniform."""
    k = 2 * margin + 1
    hi = F.max_pool2d(x[:, None], k, 1, margin)[:, 0]
    lo = -F.max_pool2d(-x[:, None], k, 1, margin)[:, 0]
    return (x > 0) & (hi - lo < 1e-9)


@pytest.mark.parametrize("filt", ["ram-lak", "shepp-logan", "cosine", "hann"])
def test_fbp_reconstructs_shepp_logan(filt):
    x = shepp_logan_3d((4, 64, 64), dtype=torch.float64)[None]  # a batch of one
    angles = torch.arange(180, dtype=torch.float64) * math.pi / 180
    op = ParallelBeamCT(volume_shape=x.shape[1:], angles=angles)
    rec = fbp(op(x), op, filter=filt)
    inside = _flat_interior(x[0])[None]
    err = (rec - x)[inside].norm() / x[inside].norm()
    assert err < 0.10, f"{filt}: relative error {float(err):.3f} inside the object"


def test_fbp_uniform_object_keeps_its_value():
    x = ellipsoid_phantom((2, 48, 48), [(2.5, 0.7, 0.6, 5.0, 0.1, 0.0, 0.0, 20.0)],
                          dtype=torch.float64)
    angles = torch.arange(120, dtype=torch.float64) * math.pi / 120
    op = ParallelBeamCT(volume_shape=x.shape, angles=angles, voxel_size=0.5, det_spacing=0.4,
                        det_count=default_det_count(x.shape, 0.5, 0.4))
    rec = fbp(op(x), op)
    centre = rec[:, 20:28, 20:28]
    assert abs(float(centre.mean()) - 2.5) < 0.025


def test_fdk_reconstructs_a_ball():
    shape = (40, 56, 56)
    x = ellipsoid_phantom(shape, [(1.0, 0.6, 0.6, 0.6 * 56 / 40, 0.05, -0.05, 0.0, 0.0)],
                          dtype=torch.float64)
    angles = torch.arange(180, dtype=torch.float64) * 2 * math.pi / 180
    op = _cone(shape=shape, angles=angles, src=120.0, det=80.0, spacing=1.5)
    rec = fdk(op(x), op)
    mid = shape[0] // 2
    for dz in (0, 4, -6):
        sl = slice(mid + dz - 1, mid + dz + 1)
        inside = x[sl] > 0
        err = (rec[sl] - x[sl])[inside].norm() / x[sl][inside].norm()
        assert err < 0.10, f"slice {mid + dz}: relative error {float(err):.3f}"
    centre = rec[mid - 2 : mid + 2, 25:31, 25:31].mean()
    assert abs(float(centre) - 1.0) < 0.05


# ---------------------------------------------------------------- independent reference
def test_matches_scikit_image_radon():
    """scikit-image's per-slice ``radon`` (rotate-and-sum, bilinear): same sinogram to 1% of
    its maximum on a smooth object. skimage rotates about ``N // 2`` (odd N here, so that is
    the centre ``(N − 1)/2``), counts image rows downwards (our H axis runs upwards) and uses
    the same angles in degrees."""
    skimage = pytest.importorskip("skimage.transform")
    import numpy as np

    n = 63
    yy, xx = np.mgrid[:n, :n]
    img = np.exp(-(((xx - 40.0) / 6) ** 2 + ((yy - 25.0) / 9) ** 2))
    img *= ((xx - 31) ** 2 + (yy - 31) ** 2) < 30**2
    theta = np.array([0.0, 17.0, 50.0, 90.0, 133.0, 160.0, 250.0])
    reference = skimage.radon(img, theta=theta, circle=True)  # (U, A)
    op = ParallelBeamCT(volume_shape=(1, n, n), angles=torch.tensor(np.deg2rad(theta)),
                        det_count=n, allow_truncation=True)
    ours = op(torch.tensor(img[::-1].copy())[None])[0].numpy().T
    err = np.abs(ours - reference).max() / reference.max()
    assert err < 0.01


# ---------------------------------------------------------------- geometry objects
def test_geometry_objects():
    vol = volume(shape=SHAPE, voxel_size=0.7)
    assert vol.slab(slice(1, 3)).shape == (2,) + SHAPE[1:]
    par = parallel_beam(angles=ANGLES, det_count=20, det_spacing=0.8)
    op = ParallelBeamCT.from_geometry(vol, par)
    ref = ParallelBeamCT(volume_shape=SHAPE, angles=ANGLES, det_count=20, voxel_size=0.7,
                         det_spacing=0.8)
    x = torch.randn(SHAPE, dtype=torch.float64)
    torch.testing.assert_close(op(x), ref(x), rtol=0, atol=0)
    assert par.subset(slice(0, 3)).num_angles == 3
    cone = cone_beam(angles=ANGLES, src_dist=30, det_dist=20, det_shape=(14, 40))
    assert cone.magnification == pytest.approx(50 / 30)
    assert ConeBeamCT.from_geometry(volume(shape=SHAPE), cone).range_shape == (14, 9, 40)
    with pytest.raises(AttributeError, match="immutable"):
        op.geometry = par
    assert "ParallelBeamCT((5, 9, 20) ← (5, 14, 11)" in repr(op)


def test_operator_follows_dtype_and_device_of_input():
    op = ParallelBeamCT(volume_shape=SHAPE, angles=ANGLES.float())
    assert op.angles.dtype == torch.float32
    assert op(torch.zeros(SHAPE)).dtype == torch.float32
    assert op.to(torch.float64).angles.dtype == torch.float64


# ---------------------------------------------------------------- errors
def test_errors_name_the_operator_expected_and_given():
    with pytest.raises(ValueError, match=r"ParallelBeamCT: angles must be 1-D.*\(3, 2\)"):
        ParallelBeamCT(volume_shape=SHAPE, angles=torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"ConeBeamCT: angles must be 1-D"):
        ConeBeamCT(volume_shape=SHAPE, angles=torch.zeros(2, 2), src_dist=30, det_dist=20,
                   det_shape=(20, 40))
    with pytest.raises(ValueError, match=r"ParallelBeamCT: volume_shape must be \(D, H, W\)"):
        ParallelBeamCT(volume_shape=(14, 11), angles=ANGLES)
    op = ParallelBeamCT(volume_shape=SHAPE, angles=ANGLES)
    with pytest.raises(ValueError, match=r"ParallelBeamCT.forward: expected trailing shape "
                                         r"\(5, 14, 11\).*got \(5, 11, 14\)"):
        op(torch.zeros(5, 11, 14))
    with pytest.raises(ValueError, match=r"ParallelBeamCT.adjoint: expected trailing shape"):
        op.adjoint(torch.zeros(SHAPE))
    with pytest.raises(TypeError, match=r"ParallelBeamCT.forward: expected float32 or float64, "
                                        r"got dtype torch.float16"):
        op(torch.zeros(SHAPE, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"ParallelBeamCT.forward: expected a real floating"):
        op(torch.zeros(SHAPE, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"ParallelBeamCT: the detector is too small.*"
                                         r"det_count=10.*use det_count >= 1[0-9]"):
        ParallelBeamCT(volume_shape=SHAPE, angles=ANGLES, det_count=10)
    with pytest.raises(ValueError, match=r"ConeBeamCT: the detector is too small.*"
                                         r"det_shape \(V, U\) = \(5, 11\)"):
        ConeBeamCT(volume_shape=SHAPE, angles=ANGLES, src_dist=30, det_dist=20,
                   det_shape=(5, 11))
    for bad in (dict(src_dist=0.0), dict(src_dist=-3.0), dict(det_dist=0.0)):
        kw = dict(src_dist=30.0, det_dist=20.0) | bad
        name = next(iter(bad))
        with pytest.raises(ValueError, match=rf"ConeBeamCT: {name} must be positive.*got"):
            ConeBeamCT(volume_shape=SHAPE, angles=ANGLES, det_shape=(40, 40), **kw)
    with pytest.raises(ValueError, match=r"ConeBeamCT: the source must lie outside the volume"):
        ConeBeamCT(volume_shape=SHAPE, angles=ANGLES, src_dist=5, det_dist=20,
                   det_shape=(40, 40))
    with pytest.raises(ValueError, match=r"ParallelBeamCT: voxel_size must be positive"):
        ParallelBeamCT(volume_shape=SHAPE, angles=ANGLES, voxel_size=0)
    with pytest.raises(ValueError, match=r"fbp: filter must be one of"):
        fbp(torch.zeros(op.range_shape), op, filter="ramp")
    with pytest.raises(TypeError, match=r"fdk: op must be a ConeBeamCT"):
        fdk(torch.zeros(op.range_shape), op)
    with pytest.raises(ValueError, match=r"ParallelBeamCT.slab: empty slab"):
        op.slab(slice(3, 3))


# ---------------------------------------------------------------- CUDA
@pytest.mark.gpu
def test_cuda_matches_cpu():
    for op in (ParallelBeamCT(volume_shape=SHAPE, angles=ANGLES), _cone()):
        x = torch.randn(2, *SHAPE, dtype=torch.float64)
        y = torch.randn(2, *op.range_shape, dtype=torch.float64)
        fx, ay = op(x), op.adjoint(y)
        op.to("cuda")  # in place, like any nn.Module
        torch.testing.assert_close(op(x.cuda()).cpu(), fx, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(op.adjoint(y.cuda()).cpu(), ay, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(op(x.float().cuda()).double().cpu(), fx, rtol=1e-4, atol=1e-3)
        check_operator(op)
