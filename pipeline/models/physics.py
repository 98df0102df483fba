"""The image-domain metric of parallel-beam CT measurements (:class:`ImageMetric`).

What losses and reconstructors ask of an operator itself (its measured entries, restrictions,
``‖A‖²``, kind) are the operator's own methods: docs/architecture.md, "Operator capabilities".
"""

from __future__ import annotations

import math

import torch

from operators3d import IndexSelect, LinearOperator, MaskedOperator

__all__ = ["ImageMetric"]


class ImageMetric:
    """The parallel-beam CT metric on measurements whose norm is the image-domain norm.

    FBP inverts the projector on its range: ``x = c · Aᵀ(R A x)`` for an image ``x`` of the
    range of ``Aᵀ`` (``R`` the Ram–Lak filter along the detector, ``c = (π/A) · Δu/Δx²``, as in
    :func:`pipeline.classical.filtered_backprojection`), so ``‖x‖² = c · ⟨Ax, R Ax⟩``: the self-adjoint,
    positive semi-definite ``M = c R`` measures a sinogram error as the image error it stands
    for. A measurement loss in ``M`` weighs detector frequencies as the image does, where the
    plain ``‖·‖²`` weighs low frequencies most (the projector's singular values fall as
    ``|ω|^{-1/2}``); :class:`~pipeline.losses.SureGaussianLoss` (``metric="image"``) uses it
    to estimate the image-domain error of the range of ``Aᵀ`` (Eldar's GSURE, IEEE TSP 2009).

    Shape:
        ``r``: ``(*batch, D, A, U)`` → the same.

    Attributes:
        diagonal: ``M_ii``, the same for every entry (zero-padded filtering has no wrap-around).
    """

    def __init__(self, op: LinearOperator) -> None:
        if op.kind != "parallel" or isinstance(op, (MaskedOperator, IndexSelect)):
            raise ValueError(
                f"ImageMetric: needs a parallel-beam CT projector, got {op.name} (the cone-beam "
                "FDK weighting has no such identity)"
            )
        self.spacing = float(op.geometry.det_spacing)
        vs = op.volume_geometry.voxel_size
        self.scale = math.pi / op.num_angles * self.spacing / vs**2
        num = op.range_shape[-1]
        delta = torch.zeros(1, num, dtype=torch.float64)
        delta[0, num // 2] = 1.0
        self.diagonal = float(self(delta)[0, num // 2])

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        from operators3d.ct import filter_rows

        return filter_rows(r, self.spacing, "ram-lak") * self.scale
