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

This module holds the ``anatomy`` recipe and the registry (:data:`FAMILY`); the building blocks
and :class:`~pipeline.data.phantom_blocks.FieldPhantom` are in :mod:`pipeline.data.phantom_blocks`,
the ``industrial`` and ``organs`` recipes in :mod:`pipeline.data.phantom_family_ct`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .phantom_blocks import (
    FieldPhantom,
    _concat_tubes,
    _Ellipsoid,
    _Field,
    _in_plane_rotation,
    _jitter,
    _paint,
    _polyline,
    _span,
    _step,
)
from .phantom_family_ct import _Industrial, _Organs

__all__ = ["FAMILY", "CROP_ZOOM", "make_family_phantom"]

#: Magnification of the ``-crop`` variants.
CROP_ZOOM = 1.5


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
