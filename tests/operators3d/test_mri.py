"""Multi-coil MRI: exact adjoints, agreement with NumPy, hybrid vs 3D, slabs, errors."""

import numpy as np
import pytest
import torch

from operators3d import (
    CenteredFFT,
    CoilExpand,
    Mask,
    MultiCoilMRI,
    centered_fft,
    centered_ifft,
    readout_to_hybrid,
)
from operators3d.fft import fft_phases
from operators3d.testing import check_operator

D, H, W, C = 5, 6, 7, 3


def _maps(dtype=torch.complex128, shape=(C, D, H, W), seed=0):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _mask(shape=(H, W), seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.4


def _operators():
    maps = _maps()
    return {
        "hybrid": MultiCoilMRI(mask=_mask(), coil_maps=maps),
        "hybrid_small_blocks": MultiCoilMRI(mask=_mask(), coil_maps=maps, block_elements=40),
        "hybrid_coil_chunk": MultiCoilMRI(mask=_mask(), coil_maps=maps, coil_chunk=2),
        "full3d": MultiCoilMRI(mask=_mask((D, H, W)), coil_maps=maps),
        "single_coil": MultiCoilMRI(mask=_mask(), volume_shape=(D, H, W), dtype=torch.complex128),
        "one_coil_map": MultiCoilMRI(mask=_mask(), coil_maps=maps[:1]),
        "weighted_mask": MultiCoilMRI(mask=torch.rand(H, W, dtype=torch.float64), coil_maps=maps),
        "slab": MultiCoilMRI(mask=_mask(), coil_maps=maps).slab(slice(1, 4)),
        "coil_expand": CoilExpand(maps),
        "fft2": CenteredFFT((C, D, H, W), num_dims=2, dtype=torch.complex128),
        "fft3": CenteredFFT((C, D, H, W), num_dims=3, dtype=torch.complex128),
        "mask": Mask(_mask(), shape=(C, D, H, W)),
        "composition": MultiCoilMRI(mask=_mask(), coil_maps=maps).as_composition(),
    }


@pytest.mark.parametrize("name", list(_operators()))
def test_operator_battery(name):
    op = _operators()[name]
    errors = check_operator(op, rtol=1e-10)
    assert errors["adjoint"] < 1e-10


@pytest.mark.parametrize("kind", ["hybrid", "full3d", "single_coil", "slab"])
def test_gradcheck(kind):
    # gradcheck builds Jacobians numerically: small odd sizes keep it quick.
    maps = _maps(shape=(2, 3, 4, 5))
    if kind == "hybrid":
        op = MultiCoilMRI(mask=_mask((4, 5)), coil_maps=maps)
    elif kind == "full3d":
        op = MultiCoilMRI(mask=_mask((3, 4, 5)), coil_maps=maps)
    elif kind == "single_coil":
        op = MultiCoilMRI(mask=_mask((4, 5)), volume_shape=(3, 4, 5), dtype=torch.complex128)
    else:
        op = MultiCoilMRI(mask=_mask((4, 5)), coil_maps=maps).slab(slice(1, 3))
    check_operator(op, gradients=True)


@pytest.mark.parametrize("mask_shape", [(H, W), (D, H, W)])
def test_forward_matches_numpy(mask_shape):
    maps, mask = _maps(), _mask(mask_shape)
    x = torch.randn(2, D, H, W, dtype=torch.complex128, generator=torch.Generator().manual_seed(4))
    op = MultiCoilMRI(mask=mask, coil_maps=maps)
    axes = (-2, -1) if len(mask_shape) == 2 else (-3, -2, -1)
    coil_images = maps.numpy() * x.numpy()[:, None]
    ref = mask.numpy() * np.fft.fftshift(
        np.fft.fftn(np.fft.ifftshift(coil_images, axes=axes), axes=axes, norm="ortho"), axes=axes
    )
    got = op(x).numpy()
    assert np.abs(got - ref).max() < 1e-12 * np.abs(ref).max()
    # the adjoint against NumPy too
    y = torch.randn(op.range_shape, dtype=torch.complex128, generator=torch.Generator().manual_seed(8))
    back = np.fft.fftshift(
        np.fft.ifftn(np.fft.ifftshift(mask.numpy() * y.numpy(), axes=axes), axes=axes, norm="ortho"),
        axes=axes,
    )
    ref_adj = (np.conj(maps.numpy()) * back).sum(axis=0)
    assert np.abs(op.adjoint(y).numpy() - ref_adj).max() < 1e-12 * np.abs(ref_adj).max()


def test_forward_complex64_matches_numpy_to_float_rounding():
    maps, mask = _maps(torch.complex64, (4, 8, 32, 30)), _mask((32, 30))
    x = torch.randn(8, 32, 30, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))
    ref = mask.numpy() * np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(maps.numpy().astype(np.complex128) * x.numpy(), axes=(-2, -1)),
                    norm="ortho"), axes=(-2, -1))
    got = MultiCoilMRI(mask=mask, coil_maps=maps)(x).numpy()
    assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 256, 257])
def test_centering_phases_equal_shifts(n):
    x = torch.randn(n, dtype=torch.complex128, generator=torch.Generator().manual_seed(n))
    p_in, p_out = fft_phases(n, dtype=torch.complex128)
    fast = p_out * torch.fft.fft(p_in * x, norm="ortho")
    assert torch.allclose(fast, centered_fft(x, dims=(-1,)), atol=1e-12)
    assert torch.allclose(centered_ifft(centered_fft(x, dims=(-1,)), dims=(-1,)), x, atol=1e-12)


def test_full_3d_with_mask_constant_along_d_equals_readout_ifft_then_hybrid():
    maps, mask2 = _maps(), _mask()
    mask3 = mask2.expand(D, H, W).clone()
    x = torch.randn(D, H, W, dtype=torch.complex128, generator=torch.Generator().manual_seed(6))
    k3 = MultiCoilMRI(mask=mask3, coil_maps=maps)(x)
    hybrid = MultiCoilMRI(mask=mask2, coil_maps=maps)(x)
    assert torch.allclose(readout_to_hybrid(k3, readout_dim=-3), hybrid, atol=1e-12)


def test_slab_is_exact_operator_of_the_slab():
    op = _operators()["hybrid"]
    x = torch.randn(2, D, H, W, dtype=torch.complex128, generator=torch.Generator().manual_seed(7))
    y = op(x)
    sl = slice(1, 4)
    assert torch.allclose(op.slab(sl)(x[:, sl]), y[:, :, sl], atol=1e-13)
    assert torch.allclose(op.slab(sl).adjoint(y[:, :, sl]), op.adjoint(y)[:, sl], atol=1e-13)
    with pytest.raises(ValueError, match="couples all D-slices"):
        _operators()["full3d"].slab(sl)
    with pytest.raises(ValueError, match="empty slab"):
        op.slab(slice(3, 3))


def test_composition_equals_fused_operator():
    op = _operators()["hybrid"]
    comp = op.as_composition()
    x = torch.randn(D, H, W, dtype=torch.complex128, generator=torch.Generator().manual_seed(9))
    y = torch.randn(C, D, H, W, dtype=torch.complex128, generator=torch.Generator().manual_seed(10))
    assert torch.allclose(comp(x), op(x), atol=1e-13)
    assert torch.allclose(comp.adjoint(y), op.adjoint(y), atol=1e-13)
    assert torch.allclose(op.normal(x), op.adjoint(op(x)), atol=1e-13)


def test_batched_leading_dims_without_loop():
    op = _operators()["hybrid"]
    x = torch.randn(2, 3, D, H, W, dtype=torch.complex128, generator=torch.Generator().manual_seed(11))
    y = op(x)
    assert y.shape == (2, 3, C, D, H, W)
    assert torch.allclose(y[1, 2], op(x[1, 2]), atol=1e-13)


def test_bad_input_errors_name_operator_expected_and_given():
    maps = _maps()
    with pytest.raises(ValueError, match=r"MultiCoilMRI: mask \(H, W\) must be \(6, 7\).*got \(7, 6\)"):
        MultiCoilMRI(mask=_mask((W, H)), coil_maps=maps)
    with pytest.raises(ValueError, match=r"MultiCoilMRI: mask \(D, H, W\) must be \(5, 6, 7\)"):
        MultiCoilMRI(mask=_mask((4, H, W)), coil_maps=maps)
    with pytest.raises(TypeError, match="coil_maps must be complex"):
        MultiCoilMRI(mask=_mask(), coil_maps=maps.real)
    with pytest.raises(TypeError, match="mask must be bool or real"):
        MultiCoilMRI(mask=_mask().to(torch.complex64), coil_maps=maps)
    with pytest.raises(ValueError, match=r"coil_maps must be \(C, D, H, W\)"):
        MultiCoilMRI(mask=_mask(), coil_maps=maps[0])
    with pytest.raises(ValueError, match="volume_shape"):
        MultiCoilMRI(mask=_mask())
    op = MultiCoilMRI(mask=_mask(), coil_maps=maps)
    with pytest.raises(ValueError, match=r"MultiCoilMRI.forward: expected trailing shape \(5, 6, 7\)"):
        op(torch.zeros(5, 7, 6, dtype=torch.complex128))
    with pytest.raises(ValueError, match=r"MultiCoilMRI.adjoint: expected trailing shape \(3, 5, 6, 7\)"):
        op.adjoint(torch.zeros(2, 5, 6, 7, dtype=torch.complex128))
    with pytest.raises(TypeError, match="MultiCoilMRI.forward: expected a complex tensor"):
        op(torch.zeros(5, 6, 7, dtype=torch.float64))


def test_complex64_forward_keeps_precision_and_dtype():
    op = MultiCoilMRI(mask=_mask(), coil_maps=_maps(torch.complex64))
    x = torch.randn(D, H, W, dtype=torch.complex64)
    assert op(x).dtype == torch.complex64
    assert op.adjoint(op(x)).dtype == torch.complex64


def test_state_dict_holds_only_mask_and_maps():
    op = _operators()["hybrid"]
    assert set(op.state_dict()) == {"mask", "coil_maps"}


@pytest.mark.gpu
def test_cuda_matches_cpu():
    op = MultiCoilMRI(mask=_mask(), coil_maps=_maps(torch.complex64))
    x = torch.randn(2, D, H, W, dtype=torch.complex64)
    cuda = op.to("cuda")
    y = cuda(x.cuda())
    assert y.device.type == "cuda"
    ref = MultiCoilMRI(mask=_mask(), coil_maps=_maps(torch.complex64))(x)
    assert torch.allclose(y.cpu(), ref, atol=1e-5)
    assert torch.allclose(cuda.adjoint(y).cpu(), ref.new_zeros(()) + op.adjoint(y).cpu(), atol=1e-5)
