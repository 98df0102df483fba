"""The base of every group action, their composition, and the helpers the actions share.

Axis names (``"D"``, ``"H"``, ``"W"`` or ``-3``, ``-2``, ``-1``), planes, the volume check and
the seeded draws used by every action's ``sample``; conventions: :mod:`operators3d.transforms`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["GroupAction", "ComposedAction"]

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
