"""Classical reconstructions of a slab's measurements: what preprocess, reconstruct and benchmarks run.

Given a slab's measurements ``y`` and its operator (and, for TV, the scan's noise model and
:class:`~pipeline.classical.tv.TVProblem`), :func:`reconstruct_slab` gives the image of a
method (``adjoint``, ``fbp``, ``sense``, ``tv``) with its parameters, as
``recon3d reconstruct --method`` computes it; :func:`fbp_slab` and :func:`sense_slab` are its
parts with keyword settings, :func:`n2i_slab` the Noise2Inverse sub-reconstructions of
``recon3d preprocess``. Cone beam has no slab operator of its own: its FDK is a sum over
blocks of detector rows (``pipeline/data/cone.py``), each filtered once (:func:`fdk_filtered`)
and backprojected into the slices it reaches (:func:`fdk_backproject`). The kernels are
:mod:`operators3d.ct` and :func:`operators3d.sense_cg`; CT code is imported only when a CT
method runs.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .tv import TVProblem, tv_reconstruct

__all__ = [
    "METHODS",
    "reconstruct_slab",
    "fbp_slab",
    "n2i_slab",
    "sense_slab",
    "fdk_filtered",
    "fdk_backproject",
]

#: The methods of :func:`reconstruct_slab` (cone-beam FDK runs out of core instead).
METHODS = ("adjoint", "fbp", "sense", "tv")


def fbp_slab(sinogram: torch.Tensor, op: Any, *, filter: str = "ram-lak",
             cutoff: float = 1.0) -> torch.Tensor:
    """Filtered back-projection of a slab through ``operators3d.ct.fbp`` (``cutoff``: the
    window's end as a fraction of Nyquist, :func:`operators3d.ct.ramp_filter`).

    Shape:
        ``(d, A, U) → (d, H, W)``.
    """
    try:
        from operators3d.ct import fbp
    except ImportError as err:
        from pipeline.data.format import ScanError

        raise ScanError(f"FBP needs operators3d.ct.fbp, which this installation lacks ({err})") from None
    return fbp(sinogram, op, filter=filter, cutoff=cutoff)


def n2i_slab(sinogram: torch.Tensor, op: Any, splits: int, *, filter: str = "ram-lak") -> torch.Tensor:
    """Noise2Inverse sub-reconstructions of a parallel-beam slab: ``[k]`` is the FBP of the
    angles ``k, k + K, k + 2K, ...`` (``K = splits``, Hendriksen et al. 2020).

    Shape:
        ``(d, A, U) → (K, d, H, W)``.
    """
    return torch.stack([fbp_slab(sinogram[:, j::splits], op.subset(slice(j, None, splits)), filter=filter)
                        for j in range(splits)])


def sense_slab(y: torch.Tensor, op: Any, *, l2_weight: float, iterations: int,
               tol: float = 1e-6) -> torch.Tensor:
    """SENSE of a slab: ``iterations`` CG steps on ``(AᴴA + λI) x = Aᴴy`` from 0
    (:func:`operators3d.sense_cg`; ``tol`` its relative stopping tolerance).

    Shape:
        ``(C, d, H, W) → (d, H, W)``.
    """
    from operators3d import sense_cg

    return sense_cg(y, op, l2_weight=l2_weight, num_iters=iterations, tol=tol)


def fdk_filtered(rows: torch.Tensor, op: Any, *, filter: str = "ram-lak") -> torch.Tensor:
    """FDK's cosine-weighted, ramp-filtered projections of a block of detector rows
    (:func:`operators3d.ct.analytic.fdk_filter`): each row alone, so once for every angle
    subset and every slab the block reaches.

    Shape:
        ``(v, A, U) → (v, A, U)``.
    """
    from operators3d.ct.analytic import fdk_filter

    return fdk_filter(rows, op, filter)


def fdk_backproject(q: torch.Tensor, op: Any) -> torch.Tensor:
    """The FDK image of filtered rows ``q`` (:func:`fdk_filtered`) of ``op``'s rows and angles:
    ``(π/A) · op.backproject(q, method="fdk")``, to be summed over the blocks of rows.

    Shape:
        ``(v, A, U) → op.domain_shape``.
    """
    return op.backproject(q, method="fdk").mul_(math.pi / op.num_angles)


def reconstruct_slab(method: str, y: torch.Tensor, op: Any, params: Mapping[str, Any], *,
                     noise: Any = None, problem: TVProblem | None = None) -> torch.Tensor:
    """The classical ``method`` on a slab's measurements ``y`` of operator ``op``.

    ``params``: ``fbp`` ``filter``, ``cutoff``; ``sense`` ``l2_weight``, ``iterations``; ``tv``
    ``tv_weight``, ``iterations`` (with the scan's ``noise`` model and ``problem``,
    :func:`~pipeline.classical.tv.tv_problem`); ``adjoint`` none (``Aᴴy``: MRI zero-filled,
    CT backprojection).

    Shape:
        ``(*op.range_shape) → (*op.domain_shape)``.
    """
    if method == "adjoint":
        return op.adjoint(y)
    if method == "fbp":
        return fbp_slab(y, op, filter=params["filter"], cutoff=float(params["cutoff"]))
    if method == "sense":
        return sense_slab(y, op, l2_weight=float(params["l2_weight"]), iterations=int(params["iterations"]))
    if method == "tv":
        if problem is None:
            raise ValueError("reconstruct_slab: tv needs the scan's TVProblem (tv_problem(scan))")
        return tv_reconstruct(y, op, problem, noise, float(params["tv_weight"]), int(params["iterations"]))
    raise ValueError(f"reconstruct_slab: method must be one of {METHODS}, got {method!r}")
