"""Realistic seeded phantoms for held-out evaluation: ``anatomy``, ``industrial``, ``organs``.

The recipes of this project are tuned on ``ellipsoids``; these phantoms are a held-out family
with the structures a real scan has and the tuning set lacks: folded boundaries, thin bright
and dark structures (vessels, fibres, cracks), layered shells of varying thickness, pores of
many sizes and a weak spatially correlated texture (see
:data:`pipeline.data.phantoms.HELD_OUT_PHANTOMS`).

Each phantom is a continuous function of the position, drawn once from its seed (a fixed set
of random Fourier modes, ellipsoids, polylines and planes), and sampled at the voxel centres
one D-row at a time:

* **Deterministic per row.** Row ``d`` is computed by the same code whatever slab it belongs
  to, so ``slab(0, 8)`` equals ``concat(slab(0, 3), slab(3, 8))`` bit for bit, and the work per
  slab is proportional to ``(d1 − d0)·H·W`` (never to D): a 2048³ volume is made slab by slab.
* **Coordinates.** D spans ``[-1, 1]`` (voxel centres ``-1 + (2i + 1)/D``, as
  :mod:`operators3d.phantoms`); in-plane pixels are square with the *shorter* of H, W spanning
  ``[-1, 1]`` and the longer one ``[-W/H, W/H]`` (or ``[-H/W, H/W]``), so a non-square field of
  view shows more of the surroundings and never stretches the object. ``shape`` therefore only
  changes the sampling resolution (and, for H ≠ W, how much background is seen); the random
  draws do not depend on it.
* **zoom.** Coordinates are divided by ``zoom``: ``zoom > 1`` magnifies the object about the
  centre of the field of view, so with the ``-crop`` names (``zoom = 1.5``) it is larger than the
  field of view and crosses its edges (a local-tomography / cropped scan). With ``zoom = 1``
  every phantom has zero border in-plane.
* **Values.** float32, non-negative, background 0, maximum about 1.0–1.5.

Phantoms:

* ``anatomy`` — a T1-like head: scalp (0.55), a bright skull rim (1.0) of varying thickness, a
  CSF layer (0.2), cortex (GM 0.6) whose sulci and interhemispheric fissure fold the GM/WM
  interface (WM 0.8), deep grey nuclei (0.66), lateral and third ventricles (CSF), thin bright
  vessels (1.15, about 1–2 voxels across at 128²) along smooth random curves, and a ±2 %
  correlated tissue texture. ``num_features``: the number of vessel trees (default 16).
* ``industrial`` — an industrial-CT sample: a capped cylinder (axis along D) of matrix material
  (0.75) with pores of many sizes (0), embedded fibres (1.25; thin, straight or slightly bent,
  in two ply directions across the axis with a random spread), a few dense inclusions (1.5)
  and thin cracks (planar dark sheets, mostly from the surface part-way in, tapered at their
  tips). ``num_features``: the number of pores (default 500).
* ``organs`` — an abdomen in CT-like window: elliptic body with a subcutaneous fat layer (0.32)
  and a muscle wall (0.65), liver, spleen, kidneys (cortex/medulla), stomach (with gas),
  pancreas, gallbladder, aorta, IVC, bowel loops and colon, each with a smooth irregular
  boundary; a spine (vertebral bodies: bright cortical rings 1.35 around darker marrow 0.55, discs,
  canal, posterior arch) and ribs (bright rings with marrow); ±3 % texture.
  ``num_features``: the number of small-bowel loops (default 24).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from .phantoms import VolumeSource

__all__ = ["FieldPhantom", "FAMILY", "CROP_ZOOM", "make_family_phantom"]

#: Magnification of the ``-crop`` variants.
CROP_ZOOM = 1.5

_TAU = 2.0 * math.pi


# ----------------------------------------------------------------------------- building blocks
def _step(t: np.ndarray, eps: float) -> np.ndarray:
    """A soft indicator of ``t > 0``: 0 below ``−eps/2``, 1 above ``eps/2``, linear between."""
    return np.clip(0.5 + t / eps, 0.0, 1.0)


def _span(axis: np.ndarray, lo: float, hi: float) -> slice:
    """The indices of a sorted axis with ``lo ≤ axis ≤ hi``."""
    return slice(int(np.searchsorted(axis, lo, "left")), int(np.searchsorted(axis, hi, "right")))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, a, b, c = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (b * b + c * c), 2 * (a * b - c * w), 2 * (a * c + b * w)],
        [2 * (a * b + c * w), 1 - 2 * (a * a + c * c), 2 * (b * c - a * w)],
        [2 * (a * c - b * w), 2 * (b * c + a * w), 1 - 2 * (a * a + b * b)],
    ])


def _in_plane_rotation(angle: float) -> np.ndarray:
    """A rotation of ``(z, y, x)`` vectors about the D axis."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])


class _Field:
    """A smooth unit-variance random field ``√(2/K) Σ_k cos(k·r + φ_k)`` (``r = (z, y, x)``).

    ``K`` wave vectors of random directions and lengths ``2π·freq·[1 − spread, 1 + spread]``
    (``freq`` in cycles per unit length) with random phases: band-limited, isotropic, defined
    everywhere, so any point is evaluated without the rest of the volume.
    """

    def __init__(self, rng: np.random.Generator, freq: float, count: int = 48, spread: float = 0.3):
        directions = rng.normal(size=(count, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        lengths = _TAU * freq * rng.uniform(1 - spread, 1 + spread, count)
        self.k = directions * lengths[:, None]
        self.phase = rng.uniform(0, _TAU, count)
        self.amp = math.sqrt(2.0 / count)

    def grid(self, z: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The field on the plane ``z`` at ``(y_i, x_j)``, shape ``(len(y), len(x))``.

        Separable: ``Re Σ_k a_k e^{i k_y y} e^{i k_x x}``, one complex matrix product.
        """
        a = self.amp * np.exp(1j * (self.k[:, 0] * z + self.phase))
        ey = np.exp(1j * np.multiply.outer(y, self.k[:, 1])) * a
        ex = np.exp(1j * np.multiply.outer(self.k[:, 2], x))
        return (ey @ ex).real

    def points(self, q: np.ndarray, grad: bool = False):
        """The field (and its gradient, ``(N, 3)``) at points ``q`` of shape ``(N, 3)``."""
        n = q.shape[0]
        values = np.empty(n)
        gradient = np.empty((n, 3)) if grad else None
        for lo in range(0, n, 16384):
            p = q[lo : lo + 16384]
            arg = (p[:, 0:1] * self.k[:, 0] + p[:, 1:2] * self.k[:, 1] + p[:, 2:3] * self.k[:, 2]
                   + self.phase)
            values[lo : lo + len(p)] = self.amp * np.cos(arg).sum(axis=1)
            if grad:
                gradient[lo : lo + len(p)] = -self.amp * (np.sin(arg) @ self.k)
        return (values, gradient) if grad else values


class _Ellipsoid:
    """``ρ(r) = ‖diag(1/s) R (r − c)‖`` evaluated on the in-plane bounding box of one row.

    The box is the ellipsoid's, widened by the factor ``1 + margin`` (for a boundary perturbed
    by up to that much) and by ``pad`` (for soft edges).
    """

    def __init__(self, centre: Sequence[float], semi: Sequence[float], rotation: np.ndarray | None = None,
                 margin: float = 0.0, pad: float = 0.02):
        self.c = np.asarray(centre, dtype=float)
        self.s = np.asarray(semi, dtype=float)
        self.R = np.eye(3) if rotation is None else np.asarray(rotation, dtype=float)
        # half extent along world axis i: √Σ_j (R_ji s_j)², widened for boundary perturbations
        self.half = np.sqrt(((self.R * self.s[:, None]) ** 2).sum(axis=0)) * (1.0 + margin) + pad

    def box(self, z: float, y: np.ndarray, x: np.ndarray):
        if abs(z - self.c[0]) > self.half[0]:
            return None
        sy = _span(y, self.c[1] - self.half[1], self.c[1] + self.half[1])
        sx = _span(x, self.c[2] - self.half[2], self.c[2] + self.half[2])
        if sy.start >= sy.stop or sx.start >= sx.stop:
            return None
        return sy, sx

    def rho(self, z: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """ρ on the grid ``y × x`` (the axes of a box). Shape ``(len(y), len(x))``."""
        dz, dy, dx = z - self.c[0], (y - self.c[1])[:, None], (x - self.c[2])[None, :]
        total = 0.0
        for j in range(3):
            local = self.R[j, 0] * dz + self.R[j, 1] * dy + self.R[j, 2] * dx
            total = total + (local / self.s[j]) ** 2
        return np.sqrt(total)


class _Tubes:
    """Solid tubes of radius ``r`` around line segments ``a → b`` with a soft edge ``eps``."""

    def __init__(self, a: np.ndarray, b: np.ndarray, radius: np.ndarray, eps: float):
        self.a, self.b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        self.r = np.asarray(radius, dtype=float)
        self.eps = eps
        reach = self.r + eps
        self.lo = np.minimum(self.a, self.b) - reach[:, None]
        self.hi = np.maximum(self.a, self.b) + reach[:, None]

    def __len__(self) -> int:
        return len(self.r)

    def profile(self, z: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``max_s clip((r_s − dist_s)/eps + ½, 0, 1)`` on the plane ``z``. Shape ``(Y, X)``."""
        out = np.zeros((len(y), len(x)))
        for s in np.nonzero((self.lo[:, 0] <= z) & (self.hi[:, 0] >= z))[0]:
            sy = _span(y, self.lo[s, 1], self.hi[s, 1])
            sx = _span(x, self.lo[s, 2], self.hi[s, 2])
            if sy.start >= sy.stop or sx.start >= sx.stop:
                continue
            a, u = self.a[s], self.b[s] - self.a[s]
            pz, py, px = z - a[0], (y[sy] - a[1])[:, None], (x[sx] - a[2])[None, :]
            t = np.clip((pz * u[0] + py * u[1] + px * u[2]) / max(float(u @ u), 1e-300), 0.0, 1.0)
            dist = np.sqrt((pz - t * u[0]) ** 2 + (py - t * u[1]) ** 2 + (px - t * u[2]) ** 2)
            value = _step(self.r[s] - dist, self.eps)
            np.maximum(out[sy, sx], value, out=out[sy, sx])
        return out


def _concat_tubes(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], eps: float) -> _Tubes:
    if not parts:
        return _Tubes(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), eps)
    return _Tubes(*(np.concatenate([p[i] for p in parts]) for i in range(3)), eps=eps)


def _polyline(points: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments ``(a, b, r)`` of a polyline with a radius per point (the mean of its ends)."""
    return points[:-1], points[1:], 0.5 * (radii[:-1] + radii[1:])


def _paint(v: np.ndarray, value, weight: np.ndarray) -> None:
    """``v ← v + weight·(value − v)`` in place (``weight`` in ``[0, 1]``)."""
    v += weight * (value - v)


def _margin(irregular: float) -> float:
    """The box margin of a boundary ``ρ·(1 + irregular·g) = 1`` with ``|g| ≤ 3``."""
    return 1.0 / (1.0 - 3.0 * irregular) - 1.0


def _jitter(rng: np.random.Generator, value: float, relative: float) -> float:
    return float(value * (1.0 + relative * rng.uniform(-1, 1)))


# ----------------------------------------------------------------------------- the volume source
class FieldPhantom(VolumeSource):
    """A seeded realistic phantom evaluated one D-row at a time (see the module docstring).

    Args:
        name: the phantom's name (``anatomy``, ``anatomy-crop``, …).
        shape: ``(D, H, W)``.
        seed: the seed it was drawn from (recorded by :meth:`describe`).
        zoom: magnification about the centre (``> 1``: the object crosses the edges).
        model: ``model.row(z, y, x) → (len(y), len(x))`` float64 and ``model.parameters``.
    """

    def __init__(self, name: str, shape: tuple[int, int, int], seed: int, zoom: float, model: Any):
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.seed = int(seed)
        self.zoom = float(zoom)
        self.model = model

    def _axes(self) -> tuple[np.ndarray, np.ndarray]:
        _, height, width = self.shape
        side = min(height, width)
        y = (2.0 * np.arange(height) + 1 - height) / side / self.zoom
        x = (2.0 * np.arange(width) + 1 - width) / side / self.zoom
        return y, x

    def slab(self, d0: int, d1: int) -> np.ndarray:
        depth, height, width = self.shape
        if not 0 <= d0 < d1 <= depth:
            raise ValueError(f"{self.name} phantom: slab {d0}:{d1} outside D={depth}")
        y, x = self._axes()
        out = np.empty((d1 - d0, height, width), dtype=np.float32)
        for i, d in enumerate(range(d0, d1)):
            z = (2.0 * d + 1 - depth) / depth / self.zoom
            out[i] = np.maximum(self.model.row(z, y, x), 0.0)
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "seed": self.seed, "zoom": self.zoom, "shape": list(self.shape),
                "parameters": dict(self.model.parameters)}


# ----------------------------------------------------------------------------- anatomy (head)
class _Anatomy:
    """A T1-like head; tissue values and layer thicknesses in the class attributes."""

    SCALP, SKULL, CSF, GM, WM, NUCLEI, VESSEL = 0.55, 1.0, 0.2, 0.6, 0.8, 0.66, 1.15
    EDGE = 0.01  # soft boundary width (≈ 0.6 voxel at 128²)
    FOLD_BEND = 0.8  # how much the sulci bend (0: straight radial sheets)
    FOLD_FINE = 0.35  # weight of the finer folding field

    def __init__(self, rng: np.random.Generator, num_vessels: int):
        self.centre = np.array([-0.03, 0.0, 0.0])
        self.semi = np.array([_jitter(rng, 0.84, 0.04), _jitter(rng, 0.84, 0.04), _jitter(rng, 0.69, 0.04)])
        self.shape_field = _Field(rng, 0.8, 32)
        self.thick_a = _Field(rng, 1.6, 32)
        self.thick_b = _Field(rng, 1.6, 32)
        self.sulcus_depth = _Field(rng, 1.3, 32)
        fold_freq = _jitter(rng, 2.1, 0.08)
        self.folds = _Field(rng, fold_freq, 96, spread=0.45)
        self.folds_fine = _Field(rng, 2.2 * fold_freq, 64, spread=0.4)  # wiggles and branches
        self.texture = _Field(rng, 11.0, 64, spread=0.5)
        self.gm_thickness = _jitter(rng, 0.036, 0.1)
        self.sulcus_halfwidth = 0.006
        # deep structures, in coordinates relative to the head centre (z, y, x); y < 0 anterior
        vz, vy = _jitter(rng, 0.1, 0.3), rng.uniform(-0.03, 0.03)
        self.ventricle = dict(z=vz, y=vy, x=_jitter(rng, 0.05, 0.15), semi=(
            _jitter(rng, 0.06, 0.15), _jitter(rng, 0.25, 0.1), _jitter(rng, 0.045, 0.2)),
            bend_x=_jitter(rng, 0.45, 0.3), bend_z=_jitter(rng, 0.9, 0.3))
        c = self.centre
        self.third = _Ellipsoid(c + (vz - 0.1, vy + 0.04, 0.0), (0.07, 0.08, 0.011))
        self.nuclei = []
        for side in (-1.0, 1.0):
            self.nuclei += [
                _Ellipsoid(c + (vz - 0.12, vy + 0.09, side * 0.075), (0.07, 0.09, 0.055), margin=0.1),
                _Ellipsoid(c + (vz - 0.03, vy - 0.13, side * 0.085), (0.06, 0.06, 0.035), margin=0.1),
                _Ellipsoid(c + (vz - 0.12, vy - 0.02, side * 0.19), (0.08, 0.11, 0.035),
                           _in_plane_rotation(side * 0.25), margin=0.1),
            ]
        self.vessels = _concat_tubes(self._vessel_trees(rng, num_vessels), eps=0.008)
        self.parameters = {"num_vessels": num_vessels,
                           "semi_axes_zyx": [round(float(s), 4) for s in self.semi],
                           "gm_thickness": round(self.gm_thickness, 4),
                           "values": {"scalp": self.SCALP, "skull": self.SKULL, "csf": self.CSF,
                                      "gm": self.GM, "wm": self.WM, "nuclei": self.NUCLEI,
                                      "vessel": self.VESSEL}}

    def _vessel_trees(self, rng: np.random.Generator, count: int):
        """Smooth random walks in the brain: half run along the cortex, half deep; with branches."""
        parts = []
        for tree in range(count):
            cortical = tree % 2 == 0
            target = rng.uniform(0.78, 0.84) if cortical else None
            u = rng.normal(size=3)
            u *= (target if cortical else rng.uniform(0.2, 0.6)) / np.linalg.norm(u)
            stack = [(u, rng.normal(size=3), rng.uniform(0.0075, 0.011), rng.integers(25, 45))]
            while stack:
                u, direction, radius, steps = stack.pop()
                direction = direction / np.linalg.norm(direction)
                curvature = np.zeros(3)
                points, radii = [u.copy()], [radius]
                for i in range(int(steps)):
                    curvature = 0.8 * curvature + 0.35 * rng.normal(size=3)
                    direction = direction + 0.25 * curvature
                    norm_u = np.linalg.norm(u)
                    outward = u / max(norm_u, 1e-9)
                    if cortical:  # stay on the shell: drop the radial part of the direction
                        direction = direction - (direction @ outward) * outward
                    elif norm_u > 0.7 and direction @ outward > 0:
                        direction = direction - 2 * (direction @ outward) * outward
                    direction /= np.linalg.norm(direction)
                    u = u + 0.028 * direction / self.semi.mean()  # steps of about 0.028
                    if cortical:
                        u = u * target / np.linalg.norm(u)
                    points.append(u.copy())
                    radii.append(radius * (1 - 0.35 * (i + 1) / steps))
                    if rng.uniform() < 0.06 and radius > 0.007 and len(stack) < 3:
                        stack.append((u.copy(), direction + rng.normal(size=3), 0.8 * radii[-1],
                                      rng.integers(8, 20)))
                physical = self.centre + np.asarray(points) * self.semi
                parts.append(_polyline(physical, np.asarray(radii)))
        return parts

    def row(self, z: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        v = np.zeros((len(y), len(x)))
        rz = z - self.centre[0]
        if abs(rz) > self.semi[0] * 1.1:
            return v
        sy = _span(y, self.centre[1] - self.semi[1] * 1.1, self.centre[1] + self.semi[1] * 1.1)
        sx = _span(x, self.centre[2] - self.semi[2] * 1.1, self.centre[2] + self.semi[2] * 1.1)
        if sy.start >= sy.stop or sx.start >= sx.stop:
            return v
        yb, xb = y[sy], x[sx]
        v[sy, sx] = self._head(z, yb, xb)
        return v

    def _head(self, z: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        a = self.semi
        rz = np.full((len(y), len(x)), z - self.centre[0])
        ry = np.broadcast_to((y - self.centre[1])[:, None], rz.shape)
        rx = np.broadcast_to((x - self.centre[2])[None, :], rz.shape)
        shape_g = np.clip(self.shape_field.grid(z, y, x), -2.5, 2.5)
        rho = np.sqrt((rz / a[0]) ** 2 + (ry / a[1]) ** 2 + (rx / a[2]) ** 2)
        dist = np.sqrt(rz**2 + ry**2 + rx**2)
        rho_p = rho * (1.0 + 0.02 * shape_g)
        # radial depth below the (perturbed) head surface; negative outside
        depth = np.where(dist > 1e-9, dist * (1.0 / np.maximum(rho_p, 1e-12) - 1.0), 1.0)
        ta = np.clip(self.thick_a.grid(z, y, x), -2.5, 2.5)
        tb = np.clip(self.thick_b.grid(z, y, x), -2.5, 2.5)
        scalp = 0.032 + 0.007 * tb
        skull = scalp + 0.038 + 0.011 * ta
        brain_surface = skull + np.maximum(0.018 + 0.007 * tb, 0.006)
        db = depth - brain_surface  # depth below the brain's outer surface

        # cortex: sulci are thin CSF sheets on the zero set of a folding field that depends
        # mostly on the direction from the centre (so they run radially inwards)
        sd = np.clip(0.13 + 0.05 * self.sulcus_depth.grid(z, y, x), 0.04, 0.24)
        d_sulcus = np.full(rz.shape, np.inf)
        shell = (db > -0.02) & (db < sd + self.gm_thickness + 0.02)  # deeper: WM whatever g is
        if shell.any():
            u = np.stack([rz[shell] / a[0], ry[shell] / a[1], rx[shell] / a[2]], axis=1)
            nu = np.linalg.norm(u, axis=1, keepdims=True)
            n = u / nu
            q = n + self.FOLD_BEND * u
            g, gq = self.folds.points(q, grad=True)
            g2, gq2 = self.folds_fine.points(q, grad=True)
            g, gq = g + self.FOLD_FINE * g2, gq + self.FOLD_FINE * gq2
            gu = (gq - n * (n * gq).sum(axis=1, keepdims=True)) / nu + self.FOLD_BEND * gq
            gr = np.linalg.norm(gu / a, axis=1)
            d_sulcus[shell] = np.abs(g) / np.maximum(gr, 1e-9) - self.sulcus_halfwidth
        below = db - sd
        d_sulcus = np.where(below > 0, np.sqrt(np.maximum(d_sulcus, 0.0) ** 2 + below**2), d_sulcus)
        # interhemispheric fissure: a CSF sheet near x = 0, from the surface 0.3 deep
        d_fissure = np.abs(rx - 0.012 * shape_g) - 0.007
        below = db - (0.3 + 0.04 * np.clip(self.sulcus_depth.grid(z + 0.5, y, x), -2, 2))
        d_fissure = np.where(below > 0, np.sqrt(np.maximum(d_fissure, 0.0) ** 2 + below**2), d_fissure)
        d_csf = np.minimum(db, np.minimum(d_sulcus, d_fissure))

        v = np.full(rz.shape, self.WM)
        _paint(v, self.GM, _step(self.gm_thickness - d_csf, self.EDGE))
        _paint(v, self.CSF, _step(-d_csf, self.EDGE * 0.7))
        self._deep(v, z, y, x, rz, ry, rx)
        v *= 1.0 + 0.022 * np.clip(self.texture.grid(z, y, x), -3, 3)
        vessels = self.vessels.profile(z, y, x)
        _paint(v, self.VESSEL, vessels * _step(depth - skull, self.EDGE))
        _paint(v, self.SKULL, _step(skull - depth, self.EDGE))
        _paint(v, self.SCALP, _step(scalp - depth, self.EDGE))
        return v * _step(depth, self.EDGE)

    def _deep(self, v, z, y, x, rz, ry, rx) -> None:
        """Deep grey nuclei, then the lateral and third ventricles (CSF) over them."""
        for nucleus in self.nuclei:
            box = nucleus.box(z, y, x)
            if box is not None:
                rho = nucleus.rho(z, y[box[0]], x[box[1]])
                _paint(v[box], self.NUCLEI, _step((1 - rho) * nucleus.s.min(), self.EDGE))
        p = self.ventricle
        sz, sy_, sx_ = p["semi"]
        dy = ry - p["y"]
        if np.abs(rz - p["z"]).min() < sz + p["bend_z"] * dy.max() ** 2 + 0.1:
            zc = p["z"] - p["bend_z"] * dy**2
            g = np.clip(self.sulcus_depth.grid(z + 1.7, y, x), -2.5, 2.5)
            for side in (-1.0, 1.0):
                # frontal horns near the midline, diverging backwards (dy > 0)
                xc = side * (p["x"] + p["bend_x"] * np.maximum(dy, 0.0) ** 2 + 0.1 * np.maximum(dy, 0.0))
                width = sx_ * (1.0 + 0.6 * np.maximum(dy / sy_, 0.0))  # larger atria
                rho = np.sqrt(((rz - zc) / sz) ** 2 + (dy / sy_) ** 2 + ((rx - xc) / width) ** 2)
                rho = rho * (1.0 + 0.08 * g)
                _paint(v, self.CSF, _step((1 - rho) * sx_, self.EDGE * 0.7))
        box = self.third.box(z, y, x)
        if box is not None:
            rho = self.third.rho(z, y[box[0]], x[box[1]])
            _paint(v[box], self.CSF, _step((1 - rho) * self.third.s.min(), self.EDGE * 0.7))


# ----------------------------------------------------------------------------- industrial CT
class _Industrial:
    """A capped cylinder of matrix with pores, fibres, inclusions and cracks."""

    MATRIX, FIBRE, INCLUSION = 0.75, 1.25, 1.5
    EDGE = 0.008

    def __init__(self, rng: np.random.Generator, num_pores: int):
        self.radius = _jitter(rng, 0.82, 0.03)
        self.half_height = 0.86
        self.texture = _Field(rng, 6.0, 48)
        self.pores = []
        for _ in range(num_pores):
            r = 0.008 * (0.1 / 0.008) ** (rng.uniform() ** 1.6)  # many small, a few large
            rho = (self.radius - r - 0.02) * math.sqrt(rng.uniform())
            theta = rng.uniform(0, _TAU)
            zc = rng.uniform(-1, 1) * (self.half_height - r - 0.02)
            semi = r * np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)])
            self.pores.append(_Ellipsoid((zc, rho * math.sin(theta), rho * math.cos(theta)), semi,
                                         _random_rotation(rng)))
        self._pore_z = np.array([[p.c[0] - p.half[0], p.c[0] + p.half[0]] for p in self.pores]).reshape(-1, 2)
        self.inclusions = []
        for _ in range(int(rng.integers(3, 7))):
            r = rng.uniform(0.01, 0.025)
            rho = (self.radius - 0.05) * math.sqrt(rng.uniform())
            theta = rng.uniform(0, _TAU)
            self.inclusions.append(_Ellipsoid(
                (rng.uniform(-0.75, 0.75), rho * math.sin(theta), rho * math.cos(theta)), (r, r, r)))
        num_fibres = int(rng.integers(50, 80))
        self.fibres = _concat_tubes(self._fibres(rng, num_fibres), eps=self.EDGE)
        self.cracks = [self._crack(rng, surface=i < 2) for i in range(int(rng.integers(2, 4)))]
        self.parameters = {"num_pores": num_pores, "num_fibres": num_fibres,
                           "num_inclusions": len(self.inclusions), "num_cracks": len(self.cracks),
                           "radius": round(self.radius, 4), "half_height": self.half_height,
                           "values": {"matrix": self.MATRIX, "fibre": self.FIBRE,
                                      "inclusion": self.INCLUSION, "pore": 0.0, "crack": 0.0}}

    def _fibres(self, rng: np.random.Generator, count: int):
        # two families of preferred directions across the axis (plies of a composite), spread
        angles = rng.uniform(0, math.pi, 2)
        parts = []
        for i in range(count):
            angle = angles[i % 2] + 0.35 * rng.normal()
            direction = np.array([0.35 * rng.normal(), math.sin(angle), math.cos(angle)])
            direction /= np.linalg.norm(direction)
            length = rng.uniform(0.15, 0.6)
            rho = (self.radius - 0.1) * math.sqrt(rng.uniform())
            theta = rng.uniform(0, _TAU)
            mid = np.array([rng.uniform(-0.7, 0.7), rho * math.sin(theta), rho * math.cos(theta)])
            bend = rng.normal(size=3) * 0.12 * length * rng.uniform(0, 1)
            t = np.linspace(-0.5, 0.5, 7)[:, None]
            points = mid + t * length * direction + (1 - 4 * t**2) * bend
            radius = np.full(7, rng.uniform(0.007, 0.013))
            parts.append(_polyline(points, radius))
        return parts

    def _crack(self, rng: np.random.Generator, surface: bool) -> dict:
        theta = rng.uniform(0, _TAU)
        radial = np.array([0.0, math.sin(theta), math.cos(theta)])
        tangent = np.array([0.0, math.cos(theta), -math.sin(theta)])
        axial = np.array([1.0, 0.0, 0.0])
        if surface:  # from the outer surface inwards, the plane holding the radial direction
            centre = np.array([rng.uniform(-0.6, 0.6), 0, 0]) + self.radius * radial
            beta = rng.uniform(-0.6, 0.6)
            normal = math.cos(beta) * tangent + math.sin(beta) * axial
            semi = (rng.uniform(0.25, 0.45), rng.uniform(0.12, 0.3))
        else:
            centre = np.array([rng.uniform(-0.5, 0.5), 0, 0]) + rng.uniform(0.1, 0.4) * radial
            normal = _random_rotation(rng)[0]
            semi = (rng.uniform(0.12, 0.25), rng.uniform(0.08, 0.18))
        e1 = np.cross(normal, axial if abs(normal[0]) < 0.9 else radial)
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(normal, e1)
        if surface and abs(e1 @ radial) < abs(e2 @ radial):
            e1, e2 = e2, e1  # the longer semi-axis runs inwards
        reach = np.sqrt((semi[0] * e1) ** 2 + (semi[1] * e2) ** 2) + 0.03
        return dict(centre=centre, normal=normal, e1=e1, e2=e2, semi=semi, reach=reach,
                    opening=rng.uniform(0.005, 0.009), rough=_Field(rng, 4.0, 24))

    def row(self, z: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        v = np.zeros((len(y), len(x)))
        if abs(z) > self.half_height + self.EDGE:
            return v
        sy = _span(y, -self.radius - 0.02, self.radius + 0.02)
        sx = _span(x, -self.radius - 0.02, self.radius + 0.02)
        if sy.start >= sy.stop or sx.start >= sx.stop:
            return v
        yb, xb = y[sy], x[sx]
        r = np.sqrt(yb[:, None] ** 2 + xb[None, :] ** 2)
        solid = _step(self.radius - r, self.EDGE) * _step(self.half_height - abs(z), self.EDGE)
        m = self.MATRIX * (1.0 + 0.015 * np.clip(self.texture.grid(z, yb, xb), -3, 3))
        m = m + (self.FIBRE - m) * self.fibres.profile(z, yb, xb)
        empty = np.zeros_like(m)
        active = np.nonzero((self._pore_z[:, 0] <= z) & (self._pore_z[:, 1] >= z))[0]
        for i in active:
            pore = self.pores[i]
            box = pore.box(z, yb, xb)
            if box is not None:
                rho = pore.rho(z, yb[box[0]], xb[box[1]])
                np.maximum(empty[box], _step((1 - rho) * pore.s.min(), self.EDGE), out=empty[box])
        for crack in self.cracks:
            self._crack_row(empty, crack, z, yb, xb)
        m *= 1.0 - empty
        for inclusion in self.inclusions:
            box = inclusion.box(z, yb, xb)
            if box is not None:
                rho = inclusion.rho(z, yb[box[0]], xb[box[1]])
                _paint(m[box], self.INCLUSION, _step((1 - rho) * inclusion.s[0], self.EDGE))
        v[sy, sx] = m * solid
        return v

    def _crack_row(self, empty, crack, z, y, x) -> None:
        c, reach = crack["centre"], crack["reach"]
        if abs(z - c[0]) > reach[0]:
            return
        sy, sx = _span(y, c[1] - reach[1], c[1] + reach[1]), _span(x, c[2] - reach[2], c[2] + reach[2])
        if sy.start >= sy.stop or sx.start >= sx.stop:
            return
        p = (z - c[0], (y[sy] - c[1])[:, None], (x[sx] - c[2])[None, :])
        dot = lambda e: e[0] * p[0] + e[1] * p[1] + e[2] * p[2]  # noqa: E731
        dn = dot(crack["normal"]) + 0.006 * crack["rough"].grid(z, y[sy], x[sx])
        s2 = (dot(crack["e1"]) / crack["semi"][0]) ** 2 + (dot(crack["e2"]) / crack["semi"][1]) ** 2
        taper = np.sqrt(np.clip(1.0 - s2, 0.0, 1.0))
        dark = np.clip((crack["opening"] * taper - np.abs(dn)) / 0.006 + 0.5 * taper, 0.0, 1.0)
        np.maximum(empty[sy, sx], dark, out=empty[sy, sx])


# ----------------------------------------------------------------------------- organs (abdomen)
class _Organs:
    """An abdomen in a CT-like window (body along D; anterior at small y, patient right at small x)."""

    FAT, MUSCLE, CAVITY, MARROW, CORTEX, CSF = 0.32, 0.65, 0.34, 0.55, 1.35, 0.25
    EDGE = 0.01

    def __init__(self, rng: np.random.Generator, num_loops: int):
        self.body_centre_y = 0.04
        self.ax, self.ay = _jitter(rng, 0.86, 0.03), _jitter(rng, 0.6, 0.04)
        self.body_field = _Field(rng, 0.7, 32)
        self.fat_field = _Field(rng, 1.2, 32)
        self.organ_fields = (_Field(rng, 1.8, 48), _Field(rng, 1.8, 48))
        self.texture = _Field(rng, 9.0, 64, spread=0.5)
        self.trabecular = _Field(rng, 22.0, 48, spread=0.4)
        self.organs: list[tuple[str, _Ellipsoid, float, float, float]] = []
        J = lambda v, s=0.03: v + s * rng.uniform(-1, 1)  # noqa: E731

        def organ(name, centre, semi, value, angle=0.0, irregular=0.07):
            semi = [_jitter(rng, s, 0.1) for s in semi]
            rot = _in_plane_rotation(angle + rng.uniform(-0.15, 0.15))
            blob = _Ellipsoid([J(c) for c in centre], semi, rot, margin=_margin(irregular))
            self.organs.append((name, blob, value + rng.uniform(-0.02, 0.02), irregular,
                                rng.uniform(0, _TAU)))

        organ("muscle", (0.0, 0.4, -0.16), (3.0, 0.1, 0.11), self.MUSCLE, 0.3, 0.04)
        organ("muscle", (0.0, 0.4, 0.16), (3.0, 0.1, 0.11), self.MUSCLE, -0.3, 0.04)
        organ("psoas", (-0.3, 0.25, -0.16), (1.2, 0.06, 0.06), self.MUSCLE, 0.0, 0.05)
        organ("psoas", (-0.3, 0.25, 0.16), (1.2, 0.06, 0.06), self.MUSCLE, 0.0, 0.05)
        # bowel first, so that the solid organs drawn next lie over it: small-bowel loops, and
        # the ascending / descending colon along D at the sides (gas, fluid or stool)
        for _ in range(num_loops):
            centre = (rng.uniform(-1.0, 0.3), rng.uniform(-0.4, 0.12), rng.uniform(-0.5, 0.5))
            r = rng.uniform(0.06, 0.11)
            semi = (r * rng.uniform(1.0, 2.5), r, r * rng.uniform(0.8, 1.3))
            blob = _Ellipsoid(centre, semi, _random_rotation(rng), margin=_margin(0.08))
            content = float(rng.choice([0.02, 0.45, 0.4]))  # gas, fluid, stool
            self.organs.append(("bowel", blob, content, 0.08, rng.uniform(0, _TAU)))
        organ("bowel", (-0.3, 0.05, -0.55), (0.6, 0.09, 0.1), float(rng.choice([0.02, 0.4])), 0.0, 0.08)
        organ("bowel", (-0.3, 0.1, 0.58), (0.6, 0.08, 0.08), float(rng.choice([0.02, 0.4])), 0.0, 0.08)
        organ("liver", (0.35, -0.02, -0.36), (0.6, 0.36, 0.38), 0.78, 0.2)
        organ("spleen", (0.45, 0.22, 0.55), (0.28, 0.19, 0.1), 0.74, 0.6)
        organ("stomach", (0.5, -0.2, 0.28), (0.3, 0.15, 0.22), 0.5, -0.3)
        organ("pancreas", (0.12, 0.03, 0.1), (0.08, 0.05, 0.27), 0.7, 0.15, 0.1)
        organ("gallbladder", (0.15, -0.22, -0.24), (0.1, 0.06, 0.05), 0.42, 0.4, 0.04)
        for side in (-1.0, 1.0):
            organ("kidney", (-0.1, 0.26, side * 0.33), (0.3, 0.14, 0.085), 0.9, side * 0.45, 0.04)
        self.aorta = (J(0.14, 0.01), J(0.04, 0.01), _jitter(rng, 0.042, 0.1))
        self.ivc = (J(0.13, 0.01), J(-0.09, 0.01), _jitter(rng, 0.05, 0.1))
        self.spine_y = J(0.3, 0.01)
        self.vertebra_period, self.vertebra_phase = _jitter(rng, 0.34, 0.08), rng.uniform(0, 1)
        self.ribs = [(0.95 - k * 0.27 + rng.uniform(-0.03, 0.03), side)
                     for k in range(5) for side in (-1.0, 1.0)]
        self.parameters = {"num_bowel_loops": num_loops,
                           "body_semi_axes_yx": [round(self.ay, 4), round(self.ax, 4)],
                           "organs": sorted({o[0] for o in self.organs}),
                           "values": {"fat": self.FAT, "muscle": self.MUSCLE, "bone_cortex": self.CORTEX,
                                      "marrow": self.MARROW}}

    def row(self, z: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        v = np.zeros((len(y), len(x)))
        scale = 1.0 + 0.04 * z  # a little wider cranially
        ax, ay = self.ax * scale, self.ay * scale
        sy = _span(y, self.body_centre_y - ay * 1.1, self.body_centre_y + ay * 1.1)
        sx = _span(x, -ax * 1.1, ax * 1.1)
        if sy.start >= sy.stop or sx.start >= sx.stop:
            return v
        v[sy, sx] = self._body(z, y[sy], x[sx], ax, ay)
        return v

    def _body(self, z, y, x, ax, ay) -> np.ndarray:
        ry = (y - self.body_centre_y)[:, None] * np.ones((1, len(x)))
        rx = np.ones((len(y), 1)) * x[None, :]
        # flatter at the back (y > 0): a superellipse of exponent 2.5 there
        p = np.where(ry > 0, 2.5, 2.0)
        rho = (np.abs(rx / ax) ** p + np.abs(ry / ay) ** p) ** (1.0 / p)
        rho = rho * (1.0 + 0.02 * np.clip(self.body_field.grid(z, y, x), -2.5, 2.5))
        r = np.sqrt(rx**2 + ry**2)
        depth = np.where(r > 1e-9, r * (1.0 / np.maximum(rho, 1e-12) - 1.0), 1.0)
        fat = 0.055 + 0.018 * np.clip(self.fat_field.grid(z, y, x), -2, 2) + 0.03 * np.clip(-ry / ay, 0, 1)
        wall = fat + 0.035
        v = np.full(rx.shape, self.CAVITY)
        cavity = _step(depth - wall, self.EDGE)
        self._organs(v, cavity, z, y, x)
        self._vessels(v, z, y, x)
        self._spine(v, z, y, x)
        v *= 1.0 + 0.03 * np.clip(self.texture.grid(z, y, x), -3, 3)
        _paint(v, self.MUSCLE, _step(wall - depth, self.EDGE))
        _paint(v, self.FAT, _step(fat - depth, self.EDGE))
        self._ribs(v, z, rx, ry, depth, fat)
        return v * _step(depth, self.EDGE)

    def _organs(self, v, cavity, z, y, x) -> None:
        for name, blob, value, irregular, angle in self.organs:
            box = blob.box(z, y, x)
            if box is None:
                continue
            yb, xb = y[box[0]], x[box[1]]
            g = (math.cos(angle) * self.organ_fields[0].grid(z, yb, xb)
                 + math.sin(angle) * self.organ_fields[1].grid(z, yb, xb))
            rho = blob.rho(z, yb, xb) * (1.0 + irregular * np.clip(g, -3, 3))
            size = blob.s.min()
            inside = _step((1 - rho) * size, self.EDGE)
            if name != "muscle":
                inside = inside * cavity[box]
            target = v[box]
            if name == "kidney":  # cortex, medulla, sinus fat
                _paint(target, value, inside)
                _paint(target, 0.72, inside * _step((0.62 - rho) * size, self.EDGE))
                _paint(target, self.FAT, inside * _step((0.3 - rho) * size, self.EDGE))
            elif name == "stomach":  # fluid with gas on top (anterior, small y)
                _paint(target, 0.7, inside)
                content = _step((0.88 - rho) * size, self.EDGE)
                gas = _step(blob.c[1] - 0.05 - yb, self.EDGE)[:, None]
                _paint(target, value, inside * content)
                _paint(target, 0.02, inside * content * gas)
            elif name == "bowel":  # wall around gas or fluid
                _paint(target, 0.7, inside)
                _paint(target, value, inside * _step((0.72 - rho) * size, self.EDGE))
            else:
                _paint(target, value, inside)

    def _vessels(self, v, z, y, x) -> None:
        for (cy, cx, r), value in ((self.aorta, 1.0), (self.ivc, 0.88)):
            cx = cx + 0.02 * z
            d = np.sqrt(((y - cy)[:, None] * (1.0 if value == 1.0 else 1.35)) ** 2 + (x - cx)[None, :] ** 2)
            _paint(v, value, _step(r - d, self.EDGE))

    def _spine(self, v, z, y, x) -> None:
        yy, xx = (y - self.spine_y)[:, None], x[None, :]
        phase = ((z / self.vertebra_period) + self.vertebra_phase) % 1.0
        disc = phase < 0.2
        # vertebral body: cortical ring around marrow (a disc between vertebrae)
        rho = np.sqrt((yy / 0.095) ** 2 + (xx / 0.115) ** 2)
        body = _step((1 - rho) * 0.095, self.EDGE)
        if disc:
            _paint(v, 0.62, body)
        else:
            marrow = self.MARROW * (1.0 + 0.1 * np.clip(self.trabecular.grid(z, y, x), -3, 3))
            _paint(v, self.CORTEX, body)
            _paint(v, marrow, _step((0.78 - rho) * 0.095, self.EDGE))
        # canal with the cord; posterior arch and spinous process (bone only in vertebrae)
        cy = 0.155
        rc = np.sqrt((yy - cy) ** 2 + xx**2)
        if not disc:
            arch = _step(0.082 - rc, self.EDGE) * _step(yy - cy + 0.01, self.EDGE)
            _paint(v, self.CORTEX, arch)
            sp = np.sqrt(((yy - 0.27) / 0.07) ** 2 + (xx / 0.022) ** 2)
            _paint(v, self.CORTEX, _step((1 - sp) * 0.022, self.EDGE))
            _paint(v, self.MARROW, _step((0.5 - sp) * 0.022, self.EDGE))
        _paint(v, self.CSF, _step(0.05 - rc, self.EDGE))
        _paint(v, 0.6, _step(0.024 - rc, self.EDGE))

    def _ribs(self, v, z, rx, ry, depth, fat) -> None:
        # each rib: a tube along the body wall, descending anteriorly; seen as an elongated ring
        phi = np.arctan2(ry, np.abs(rx))  # +π/2 posterior midline, 0 lateral, −π/2 anterior
        centre_depth = fat + 0.018
        for z0, side in self.ribs:
            if z0 + 0.05 < z or z0 - 0.6 > z:
                continue
            zc = z0 - 0.22 * (1.25 - phi)
            d = np.sqrt((depth - centre_depth) ** 2 + (z - zc) ** 2)
            on_side = (np.sign(rx) == side) & (phi > -1.0) & (phi < 1.25)
            ring = np.where(on_side, _step(0.022 - d, self.EDGE), 0.0)
            _paint(v, self.CORTEX, ring)
            _paint(v, self.MARROW, np.where(on_side, _step(0.011 - d, self.EDGE * 0.8), 0.0))


# ----------------------------------------------------------------------------- registry
#: name → (model factory taking (rng, num_features), default num_features)
FAMILY: dict[str, tuple[Callable[[np.random.Generator, int], Any], int]] = {
    "anatomy": (_Anatomy, 16),
    "industrial": (_Industrial, 500),
    "organs": (_Organs, 24),
}


def make_family_phantom(name: str, kind: str, shape: tuple[int, int, int], rng: np.random.Generator, *,
                        seed: int, num_features: int | None, zoom: float) -> FieldPhantom:
    """The phantom ``kind`` (a key of :data:`FAMILY`) drawn from ``rng``, at magnification ``zoom``,
    named ``name`` in :meth:`FieldPhantom.describe`."""
    factory, default = FAMILY[kind]
    count = default if num_features is None else int(num_features)
    if count < 0:
        raise ValueError(f"num_features must be >= 0, got {count}")
    if not (zoom > 0 and math.isfinite(zoom)):
        raise ValueError(f"zoom must be a positive number, got {zoom}")
    return FieldPhantom(name, shape, seed, zoom, factory(rng, count))
