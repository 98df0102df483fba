"""The CT-like recipes of the held-out phantom family: ``industrial`` and ``organs``.

Their contents and tissue values are described in :mod:`pipeline.data.phantom_family`, which
registers them; the building blocks are in :mod:`pipeline.data.phantom_blocks`.
"""

from __future__ import annotations

import math

import numpy as np

from .phantom_blocks import (
    _TAU,
    _concat_tubes,
    _Ellipsoid,
    _Field,
    _in_plane_rotation,
    _jitter,
    _margin,
    _paint,
    _polyline,
    _random_rotation,
    _span,
    _step,
)


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
