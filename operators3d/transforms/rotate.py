"""Rotation by any angle in a plane, by interpolation (``grid_sample``).

Quarter turns are exact (``torch.rot90``); other angles interpolate the plane's samples, so
:class:`Rotate` is an isometry of the continuous image only; conventions:
:mod:`operators3d.transforms`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .action import _NAME_TO_DIM, GroupAction, _draw_uniform, _plane

__all__ = ["Rotate"]


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

