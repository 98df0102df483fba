"""Total variation as ``recon3d reconstruct --method tv`` sets it up for a scan, and one slab's solve.

:class:`TVProblem` holds what a scan fixes: the gradient's weights (physical units), the data
weights (PWLS for photon-counting CT), the linear first estimate (FBP for CT, ``Aᴴy`` for MRI)
and nonnegativity (CT). :func:`tv_reconstruct` solves ``min ½‖Ax − y‖²_w + μ TV(x)`` for a slab
with the primal-dual solver of :mod:`operators3d.tv`; the weight and iteration count come from
:func:`pipeline.classical.select.select_tv` or are given (``docs/classical.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["TVProblem", "tv_problem", "tv_reconstruct"]


@dataclass
class TVProblem:
    """How TV is set up for a scan: data weights, noise scale, initial estimate, constraint."""

    modality: str
    grad_weights: tuple[float, float, float]
    nonnegative: bool

    def weights(self, noise, y: torch.Tensor) -> torch.Tensor | None:
        """PWLS weights ``w = e^{−y}`` for photon-counting CT (``w v = 1/I₀``: whitened), else None."""
        from operators3d import TransmissionNoise

        if self.modality == "ct" and isinstance(noise, TransmissionNoise):
            return torch.exp(-y.to(torch.float64)).to(y.dtype)
        return None

    def initial(self, op) -> Callable[[torch.Tensor], torch.Tensor]:
        """A linear first estimate: FBP (Hann) for CT, ``Aᴴy`` for MRI."""
        if self.modality == "ct":
            from operators3d.ct import fbp

            return lambda v: fbp(v, op, filter="hann")
        return op.adjoint


def tv_problem(scan) -> TVProblem:
    """The TV setup of ``scan``: gradient weights ``min(voxel)/voxel_a`` (physical units),
    nonnegativity for CT (attenuation)."""
    vs = [float(v) for v in scan.metadata.voxel_size]
    small = min(vs)
    return TVProblem(scan.modality, tuple(small / v for v in vs), scan.modality == "ct")  # type: ignore[arg-type]


def tv_reconstruct(y: torch.Tensor, op, problem: TVProblem, noise, weight: float, iterations: int, *,
                   cuts: Sequence[int] = (), progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """One TV reconstruction (a slab): ``min ½‖Ax − y‖²_w + μ TV(x)`` by PDHG."""
    from operators3d.tv import FiniteDifference, tv_pdhg

    grad = FiniteDifference(op.domain_shape, problem.grad_weights, cuts)
    out = tv_pdhg(y, op, float(weight), num_iters=int(iterations), grad=grad,
                  data_weights=problem.weights(noise, y), initial=problem.initial(op),
                  nonnegative=problem.nonnegative, progress=progress)
    return out[int(iterations)][0][0]
