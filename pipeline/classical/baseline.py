"""Classical reconstructions of any operator, for models and losses: FBP/FDK, SENSE, ``Aᴴy``.

:func:`filtered_backprojection` is FBP / FDK through the projector's matched adjoint, so
gradients flow through it (``operators3d.ct.fbp`` / ``fdk`` backproject with kernels autograd
cannot differentiate): the ``"fbp"`` initial estimate of the reconstructors and the
Noise2Inverse target. :func:`classical_reconstruction` is the plain baseline (``fbp``, ``fdk``,
SENSE, else ``Aᴴy``). Both accept the restricted operators of :mod:`operators3d.restrict`
(a :class:`~operators3d.MaskedOperator` is compensated by its ``keep_fraction``).
:func:`clipped_fbp` is the FBP of a scan read through a clipping detector (a count floor, a
saturation): FBP-preconditioned projected steps on the detector-aware data consistency,
differentiable too (the detector-aware initial estimate of the reconstructors).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from operators3d import IndexSelect, LinearOperator, MaskedOperator, MultiCoilMRI, sense_cg
from operators3d.nonlinear import at_clip_levels

__all__ = ["filtered_backprojection", "clipped_fbp", "clip_levels_of", "CLIPPED_FBP_ITERATIONS",
           "CLIPPED_FBP_STEP", "classical_reconstruction"]


def filtered_backprojection(
    y: torch.Tensor, op: LinearOperator, *, filter: str = "ram-lak"
) -> torch.Tensor:
    """FBP (parallel beam) or FDK (cone beam) through the operator's matched adjoint: differentiable.

    :func:`operators3d.ct.fbp` and :func:`~operators3d.ct.fdk` backproject with voxel-driven
    kernels that autograd cannot differentiate; networks that start from FBP need gradients
    through it (EI's second pass reconstructs ``A T_g x̂``). This is the same ramp filter (and,
    for cone beam, the same cosine pre-weighting) followed by the exact transpose ``Aᵀ``, whose
    backward is the projector, scaled so that it matches FBP/FDK: a voxel-driven linear
    backprojection equals ``Aᵀ`` times ``det_spacing / voxel_size²`` (parallel beam; Joseph's
    hat weights sum to the inverse ray spacing), and FDK's ``(src/L)²`` weighting equals ``Aᵀ``
    times ``(src/(src+det))² · du · dv / voxel_size³`` to first order (cone beam). It differs from
    ``fbp``/``fdk`` by the backprojector's interpolation only (a few % on a 64² phantom).
    A :class:`~operators3d.MaskedOperator` of a projector is divided by its
    ``keep_fraction``.

    Shape:
        ``(*batch, D, A, U) → (*batch, D, H, W)`` (cone beam ``(*batch, V, A, U)``).

    Math:
        parallel: ``x = (π/A) · (Δu/Δx²) · Aᵀ(h ∗ y)``; cone: ``x = (π/A) · (src/(src+det))² ·
        (Δu Δv/Δx³) · Aᵀ(h ∗ (c ⊙ y))``, ``c = src/sqrt(src² + u² + v²)`` (axis-plane ``u, v``).
    """
    kind = op.kind if op.is_ct else None
    if kind is None:
        raise ValueError(f"filtered_backprojection: needs a CT operator, got {op.name}")
    if isinstance(op, MaskedOperator):
        inner = op.op
        if isinstance(inner, (MaskedOperator, IndexSelect)):
            raise ValueError(f"filtered_backprojection: unsupported nested restriction {op.name}")
        masked = y * op._weights(y)
        return filtered_backprojection(masked, inner, filter=filter) / max(op.keep_fraction, 1e-12)
    if isinstance(op, IndexSelect):
        raise ValueError(
            f"filtered_backprojection: {op.name} is an angle selection without its own "
            "projector; use restrict_angles on a projector with subset()"
        )
    from operators3d.ct import filter_rows

    vs = op.volume_geometry.voxel_size
    g = op.geometry
    if kind == "parallel":
        ds = g.det_spacing
        q = filter_rows(y, ds, filter)
        return op.adjoint(q) * (math.pi / op.num_angles * ds / vs**2)
    num_v, num_u = g.det_shape
    dv, du = g.det_spacing
    src, big = g.src_dist, g.src_dist + g.det_dist
    scale = src / big
    u = (torch.arange(num_u, dtype=torch.float64) - (num_u - 1) / 2) * du * scale
    v = (torch.arange(num_v, dtype=torch.float64) - (num_v - 1) / 2) * dv * scale
    cosine = src / torch.sqrt(src**2 + u[None, :] ** 2 + v[:, None] ** 2)
    weighted = y * cosine.to(device=y.device, dtype=y.dtype)[:, None, :]
    q = filter_rows(weighted, du * scale, filter)
    factor = math.pi / op.num_angles * scale**2 * du * dv / vs**3
    return op.adjoint(q) * factor


#: :func:`clipped_fbp`'s defaults, chosen on the tuning scan of ``benchmarks/nonlinear.py``
#: (``clip-tuning``, ellipsoids seed 101, 12 % of rays at a count floor; BENCHMARKS.md, issue 18.2).
CLIPPED_FBP_ITERATIONS, CLIPPED_FBP_STEP = 10, 1.0


def clip_levels_of(record: Mapping[str, Any] | None) -> tuple[float | None, float | None] | None:
    """``(low, high)`` of a scan's ``detector`` record when it is a clipping detector with a level
    (what :func:`clipped_fbp` takes), else ``None`` (linear, quantised, one bit)."""
    if record is None or record.get("model") != "clip":
        return None
    low, high = record.get("low"), record.get("high")
    return None if low is None and high is None else (low, high)


def clipped_fbp(
    y: torch.Tensor, op: LinearOperator, *, low: float | None = None, high: float | None = None,
    filter: str = "hann", precondition: str = "hann", iterations: int = CLIPPED_FBP_ITERATIONS,
    step: float = CLIPPED_FBP_STEP, start: torch.Tensor | None = None,
) -> torch.Tensor:
    """FBP of line integrals read through a clipping detector, ``y = clamp(A x + n, low, high)``.

    A ray read at ``high`` (a count floor: photon starvation) only says ``A x ≥ high``, one at
    ``low`` (saturation) ``A x ≤ low``; plain FBP takes them as equalities and streaks. This
    starts at the FBP of ``y`` (window ``filter``) and takes ``iterations`` projected steps on
    the detector-aware data consistency, preconditioned by an FBP (window ``precondition``; the
    Hann window's: a Ram-Lak preconditioner diverges at step 1):

    ``x ← max(0, x + step · FBP(r))``, ``r = y − A x`` on the rays inside ``(low, high)``,
    ``max(0, high − A x)`` on those at ``high`` and ``min(0, low − A x)`` on those at ``low``

    (``r`` is minus the gradient of the measurement consistency in the clipped detector's
    measurement space; the clamp keeps attenuation non-negative). The iteration is
    semi-convergent: it is stopped early, at the count chosen on a tuning scan. Differentiable
    in ``y`` (:func:`filtered_backprojection` throughout), so it can be a network's input.
    ``start`` replaces the starting FBP (``recon3d reconstruct --method fbp`` starts from its own
    FBP, window and cutoff as chosen for the scan).

    Shape:
        as :func:`filtered_backprojection`.
    """
    x = filtered_backprojection(y, op, filter=filter) if start is None else start
    if low is None and high is None:
        return x
    with torch.no_grad():  # which rays read a level
        at_low, at_high = at_clip_levels(y, low, high)
    for _ in range(int(iterations)):
        ax = op(x)
        r = y - ax
        if at_high is not None:
            r = torch.where(at_high, torch.relu(high - ax), r)
        if at_low is not None:
            r = torch.where(at_low, -torch.relu(ax - low), r)
        x = (x + step * filtered_backprojection(r, op, filter=precondition)).clamp_min(0)
    return x


def classical_reconstruction(
    y: torch.Tensor, op: LinearOperator, *, sense_iters: int = 10, sense_l2: float = 0.0
) -> torch.Tensor:
    """The classical baseline for an operator: FBP/FDK for CT, SENSE for MRI, else ``Aᴴy``.

    CT uses :func:`operators3d.ct.fbp` / :func:`~operators3d.ct.fdk` themselves (not
    differentiable; :func:`filtered_backprojection` is the differentiable counterpart); a
    :class:`~operators3d.MaskedOperator` of a projector gets
    ``fbp(y)/keep_fraction`` (entries dropped uniformly at random lower the expected sinogram
    by that factor). MRI: ``sense_iters`` CG iterations of SENSE (differentiable, unrolled).

    Shape:
        ``(*batch, *op.range_shape) → (*batch, *op.domain_shape)``.
    """
    kind = op.kind if op.is_ct else None
    if kind is not None:
        from operators3d.ct import fbp, fdk

        inner, scale = op, 1.0
        if isinstance(op, MaskedOperator):
            inner, scale = op.op, 1.0 / max(op.keep_fraction, 1e-12)
            y = y * op._weights(y)
        if isinstance(inner, (MaskedOperator, IndexSelect)):
            return op.adjoint(y)
        out = fbp(y, inner) if kind == "parallel" else fdk(y, inner)
        return out * scale if scale != 1.0 else out
    if isinstance(op, MultiCoilMRI):
        return sense_cg(y, op, num_iters=sense_iters, l2_weight=sense_l2, tol=0.0)
    return op.adjoint(y)
