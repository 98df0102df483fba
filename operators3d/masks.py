"""Cartesian undersampling masks over the phase-encoding plane ``(ky, kz)``.

A mask of shape ``(H, W)`` selects the same phase encodes for every readout position, so it
applies per D-slice in hybrid space (``DESIGN.md``, *MRI*). ``True`` means sampled. The k-space
centre (DC) sits at index ``(H // 2, W // 2)``, as the centred FFT
``fftshift ∘ fftn ∘ ifftshift`` puts it, and every mask keeps a fully sampled calibration block
around it (:func:`calibration_region`) for coil-map estimation.

Acceleration is ``H · W / (number of sampled points)``, the calibration block included.
Every random draw comes from the ``torch.Generator`` passed in, so a seed fixes the mask.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "poisson_disc_mask",
    "gaussian_mask",
    "calibration_region",
    "acceleration_of",
]

# Random sequential adsorption of discs of diameter r jams at ≈ 0.547 area coverage
# (Feder 1980), i.e. ≈ 0.547 / (π r² / 4) ≈ 0.70 / r² points per unit area.
_RSA_POINTS_PER_AREA = 0.70


# ----------------------------------------------------------------------------- validation
def _grid_shape(shape: Sequence[int], owner: str) -> tuple[int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as err:
        raise ValueError(f"{owner}: shape must be a pair (H, W) of ints, got {shape!r}") from err
    if len(out) != 2:
        raise ValueError(f"{owner}: shape must be 2D (H, W), got {len(out)}D shape {out}")
    if any(s <= 0 for s in out):
        raise ValueError(f"{owner}: shape must be positive, got {out}")
    return out  # type: ignore[return-value]


def _calibration_size(
    calibration: int | Sequence[int], shape: tuple[int, int], owner: str
) -> tuple[int, int]:
    if isinstance(calibration, (int, np.integer)):
        size = (int(calibration), int(calibration))
    else:
        try:
            size = tuple(int(c) for c in calibration)
        except TypeError as err:
            raise ValueError(
                f"{owner}: calibration must be an int or a pair (cH, cW), got {calibration!r}"
            ) from err
        if len(size) != 2:
            raise ValueError(
                f"{owner}: calibration must be an int or a pair (cH, cW), got {calibration!r}"
            )
    if any(c < 0 for c in size):
        raise ValueError(f"{owner}: calibration must be non-negative, got {size}")
    if size[0] > shape[0] or size[1] > shape[1]:
        raise ValueError(
            f"{owner}: calibration {size} must fit in the grid {shape}, got a larger block"
        )
    return size  # type: ignore[return-value]


def _check_acceleration(acceleration: float, owner: str) -> float:
    acc = float(acceleration)
    if not math.isfinite(acc) or acc < 1:
        raise ValueError(f"{owner}: acceleration must be a finite number >= 1, got {acceleration}")
    return acc


def _budget(
    shape: tuple[int, int], acc: float, calib: tuple[int, int], owner: str
) -> tuple[int, int]:
    """The number of samples the acceleration allows and the number the calibration takes."""
    total = shape[0] * shape[1]
    num_samples = max(1, round(total / acc))
    num_calib = calib[0] * calib[1]
    if num_calib > num_samples:
        raise ValueError(
            f"{owner}: the calibration block {calib} alone takes {num_calib} samples, more than "
            f"the {num_samples} that acceleration {acc} allows on a {shape} grid; expected a "
            f"block of at most {num_samples} samples or an acceleration of at most "
            f"{total / num_calib:.3g}"
        )
    return num_samples, num_calib


def _normalised_radius(shape: tuple[int, int]) -> torch.Tensor:
    """``ρ = sqrt((2(ky − H//2)/H)² + (2(kz − W//2)/W)²)``: 1 at the middle of each edge."""
    h, w = shape
    ky = (torch.arange(h, dtype=torch.float64) - h // 2) * (2.0 / h)
    kz = (torch.arange(w, dtype=torch.float64) - w // 2) * (2.0 / w)
    return torch.sqrt(ky[:, None] ** 2 + kz[None, :] ** 2)


# ----------------------------------------------------------------------------- helpers
def calibration_region(
    shape: Sequence[int], calibration: int | Sequence[int]
) -> tuple[slice, slice]:
    """The slices of the fully sampled calibration block centred on the k-space centre.

    Along an axis of length ``N`` the block of size ``c`` starts at ``N // 2 − c // 2``, so
    the centre index ``N // 2`` (DC of the centred FFT) sits at its index ``c // 2``.

    Args:
        shape: the grid ``(H, W)``.
        calibration: the block size ``c`` or ``(cH, cW)``.

    Returns:
        ``(slice over H, slice over W)``; empty slices for a zero-size block.

    Shape:
        indexes the last two dims of a ``(..., H, W)`` tensor.
    """
    owner = "calibration_region"
    grid = _grid_shape(shape, owner)
    calib = _calibration_size(calibration, grid, owner)
    starts = [n // 2 - c // 2 for n, c in zip(grid, calib)]
    return slice(starts[0], starts[0] + calib[0]), slice(starts[1], starts[1] + calib[1])


def acceleration_of(mask: torch.Tensor) -> float:
    """The acceleration ``numel / count_nonzero`` of a mask (``inf`` for an empty mask).

    Shape:
        ``mask``: any shape (bool or 0/1 valued).
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"acceleration_of: expected a tensor, got {type(mask).__name__}")
    num = int(torch.count_nonzero(mask))
    return math.inf if num == 0 else mask.numel() / num


# ----------------------------------------------------------------------------- Poisson disc
class _DartThrower:
    """Greedy dart throwing over the grid points in one fixed random order.

    A candidate ``p`` is accepted unless an accepted point ``q`` blocks it: ``‖p − q‖² <
    r(q)² + u_q − ½`` with a dither ``u_q ~ U[0, 1)`` drawn once per point. Lattice distances
    are discrete, so without the dither the blocked set, and the sample count, would jump
    only where ``r²`` crosses an integer (a uniform-density mask could reach only a handful
    of accelerations); with it each lattice point is blocked with a probability that grows
    linearly in ``r²``. Every grid point is tried once, so the result is a maximal
    Poisson-disc set. The order and the dither are drawn once, so the sample count is a
    (nearly monotone) function of the radius scale alone.
    """

    def __init__(
        self,
        base_radius: np.ndarray,
        order: np.ndarray,
        dither: np.ndarray,
        excluded: np.ndarray,
    ) -> None:
        self.shape = base_radius.shape
        self.base_sq = (base_radius**2).ravel()
        self.dither = dither.ravel() - 0.5
        order = order[~excluded.ravel()[order]]
        self.order = order
        self._offsets: dict[tuple[int, int], np.ndarray] = {}

    def _disc_offsets(self, key: int, row_stride: int) -> np.ndarray:
        """Flat offsets of the lattice points with ``dy² + dz² ≤ key`` (padded row stride)."""
        cached = self._offsets.get((key, row_stride))
        if cached is None:
            r = math.isqrt(key)
            d = np.arange(-r, r + 1)
            dy, dz = np.meshgrid(d, d, indexing="ij")
            inside = dy**2 + dz**2 <= key
            cached = (dy[inside] * row_stride + dz[inside]).astype(np.int64)
            self._offsets[(key, row_stride)] = cached
        return cached

    def throw(self, scale: float) -> np.ndarray:
        """The accepted flat indices for the radius field ``scale · base_radius``."""
        h, w = self.shape
        # d² < t  ⇔  d² ≤ ceil(t) − 1 for integer d²: one exact key per distinct disc.
        keys = np.ceil(self.base_sq * scale**2 + self.dither).astype(np.int64) - 1
        pad = math.isqrt(max(int(keys.max()), 0))
        stride = w + 2 * pad
        ys, zs = np.divmod(self.order, w)
        padded_idx = ((ys + pad) * stride + zs + pad).tolist()
        order_keys = keys[self.order].tolist()
        flags = bytearray((h + 2 * pad) * stride)  # fast scalar reads
        blocked = np.frombuffer(flags, dtype=np.uint8)  # writable view for disc writes
        accepted = []
        append = accepted.append
        for pos, (pidx, key) in enumerate(zip(padded_idx, order_keys)):
            if flags[pidx]:
                continue
            append(pos)
            if key > 0:
                blocked[pidx + self._disc_offsets(key, stride)] = 1
        return self.order[np.asarray(accepted, dtype=np.int64)]


def poisson_disc_mask(
    shape: Sequence[int],
    acceleration: float,
    *,
    calibration: int | Sequence[int] = 24,
    generator: torch.Generator | None = None,
    density_power: float = 1.0,
    max_attempts: int = 30,
    tol: float = 0.05,
) -> torch.Tensor:
    """A variable-density Poisson-disc mask over ``(ky, kz)`` with a calibration block.

    Points keep a minimum distance that grows away from the k-space centre, so the pattern is
    dense near DC, sparse at the edge and free of clusters and holes: the incoherent, variable
    density sampling compressed sensing MRI asks for (Lustig, Donoho & Pauly, MRM 2007;
    Poisson disc: Bridson, SIGGRAPH 2007 sketches; Cook 1986; variable-density Poisson disc as
    in Vasanawala et al. 2011 and sigpy's ``mri.poisson``).

    Algorithm: one random order of the grid points is drawn from ``generator``; dart throwing
    visits them in that order and accepts a point unless an already accepted ``q`` lies closer
    than ``r(q)`` (a maximal Poisson-disc set on the grid; the squared radius is dithered by
    ``U[−½, ½)`` per point so that the discrete lattice distances still give a sample count
    that varies smoothly with the radius). The radius scale ``s`` is tuned by
    a safeguarded secant/bisection search (``count ∝ s⁻²``) until the acceleration is within
    ``tol``. The calibration block is sampled in full and added afterwards; its points neither
    compete nor block neighbours.

    Math:
        ``r(k) = s · (1 + ρ(k))^p`` pixels with ``ρ = ‖(2(ky − H//2)/H, 2(kz − W//2)/W)‖``
        (1 at the middle of each edge), ``p = density_power``; density ``∝ r⁻²``.

    Args:
        shape: the grid ``(H, W)``.
        acceleration: target ``H·W / num_sampled`` (calibration included), ``>= 1``.
        calibration: size ``c`` or ``(cH, cW)`` of the fully sampled centre block
            (:func:`calibration_region`); 0 for none.
        generator: the source of all randomness (the point order); ``None`` uses torch's
            global generator.
        density_power: ``p`` above; 0 gives uniform-density Poisson disc.
        max_attempts: the most radius scales tried before giving up.
        tol: the allowed relative error of the acceleration.

    Returns:
        a bool tensor, ``True`` where sampled.

    Raises:
        ValueError: for a non-2D shape, an acceleration below 1, a calibration block larger
            than the grid or than the sample budget.
        RuntimeError: when no radius scale within ``max_attempts`` reaches ``tol``.

    Shape:
        returns ``(H, W)``, DC at ``(H // 2, W // 2)``.
    """
    owner = "poisson_disc_mask"
    grid = _grid_shape(shape, owner)
    acc = _check_acceleration(acceleration, owner)
    calib = _calibration_size(calibration, grid, owner)
    if tol <= 0:
        raise ValueError(f"{owner}: tol must be positive, got {tol}")
    if max_attempts < 1:
        raise ValueError(f"{owner}: max_attempts must be at least 1, got {max_attempts}")
    if density_power < 0:
        raise ValueError(f"{owner}: density_power must be >= 0, got {density_power}")
    num_samples, num_calib = _budget(grid, acc, calib, owner)
    h, w = grid
    total = h * w

    # Drawn before any early return so the generator always advances the same way.
    order = torch.randperm(total, generator=generator).numpy()
    dither = torch.rand(grid, generator=generator, dtype=torch.float64).numpy()
    mask = torch.zeros(grid, dtype=torch.bool)
    mask[calibration_region(grid, calib)] = True
    if num_samples >= total:
        return torch.ones(grid, dtype=torch.bool)
    if num_samples == num_calib:
        return mask

    base = ((1.0 + _normalised_radius(grid)) ** density_power).numpy()
    excluded = mask.numpy()
    thrower = _DartThrower(base, order, dither, excluded)
    free = ~excluded
    want = num_samples - num_calib

    def relative_error(count: int) -> float:
        return abs(total / (num_calib + count) - acc) / acc

    # Initial scale from the jamming density: count(s) ≈ Σ_free 0.70 / (s² base²).
    scale = math.sqrt(_RSA_POINTS_PER_AREA * float((1.0 / base[free] ** 2).sum()) / want)
    lo, hi = 0.0, math.inf  # counts too many at lo (scale too small), too few at hi
    best_points: np.ndarray | None = None
    best_err = math.inf
    for _ in range(max_attempts):
        points = thrower.throw(scale)
        count = len(points)
        err = relative_error(count)
        if err < best_err:
            best_points, best_err = points, err
        if count == want or err <= tol / 4:
            break
        if count > want:
            lo = max(lo, scale)
        else:
            hi = min(hi, scale)
        # Secant step on count ∝ s⁻², kept inside the bracket (else bisect it geometrically).
        proposal = scale * math.sqrt(count / want) if count > 0 else scale / 2
        if not lo < proposal < hi:
            if lo > 0 and math.isfinite(hi):
                proposal = math.sqrt(lo * hi)
            elif lo > 0:
                proposal = 2 * lo
            else:
                proposal = hi / 2
        scale = proposal
    if best_err > tol:
        raise RuntimeError(
            f"{owner}: no radius scale in {max_attempts} attempts reached acceleration {acc} "
            f"within tol={tol} on a {grid} grid (closest: relative error {best_err:.3g}); "
            "raise max_attempts or tol, or change density_power"
        )
    mask.view(-1)[torch.from_numpy(best_points)] = True
    return mask


# ----------------------------------------------------------------------------- Gaussian
def gaussian_mask(
    shape: Sequence[int],
    acceleration: float,
    *,
    calibration: int | Sequence[int] = 24,
    generator: torch.Generator | None = None,
    std_fraction: float = 0.25,
) -> torch.Tensor:
    """A variable-density random mask with a Gaussian density around the k-space centre.

    Exactly ``round(H·W / acceleration)`` points are sampled (calibration included): the
    calibration block, plus points drawn without replacement from the rest with probability
    weights ``w(k)`` by Gumbel-top-k (Efraimidis & Spirakis 2006), the scheme SSDU uses for
    its loss set (Yaman et al., MRM 2020; Lustig et al. 2007 for variable density).

    Math:
        ``w(k) = exp(−(ky − H//2)²/(2σ_y²) − (kz − W//2)²/(2σ_z²))``,
        ``σ_y = std_fraction·H``, ``σ_z = std_fraction·W``; keep the top ``n`` of
        ``log w + g``, ``g ~ Gumbel(0, 1)``.

    Args:
        shape: the grid ``(H, W)``.
        acceleration: target ``H·W / num_sampled`` (calibration included), ``>= 1``.
        calibration: size ``c`` or ``(cH, cW)`` of the fully sampled centre block; 0 for none.
        generator: the source of all randomness; ``None`` uses torch's global generator.
        std_fraction: the Gaussian's standard deviation as a fraction of each axis length.

    Returns:
        a bool tensor, ``True`` where sampled.

    Raises:
        ValueError: for a non-2D shape, an acceleration below 1, a calibration block larger
            than the grid or than the sample budget, a non-positive ``std_fraction``.

    Shape:
        returns ``(H, W)``, DC at ``(H // 2, W // 2)``.
    """
    owner = "gaussian_mask"
    grid = _grid_shape(shape, owner)
    acc = _check_acceleration(acceleration, owner)
    calib = _calibration_size(calibration, grid, owner)
    if not std_fraction > 0:
        raise ValueError(f"{owner}: std_fraction must be positive, got {std_fraction}")
    num_samples, num_calib = _budget(grid, acc, calib, owner)
    h, w = grid

    uniform = torch.rand(h * w, generator=generator, dtype=torch.float64)
    mask = torch.zeros(grid, dtype=torch.bool)
    mask[calibration_region(grid, calib)] = True
    num_random = num_samples - num_calib
    if num_random == 0:
        return mask
    ky = (torch.arange(h, dtype=torch.float64) - h // 2) / (std_fraction * h)
    kz = (torch.arange(w, dtype=torch.float64) - w // 2) / (std_fraction * w)
    log_weight = -0.5 * (ky[:, None] ** 2 + kz[None, :] ** 2)
    tiny = torch.finfo(torch.float64).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1 - 1e-16)))
    keys = log_weight.reshape(-1) + gumbel
    keys[mask.reshape(-1)] = -math.inf
    chosen = torch.topk(keys, num_random).indices
    mask.view(-1)[chosen] = True
    return mask
