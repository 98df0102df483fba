"""Reconstructors ``model(y, op) -> x_hat``: a backbone on an initial estimate, and unrolled networks.

Both take measurements ``y`` of shape ``(*batch, *op.range_shape)`` and an operator, and return
an image ``(*batch, *op.domain_shape)`` (complex for MRI, real for CT). The backbone sees real
channels (:mod:`pipeline.models.channels`): 2 for a complex image, 1 for a real one, so a
backbone for MRI is built with ``in_channels = out_channels = 2`` and for CT with 1. Any
backbone works, including a :class:`~pipeline.models.TiledBackbone` (which makes the network
part memory-bounded; the operator steps act on the whole slab).

Scale: with ``normalize=True`` (default) the backbone sees ``x / s`` and its output is
multiplied by ``s``, ``s`` the root mean square of the initial estimate of each batch element
(a constant of the data: no gradient flows through it). This makes the network independent of
the scan's intensity scale (CT backprojections are ``~A·N`` times the image) and the
reconstructor positively homogeneous: ``f(c·y) = c·f(y)`` for ``c > 0``. A slab's RMS differs
from its neighbours', so whole-scan work fixes one scale per scan instead:
``with intensity_scale(model, s):`` makes every reconstructor inside ``model`` use ``s``
(:func:`scan_intensity_scale` estimates it from evenly spaced slabs); training and out-of-core
reconstruction both do this, so a scan reconstructed slab by slab equals the model applied to
the whole volume.

The operator steps they share (:func:`~pipeline.models.operator_steps.initial_estimate`,
:func:`~pipeline.models.operator_steps.normal_solve`) are in :mod:`pipeline.models.operator_steps`.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import torch
from torch import nn

from operators3d import LinearOperator

from .channels import from_channels, num_channels, to_channels
from .operator_steps import Initial, _check_filter, _check_initial, initial_estimate, normal_solve

__all__ = [
    "ArtifactRemoval",
    "UnrolledNetwork",
    "set_scan_detector",
    "intensity_scale",
    "scan_intensity_scale",
]

_DCS = ("gradient", "cg")


# ----------------------------------------------------------------------------- helpers
def _flatten(y: torch.Tensor, op: LinearOperator, owner: str) -> tuple[torch.Tensor, torch.Size]:
    """``y`` as ``(B, *range)`` and the original leading dims."""
    if not isinstance(op, LinearOperator):
        raise TypeError(f"{owner}: op must be a LinearOperator, got {type(op).__name__}")
    k = len(op.range_shape)
    if y.ndim < k or tuple(y.shape[y.ndim - k :]) != op.range_shape:
        raise ValueError(
            f"{owner}: expected y of trailing shape {op.range_shape} ({op.name}), got "
            f"{tuple(y.shape)}"
        )
    if len(op.domain_shape) != 3:
        raise ValueError(
            f"{owner}: the operator's domain must be a volume (D, H, W), got {op.domain_shape}"
        )
    lead = y.shape[: y.ndim - k]
    return y.reshape((math.prod(lead),) + op.range_shape), lead


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of each batch element, ``(B, 1, 1, 1)``, detached, never zero."""
    with torch.no_grad():
        s = x.abs().pow(2).mean(dim=(-3, -2, -1), keepdim=True).sqrt()
        return s.clamp_min(torch.finfo(s.dtype).tiny)


def _scale_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The normalisation scale of ``x``: the fixed one when set, else its RMS (``None`` if off)."""
    if not module.normalize:
        return None
    fixed = module.__dict__.get("_fixed_scale")
    if fixed is None:
        return _rms(x)
    real = x.real.dtype if x.is_complex() else x.dtype
    return torch.full((x.shape[0],) + (1,) * (x.ndim - 1), float(fixed), dtype=real, device=x.device)


class intensity_scale:
    """Context manager: every reconstructor in ``model`` normalises by ``scale`` instead of each
    sample's RMS (see the module docstring). ``scale=None`` keeps the per-sample RMS.

    Example::

        s = scan_intensity_scale(model, slabs)
        with intensity_scale(model, s):
            x = model(y_slab, op_slab)
    """

    def __init__(self, model: nn.Module, scale: float | None) -> None:
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"intensity_scale: scale must be a positive finite number, got {scale}")
        self.targets = [m for m in model.modules() if isinstance(m, (ArtifactRemoval, UnrolledNetwork))]
        self.scale = scale
        self._previous: list = []

    def __enter__(self) -> "intensity_scale":
        self._previous = [m.__dict__.get("_fixed_scale") for m in self.targets]
        for m in self.targets:
            m.__dict__["_fixed_scale"] = self.scale
        return self

    def __exit__(self, *exc) -> None:
        for m, prev in zip(self.targets, self._previous):
            m.__dict__["_fixed_scale"] = prev


@torch.no_grad()
def scan_intensity_scale(model: nn.Module, slabs) -> float | None:
    """The RMS of the initial estimate of ``model``'s first reconstructor over ``slabs``.

    Args:
        model: a model containing an :class:`ArtifactRemoval` or :class:`UnrolledNetwork`.
        slabs: an iterable of ``(y, op)`` (evenly spaced slabs of a scan; the estimate is
            the same for every caller that passes the same slabs).

    Returns:
        The scale, or ``None`` when the model does not normalise.
    """
    rec = next((m for m in model.modules() if isinstance(m, (ArtifactRemoval, UnrolledNetwork))), None)
    if rec is None or not rec.normalize:
        return None
    total, count = 0.0, 0
    for y, op in slabs:
        yb, _ = _flatten(y, op, "scan_intensity_scale")
        x0 = rec.initial_image(yb, op)
        total += float(x0.abs().double().pow(2).sum())
        count += x0.numel()
    if count == 0:
        raise ValueError("scan_intensity_scale: no slabs given")
    return max(math.sqrt(total / count), torch.finfo(torch.float32).tiny)


def _check_channels(backbone: nn.Module, x: torch.Tensor, owner: str) -> None:
    want = num_channels(x)
    for what in ("in_channels", "out_channels"):
        have = getattr(backbone, what, None)
        if have is not None and have != want:
            kind = "complex" if x.is_complex() else "real"
            raise ValueError(
                f"{owner}: a {kind} image needs a backbone with {what}={want}, got {have}"
            )


def _param_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _denoise(backbone: nn.Module, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``s · g(x / s)`` through the channel boundary, in the backbone's precision.

    The channels are cast to the backbone's parameter dtype (a bf16/fp16 engine converts the
    weights, not the operator's images) and the result back to the image's precision.
    """
    z = x / scale if scale is not None else x
    channels = to_channels(z)
    dtype = _param_dtype(backbone)
    if dtype is not None and dtype != channels.dtype:
        channels = channels.to(dtype)
    out = backbone(channels)
    if out.dtype != x.real.dtype:
        out = out.to(x.real.dtype)
    out = from_channels(out, complex=x.is_complex())
    return out * scale if scale is not None else out


# ----------------------------------------------------------------------------- reconstructors
class ArtifactRemoval(nn.Module):
    """A backbone applied to an initial estimate: ``x̂ = s · g(x₀ / s)``.

    The post-processing reconstructor of the self-supervised literature (deepinv's
    ``ArtifactRemoval``; Jin et al., IEEE TIP 2017 for FBP + U-Net). With a residual backbone
    it learns a correction of ``Aᴴy``, FBP or SENSE.

    With ``op=None`` it is an image denoiser: ``x₀ = y`` (image-domain training, e.g.
    Noise2Inverse on crops of precomputed sub-reconstructions).

    Shape:
        ``y``: ``(*batch, *op.range_shape)`` → ``(*batch, *op.domain_shape)``; with
        ``op=None``, ``(*batch, D, H, W)`` → the same.

    Math:
        ``x₀ = Aᴴy | FBP(y) | (AᴴA + λI)⁻¹Aᴴy`` (or ``y``), ``x̂ = s·g(x₀/s)``, ``s = rms(x₀)``
        (if ``normalize``).

    Args:
        backbone: a network on ``(B, C, D, H, W)`` real channels (2 for MRI, 1 for CT).
        initial: ``"adjoint"``, ``"fbp"``, ``"sense"``, ``"classical"`` or ``f(y, op)``.
        normalize: scale the backbone's input by the initial estimate's RMS.
        sense_iters: CG iterations of the SENSE estimate.
        sense_l2: Tikhonov weight ``λ`` of the SENSE estimate.
        fbp_filter: ramp window of an FBP/FDK estimate (:func:`initial_estimate`).
        initial_detector: ``"auto"``: when :attr:`detector` is a clipping detector's record
            (a count floor, a saturation; ``docs/scan-format.md``), an FBP estimate is the
            detector-aware :func:`~pipeline.classical.clipped_fbp` of the record's levels instead
            of plain FBP; ``"ignore"``: plain FBP whatever the detector.
        detector: the record of the detector the measurements went through (``None``: linear).
            Training sets it from the training scans; whole-scan reconstruction from the scan
            being reconstructed (:func:`set_scan_detector`). Not part of the weights.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        initial: Initial = "adjoint",
        normalize: bool = True,
        sense_iters: int = 10,
        sense_l2: float = 0.0,
        fbp_filter: str = "ram-lak",
        initial_detector: str = "ignore",
        detector: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_initial(initial, "ArtifactRemoval")
        _check_filter(fbp_filter, "ArtifactRemoval")
        if initial_detector not in ("auto", "ignore"):
            raise ValueError(f"ArtifactRemoval: initial_detector must be 'auto' or 'ignore', got {initial_detector!r}")
        self.backbone = backbone
        self.initial = initial
        self.normalize = normalize
        self.sense_iters = sense_iters
        self.sense_l2 = sense_l2
        self.fbp_filter = fbp_filter
        self.initial_detector = initial_detector
        self.detector = None if detector is None else dict(detector)

    def extra_repr(self) -> str:
        init = self.initial
        if not isinstance(init, str):
            init = getattr(init, "__name__", "callable")
        window = "" if self.fbp_filter == "ram-lak" else f", fbp_filter={self.fbp_filter}"
        levels = self.clip_levels()
        aware = "" if levels is None else f", clipped_fbp(low={levels[0]}, high={levels[1]})"
        return f"initial={init}, normalize={self.normalize}{window}{aware}"

    def clip_levels(self) -> tuple[float | None, float | None] | None:
        """``(low, high)`` of a clipping detector the FBP estimate accounts for, else ``None``."""
        from pipeline.classical import clip_levels_of

        if self.initial_detector != "auto" or self.initial not in ("fbp", "classical"):
            return None
        return clip_levels_of(self.detector)

    def initial_image(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        """The backbone's input before scaling: this model's initial estimate (its own window,
        SENSE settings...). Whoever computes the input outside :meth:`forward` (the staged
        out-of-core reconstruction, the intensity scale) must call this, so that the network
        never sees another estimate than the one it was trained on.

        Shape:
            ``(*batch, *op.range_shape)`` → ``(*batch, *op.domain_shape)``.
        """
        levels = self.clip_levels()
        if levels is not None and op.is_ct:
            from pipeline.classical import clipped_fbp

            return clipped_fbp(y, op, low=levels[0], high=levels[1], filter=self.fbp_filter)
        return initial_estimate(y, op, self.initial, sense_iters=self.sense_iters, sense_l2=self.sense_l2,
                                fbp_filter=self.fbp_filter)

    def forward(self, y: torch.Tensor, op: LinearOperator | None) -> torch.Tensor:
        if op is None:  # image mode: y is already an image (a denoiser, e.g. Noise2Inverse)
            if y.ndim < 3:
                raise ValueError(
                    f"ArtifactRemoval: with op=None, y must be an image (*batch, D, H, W), got "
                    f"{tuple(y.shape)}"
                )
            lead, domain = y.shape[:-3], tuple(y.shape[-3:])
            x0 = y.reshape((math.prod(lead),) + domain)
        else:
            yb, lead = _flatten(y, op, "ArtifactRemoval")
            domain = op.domain_shape
            x0 = self.initial_image(yb, op)
        _check_channels(self.backbone, x0, "ArtifactRemoval")
        out = _denoise(self.backbone, x0, _scale_of(self, x0))
        return out.reshape(lead + domain)


def set_scan_detector(model: nn.Module, record: Mapping[str, Any] | None) -> bool:
    """Tell the reconstructor inside ``model`` which detector the scan it runs on was read through
    (the scan's ``detector`` record, ``None``: linear). Whoever runs a model on a scan other than
    its training scans calls this (whole-scan reconstruction), so that a model with
    ``initial_detector="auto"`` starts from the detector-aware estimate of *that* scan's levels.
    Returns whether the initial estimate now accounts for the detector."""
    for m in model.modules():
        if isinstance(m, ArtifactRemoval) and m.initial_detector == "auto":
            m.detector = None if record is None else dict(record)
            return m.clip_levels() is not None
    return False


def _reset_parameters(module: nn.Module) -> None:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset) and m is not module:
            reset()


class UnrolledNetwork(nn.Module):
    """``K`` iterations of a data-consistency step with the operator and a learned backbone.

    ``data_consistency="gradient"`` (a learned proximal-gradient network, e.g. Hammernik et
    al., MRM 2018): ``x ← s·g_k((x − (η_k/L) Aᴴ(Ax − y))/s)``. ``"cg"`` (MoDL, Aggarwal,
    Mani & Jacob, IEEE TMI 2019): ``z = s·g_k(x/s)``, ``x ← (AᴴA + λ_k L I)⁻¹(Aᴴy + λ_k L z)``
    by CG with implicit gradients (:func:`normal_solve`). ``L`` bounds ``‖A‖²``
    (:meth:`~operators3d.LinearOperator.lipschitz`), so ``η`` and ``λ`` are scale-free; both are
    learned (positive, through their logarithm). ``shared=True`` applies one backbone (and one
    ``η`` / ``λ``) in every iteration; otherwise each iteration has its own, re-initialised,
    copy.

    Shape:
        ``y``: ``(*batch, *op.range_shape)`` → ``(*batch, *op.domain_shape)``.

    Math:
        ``x₀ = Aᴴy / L`` (``initial="adjoint"``: one gradient step from zero) or another
        initial estimate; then ``K`` iterations as above; ``s = rms(x₀)``.

    Args:
        backbone: a network on real channels (2 for MRI, 1 for CT).
        num_iters: ``K``.
        data_consistency: ``"gradient"`` or ``"cg"``.
        shared: share the backbone and step parameters across iterations.
        initial: ``"adjoint"``, ``"fbp"``, ``"sense"``, ``"classical"`` or ``f(y, op)``.
        normalize: scale the backbone's input by ``s``.
        step_size: initial ``η`` (gradient DC).
        cg_weight: initial ``λ`` (CG DC).
        cg_iters: CG iterations per DC step.
        sense_iters, sense_l2: CG iterations and Tikhonov weight ``λ`` of a SENSE initial
            estimate (as for :class:`ArtifactRemoval`).
        fbp_filter: ramp window of an FBP/FDK initial estimate.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_iters: int = 5,
        data_consistency: str = "gradient",
        shared: bool = True,
        initial: Initial = "adjoint",
        normalize: bool = True,
        step_size: float = 1.0,
        cg_weight: float = 0.05,
        cg_iters: int = 10,
        sense_iters: int = 10,
        sense_l2: float = 0.0,
        fbp_filter: str = "ram-lak",
    ) -> None:
        super().__init__()
        name = "UnrolledNetwork"
        _check_filter(fbp_filter, name)
        self.fbp_filter = fbp_filter
        if not isinstance(num_iters, int) or num_iters < 1:
            raise ValueError(f"{name}: num_iters must be a positive int, got {num_iters!r}")
        if data_consistency not in _DCS:
            raise ValueError(f"{name}: data_consistency must be one of {_DCS}, got {data_consistency!r}")
        if step_size <= 0 or cg_weight <= 0:
            raise ValueError(
                f"{name}: step_size and cg_weight must be > 0, got {step_size} and {cg_weight}"
            )
        _check_initial(initial, name)
        self.num_iters = num_iters
        self.data_consistency = data_consistency
        self.shared = shared
        self.initial = initial
        self.normalize = normalize
        self.cg_iters = cg_iters
        self.sense_iters = sense_iters
        self.sense_l2 = sense_l2
        if shared:
            self.backbones = nn.ModuleList([backbone])
        else:
            copies = [backbone] + [copy.deepcopy(backbone) for _ in range(num_iters - 1)]
            for c in copies[1:]:
                _reset_parameters(c)
            self.backbones = nn.ModuleList(copies)
        n = 1 if shared else num_iters
        init = math.log(step_size if data_consistency == "gradient" else cg_weight)
        self.log_step = nn.Parameter(torch.full((n,), init))

    def extra_repr(self) -> str:
        return (
            f"num_iters={self.num_iters}, data_consistency={self.data_consistency}, "
            f"shared={self.shared}"
        )

    def _iteration_parts(self, k: int) -> tuple[nn.Module, torch.Tensor]:
        i = 0 if self.shared else k
        return self.backbones[i], self.log_step[i].exp()

    def initial_image(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        """The first iterate before scaling: ``Aᴴy/L`` or this model's initial estimate (see
        :meth:`ArtifactRemoval.initial_image`).

        Shape:
            ``(*batch, *op.range_shape)`` → ``(*batch, *op.domain_shape)``.
        """
        if self.initial == "adjoint":
            return op.adjoint(y) / op.lipschitz()
        return initial_estimate(y, op, self.initial, sense_iters=self.sense_iters, sense_l2=self.sense_l2,
                                fbp_filter=self.fbp_filter)

    def forward(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        if op is None:
            raise ValueError(
                "UnrolledNetwork: needs an operator (op=None is image mode; use ArtifactRemoval)"
            )
        yb, lead = _flatten(y, op, "UnrolledNetwork")
        lip = op.lipschitz()
        aty = op.adjoint(yb)
        if self.initial == "adjoint":
            x = aty / lip
        else:
            x = self.initial_image(yb, op)
        _check_channels(self.backbones[0], x, "UnrolledNetwork")
        scale = _scale_of(self, x)
        for k in range(self.num_iters):
            backbone, param = self._iteration_parts(k)
            if self.data_consistency == "gradient":
                step = param.to(x.real.dtype) / lip
                x = x - step * (op.normal(x) - aty)
                x = _denoise(backbone, x, scale)
            else:
                z = _denoise(backbone, x, scale)
                lam = param.to(x.real.dtype) * lip
                x = normal_solve(aty + lam * z, op, damping=lam, num_iters=self.cg_iters, tol=0.0)
        return x.reshape(lead + op.domain_shape)
