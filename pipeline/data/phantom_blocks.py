"""Building blocks of the held-out phantom family (:mod:`pipeline.data.phantom_family`).

Smooth steps, random rotations, a random Fourier field (:class:`_Field`), soft ellipsoids,
tube sets along polylines, painting helpers, and :class:`FieldPhantom`, the
:class:`~pipeline.data.phantoms.VolumeSource` that samples a recipe one D-row at a time. The
names with a leading underscore are the package-internal vocabulary of the recipes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .phantoms import VolumeSource

__all__ = ["FieldPhantom"]


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
