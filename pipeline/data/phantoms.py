"""Volumes and coil maps evaluated one D-slab at a time, for simulation of any size.

The analytic phantoms use the coordinates of :mod:`operators3d.phantoms` (voxel centres at
``-1 + (2i + 1)/N`` along each axis) and the same arithmetic, so a slab equals the matching
rows of the whole-volume phantom exactly; each ellipsoid is evaluated on its bounding box only,
so foams of thousands of spheres stay cheap. :func:`coil_maps_slab` reproduces
:func:`operators3d.simulate_coil_maps` row by row.

Sources:

* ``shepp-logan``: :data:`operators3d.phantoms.SHEPP_LOGAN_3D`.
* ``ellipsoids``: a body ellipsoid with seeded random inner ellipsoids (values clipped to ≥ 0).
* ``foam``: a cylinder of value 1 with seeded random spherical pores (value 0), for CT.
* ``anatomy``, ``industrial``, ``organs``: realistic seeded phantoms (a head with folded cortex,
  skull, ventricles and vessels; an industrial-CT sample with pores, fibres and cracks; an
  abdomen with organs, fat, spine and ribs), evaluated row by row from analytic random fields
  (:mod:`pipeline.data.phantom_family`). ``NAME-crop`` is the same object magnified by
  :data:`~pipeline.data.phantom_family.CROP_ZOOM` so that it crosses the edges of the field of
  view; ``make_volume_source(..., zoom=z)`` sets any magnification.
* a file: ``.npy`` (read per slab) or a zarr array (or a scan, whose ``reference`` is used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from operators3d.coils import simulate_coil_maps
from operators3d.phantoms import SHEPP_LOGAN_3D

__all__ = [
    "VolumeSource",
    "AnalyticPhantom",
    "ArrayVolume",
    "make_volume_source",
    "coil_maps_slab",
    "smooth_phase_slab",
    "derive_seed",
    "PHANTOMS",
    "TUNING_PHANTOMS",
    "HELD_OUT_PHANTOMS",
]

#: The realistic family of :mod:`pipeline.data.phantom_family` (names without ``-crop``).
_FAMILY_NAMES = ("anatomy", "industrial", "organs")

#: Every named phantom ``make_volume_source`` and ``recon3d simulate --phantom`` accept.
PHANTOMS = ("shepp-logan", "ellipsoids", "foam", *_FAMILY_NAMES, *(f"{n}-crop" for n in _FAMILY_NAMES))

#: The phantoms the recipes (loss weights, learning rates, step counts in ``launch/configs`` and
#: ``benchmarks/quality.py``) are tuned on. Quality claims are checked on HELD_OUT_PHANTOMS.
TUNING_PHANTOMS = ("ellipsoids",)

#: A held-out set that is not the tuning set (issue 14.2): realistic structure the tuning
#: phantoms lack, inside the field of view and (``-crop``) crossing its edges.
HELD_OUT_PHANTOMS = (*_FAMILY_NAMES, *(f"{n}-crop" for n in _FAMILY_NAMES))


def derive_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed that depends on ``seed`` and ``keys`` only (stable across runs)."""
    import zlib

    ints = [int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF]
    for key in keys:
        ints.append(zlib.crc32(key.encode()) if isinstance(key, str) else int(key) & 0xFFFFFFFF)
    state = np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


class VolumeSource:
    """A ``(D, H, W)`` real volume that can be evaluated one D-slab at a time."""

    shape: tuple[int, int, int]

    def slab(self, d0: int, d1: int) -> np.ndarray:
        """Rows ``d0:d1`` as float32. Shape: ``(d1 − d0, H, W)``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


def _axis(n: int, lo: int, hi: int) -> torch.Tensor:
    # Elementwise the same expression as operators3d.phantoms._grid, so slabs match exactly.
    return -1 + (2 * torch.arange(lo, hi, dtype=torch.float64) + 1) / n


def _index_range(centre: float, half: float, n: int) -> tuple[int, int]:
    """Indices whose coordinate may lie in ``[centre − half, centre + half]`` (padded by 1)."""
    lo = math.floor(((centre - half) + 1) * n / 2 - 0.5) - 1
    hi = math.ceil(((centre + half) + 1) * n / 2 - 0.5) + 2
    return max(0, lo), min(n, hi)


@dataclass(frozen=True)
class AnalyticPhantom(VolumeSource):
    """A sum of uniform ellipsoids, rows ``(value, a, b, c, x0, y0, z0, phi_degrees)``.

    Math:
        ``f(r) = clip_lo(Σ_e v_e · 1[‖R_e (r − r_e) / (a_e, b_e, c_e)‖ ≤ 1])`` as in
        :func:`operators3d.phantoms.ellipsoid_phantom`, optionally clipped below at 0.
    """

    shape: tuple[int, int, int]
    ellipsoids: tuple[tuple[float, ...], ...]
    name: str = "ellipsoids"
    clip_negative: bool = False

    def slab(self, d0: int, d1: int) -> np.ndarray:
        depth, height, width = self.shape
        if not 0 <= d0 < d1 <= depth:
            raise ValueError(f"{self.name} phantom: slab {d0}:{d1} outside D={depth}")
        out = torch.zeros((d1 - d0, height, width), dtype=torch.float64)
        zs = _axis(depth, d0, d1)
        for row in self.ellipsoids:
            value, a, b, c, x0, y0, z0, phi = (float(v) for v in row)
            cos, sin = math.cos(math.radians(phi)), math.sin(math.radians(phi))
            hx = math.sqrt((a * cos) ** 2 + (b * sin) ** 2)
            hy = math.sqrt((a * sin) ** 2 + (b * cos) ** 2)
            zl, zh = _index_range(z0, c, depth)
            zl, zh = max(zl, d0), min(zh, d1)
            if zl >= zh:
                continue
            yl, yh = _index_range(y0, hy, height)
            xl, xh = _index_range(x0, hx, width)
            if yl >= yh or xl >= xh:
                continue
            z = zs[zl - d0 : zh - d0].view(-1, 1, 1)
            y = _axis(height, yl, yh).view(1, -1, 1)
            x = _axis(width, xl, xh).view(1, 1, -1)
            xr = (x - x0) * cos + (y - y0) * sin
            yr = -(x - x0) * sin + (y - y0) * cos
            inside = (xr / a) ** 2 + (yr / b) ** 2 + ((z - z0) / c) ** 2 <= 1.0
            box = out[zl - d0 : zh - d0, yl:yh, xl:xh]
            box.copy_(box + value * inside)
        if self.clip_negative:
            out.clamp_(min=0)
        return out.to(torch.float32).numpy()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "num_ellipsoids": len(self.ellipsoids)}


def _random_ellipsoids(rng: np.random.Generator, count: int) -> tuple[tuple[float, ...], ...]:
    rows = [(1.0, 0.72, 0.85, 0.9, 0.0, 0.0, 0.0, 0.0)]
    for _ in range(count):
        a, b, c = rng.uniform(0.05, 0.3, size=3)
        centre = rng.uniform(-0.45, 0.45, size=3)
        value = float(rng.choice([-1, 1]) * rng.uniform(0.1, 0.5))
        rows.append((value, a, b, c, *centre, float(rng.uniform(0, 180))))
    return tuple(tuple(float(v) for v in r) for r in rows)


def _foam(rng: np.random.Generator, count: int) -> tuple[tuple[float, ...], ...]:
    # The cylinder: an ellipsoid long enough along z to cover every slice.
    rows = [(1.0, 0.9, 0.9, 1e6, 0.0, 0.0, 0.0, 0.0)]
    for _ in range(count):
        r = float(rng.uniform(0.02, 0.09))
        rho = 0.85 * math.sqrt(float(rng.uniform(0, 1)))
        theta = float(rng.uniform(0, 2 * math.pi))
        z = float(rng.uniform(-1, 1))
        rows.append((-1.0, r, r, r, rho * math.cos(theta), rho * math.sin(theta), z, 0.0))
    return tuple(rows)


@dataclass(frozen=True)
class ArrayVolume(VolumeSource):
    """A volume stored in a ``.npy`` file or a zarr array, read per slab."""

    path: str
    array: Any
    shape: tuple[int, int, int]

    def slab(self, d0: int, d1: int) -> np.ndarray:
        values = np.asarray(self.array[d0:d1])
        if np.iscomplexobj(values):
            raise ValueError(f"volume '{self.path}': expected a real volume, got {values.dtype}")
        if not np.isfinite(values).all():
            raise ValueError(f"volume '{self.path}': rows {d0}:{d1} hold NaN/Inf")
        return values.astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        return {"kind": "file", "path": self.path}


def _open_volume_file(path: str) -> ArrayVolume:
    if path.endswith(".npy"):
        if not Path(path).exists():
            raise FileNotFoundError(f"volume '{path}' does not exist")
        from ._npy import NpyArray

        arr = NpyArray(path)
    else:
        import zarr

        from .store import open_store

        try:
            node = zarr.open(store=open_store(path, read_only=True), mode="r")
        except Exception as err:
            raise FileNotFoundError(
                f"volume '{path}': not a .npy file or a zarr array/scan ({type(err).__name__}: {err})"
            ) from None
        if isinstance(node, zarr.Group):
            if "reference" not in set(node.array_keys()):
                raise ValueError(f"volume '{path}': a zarr group without a 'reference' array")
            node = node["reference"]
        arr = node
    if arr.ndim != 3:
        raise ValueError(f"volume '{path}': expected (D, H, W), got shape {tuple(arr.shape)}")
    return ArrayVolume(path=path, array=arr, shape=tuple(int(s) for s in arr.shape))


def make_volume_source(
    phantom: str,
    shape: Sequence[int] | None,
    *,
    seed: int,
    num_features: int | None = None,
    zoom: float | None = None,
) -> VolumeSource:
    """The volume named by ``phantom`` (a name in :data:`PHANTOMS` or a file path).

    Args:
        phantom: ``shepp-logan``, ``ellipsoids``, ``foam``, ``anatomy``, ``industrial``,
            ``organs`` (each of the last three also as ``NAME-crop``), or a ``.npy`` / zarr path.
        shape: ``(D, H, W)``; required for analytic phantoms, checked against files.
        seed: draws the random ellipsoids, foam pores, or the realistic phantom (``NAME`` and
            ``NAME-crop`` of one seed are the same object).
        num_features: the number of random ellipsoids (default 12), foam pores (default 300),
            anatomy vessel trees (16), industrial pores (500) or organs bowel loops (24).
        zoom: magnification of ``anatomy`` / ``industrial`` / ``organs`` about the centre of the
            field of view (default 1, or 1.5 for ``NAME-crop``); not accepted for the others.
    """
    if phantom in PHANTOMS:
        if shape is None:
            raise ValueError(f"phantom {phantom!r} needs a shape (D, H, W)")
        dims = tuple(int(s) for s in shape)
        if len(dims) != 3 or any(s < 1 for s in dims):
            raise ValueError(f"shape must be three positive sizes (D, H, W), got {dims}")
        kind = phantom.removesuffix("-crop")
        if kind in _FAMILY_NAMES:
            from .phantom_family import CROP_ZOOM, make_family_phantom

            if zoom is None:
                zoom = CROP_ZOOM if phantom.endswith("-crop") else 1.0
            rng = np.random.default_rng(derive_seed(seed, "phantom", kind))
            return make_family_phantom(phantom, kind, dims, rng, seed=seed, num_features=num_features,
                                       zoom=float(zoom))
        if zoom is not None:
            raise ValueError(f"zoom applies to {', '.join(_FAMILY_NAMES)}, not to {phantom!r}")
        rng = np.random.default_rng(derive_seed(seed, "phantom", phantom))
        if phantom == "shepp-logan":
            return AnalyticPhantom(dims, tuple(tuple(r) for r in SHEPP_LOGAN_3D), "shepp-logan")
        if phantom == "ellipsoids":
            rows = _random_ellipsoids(rng, 12 if num_features is None else num_features)
            return AnalyticPhantom(dims, rows, "ellipsoids", clip_negative=True)
        rows = _foam(rng, 300 if num_features is None else num_features)
        return AnalyticPhantom(dims, rows, "foam", clip_negative=True)
    source = _open_volume_file(phantom)
    if shape is not None and tuple(int(s) for s in shape) != source.shape:
        raise ValueError(
            f"volume '{phantom}' has shape {source.shape}, but --shape {tuple(shape)} was given"
        )
    return source


def smooth_phase_slab(shape: Sequence[int], d0: int, d1: int) -> torch.Tensor:
    """A smooth image phase ``exp(0.6i (z + y²/2 − 0.3x))`` on rows ``d0:d1`` (complex64).

    Shape:
        ``(d1 − d0, H, W)``.
    """
    depth, height, width = (int(s) for s in shape)
    z = torch.linspace(-1, 1, depth, dtype=torch.float64)[d0:d1].view(-1, 1, 1)
    y = torch.linspace(-1, 1, height, dtype=torch.float64).view(1, -1, 1)
    x = torch.linspace(-1, 1, width, dtype=torch.float64).view(1, 1, -1)
    angle = 0.6 * (z + 0.5 * y**2 - 0.3 * x)
    return torch.polar(torch.ones_like(angle), angle).to(torch.complex64)


def coil_maps_slab(
    num_coils: int,
    shape: Sequence[int],
    d0: int,
    d1: int,
    *,
    seed: int | None = None,
    ring_radius: float = 1.5,
) -> torch.Tensor:
    """Rows ``d0:d1`` of :func:`operators3d.simulate_coil_maps` (same layout and formula).

    With ``seed`` the layout jitter is drawn from ``torch.Generator().manual_seed(seed)``
    exactly as ``simulate_coil_maps(..., generator=that generator)`` draws it.

    Shape:
        returns ``(C, d1 − d0, H, W)`` complex64.
    """
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    return simulate_coil_maps(
        num_coils,
        tuple(int(s) for s in shape),
        generator=generator,
        ring_radius=ring_radius,
        d_range=slice(d0, d1),
    )
