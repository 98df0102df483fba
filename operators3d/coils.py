"""Coil sensitivity maps: simulated ones for test scans, and ESPIRiT estimates from data.

Maps have shape ``(C, D, H, W)`` (``(C, H, W)`` for a 2D image) and enter the multi-coil model
``y_c = M ⊙ F(S_c ⊙ x)`` (``DESIGN.md``, *MRI*). Both functions return maps normalised so that
``Σ_c |S_c|² = 1`` wherever they are nonzero, so ``Σ_c conj(S_c) S_c x = x`` there and SENSE
coil combination needs no intensity correction.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .fft import complex_dtype_of, real_dtype_of
from .masks import calibration_region

__all__ = ["simulate_coil_maps", "estimate_coil_maps"]

_COILS_PER_RING = 8


# ----------------------------------------------------------------------------- simulation
def simulate_coil_maps(
    num_coils: int,
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.complex64,
    generator: torch.Generator | None = None,
    ring_radius: float = 1.5,
    device: torch.device | str | None = None,
    d_range: slice | None = None,
) -> torch.Tensor:
    """Smooth complex coil sensitivities from small coils on a cylinder around the volume.

    Coordinates are normalised to ``[−1, 1]`` along each image axis. Coils sit on a cylinder
    of radius ``ring_radius`` about the D axis, in rings of up to 8 spread evenly along D
    (one ring at D = 0 for a 2D image or ``D == 1``), alternate rings rotated by half a coil.
    Each coil sees a Biot–Savart-like ``1/distance`` magnitude and a smooth phase: a constant
    plus a gentle ramp along the ring's tangent. The maps are then divided by their
    root-sum-of-squares, so ``Σ_c |S_c|² = 1`` *everywhere* (not only in an object).

    Without a generator the layout is fixed (coil ``j`` of ``n`` in a ring at angle
    ``2πj/n``, phase offset ``2πj/C``); with one, the ring rotations, the coil distances
    (±10 %) and the phase offsets are drawn from it.

    Math:
        ``S_c(r) = exp(i(φ_c + (π/2)⟨r, t_c⟩)) / ‖r − p_c‖``, then
        ``S_c ← S_c / sqrt(Σ_c' |S_c'|²)``.

    Args:
        num_coils: ``C``.
        shape: the image shape ``(D, H, W)`` or ``(H, W)``.
        dtype: a complex dtype of the maps.
        generator: draws the layout jitter; ``None`` gives the fixed layout.
        ring_radius: the cylinder radius in normalised units (> √2 keeps coils outside the
            image corners).
        device: where the maps are made.
        d_range: only these D-rows of the volume's maps (the maps are pointwise in D, so a
            slab computed alone equals the same rows of the whole; 3D ``shape`` only).

    Returns:
        complex coil maps.

    Shape:
        ``(C, D, H, W)`` for a 3D ``shape``, ``(C, H, W)`` for a 2D one.
    """
    owner = "simulate_coil_maps"
    if int(num_coils) != num_coils or num_coils < 1:
        raise ValueError(f"{owner}: num_coils must be a positive int, got {num_coils}")
    num_coils = int(num_coils)
    dims = tuple(int(s) for s in shape)
    if len(dims) not in (2, 3) or any(s <= 0 for s in dims):
        raise ValueError(f"{owner}: shape must be positive (D, H, W) or (H, W), got {dims}")
    if not dtype.is_complex:
        raise ValueError(f"{owner}: dtype must be complex, got {dtype}")
    if ring_radius <= math.sqrt(2):
        raise ValueError(
            f"{owner}: ring_radius must exceed √2 (outside the image corners), got {ring_radius}"
        )
    depth, height, width = (1, *dims) if len(dims) == 2 else dims
    if d_range is not None and len(dims) == 2:
        raise ValueError(f"{owner}: d_range needs a 3D shape (D, H, W), got {dims}")
    d_rows = slice(None) if d_range is None else d_range
    real = torch.float64

    num_rings = 1 if depth == 1 else max(1, math.ceil(num_coils / _COILS_PER_RING))
    ring_sizes = [
        num_coils // num_rings + (1 if r < num_coils % num_rings else 0) for r in range(num_rings)
    ]
    if generator is None:
        ring_turns = [math.pi / n * (r % 2) for r, n in enumerate(ring_sizes)]
        distance_jitter = torch.ones(num_coils, dtype=real)
        phase_offsets = 2 * math.pi * torch.arange(num_coils, dtype=real) / num_coils
    else:
        ring_turns = (2 * math.pi * torch.rand(num_rings, generator=generator, dtype=real)).tolist()
        distance_jitter = 1 + 0.1 * (2 * torch.rand(num_coils, generator=generator, dtype=real) - 1)
        phase_offsets = 2 * math.pi * torch.rand(num_coils, generator=generator, dtype=real)

    angles, ring_d = [], []
    for r, n in enumerate(ring_sizes):
        angles += [ring_turns[r] + 2 * math.pi * j / n for j in range(n)]
        ring_d += [0.0 if num_rings == 1 else -0.5 + r / (num_rings - 1)] * n
    theta = torch.tensor(angles, dtype=real)
    centres = torch.stack(
        [
            torch.tensor(ring_d, dtype=real),
            ring_radius * distance_jitter * torch.sin(theta),
            ring_radius * distance_jitter * torch.cos(theta),
        ],
        dim=1,
    )  # (C, 3): (d, y, x)
    tangents = torch.stack([-torch.cos(theta), torch.sin(theta)], dim=1)  # (C, 2) in (y, x)

    def axis(n: int) -> torch.Tensor:
        return (torch.arange(n, dtype=real) - (n - 1) / 2) / (n / 2)

    zd, zy, zx = axis(depth)[d_rows], axis(height), axis(width)
    rd = zd[None, :, None, None] - centres[:, 0, None, None, None]
    ry = zy[None, None, :, None] - centres[:, 1, None, None, None]
    rx = zx[None, None, None, :] - centres[:, 2, None, None, None]
    magnitude = 1.0 / torch.sqrt(rd**2 + ry**2 + rx**2)
    along = zy[None, None, :, None] * tangents[:, 0, None, None, None] + (
        zx[None, None, None, :] * tangents[:, 1, None, None, None]
    )
    phase = phase_offsets[:, None, None, None] + (math.pi / 2) * along
    maps = torch.polar(magnitude, phase.expand_as(magnitude))
    maps = maps / torch.sqrt((maps.abs() ** 2).sum(dim=0, keepdim=True))
    if len(dims) == 2:
        maps = maps[:, 0]
    return maps.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- ESPIRiT
def _calibration_matrix(calib: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Rows are the ``C·k·k`` patches of a ``(d, C, cH, cW)`` block: ``(d, P, C·k²)``."""
    d, c = calib.shape[:2]
    patches = calib.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)  # d, C, pH, pW, k, k
    patches = patches.permute(0, 2, 3, 1, 4, 5)
    return patches.reshape(d, -1, c * kernel_size * kernel_size)


def _kernel_correlation(basis: torch.Tensor, num_coils: int, kernel_size: int) -> torch.Tensor:
    """``K_cc'(Δ) = (1/k²) Σ_j Σ_p b_j[c, p] conj(b_j[c', p + Δ])`` for ``Δ ∈ [−(k−1), k−1]²``.

    Args:
        basis: ``(d, n, C·k²)``, the kept rows of ``Vᴴ`` (zero rows are dropped vectors).

    Returns:
        ``(d, C, C, 2k−1, 2k−1)``, index ``Δ + k − 1``.
    """
    d, n = basis.shape[:2]
    k = kernel_size
    size = 2 * k - 1
    kernels = basis.reshape(d, n, num_coils, k, k)
    # Circular correlation of length 2k − 1 equals the linear one: the support fits.
    spectra = torch.fft.fft2(kernels, s=(size, size))
    cross = torch.einsum("djcuv,djeuv->dceuv", spectra.conj(), spectra)
    # ifft(conj(B̂_c) B̂_c')[m] = Σ_p conj(b_c[p]) b_c'[p + m] = conj(k² K_cc'(m)).
    corr = torch.fft.ifft2(cross).conj() / (k * k)
    return torch.roll(corr, shifts=(k - 1, k - 1), dims=(-2, -1))


def _gram_on_grid(
    corr: torch.Tensor, image_shape: tuple[int, int], grid_shape: tuple[int, int]
) -> torch.Tensor:
    """``G(t) = Σ_Δ K(Δ) exp(−2πi ⟨Δ, t⟩ / N)`` on a grid spanning the image.

    ``t`` runs from ``−N//2`` to ``N − 1 − N//2`` (image index minus the centre) in
    ``grid_shape`` equal steps per axis; the image-space ESPIRiT operator is the Hermitian
    ``C×C`` matrix ``G(t)`` per point (the centred DFT turns the k-space correlation into it).

    Returns:
        ``(d, gH, gW, C, C)``.
    """
    size = corr.shape[-1]
    half = (size - 1) // 2
    delta = torch.arange(-half, half + 1, dtype=torch.float64)
    factors = []
    for n, g in zip(image_shape, grid_shape):
        t = torch.linspace(-(n // 2), n - 1 - n // 2, g, dtype=torch.float64)
        angle = -2 * math.pi * delta[:, None] * t[None, :] / n
        factors.append(torch.polar(torch.ones_like(angle), angle).to(corr.device, corr.dtype))
    gram = torch.einsum("dceuv,uy->dceyv", corr, factors[0])
    gram = torch.einsum("dceyv,vz->dyzce", gram, factors[1])
    # Exactly Hermitian for eigh (rounding breaks it slightly).
    return 0.5 * (gram + gram.conj().transpose(-1, -2))


def _resize(field: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(..., gH, gW)`` real or complex samples spanning the image."""
    if tuple(field.shape[-2:]) == shape:
        return field
    lead = field.shape[:-2]
    if field.is_complex():
        parts = torch.view_as_real(field).movedim(-1, -3)
    else:
        parts = field[..., None, :, :]
    flat = parts.reshape(-1, parts.shape[-3], *parts.shape[-2:])
    out = F.interpolate(flat, size=shape, mode="bilinear", align_corners=True)
    out = out.reshape(*lead, parts.shape[-3], *shape)
    if field.is_complex():
        return torch.view_as_complex(out.movedim(-3, -1).contiguous())
    return out[..., 0, :, :]


def estimate_coil_maps(
    kspace: torch.Tensor,
    *,
    calibration: int | Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
    method: str = "espirit",
    kernel_size: int = 6,
    threshold: float = 0.02,
    crop: float = 0.95,
    eigen_grid: int | None = 64,
    chunk_size: int = 8,
) -> torch.Tensor:
    """Coil maps by ESPIRiT from the fully sampled calibration block, one 2D problem per slice.

    ESPIRiT (Uecker et al., "ESPIRiT — an eigenvalue approach to autocalibrating parallel
    MRI: where SENSE meets GRAPPA", MRM 2014), per D-slice of hybrid k-space and batched over
    slices: the calibration (block-Hankel) matrix ``A`` of all ``k×k×C`` patches is
    factorised, ``A = UΣVᴴ``; the rows of ``Vᴴ`` with ``σ > threshold · σ_max`` span the
    signal patches. Averaging the projection onto them over all patch positions is a
    convolution in k-space, i.e. a Hermitian ``C×C`` matrix ``G(x)`` per pixel in image space
    with eigenvalues in ``[0, 1]``; its eigenvector for eigenvalue 1 is the coil sensitivity.
    Maps are zeroed where the top eigenvalue is below ``crop``, their phase is taken relative
    to a virtual body coil (the dominant coil combination of the calibration data) so they
    are smooth, and they are normalised to ``Σ_c |S_c|² = 1`` where nonzero.

    ``G`` is a trigonometric polynomial of degree ``k − 1``, so it and its eigenvectors vary
    on the scale of ``FOV / k``: the eigenproblems are solved on a grid of at most
    ``eigen_grid`` points per axis spanning the image, and the maps (and eigenvalues) are
    interpolated bilinearly to the image size. ``eigen_grid=None`` solves at every pixel.

    Math:
        ``G(x) = (1/k²) Σ_j ĝ_j(x) ĝ_j(x)ᴴ``, ``ĝ_j(x) = Σ_p v_j[:, p] e^{2πi⟨p, x⟩/N}``
        (``v_j`` the kept rows of ``Vᴴ``, ``x`` relative to the centre ``N // 2``);
        ``G(x) S(x) = λ(x) S(x)``, ``S = 0`` where ``λ < crop``.

    Args:
        kspace: multi-coil hybrid k-space (readout already inverse-transformed) with the
            calibration block fully sampled, or the calibration block itself.
        calibration: the calibration block size ``c`` or ``(cH, cW)`` when ``kspace`` is the
            full grid (the block is cut out with :func:`~operators3d.masks.calibration_region`);
            ``None`` when ``kspace`` already is the block.
        shape: the image shape ``(H, W)``; defaults to the k-space grid when ``calibration``
            is given, and is required when it is not.
        method: ``"espirit"`` (the only method so far).
        kernel_size: ``k``, the patch size in k-space.
        threshold: keep singular vectors with ``σ > threshold · σ_max``.
        crop: zero the maps where the top eigenvalue is below this.
        eigen_grid: the most points per axis at which eigenproblems are solved; ``None``
            for every pixel.
        chunk_size: slices processed together (bounds memory, not results).

    Returns:
        complex coil maps, the dtype of ``kspace``.

    Shape:
        ``kspace``: ``(C, D, kH, kW)`` or ``(C, D, cH, cW)``, or the same without ``D``;
        returns ``(C, D, H, W)`` (``(C, H, W)`` without ``D``).
    """
    owner = "estimate_coil_maps"
    if method != "espirit":
        raise ValueError(f"{owner}: method must be 'espirit', got {method!r}")
    if not isinstance(kspace, torch.Tensor) or not kspace.is_complex():
        got = kspace.dtype if isinstance(kspace, torch.Tensor) else type(kspace).__name__
        raise TypeError(f"{owner}: expected complex k-space, got {got}")
    if kspace.ndim not in (3, 4):
        raise ValueError(
            f"{owner}: expected k-space of shape (C, D, kH, kW) or (C, kH, kW), got "
            f"{tuple(kspace.shape)}"
        )
    squeeze = kspace.ndim == 3
    data = kspace[:, None] if squeeze else kspace
    num_coils, depth = data.shape[:2]
    grid = tuple(data.shape[-2:])

    if calibration is not None:
        image_shape = grid if shape is None else tuple(int(s) for s in shape)
        if image_shape != grid:
            raise ValueError(
                f"{owner}: shape must equal the k-space grid {grid} when calibration is given, "
                f"got {image_shape}"
            )
        rows, cols = calibration_region(grid, calibration)
        calib = data[..., rows, cols]
    else:
        if shape is None:
            raise ValueError(
                f"{owner}: give shape=(H, W) when kspace is the calibration block "
                f"(or calibration= with full k-space), got neither"
            )
        image_shape = tuple(int(s) for s in shape)
        calib = data
    if len(image_shape) != 2 or any(s <= 0 for s in image_shape):
        raise ValueError(f"{owner}: shape must be positive (H, W), got {image_shape}")
    calib_shape = tuple(calib.shape[-2:])
    if kernel_size < 1 or kernel_size > min(calib_shape):
        raise ValueError(
            f"{owner}: kernel_size must be between 1 and the calibration size {calib_shape}, "
            f"got {kernel_size}"
        )
    if any(c > n for c, n in zip(calib_shape, image_shape)):
        raise ValueError(
            f"{owner}: the calibration block {calib_shape} must fit in the image {image_shape}"
        )
    if not 0 <= threshold < 1:
        raise ValueError(f"{owner}: threshold must be in [0, 1), got {threshold}")
    if chunk_size < 1:
        raise ValueError(f"{owner}: chunk_size must be at least 1, got {chunk_size}")

    work_dtype = complex_dtype_of(kspace.dtype)
    calib = calib.to(work_dtype)
    height, width = image_shape
    grid_shape = (
        (height, width)
        if eigen_grid is None
        else (min(height, int(eigen_grid)), min(width, int(eigen_grid)))
    )
    if min(grid_shape) < 2:
        raise ValueError(f"{owner}: eigen_grid must be at least 2, got {eigen_grid}")

    # Virtual body coil: the dominant coil combination of all calibration data.
    flat = calib.reshape(num_coils, -1)
    _, body = torch.linalg.eigh(flat @ flat.conj().T)
    body = body[:, -1]

    out = torch.zeros(
        (num_coils, depth, height, width), dtype=kspace.dtype, device=kspace.device
    )
    real = real_dtype_of(work_dtype)
    for start in range(0, depth, chunk_size):
        block = calib[:, start : start + chunk_size].transpose(0, 1)  # d, C, cH, cW
        matrix = _calibration_matrix(block, kernel_size)
        # Right singular vectors from the eigenvectors of the small Gram matrix AᴴA: as
        # accurate for the kept subspace, and several times cheaper than an SVD of A.
        power, vecs = torch.linalg.eigh(matrix.conj().transpose(-1, -2) @ matrix)
        keep = power > threshold**2 * power[:, -1:]  # σ² > threshold² σ_max²
        basis = vecs.conj().transpose(-1, -2) * keep[..., None].to(vecs.dtype)  # rows of Vᴴ
        corr = _kernel_correlation(basis, num_coils, kernel_size)
        gram = _gram_on_grid(corr, image_shape, grid_shape)
        eigvals, eigvecs = torch.linalg.eigh(gram)
        value = eigvals[..., -1].to(real)  # d, gH, gW
        vec = eigvecs[..., -1]  # d, gH, gW, C
        ref = vec @ body.conj()
        vec = vec * (ref.conj() / ref.abs().clamp_min(torch.finfo(real).tiny))[..., None]
        maps = _resize(vec.permute(0, 3, 1, 2), image_shape)  # d, C, H, W
        value = _resize(value, image_shape)
        norm = torch.linalg.vector_norm(maps, dim=1, keepdim=True)
        keep_pixel = (value[:, None] >= crop) & (norm > 0)
        maps = torch.where(keep_pixel, maps / norm.clamp_min(torch.finfo(real).tiny), 0)
        out[:, start : start + chunk_size] = maps.transpose(0, 1).to(out.dtype)
    return out[:, 0] if squeeze else out
