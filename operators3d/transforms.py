"""Group actions on volumes, for equivariant imaging.

Equivariant imaging (Chen, Tachella & Davies, ICCV 2021) picks a group action ``T_g`` under
which the set of images is invariant and asks the reconstructor to commute with it:
``f(A T_g x, A) ≈ T_g f(A x, A)``. This module holds the actions: in-plane rotations by
multiples of 90° (:class:`Rotate90`) and by any angle (:class:`Rotate`), flips
(:class:`Reflect`), circular shifts (:class:`Shift`), the 24 proper rotations of the cube
(:class:`CubeRotation`), and compositions of them (:class:`ComposedAction`).

Conventions shared by every action:

- They act on the last three dims, read as ``(D, H, W)``; any leading dims (batch, channels)
  broadcast, so ``(B, D, H, W)`` and ``(B, C, D, H, W)`` both work, with no loop over the batch.
  Axes are named ``"D"``, ``"H"``, ``"W"`` (or given as ``-3``, ``-2``, ``-1``).
- Real and complex inputs, CPU and CUDA; plain torch ops, so autograd flows through them.
- One group element per call: every batch element gets the same transform. Draw one element
  per step (or call once per sub-batch) for batch-wise different transforms.
- Actions are immutable (frozen dataclasses: equal elements compare equal and hash alike).
  ``a.compose(b)`` (also ``a @ b``) is ``a ∘ b``: apply ``b`` first, then ``a``.
- Random elements come from a classmethod ``sample(*, generator=None, ...)`` that draws from
  the given :class:`torch.Generator` (the global RNG if ``None``), so a seeded generator gives
  the same element every time. ``exclude_identity=True`` (the default where the group is
  finite) never draws the identity, which would make an EI step contribute nothing.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "GroupAction",
    "ComposedAction",
    "Rotate90",
    "Rotate",
    "Reflect",
    "Shift",
    "CubeRotation",
    "cube_rotations",
]

_AXIS_NAMES = ("D", "H", "W")
_NAME_TO_DIM = {"D": -3, "H": -2, "W": -1}


def _axis_name(axis: str | int, owner: str) -> str:
    """Normalise an axis given as ``"D"/"H"/"W"`` (any case) or ``-3/-2/-1`` to its name."""
    if isinstance(axis, str) and axis.upper() in _NAME_TO_DIM:
        return axis.upper()
    if isinstance(axis, numbers.Integral) and not isinstance(axis, bool) and -3 <= axis <= -1:
        return _AXIS_NAMES[int(axis) + 3]
    raise ValueError(f"{owner}: expected an axis among 'D', 'H', 'W' (or -3, -2, -1), got {axis!r}")


def _plane(plane: Sequence[str | int], owner: str) -> tuple[tuple[str, str], bool]:
    """Normalise a plane to its two axis names in (D, H, W) order; also say if it was reversed."""
    if isinstance(plane, str) or len(plane) != 2:
        raise ValueError(f"{owner}: expected a plane of two axes such as ('H', 'W'), got {plane!r}")
    a, b = (_axis_name(p, owner) for p in plane)
    if a == b:
        raise ValueError(f"{owner}: the two plane axes must differ, got {plane!r}")
    if _NAME_TO_DIM[a] > _NAME_TO_DIM[b]:
        return (b, a), True
    return (a, b), False


def _check_volume(x: torch.Tensor, owner: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 3:
        raise ValueError(
            f"{owner}: expected a tensor whose last three dims are (D, H, W), "
            f"got shape {tuple(x.shape)}"
        )


def _draw_int(high: int, generator: torch.Generator | None) -> int:
    """One integer uniform in ``[0, high)`` from ``generator``."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(high, (1,), generator=generator, device=device).item())


def _draw_element(count: int, generator: torch.Generator | None, exclude_identity: bool) -> int:
    """An index uniform in ``[0, count)``, or in ``[1, count)`` (index 0 = identity) if excluded."""
    if exclude_identity:
        return 1 + _draw_int(count - 1, generator)
    return _draw_int(count, generator)


def _draw_uniform(generator: torch.Generator | None) -> float:
    """One float64 uniform in ``[0, 1)`` from ``generator``."""
    device = generator.device if generator is not None else "cpu"
    return float(torch.rand(1, generator=generator, device=device, dtype=torch.float64).item())


class GroupAction:
    """A group element acting on the last three dims ``(D, H, W)`` of a tensor.

    Subclasses implement ``_apply`` (on an already checked tensor) and ``inverse``, may
    override ``compose`` with a closed form, and provide ``sample(*, generator=None, ...)``.

    Shape:
        ``(*lead, D, H, W) → (*lead, D, H, W)``.

    Math:
        ``(T_a ∘ T_b) x = T_a(T_b x)``; ``T_g⁻¹ T_g = I``.
    """

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the action to ``x``."""
        _check_volume(x, self.name)
        return self._apply(x)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} does not implement _apply")

    def inverse(self) -> "GroupAction":
        """The inverse element ``g⁻¹``."""
        raise NotImplementedError(f"{self.name} does not implement inverse")

    def compose(self, other: "GroupAction") -> "GroupAction":
        """``self ∘ other``: apply ``other`` first, then ``self``.

        The result has the type of its factors where the group is closed in that type (two
        :class:`Shift`, two :class:`CubeRotation`, ...), a :class:`ComposedAction` otherwise.
        """
        if not isinstance(other, GroupAction):
            raise TypeError(
                f"{self.name}.compose: expected a GroupAction, got {type(other).__name__}"
            )
        return ComposedAction(self, other)

    def __matmul__(self, other: object) -> "GroupAction":
        if isinstance(other, GroupAction):
            return self.compose(other)
        if isinstance(other, torch.Tensor):
            raise TypeError(f"{self.name} @ tensor is not defined: apply an action with T(x)")
        return NotImplemented

    @classmethod
    def sample(cls, *, generator: torch.Generator | None = None) -> "GroupAction":
        """A random element drawn from ``generator`` (subclasses add their own options)."""
        raise NotImplementedError(f"{cls.__name__} does not implement sample")


@dataclass(frozen=True)
class ComposedAction(GroupAction):
    """``outer ∘ inner`` for actions of different kinds.

    Shape:
        ``(*lead, D, H, W) → (*lead, D, H, W)``.

    Math:
        ``(T_o ∘ T_i) x = T_o(T_i x)``, ``(T_o ∘ T_i)⁻¹ = T_i⁻¹ ∘ T_o⁻¹``.

    Args:
        outer: applied second.
        inner: applied first.
    """

    outer: GroupAction
    inner: GroupAction

    def __post_init__(self) -> None:
        for what in ("outer", "inner"):
            value = getattr(self, what)
            if not isinstance(value, GroupAction):
                raise TypeError(
                    f"ComposedAction: {what} must be a GroupAction, got {type(value).__name__}"
                )

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(self.inner(x))

    def inverse(self) -> "ComposedAction":
        return ComposedAction(self.inner.inverse(), self.outer.inverse())


# ------------------------------------------------------------------------ rotations by 90°
@dataclass(frozen=True)
class Rotate90(GroupAction):
    """Rotation by ``k · 90°`` in a plane (``torch.rot90``), exact.

    The plane is stored in ``(D, H, W)`` order: ``Rotate90(1, plane=("W", "H"))`` is stored as
    ``Rotate90(3, plane=("H", "W"))``; ``k`` is stored modulo 4. Positive ``k`` turns the first
    plane axis towards the second (``torch.rot90``'s convention), the same sense as
    :class:`Rotate` with a positive angle.

    Shape:
        ``(*lead, D, H, W) → (*lead, D, H, W)``; odd ``k`` needs equal sizes along the plane
        (a ``ValueError`` otherwise, since the shape would change).

    Math:
        ``(T x)[i, j] = x[j, N − 1 − i]`` on the plane for ``k = 1``; ``T⁻¹ = Rotate90(−k)``.

    Args:
        k: number of quarter turns (any integer).
        plane: the two axes of the rotation plane.
    """

    k: int
    plane: tuple[str, str] = ("H", "W")

    def __post_init__(self) -> None:
        if not isinstance(self.k, numbers.Integral) or isinstance(self.k, bool):
            raise TypeError(f"Rotate90: k must be an integer, got {self.k!r}")
        plane, reversed_ = _plane(self.plane, "Rotate90")
        k = (-int(self.k) if reversed_ else int(self.k)) % 4
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "plane", plane)

    @property
    def dims(self) -> tuple[int, int]:
        return (_NAME_TO_DIM[self.plane[0]], _NAME_TO_DIM[self.plane[1]])

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dims
        if self.k % 2 == 1 and x.shape[a] != x.shape[b]:
            raise ValueError(
                f"Rotate90: a quarter turn in the {self.plane} plane needs equal sizes along "
                f"{self.plane[0]} and {self.plane[1]}, got shape {tuple(x.shape)}"
            )
        return torch.rot90(x, self.k, dims=(a, b))

    def inverse(self) -> "Rotate90":
        return Rotate90(-self.k, plane=self.plane)

    def compose(self, other: GroupAction) -> GroupAction:
        if isinstance(other, Rotate90) and other.plane == self.plane:
            return Rotate90(self.k + other.k, plane=self.plane)
        return super().compose(other)

    @classmethod
    def sample(
        cls,
        *,
        generator: torch.Generator | None = None,
        plane: Sequence[str | int] = ("H", "W"),
        exclude_identity: bool = True,
    ) -> "Rotate90":
        """A uniform random quarter-turn count: ``k ∈ {1, 2, 3}`` (``{0, …, 3}`` with identity)."""
        k = _draw_element(4, generator, exclude_identity)
        return cls(k, plane=tuple(plane))


# ------------------------------------------------------------------- rotations by any angle
_INTERP_MODES = ("bilinear", "nearest", "bicubic")
_PADDING_MODES = ("zeros", "border", "reflection")


def _rotation_grid(
    h: int, w: int, cos: float, sin: float, *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The ``grid_sample`` grid ``(1, h, w, 2)`` for a rotation about the plane's centre."""
    rows = torch.arange(h, dtype=torch.float64, device=device) - (h - 1) / 2
    cols = torch.arange(w, dtype=torch.float64, device=device) - (w - 1) / 2
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    # The output pixel at centred (r, c) reads the input at R(θ)ᵀ-rotated coordinates.
    r_in = cos * r + sin * c
    c_in = -sin * r + cos * c
    # align_corners=True maps -1 and 1 to the centres of the first and last pixels.
    x_norm = c_in / max((w - 1) / 2, 0.5)
    y_norm = r_in / max((h - 1) / 2, 0.5)
    return torch.stack([x_norm, y_norm], dim=-1).unsqueeze(0).to(dtype)


def _rotate_real(
    x: torch.Tensor, grid: torch.Tensor, a: int, b: int, mode: str, padding: str
) -> torch.Tensor:
    moved = x.movedim((a, b), (-2, -1))
    h, w = moved.shape[-2:]
    # Every other index becomes a channel: one grid, one kernel call, no loop over slices.
    flat = moved.reshape(1, -1, h, w)
    out = F.grid_sample(flat, grid, mode=mode, padding_mode=padding, align_corners=True)
    return out.reshape(moved.shape).movedim((-2, -1), (a, b))


@dataclass(frozen=True)
class Rotate(GroupAction):
    """Rotation by any angle in a plane, about its centre, by interpolation.

    The centre is at ``((N−1)/2, (M−1)/2)`` in voxel units (``DESIGN.md``), so the rotation maps
    the voxel grid onto itself for multiples of 90°. Values that come from outside the volume
    follow ``padding`` (zeros by default). Complex inputs rotate their real and imaginary parts.
    An angle within 1e-12 of a multiple of π/2 is applied exactly (``torch.rot90``) where that
    keeps the shape (half turns, or quarter turns on a square plane).

    ``inverse()`` is the rotation by ``−angle``: ``T⁻¹ T`` is the identity only up to the
    interpolation error (two smoothing passes; corners rotated out of the volume are lost),
    and exactly for multiples of 90°. ``compose`` of two rotations in the same plane adds the
    angles (the group law), and applying the result interpolates once, so it differs from
    applying the factors in turn by the interpolation error.

    Shape:
        ``(*lead, D, H, W) → (*lead, D, H, W)``.

    Math:
        ``(T x)(p) = x(R(θ)⁻¹ p)`` for centred in-plane coordinates ``p``, ``R(θ)`` turning the
        first plane axis towards the second; ``T⁻¹ = Rotate(−θ)``.

    Args:
        angle: radians.
        plane: the two axes of the rotation plane (stored in ``(D, H, W)`` order, with the
            angle negated if they were given reversed).
        interp: ``"bilinear"`` (default), ``"nearest"`` or ``"bicubic"`` (``grid_sample``).
        padding: ``"zeros"`` (default), ``"border"`` or ``"reflection"``.
    """

    angle: float
    plane: tuple[str, str] = ("H", "W")
    interp: str = "bilinear"
    padding: str = "zeros"

    def __post_init__(self) -> None:
        if isinstance(self.angle, torch.Tensor) and self.angle.numel() == 1:
            object.__setattr__(self, "angle", float(self.angle.item()))
        if not isinstance(self.angle, numbers.Real) or isinstance(self.angle, bool):
            raise TypeError(f"Rotate: angle must be a real number (radians), got {self.angle!r}")
        if not math.isfinite(float(self.angle)):
            raise ValueError(f"Rotate: angle must be finite, got {self.angle!r}")
        plane, reversed_ = _plane(self.plane, "Rotate")
        angle = -float(self.angle) if reversed_ else float(self.angle)
        object.__setattr__(self, "angle", angle)
        object.__setattr__(self, "plane", plane)
        if self.interp not in _INTERP_MODES:
            raise ValueError(f"Rotate: interp must be one of {_INTERP_MODES}, got {self.interp!r}")
        if self.padding not in _PADDING_MODES:
            raise ValueError(
                f"Rotate: padding must be one of {_PADDING_MODES}, got {self.padding!r}"
            )

    @property
    def dims(self) -> tuple[int, int]:
        return (_NAME_TO_DIM[self.plane[0]], _NAME_TO_DIM[self.plane[1]])

    def _quarter_turns(self) -> int | None:
        """``k`` if the angle is ``k · π/2`` to within 1e-12, else ``None``."""
        q = self.angle / (math.pi / 2)
        k = round(q)
        return k % 4 if abs(q - k) * (math.pi / 2) <= 1e-12 else None

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"Rotate: expected a floating or complex tensor, got {x.dtype}")
        a, b = self.dims
        k = self._quarter_turns()
        if k is not None and (k % 2 == 0 or x.shape[a] == x.shape[b]):
            return torch.rot90(x, k, dims=(a, b))
        if k is not None:
            cos, sin = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)][k]
        else:
            cos, sin = math.cos(self.angle), math.sin(self.angle)
        real = x.real if x.is_complex() else x
        grid = _rotation_grid(
            x.shape[a], x.shape[b], cos, sin, dtype=real.dtype, device=x.device
        )
        if x.is_complex():
            re = _rotate_real(x.real, grid, a, b, self.interp, self.padding)
            im = _rotate_real(x.imag, grid, a, b, self.interp, self.padding)
            return torch.complex(re, im)
        return _rotate_real(x, grid, a, b, self.interp, self.padding)

    def inverse(self) -> "Rotate":
        return Rotate(-self.angle, plane=self.plane, interp=self.interp, padding=self.padding)

    def compose(self, other: GroupAction) -> GroupAction:
        if (
            isinstance(other, Rotate)
            and other.plane == self.plane
            and other.interp == self.interp
            and other.padding == self.padding
        ):
            return Rotate(
                self.angle + other.angle, plane=self.plane, interp=self.interp, padding=self.padding
            )
        return super().compose(other)

    @classmethod
    def sample(
        cls,
        *,
        generator: torch.Generator | None = None,
        max_angle: float = math.pi,
        plane: Sequence[str | int] = ("H", "W"),
        interp: str = "bilinear",
        padding: str = "zeros",
    ) -> "Rotate":
        """A rotation by an angle uniform in ``[−max_angle, max_angle)`` (radians)."""
        if not (isinstance(max_angle, numbers.Real) and 0 <= max_angle <= math.pi):
            raise ValueError(f"Rotate.sample: max_angle must lie in [0, π], got {max_angle!r}")
        angle = (2 * _draw_uniform(generator) - 1) * float(max_angle)
        return cls(angle, plane=tuple(plane), interp=interp, padding=padding)


# ------------------------------------------------------------------------------ reflections
@dataclass(frozen=True)
class Reflect(GroupAction):
    """Flips along some of the axes ``D``, ``H``, ``W``; exact.

    The axes are stored as a sorted tuple of names without repeats; ``Reflect(())`` is the
    identity. Flips are about the centre ``(N−1)/2``, i.e. index ``i ↦ N − 1 − i``.

    Shape:
        ``(*lead, D, H, W) → (*lead, D, H, W)``.

    Math:
        ``(T x)[…, i, …] = x[…, N − 1 − i, …]`` along each flipped axis; ``T⁻¹ = T``.

    Args:
        axes: the axes to flip, e.g. ``("H",)`` or ``("D", "W")``.
    """

    axes: tuple[str, ...]

    def __post_init__(self) -> None:
        axes = (self.axes,) if isinstance(self.axes, (str, int)) else self.axes
        names = {_axis_name(a, "Reflect") for a in axes}
        object.__setattr__(self, "axes", tuple(n for n in _AXIS_NAMES if n in names))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        if not self.axes:
            return x.clone()
        return torch.flip(x, dims=[_NAME_TO_DIM[a] for a in self.axes])

    def inverse(self) -> "Reflect":
        return self

    def compose(self, other: GroupAction) -> GroupAction:
        if isinstance(other, Reflect):
            return Reflect(tuple(set(self.axes) ^ set(other.axes)))
        return super().compose(other)

    @classmethod
    def sample(
        cls,
        *,
        generator: torch.Generator | None = None,
        axes: Sequence[str | int] = ("H", "W"),
        exclude_identity: bool = True,
    ) -> "Reflect":
        """A uniform random subset of ``axes`` to flip (never the empty one by default)."""
        names = [n for n in _AXIS_NAMES if n in {_axis_name(a, "Reflect.sample") for a in axes}]
        if not names:
            raise ValueError(f"Reflect.sample: expected at least one axis, got {axes!r}")
        count = 2 ** len(names)
        bits = _draw_element(count, generator, exclude_identity)
        return cls(tuple(n for i, n in enumerate(names) if bits >> i & 1))


# ----------------------------------------------------------------------------------- shifts
@dataclass(frozen=True)
class Shift(GroupAction):
    """Circular integer shifts along ``D``, ``H``, ``W`` (``torch.roll``); exact.

    Shifts are not reduced modulo the size (the size is only known when applied), so
    ``Shift((0, N, 0))`` acts like the identity on size ``N`` but does not compare equal to it.

    Shape:
        ``(*lead, D, H, W) → (*lead, D, H, W)``.

    Math:
        ``(T x)[d, h, w] = x[(d − s_D) mod D, (h − s_H) mod H, (w − s_W) mod W]``;
        ``T⁻¹ = Shift(−s)``.

    Args:
        shifts: ``(s_D, s_H, s_W)``, integers.
    """

    shifts: tuple[int, int, int]

    def __post_init__(self) -> None:
        shifts = tuple(self.shifts)
        if len(shifts) != 3 or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shifts
        ):
            raise ValueError(f"Shift: expected three integer shifts (D, H, W), got {self.shifts!r}")
        object.__setattr__(self, "shifts", tuple(int(s) for s in shifts))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, shifts=self.shifts, dims=(-3, -2, -1))

    def inverse(self) -> "Shift":
        return Shift(tuple(-s for s in self.shifts))

    def compose(self, other: GroupAction) -> GroupAction:
        if isinstance(other, Shift):
            return Shift(tuple(a + b for a, b in zip(self.shifts, other.shifts)))
        return super().compose(other)

    @classmethod
    def sample(
        cls,
        *,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        axes: Sequence[str | int] = ("H", "W"),
        exclude_identity: bool = True,
    ) -> "Shift":
        """A uniform random element of the cyclic shift group along ``axes``.

        Args:
            shape: the shape the shift will act on; its last three entries are ``(D, H, W)``
                (``x.shape`` works).
            axes: the axes to shift along; the others get shift 0.
            exclude_identity: never draw the all-zero shift.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) < 3 or any(s <= 0 for s in shape[-3:]):
            raise ValueError(
                f"Shift.sample: expected a shape ending in positive (D, H, W), got {shape!r}"
            )
        names = [n for n in _AXIS_NAMES if n in {_axis_name(a, "Shift.sample") for a in axes}]
        sizes = [shape[_NAME_TO_DIM[n]] for n in names]
        total = math.prod(sizes)
        if exclude_identity and total == 1:
            raise ValueError(
                f"Shift.sample: shape {shape!r} has size 1 along {names}: no shift but the "
                "identity exists (pass exclude_identity=False)"
            )
        flat = _draw_element(total, generator, exclude_identity)
        shifts = {"D": 0, "H": 0, "W": 0}
        for n, size in zip(reversed(names), reversed(sizes)):
            flat, shifts[n] = divmod(flat, size)
        return cls((shifts["D"], shifts["H"], shifts["W"]))


# -------------------------------------------------------------------------- cube rotations
def _signed_permutations() -> tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...]:
    """The 24 ``(permutation, signs)`` pairs with determinant +1, identity first."""
    out = []
    for perm in itertools.permutations(range(3)):
        inversions = sum(perm[i] > perm[j] for i in range(3) for j in range(i + 1, 3))
        parity = -1 if inversions % 2 else 1
        for signs in itertools.product((1, -1), repeat=3):
            if parity * signs[0] * signs[1] * signs[2] == 1:
                out.append((perm, signs))
    return tuple(out)


_CUBE = _signed_permutations()
_CUBE_INDEX = {elem: i for i, elem in enumerate(_CUBE)}


@dataclass(frozen=True)
class CubeRotation(GroupAction):
    """One of the 24 proper rotations of the cube, as a signed permutation of ``(D, H, W)``; exact.

    Element ``index`` has the matrix ``M`` with ``M[i, perm[i]] = signs[i]`` (``det M = +1``);
    index 0 is the identity, and :func:`cube_rotations` lists all 24 in index order. Coordinates
    are centred at ``(N−1)/2``, so a sign flips an axis ``i ↦ N − 1 − i``.

    Shape:
        ``(*lead, D, H, W) → (*lead, D, H, W)``; the sizes of axes the permutation exchanges must
        be equal (``D == H == W`` for a general element), a ``ValueError`` otherwise.

    Math:
        ``(T_M x)(r) = x(Mᵀ r)`` on centred coordinates; ``T_A ∘ T_B = T_{AB}``, ``T_M⁻¹ = T_{Mᵀ}``.

    Args:
        index: which rotation, ``0 ≤ index < 24``.
    """

    index: int

    num_elements: ClassVar[int] = 24

    def __post_init__(self) -> None:
        if (
            not isinstance(self.index, numbers.Integral)
            or isinstance(self.index, bool)
            or not 0 <= self.index < 24
        ):
            raise ValueError(
                f"CubeRotation: index must be an integer in [0, 24), got {self.index!r}"
            )
        object.__setattr__(self, "index", int(self.index))

    @property
    def permutation(self) -> tuple[int, int, int]:
        """``perm``: output axis ``i`` reads input axis ``perm[i]`` (0, 1, 2 = D, H, W)."""
        return _CUBE[self.index][0]

    @property
    def signs(self) -> tuple[int, int, int]:
        """``±1`` per output axis: ``-1`` flips it."""
        return _CUBE[self.index][1]

    @property
    def matrix(self) -> torch.Tensor:
        """The signed permutation matrix ``M`` (int64, ``3 × 3``)."""
        m = torch.zeros(3, 3, dtype=torch.int64)
        for i, (p, s) in enumerate(zip(self.permutation, self.signs)):
            m[i, p] = s
        return m

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor | Sequence[Sequence[int]]) -> "CubeRotation":
        """The element with signed permutation matrix ``matrix`` (determinant +1)."""
        m = torch.as_tensor(matrix).to(torch.int64)
        try:
            if m.shape != (3, 3):
                raise KeyError
            perm = tuple(int(torch.nonzero(m[i]).flatten().item()) for i in range(3))
            signs = tuple(int(m[i, perm[i]]) for i in range(3))
            return cls(_CUBE_INDEX[(perm, signs)])
        except (KeyError, RuntimeError, ValueError) as err:
            raise ValueError(
                "CubeRotation.from_matrix: expected a 3 × 3 signed permutation matrix with "
                f"determinant +1, got {m.tolist()}"
            ) from err

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        perm, signs = self.permutation, self.signs
        sizes = tuple(x.shape[-3:])
        if any(sizes[perm[i]] != sizes[i] for i in range(3)):
            raise ValueError(
                f"CubeRotation: element {self.index} (permutation {perm}) would change the "
                f"trailing shape {sizes}; it needs equal sizes along the exchanged axes"
            )
        lead = x.ndim - 3
        y = x.permute(*range(lead), *(lead + p for p in perm))
        flips = [i - 3 for i in range(3) if signs[i] < 0]
        return torch.flip(y, dims=flips) if flips else y.clone()

    def inverse(self) -> "CubeRotation":
        return CubeRotation.from_matrix(self.matrix.T)

    def compose(self, other: GroupAction) -> GroupAction:
        if isinstance(other, CubeRotation):
            return CubeRotation.from_matrix(self.matrix @ other.matrix)
        return super().compose(other)

    @classmethod
    def sample(
        cls, *, generator: torch.Generator | None = None, exclude_identity: bool = True
    ) -> "CubeRotation":
        """A uniform random element (one of 23 non-identity ones by default)."""
        index = _draw_element(24, generator, exclude_identity)
        return cls(index)


def cube_rotations() -> tuple[CubeRotation, ...]:
    """All 24 proper rotations of the cube, identity first (index order)."""
    return tuple(CubeRotation(i) for i in range(24))
