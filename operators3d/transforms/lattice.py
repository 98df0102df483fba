"""The exact group actions: they permute voxels (quarter turns, flips, shifts, cube rotations).

No interpolation, so each is an isometry of the voxel grid and its inverse is exact;
conventions: :mod:`operators3d.transforms`.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from .action import _AXIS_NAMES, _NAME_TO_DIM, GroupAction, _axis_name, _draw_element, _plane

__all__ = ["Rotate90", "Reflect", "Shift", "CubeRotation", "cube_rotations"]


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
