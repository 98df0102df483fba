"""Build the pieces of a training run from its config: stream, model, loss, optimizer, schedule.

Everything here is plain torch and ``pipeline``; DeepSpeed enters only in
:mod:`pipeline.train.engine`. The same functions rebuild an exported model for inference
(:mod:`pipeline.train.export`), so a model is always made by :func:`build_model` from its
:class:`~pipeline.train.config.ModelConfig` and :func:`wrap_for_loss`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ConfigError, DataConfig, ExperimentConfig, LossConfig, ModelConfig

__all__ = [
    "ScanFacts",
    "scan_facts",
    "derived_seed",
    "build_model",
    "build_loss",
    "wrap_for_loss",
    "build_stream",
    "scan_scale",
    "build_optimizer",
    "learning_rate",
    "cast_to_parameters",
    "zero_last_convolution",
]


def derived_seed(*parts: Any) -> int:
    """A 62-bit seed that is a pure function of ``parts`` (root seed, rank, purpose...)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@dataclass(frozen=True)
class ScanFacts:
    """What the model and loss need to know about the training scans."""

    modality: str  # "mri" | "ct"
    geometry: str  # "cartesian" | "parallel" | "cone"
    noise_model: Any  # operators3d NoiseModel or None
    channels: int  # real channels of an image at the network's boundary
    without_reference: tuple[str, ...] = ()  # scans with no reference array (supervised needs one)


def scan_facts(paths: list[str], *, storage_options: dict[str, Any] | None = None, what: str = "data.scans") -> ScanFacts:
    """Open every scan (validating it) and check that they can be trained on together.

    Raises:
        ConfigError: a scan that is missing or invalid, or scans of different modalities.
    """
    from pipeline.data import ScanError, open_scan

    facts = []
    for i, path in enumerate(paths):
        try:
            scan = open_scan(path, storage_options=storage_options)
        except (ScanError, FileNotFoundError, OSError) as exc:
            raise ConfigError(f"{what}[{i}]: cannot open scan {path!r}: {exc}") from None
        meta = scan.metadata
        geometry = "cartesian" if scan.modality == "mri" else meta.geometry.kind
        facts.append((scan.modality, geometry, meta.noise_model, path, scan.reference is not None))
    modalities = {f[0] for f in facts}
    if len(modalities) > 1:
        raise ConfigError(f"{what}: scans of one modality only, got {sorted(modalities)}")
    noise = {repr(f[2]) for f in facts}
    noise_model = None
    if len(noise) == 1 and facts[0][2] is not None:
        from operators3d import noise_model_from_dict

        noise_model = noise_model_from_dict(facts[0][2])
    modality, geometry = facts[0][0], facts[0][1]
    return ScanFacts(modality, geometry, noise_model, 2 if modality == "mri" else 1,
                     without_reference=tuple(str(f[3]) for f in facts if not f[4]))


def _to_parameter_dtype(module: nn.Module, args: tuple) -> tuple:
    param = next(module.parameters(), None)
    if param is None or not args or args[0].dtype == param.dtype:
        return args
    module._recon3d_in_dtype = args[0].dtype
    return (args[0].to(param.dtype),) + tuple(args[1:])


def _to_input_dtype(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    dtype = module.__dict__.pop("_recon3d_in_dtype", None)
    return output if dtype is None else output.to(dtype)


def cast_to_parameters(backbone: nn.Module) -> nn.Module:
    """Make ``backbone`` run in its parameters' dtype (bf16/fp16 engines) and return its input's.

    Hooks, not a wrapper module, so the state dict keys are those of the fp32 model. The
    reconstructor and the operators stay in float32/complex64; only the network's
    convolutions run in reduced precision.
    """
    backbone.register_forward_pre_hook(_to_parameter_dtype)
    backbone.register_forward_hook(_to_input_dtype)
    return backbone


def zero_last_convolution(backbone: nn.Module) -> None:
    """Zero the weights and bias of ``backbone``'s last convolution (a residual backbone is then
    the identity, so the reconstructor starts at its initial estimate)."""
    head = getattr(backbone, "head", None)  # UNet3D's output convolution
    convs = [head] if isinstance(head, nn.Conv3d) else [m for m in backbone.modules() if isinstance(m, nn.Conv3d)]
    if not convs:
        raise ConfigError(f"model.start_at_initial: {type(backbone).__name__} has no convolution to zero")
    with torch.no_grad():
        convs[-1].weight.zero_()
        if convs[-1].bias is not None:
            convs[-1].bias.zero_()


def build_model(cfg: ModelConfig, facts: ScanFacts, *, precision: str = "fp32") -> nn.Module:
    """The reconstructor ``model(y, op)`` described by ``cfg`` for scans like ``facts``."""
    from pipeline.models import ArtifactRemoval, DnCNN3D, TiledBackbone, UNet3D, UnrolledNetwork

    ch = facts.channels
    if cfg.backbone == "unet":
        backbone: nn.Module = UNet3D(ch, ch, widths=cfg.widths, convs_per_level=cfg.convs_per_level,
                                     norm=cfg.norm, activation=cfg.activation, residual=cfg.residual,
                                     checkpoint=cfg.activation_checkpointing)
    else:
        backbone = DnCNN3D(ch, ch, width=cfg.dncnn_width, depth=cfg.dncnn_depth,
                           activation=cfg.activation, residual=cfg.residual)
    if cfg.start_at_initial:
        zero_last_convolution(backbone)
    if precision != "fp32":
        backbone = cast_to_parameters(backbone)
    if cfg.tile is not None:
        backbone = TiledBackbone(backbone, tile_shape=cfg.tile.shape, overlap=cfg.tile.overlap,
                                 checkpoint=cfg.tile.activation_checkpointing, tiles_per_batch=cfg.tile.tiles_per_batch)
    initial = cfg.initial
    if initial == "sense" and facts.modality != "mri":
        raise ConfigError("model.initial: 'sense' is for MRI scans; use 'fbp' or 'adjoint' for CT")
    if cfg.reconstructor == "artifact_removal":
        return ArtifactRemoval(backbone, initial=initial, normalize=cfg.normalize, fbp_filter=cfg.fbp_filter)
    u = cfg.unrolled
    return UnrolledNetwork(backbone, num_iters=u.iterations, data_consistency=u.data_consistency,
                           shared=u.shared, initial=initial, normalize=cfg.normalize, step_size=u.step_size,
                           fbp_filter=cfg.fbp_filter)


_TRANSFORMS = {"rotate90": "Rotate90", "rotate": "Rotate", "reflect": "Reflect", "shift": "Shift",
               "cube_rotations": "CubeRotation"}


def build_loss(cfg: LossConfig, facts: ScanFacts, *, seed: int) -> Any:
    """The weighted sum of the configured terms; ``seed`` seeds each term's generator."""
    import operators3d
    from pipeline.losses import (
        EquivariantImagingLoss,
        MeasurementConsistencyLoss,
        Noise2InverseLoss,
        SplittingLoss,
        SSDULoss,
        SupervisedLoss,
        SureGaussianLoss,
        SurePoissonLoss,
        WeightedSum,
    )

    terms = []
    for i, t in enumerate(cfg.terms):
        where = f"loss.terms[{i}] ({t.name})"
        s = derived_seed(seed, "loss-term", i)
        if t.name == "mc":
            loss: Any = MeasurementConsistencyLoss()
        elif t.name == "ei":
            noise = None
            if t.noise:
                if facts.noise_model is None:
                    raise ConfigError(f"{where}: noise: true (robust EI) needs scans with a noise model in their metadata")
                noise = facts.noise_model
            loss = EquivariantImagingLoss(transform=getattr(operators3d, _TRANSFORMS[t.transform]),
                                          noise_model=noise, seed=s)
        elif t.name == "sure":
            nm = facts.noise_model
            if nm is None:
                raise ConfigError(f"{where}: SURE needs scans with a noise model in their metadata")
            if isinstance(nm, (operators3d.GaussianNoise, operators3d.TransmissionNoise)):
                if t.metric == "image" and (facts.modality, facts.geometry) != ("ct", "parallel"):
                    raise ConfigError(f"{where}: metric: image needs parallel-beam CT scans")
                loss = SureGaussianLoss(noise_model=nm, tau=t.tau, metric=t.metric, seed=s)
            else:
                if t.metric == "image":
                    raise ConfigError(f"{where}: metric: image needs Gaussian or transmission noise, "
                                      f"the scans have {nm.kind}")
                loss = SurePoissonLoss(noise_model=nm, tau=t.tau, seed=s)
        elif t.name == "splitting":
            loss = SplittingLoss(t.rho, seed=s)
        elif t.name == "supervised":
            if facts.without_reference:
                raise ConfigError(
                    f"{where}: needs the scans' reference array, and {facts.without_reference[0]} has none "
                    f"({len(facts.without_reference)} scan(s) without one); simulated scans carry it, measured "
                    "ones do not: train those with a self-supervised term")
            loss = SupervisedLoss(metric=t.metric)
        elif t.name == "ssdu":
            if facts.modality != "mri":
                raise ConfigError(f"{where}: SSDU splits MRI k-space; use n2i or splitting for CT")
            loss = SSDULoss(t.rho, metric=t.metric, weighted=t.weighted, seed=s)
        else:
            loss = Noise2InverseLoss(t.num_splits, target=t.target, seed=s)
        terms.append((t.weight, loss))
    return WeightedSum(terms)


def wrap_for_loss(model: nn.Module, loss_cfg: LossConfig, facts: ScanFacts) -> nn.Module:
    """``model`` wrapped as its splitting term needs (identity without one).

    The wrapper's parameters are the model's, so the wrapped model's state dict is what
    checkpoints and exports hold; inference (``eval()``) uses all measurements (Noise2Inverse:
    the average over the splits).
    """
    return build_loss(loss_cfg, facts, seed=0).adapt_model(model)


def scan_scale(model: nn.Module, path: str, *, thickness: int | None, max_slabs: int = 8,
               storage_options: dict[str, Any] | None = None, device: torch.device | str = "cpu") -> float | None:
    """The intensity scale of a scan for ``model``: the RMS of its initial estimate over up to
    ``max_slabs`` evenly spaced slabs (see :func:`pipeline.models.intensity_scale`).

    Training and whole-scan reconstruction both use it, so a network sees the same scale for a
    scan in both. ``None`` when the model does not normalise.
    """
    from pipeline.data import open_scan
    from pipeline.models import scan_intensity_scale

    scan = open_scan(path, storage_options=storage_options)
    slabs = scan.slab_slices(thickness)
    pick = sorted({round(i * (len(slabs) - 1) / max(1, max_slabs - 1)) for i in range(min(max_slabs, len(slabs)))})

    def pairs():
        for i in pick:
            y, op = scan.slab(slabs[i])
            yield y.unsqueeze(0).to(device), op.to(device)

    return scan_intensity_scale(model, pairs())


def build_stream(cfg: DataConfig, *, seed: int, rank: int, world_size: int, include_reference: bool = False):
    """This rank's :class:`~pipeline.data.SlabStream` over the training scans (with each slab's
    reference in ``meta["reference"]`` when ``include_reference``: a supervised term)."""
    from pipeline.data import SlabStream, SlabStreamConfig

    stream_cfg = SlabStreamConfig(
        scans=tuple(cfg.scans), mode=cfg.mode, slab_thickness=cfg.slab_thickness,
        image_arrays=tuple(cfg.image_arrays), crop_shape=cfg.crop_shape,
        crops_per_scan=cfg.crops_per_scan, shuffle=cfg.shuffle, seed=seed,
        num_workers=cfg.num_workers, worker_type=cfg.worker_type, prefetch_factor=cfg.prefetch_factor,
        storage_options=dict(cfg.storage_options), include_reference=include_reference,
    )
    try:
        return SlabStream(stream_cfg, rank=rank, world_size=world_size)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None


def build_optimizer(config: ExperimentConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = config.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def learning_rate(config: ExperimentConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): warm-up, then constant or cosine."""
    s, base = config.schedule, config.optimizer.lr
    if s.warmup_steps and step < s.warmup_steps:
        return base * (step + 1) / s.warmup_steps
    if s.name == "constant":
        return base
    span = max(1, config.run.max_steps - s.warmup_steps - 1)  # the last step reaches the minimum
    t = min(1.0, (step - s.warmup_steps) / span)
    return base * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
