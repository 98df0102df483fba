"""operators3d — matrix-free 3D imaging operators in pure torch.

Pure mathematics on tensors: linear operators, physics (MRI, CT), sampling masks, coil
maps, noise models and group actions. Imports torch (and numpy) only — never ``pipeline``,
``deepspeed``, ``dask`` or ``zarr``.

Conventions (stated once here and in DESIGN.md):

* **Axes.** A volume is ``(B, D, H, W)``; ``D`` is the separable axis (CT rotation axis /
  detector rows, MRI readout). Operators act on trailing dims and broadcast over leading ones.
* **MRI.** Complex dtypes. Centred orthonormal FFT ``F = fftshift ∘ fftn(norm="ortho") ∘
  ifftshift``. ``MultiCoilMRI``: ``y_c = M ⊙ F(S_c ⊙ x)``, adjoint ``Σ_c conj(S_c) F⁻¹(M ⊙ y_c)``;
  image ``(…, D, H, W)`` ↔ k-space ``(…, C, D, kH, kW)``. A mask ``(H, W)`` means hybrid space
  (2D FFT per D-slice), a mask ``(D, H, W)`` a full 3D FFT.
* **CT.** Sinogram ``(…, D, A, U)`` (detector rows, angles, columns); parallel beam with x along
  W and y along H centred at (N−1)/2, ray direction ``d(θ) = (−sin θ, cos θ)``; cone beam on a
  circular orbit with a flat detector ``(V, U)`` (see :mod:`operators3d.ct`). Angles in radians.
* **Inner product.** Plain ``vdot`` over flattened tensors: ``⟨A x, y⟩ = ⟨x, Aᴴ y⟩``.
* **Autograd.** The backward of an operator is its adjoint; nothing of the input is saved.

Example::

    import torch
    from operators3d import MultiCoilMRI, poisson_disc_mask, simulate_coil_maps, sense_cg

    maps = simulate_coil_maps(8, (16, 64, 64))
    mask = poisson_disc_mask((64, 64), 4, calibration=12, generator=torch.Generator().manual_seed(0))
    op = MultiCoilMRI(mask=mask, coil_maps=maps)
    y = op(x)                      # (8, 16, 64, 64) k-space
    x_hat = sense_cg(y, op)        # SENSE baseline
"""

from .algebra import (
    AdjointOperator,
    Composition,
    Diagonal,
    Identity,
    NormalOperator,
    Scaled,
    Sum,
)
from .base import LinearOperator
from .coils import estimate_coil_maps, simulate_coil_maps
from .ct import ConeBeamCT, ParallelBeamCT, cone_beam, fbp, fdk, parallel_beam, volume
from .fft import centered_fft, centered_ifft, readout_to_hybrid
from .krylov import conjugate_gradient, op_norm
from .masks import acceleration_of, calibration_region, gaussian_mask, poisson_disc_mask
from .mri import CenteredFFT, CoilExpand, Mask, MultiCoilMRI, sense_cg
from .noise import (
    GaussianNoise,
    NoiseModel,
    PoissonGaussianNoise,
    PoissonNoise,
    TransmissionNoise,
    noise_model_from_dict,
)
from .nonlinear import Clip, NonLinearForward, Quantize, Sign, nonlinear_from_dict
from .phantoms import ellipsoid_phantom, shepp_logan_3d
from .restrict import IndexSelect, MaskedOperator
from .transforms import (
    ComposedAction,
    CubeRotation,
    GroupAction,
    Reflect,
    Rotate,
    Rotate90,
    Shift,
    cube_rotations,
)

__all__ = [
    "LinearOperator",
    "Composition",
    "Sum",
    "Scaled",
    "AdjointOperator",
    "NormalOperator",
    "Identity",
    "Diagonal",
    "MaskedOperator",
    "IndexSelect",
    "op_norm",
    "conjugate_gradient",
    "centered_fft",
    "centered_ifft",
    "readout_to_hybrid",
    "MultiCoilMRI",
    "CoilExpand",
    "CenteredFFT",
    "Mask",
    "sense_cg",
    "ParallelBeamCT",
    "ConeBeamCT",
    "fbp",
    "fdk",
    "volume",
    "parallel_beam",
    "cone_beam",
    "poisson_disc_mask",
    "gaussian_mask",
    "calibration_region",
    "acceleration_of",
    "simulate_coil_maps",
    "estimate_coil_maps",
    "NoiseModel",
    "GaussianNoise",
    "PoissonNoise",
    "PoissonGaussianNoise",
    "TransmissionNoise",
    "noise_model_from_dict",
    "NonLinearForward",
    "Clip",
    "Quantize",
    "Sign",
    "nonlinear_from_dict",
    "GroupAction",
    "ComposedAction",
    "Rotate90",
    "Rotate",
    "Reflect",
    "Shift",
    "CubeRotation",
    "cube_rotations",
    "ellipsoid_phantom",
    "shepp_logan_3d",
]
