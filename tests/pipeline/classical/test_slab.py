"""pipeline.classical's slab entry point: each method is its kernel with the given parameters (to the
bit), Noise2Inverse subsets are the FBPs of every K-th angle, and FDK by blocks of detector rows
sums to the whole FDK."""

from __future__ import annotations

import math

import pytest
import torch

from operators3d import GaussianNoise, MultiCoilMRI, poisson_disc_mask, sense_cg, simulate_coil_maps
from operators3d.ct import ConeBeamCT, ParallelBeamCT, fbp, fdk
from pipeline.classical import (
    TVProblem,
    fdk_backproject,
    fdk_filtered,
    n2i_slab,
    reconstruct_slab,
    tv_reconstruct,
)


def _ct():
    gen = torch.Generator().manual_seed(0)
    op = ParallelBeamCT(volume_shape=(2, 16, 16), angles=torch.arange(12) * math.pi / 12)
    return op(torch.rand(op.domain_shape, generator=gen)), op


def _mri():
    gen = torch.Generator().manual_seed(0)
    shape = (2, 16, 16)
    op = MultiCoilMRI(mask=poisson_disc_mask(shape[1:], 2, calibration=4, generator=gen),
                      coil_maps=simulate_coil_maps(3, shape))
    clean = op(torch.rand(shape, generator=gen).to(torch.complex64))
    return GaussianNoise(0.01).sample(clean, generator=gen, mask=op.mask), op


def test_each_method_is_its_kernel():
    y, op = _ct()
    assert torch.equal(reconstruct_slab("adjoint", y, op, {}), op.adjoint(y))
    assert torch.equal(reconstruct_slab("fbp", y, op, {"filter": "cosine", "cutoff": 0.6}),
                       fbp(y, op, filter="cosine", cutoff=0.6))
    problem = TVProblem("ct", (1.0, 1.0, 1.0), True)
    assert torch.equal(reconstruct_slab("tv", y, op, {"tv_weight": 0.01, "iterations": 5}, problem=problem),
                       tv_reconstruct(y, op, problem, None, 0.01, 5))
    ym, opm = _mri()
    assert torch.equal(reconstruct_slab("sense", ym, opm, {"l2_weight": 1e-3, "iterations": 7}),
                       sense_cg(ym, opm, l2_weight=1e-3, num_iters=7))
    with pytest.raises(ValueError, match="TVProblem"):
        reconstruct_slab("tv", y, op, {"tv_weight": 0.01, "iterations": 5})
    with pytest.raises(ValueError, match="method must be one of"):
        reconstruct_slab("fdk", y, op, {})


def test_n2i_subsets_are_the_fbps_of_every_kth_angle():
    y, op = _ct()
    subs = n2i_slab(y, op, 3, filter="hann")
    assert subs.shape == (3, *op.domain_shape)
    for j in range(3):
        assert torch.equal(subs[j], fbp(y[:, j::3], op.subset(slice(j, None, 3)), filter="hann"))


def test_fdk_by_blocks_of_rows_sums_to_the_whole_fdk():
    op = ConeBeamCT(volume_shape=(6, 12, 12), angles=torch.arange(10) * 2 * math.pi / 10, src_dist=30.0,
                    det_dist=15.0, det_shape=(12, 26))
    y = op(torch.rand(op.domain_shape, generator=torch.Generator().manual_seed(0)))
    whole = fdk(y, op, filter="hann")
    parts = torch.zeros_like(whole)
    for r0, r1 in ((0, 5), (5, 12)):
        rows = op.rows(slice(r0, r1))
        parts += fdk_backproject(fdk_filtered(y[r0:r1], rows, filter="hann"), rows)
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
