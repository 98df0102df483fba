"""What the CT projectors share: settings, rebuilding, input checks and operator capabilities.

:class:`CTProjector` is the base of :class:`~operators3d.ct.ParallelBeamCT` and
:class:`~operators3d.ct.ConeBeamCT`. Each subclass sets ``kind`` (``"parallel"`` or
``"cone"``), calls :meth:`CTProjector._setup` from its constructor, says which constructor
arguments a geometry stands for (``_arguments``) and implements ``subset`` (the projector of
some of its angles, computing only those).
"""

from __future__ import annotations

from typing import Self, Sequence

import torch

from ..base import LinearOperator
from . import _kernels as K

__all__ = ["CTProjector"]


class CTProjector(LinearOperator):
    """A CT projector: real sinograms ``(…, A, U)`` whose angles are range dim ``-2``.

    Capabilities: every sinogram entry is measured (the default :meth:`measurement_mask`);
    :meth:`restrict_angles` is the projector's own ``subset``; :meth:`lipschitz` is Schur's
    bound from one projection and one backprojection.
    """

    def _setup(self, vol, geom, angles, allow_truncation: bool, block_bytes: int | None,
               table_bytes: int | None) -> None:
        """Keep the geometry and settings; ``angles`` becomes a buffer (float64 if given so,
        else float32)."""
        self.volume_geometry = vol
        self.geometry = geom
        self.allow_truncation = bool(allow_truncation)
        self.block_bytes = block_bytes
        self.table_bytes = table_bytes
        given = isinstance(angles, torch.Tensor) and angles.is_floating_point()
        self.register_buffer("angles", geom.angles.to(angles.dtype if given else torch.float32))

    @classmethod
    def from_geometry(
        cls,
        volume_geometry,
        geometry,
        *,
        allow_truncation: bool = False,
        block_bytes: int | None = None,
        table_bytes: int | None = None,
    ) -> Self:
        """The projector of a :func:`~operators3d.ct.volume` and a
        :func:`~operators3d.ct.parallel_beam` / :func:`~operators3d.ct.cone_beam` geometry."""
        return cls(
            **cls._arguments(volume_geometry, geometry),
            allow_truncation=allow_truncation,
            block_bytes=block_bytes,
            table_bytes=table_bytes,
        )

    def _rebuild(self, vol, geom, allow_truncation: bool | None = None) -> Self:
        """This projector's kind and settings on another volume or geometry (same device and
        precision); ``allow_truncation`` defaults to this one's."""
        truncate = self.allow_truncation if allow_truncation is None else allow_truncation
        op = type(self).from_geometry(
            vol, geom, allow_truncation=truncate, block_bytes=self.block_bytes,
            table_bytes=self.table_bytes,
        )
        return op.to(device=self.angles.device, dtype=self.angles.dtype)

    def _budgets(self, device: torch.device) -> tuple[int, int]:
        """The block and table sizes (bytes) of a call on ``device``."""
        return K.block_bytes_for(device, self.block_bytes), K.table_bytes_for(device, self.table_bytes)

    @property
    def num_angles(self) -> int:
        return self.geometry.num_angles

    def check_input(self, x: torch.Tensor, *, adjoint: bool = False) -> None:
        super().check_input(x, adjoint=adjoint)
        K.check_dtype(x, f"{self.name}.{'adjoint' if adjoint else 'forward'}")

    def restrict_angles(self, index: torch.Tensor | Sequence[int]) -> "CTProjector":
        """The projector of the angles ``index`` (:meth:`subset`: it projects only those)."""
        return self.subset(torch.as_tensor(index, dtype=torch.int64).reshape(-1))

    def _lipschitz(self) -> float:
        """Schur's test: the weights are nonnegative, so ``‖A‖² ≤ max(A 1) · max(Aᵀ 1)``."""
        dtype = self.angles.dtype if self.angles.is_floating_point() else torch.float32
        ones_x = torch.ones(self.domain_shape, dtype=dtype, device=self.device)
        ones_y = torch.ones(self.range_shape, dtype=dtype, device=self.device)
        return float(self(ones_x).max()) * float(self.adjoint(ones_y).max())
