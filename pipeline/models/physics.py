"""What models and losses need to know about an operator: measured entries, restrictions, scale.

Losses average over the *measured* entries of ``y`` (entries outside an MRI mask are not
measurements), splitting losses restrict an operator to a subset of its measurements, and
reconstructors need a classical initial estimate and a step size ``1/‖A‖²``. These helpers
answer those questions for :class:`~operators3d.MultiCoilMRI`, the CT operators of
:mod:`operators3d.ct` and any other :class:`~operators3d.LinearOperator` (with generic,
slower fallbacks), without touching ``operators3d``.

Restrictions come in three kinds:

* :func:`restrict_measurements` keeps the entries where a 0/1 ``mask`` is set: a new
  ``MultiCoilMRI`` with the product mask when the mask lives on its k-space grid, otherwise a
  :class:`MaskedOperator` ``M ∘ A``.
* :func:`restrict_angles` keeps a subset of CT angles: the operator's own ``subset`` (a new
  projector that computes only those angles) where it has one, otherwise an
  :class:`IndexSelect` that computes all angles and keeps some.
* :class:`IndexSelect` selects indices along one range dim of any operator.

Initial estimates: :func:`filtered_backprojection` is FBP / FDK through the projector's
matched adjoint, so gradients flow through it (``operators3d.ct.fbp`` / ``fdk`` backproject
with kernels autograd cannot differentiate); :func:`classical_reconstruction` is the plain
baseline (``fbp``, ``fdk``, SENSE).
"""

from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch

from operators3d import LinearOperator, MultiCoilMRI, op_norm, sense_cg
from operators3d.fft import real_dtype_of

__all__ = [
    "MaskedOperator",
    "IndexSelect",
    "measurement_mask",
    "num_measured",
    "restrict_measurements",
    "restrict_angles",
    "kspace_mask",
    "is_ct",
    "ct_kind",
    "lipschitz",
    "filtered_backprojection",
    "ImageMetric",
    "classical_reconstruction",
]


class MaskedOperator(LinearOperator):
    """``M ∘ A``: an operator followed by a real 0/1 (or weighting) mask on its range.

    Used by measurement-splitting losses to restrict any operator to a subset of its measured
    entries. ``keep_fraction`` (the mean of the mask over the entries ``op`` measures) lets a
    linear initial estimate compensate for the dropped entries (see
    :func:`classical_reconstruction`).

    Shape:
        ``(*batch, *op.domain_shape) → (*batch, *op.range_shape)``; ``mask`` broadcasts to
        ``op.range_shape``.

    Math:
        ``(M A) x = m ⊙ (A x)``, ``(M A)ᴴ y = Aᴴ(m ⊙ y)``.

    Args:
        op: the operator to restrict.
        mask: real tensor broadcastable to ``op.range_shape`` (bool is converted).
    """

    def __init__(self, op: LinearOperator, mask: torch.Tensor) -> None:
        if not isinstance(op, LinearOperator):
            raise TypeError(f"MaskedOperator: op must be a LinearOperator, got {type(op).__name__}")
        if not isinstance(mask, torch.Tensor) or mask.is_complex():
            raise TypeError(f"MaskedOperator: mask must be a real or bool tensor, got {mask!r:.60}")
        try:
            out = torch.broadcast_shapes(mask.shape, op.range_shape)
        except RuntimeError as err:
            raise ValueError(
                f"MaskedOperator: mask of shape {tuple(mask.shape)} does not broadcast to the "
                f"range {op.range_shape} of {op.name}"
            ) from err
        if tuple(out) != op.range_shape:
            raise ValueError(
                f"MaskedOperator: mask of shape {tuple(mask.shape)} would enlarge the range "
                f"{op.range_shape} of {op.name}"
            )
        super().__init__(
            op.domain_shape,
            op.range_shape,
            domain_complex=op.domain_complex,
            range_complex=op.range_complex,
        )
        self.op = op
        # bool stays bool (multiplying keeps the data's dtype); weights are cast per call.
        self.register_buffer("mask", mask.to(device=op.device))
        inner = measurement_mask(op)
        measured = torch.ones((), dtype=torch.bool, device=op.device) if inner is None else inner
        measured = torch.broadcast_to(measured.to(op.device), op.range_shape)
        kept = (self.mask != 0).expand(op.range_shape) & measured
        total = int(measured.sum())
        self.keep_fraction = float(kept.sum()) / total if total else 0.0

    def _weights(self, like: torch.Tensor) -> torch.Tensor:
        if self.mask.dtype == torch.bool:
            return self.mask
        return self.mask.to(real_dtype_of(like.dtype))

    @property
    def name(self) -> str:
        return f"Masked({self.op.name})"

    def check_input(self, x: torch.Tensor, *, adjoint: bool = False) -> None:
        self.op.check_input(x, adjoint=adjoint)

    def _forward(self, x):
        out = self.op._forward(x)
        return out * self._weights(out)

    def _adjoint(self, y):
        return self.op._adjoint(y * self._weights(y))

    def _normal(self, x):
        out = self.op._forward(x)
        w = self._weights(out)
        return self.op._adjoint(out * (w if w.dtype == torch.bool else w * w))


class IndexSelect(LinearOperator):
    """``S ∘ A``: keep the indices ``index`` along range dim ``dim`` of an operator.

    The generic way to restrict an operator to a subset of angles (``dim=-2`` for the CT
    sinogram ``(D, A, U)``); it computes the whole range and selects, so an operator's own
    ``subset`` (computing only the kept angles) is preferred by :func:`restrict_angles`.

    Shape:
        ``(*batch, *op.domain_shape) → (*batch, *range)`` with ``range[dim] = len(index)``.

    Math:
        ``(S A) x = (A x)[…, index, …]``; ``(S A)ᴴ y = Aᴴ(Sᴴ y)``, ``Sᴴ`` scatters into zeros.

    Args:
        op: the operator.
        index: 1-D integer indices (distinct) along ``dim``.
        dim: a negative range dim.
    """

    def __init__(
        self, op: LinearOperator, index: torch.Tensor | Sequence[int], *, dim: int = -2
    ) -> None:
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        k = len(op.range_shape)
        if not -k <= dim < 0:
            raise ValueError(f"IndexSelect: dim must be a negative range dim in [-{k}, -1], got {dim}")
        size = op.range_shape[dim]
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= size:
            raise ValueError(
                f"IndexSelect: indices must lie in [0, {size}) along dim {dim} of {op.name}'s "
                f"range {op.range_shape}, got {index.tolist()[:8]}..."
            )
        if torch.unique(index).numel() != index.numel():
            raise ValueError("IndexSelect: indices must be distinct")
        rng = list(op.range_shape)
        rng[dim] = index.numel()
        super().__init__(
            op.domain_shape, rng, domain_complex=op.domain_complex, range_complex=op.range_complex
        )
        self.op = op
        self.dim = dim
        self.register_buffer("index", index.to(op.device))

    @property
    def name(self) -> str:
        return f"Select({self.op.name})"

    def _forward(self, x):
        return self.op._forward(x).index_select(self.dim, self.index)

    def _adjoint(self, y):
        shape = y.shape[: y.ndim - len(self.range_shape)] + self.op.range_shape
        full = torch.zeros(shape, dtype=y.dtype, device=y.device)
        full.index_copy_(y.ndim + self.dim, self.index, y)
        return self.op._adjoint(full)


# ----------------------------------------------------------------------------- queries
def kspace_mask(op: LinearOperator) -> torch.Tensor | None:
    """The k-space sampling mask ``(H, W)`` or ``(D, H, W)`` of an MRI operator, else None."""
    if isinstance(op, MultiCoilMRI):
        return op.mask
    return None


def measurement_mask(op: LinearOperator) -> torch.Tensor | None:
    """Which range entries are measurements: a bool tensor broadcastable to ``op.range_shape``.

    ``None`` means every entry is measured (CT, an identity, ...). For ``MultiCoilMRI`` the
    entries outside the sampling mask are not measurements; for :class:`MaskedOperator` the
    entries where its mask is zero are not either.

    Shape:
        broadcastable to ``op.range_shape``.
    """
    if isinstance(op, MultiCoilMRI):
        return op.mask != 0
    if isinstance(op, MaskedOperator):
        inner = measurement_mask(op.op)
        own = op.mask != 0
        return own if inner is None else own & inner.to(own.device)
    if isinstance(op, IndexSelect):
        inner = measurement_mask(op.op)
        if inner is None:
            return None
        full = torch.broadcast_to(inner, op.op.range_shape)
        return full.index_select(op.dim, op.index.to(full.device))
    return None


def num_measured(op: LinearOperator, y: torch.Tensor) -> int:
    """The number of measured entries of ``y`` (its batch dims included).

    Shape:
        ``y``: ``(*batch, *op.range_shape)``.
    """
    k = len(op.range_shape)
    if y.ndim < k or tuple(y.shape[y.ndim - k :]) != op.range_shape:
        raise ValueError(
            f"num_measured: expected y with trailing shape {op.range_shape} ({op.name}), "
            f"got {tuple(y.shape)}"
        )
    batch = math.prod(y.shape[: y.ndim - k])
    mask = measurement_mask(op)
    if mask is None:
        return batch * math.prod(op.range_shape)
    per = int(torch.broadcast_to(mask, op.range_shape).sum())
    return batch * per


def is_ct(op: LinearOperator) -> bool:
    """Whether ``op`` is (a restriction of) a CT projector of :mod:`operators3d.ct`."""
    return ct_kind(op) is not None


def ct_kind(op: LinearOperator) -> str | None:
    """``"parallel"`` or ``"cone"`` for (restrictions of) CT projectors, else ``None``."""
    while isinstance(op, (MaskedOperator, IndexSelect)):
        op = op.op
    try:
        from operators3d.ct import ConeBeamCT, ParallelBeamCT
    except ImportError:  # CT not installed: nothing is CT
        return None
    if isinstance(op, ParallelBeamCT):
        return "parallel"
    if isinstance(op, ConeBeamCT):
        return "cone"
    return None


# ----------------------------------------------------------------------------- restrictions
def restrict_measurements(op: LinearOperator, mask: torch.Tensor) -> LinearOperator:
    """The operator that measures only where ``mask`` is nonzero (weighted by it if real).

    A mask on the k-space grid of a ``MultiCoilMRI`` (shape ``op.mask.shape``) gives a new
    ``MultiCoilMRI`` with the product mask (fast, and SENSE still applies); any other mask
    broadcastable to the range gives a :class:`MaskedOperator`.

    Shape:
        ``mask`` broadcastable to ``op.range_shape``.
    """
    if isinstance(op, MultiCoilMRI) and tuple(mask.shape) == tuple(op.mask.shape):
        mask = mask.to(op.mask.device)
        if mask.dtype == torch.bool and op.mask.dtype == torch.bool:
            new_mask = op.mask & mask
        else:  # real weights: the operator's mask becomes a weighting (still linear)
            real = mask.dtype if mask.is_floating_point() else torch.float64
            new_mask = op.mask.to(real) * mask.to(real)
        chunk = op.coil_chunk if op.coil_chunk_given else None
        if op.coil_maps is None:
            return MultiCoilMRI(
                mask=new_mask,
                volume_shape=op.domain_shape,
                dtype=op._phase_in.dtype,
                coil_chunk=chunk,
                block_elements=op.block_elements,
            )
        return MultiCoilMRI(
            mask=new_mask, coil_maps=op.coil_maps, coil_chunk=chunk, block_elements=op.block_elements
        )
    return MaskedOperator(op, mask)


def restrict_angles(op: LinearOperator, index: torch.Tensor | Sequence[int]) -> LinearOperator:
    """The operator of a subset of the CT angles (range dim ``-2``).

    Uses the projector's own ``subset`` (which projects only those angles) when it has one,
    otherwise an :class:`IndexSelect` along dim ``-2``.

    Shape:
        range ``(…, A, U) → (…, len(index), U)``.
    """
    index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
    subset = getattr(op, "subset", None)
    if callable(subset):
        return subset(index)
    return IndexSelect(op, index, dim=-2)


# ----------------------------------------------------------------------------- scale
_LIPSCHITZ: "weakref.WeakKeyDictionary[LinearOperator, float]" = weakref.WeakKeyDictionary()


def lipschitz(op: LinearOperator) -> float:
    """An upper bound (or, for generic operators, an estimate) of ``‖A‖₂²``, cached per operator.

    ``MultiCoilMRI``: ``max|m|² · max_x Σ_c |S_c(x)|²`` (the orthonormal FFT is unitary), exact
    for a fully sampled mask. CT projectors have nonnegative weights, so Schur's test gives
    ``‖A‖² ≤ max(A 1) · max(Aᵀ 1)`` from one projection and one backprojection. Others: the
    power method (30 iterations, seeded), which converges from below.

    Math:
        ``L ≥ ‖AᴴA‖₂``; a gradient step ``x − (1/L) Aᴴ(Ax − y)`` does not increase ``‖Ax − y‖``.
    """
    cached = _LIPSCHITZ.get(op)
    if cached is not None:
        return cached
    with torch.no_grad():
        if isinstance(op, MultiCoilMRI):
            m2 = float(op.mask.to(torch.float64).abs().max()) ** 2
            if op.coil_maps is None:
                value = m2
            else:
                value = m2 * float((op.coil_maps.abs() ** 2).sum(dim=0).max())
        elif isinstance(op, MaskedOperator):
            value = float(op.mask.to(torch.float64).abs().max()) ** 2 * lipschitz(op.op)
        elif isinstance(op, IndexSelect):
            value = lipschitz(op.op)
        elif is_ct(op):
            dtype = op.angles.dtype if op.angles.is_floating_point() else torch.float32
            ones_x = torch.ones(op.domain_shape, dtype=dtype, device=op.device)
            ones_y = torch.ones(op.range_shape, dtype=dtype, device=op.device)
            value = float(op(ones_x).max()) * float(op.adjoint(ones_y).max())
        else:
            gen = torch.Generator().manual_seed(0)
            value = op_norm(op, num_iters=30, tol=1e-4, generator=gen) ** 2
    value = max(value, torch.finfo(torch.float32).tiny)
    _LIPSCHITZ[op] = value
    return value


# ----------------------------------------------------------------------------- baselines
class ImageMetric:
    """The parallel-beam CT metric on measurements whose norm is the image-domain norm.

    FBP inverts the projector on its range: ``x = c · Aᵀ(R A x)`` for an image ``x`` of the
    range of ``Aᵀ`` (``R`` the Ram–Lak filter along the detector, ``c = (π/A) · Δu/Δx²``, as in
    :func:`filtered_backprojection`), so ``‖x‖² = c · ⟨Ax, R Ax⟩``: the self-adjoint,
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
        if ct_kind(op) != "parallel" or isinstance(op, (MaskedOperator, IndexSelect)):
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
    A :class:`MaskedOperator` of a projector is divided by its ``keep_fraction``.

    Shape:
        ``(*batch, D, A, U) → (*batch, D, H, W)`` (cone beam ``(*batch, V, A, U)``).

    Math:
        parallel: ``x = (π/A) · (Δu/Δx²) · Aᵀ(h ∗ y)``; cone: ``x = (π/A) · (src/(src+det))² ·
        (Δu Δv/Δx³) · Aᵀ(h ∗ (c ⊙ y))``, ``c = src/sqrt(src² + u² + v²)`` (axis-plane ``u, v``).
    """
    kind = ct_kind(op)
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


def classical_reconstruction(
    y: torch.Tensor, op: LinearOperator, *, sense_iters: int = 10, sense_l2: float = 0.0
) -> torch.Tensor:
    """The classical baseline for an operator: FBP/FDK for CT, SENSE for MRI, else ``Aᴴy``.

    CT uses :func:`operators3d.ct.fbp` / :func:`~operators3d.ct.fdk` themselves (not
    differentiable; :func:`filtered_backprojection` is the differentiable counterpart); a
    :class:`MaskedOperator` of a projector gets ``fbp(y)/keep_fraction`` (entries dropped
    uniformly at random lower the expected sinogram by that factor). MRI: ``sense_iters`` CG
    iterations of SENSE (differentiable, unrolled).

    Shape:
        ``(*batch, *op.range_shape) → (*batch, *op.domain_shape)``.
    """
    kind = ct_kind(op)
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
