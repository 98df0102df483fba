"""Build the pieces of a training run from its config: stream, model, loss, optimizer, schedule.

Everything here is plain torch and ``pipeline``; DeepSpeed enters only in
:mod:`pipeline.train.engine`. The same functions rebuild an exported model for inference
(:mod:`pipeline.train.export`), so a model is always made by :func:`build_model` from its
:class:`~pipeline.train.config.ModelConfig` and :func:`wrap_for_loss`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
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
    detector: Any = None  # the scans' non-linear detector record (docs/scan-format.md), None: linear


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
        facts.append((scan.modality, geometry, meta.noise_model, path, scan.reference is not None,
                      meta.detector))
    modalities = {f[0] for f in facts}
    if len(modalities) > 1:
        raise ConfigError(f"{what}: scans of one modality only, got {sorted(modalities)}")
    from pipeline.losses.detector import detector_key

    detectors = {detector_key(f[5]): f for f in facts}
    if len(detectors) > 1:
        first, other = list(detectors.values())[:2]
        raise ConfigError(
            f"{what}: the scans were measured through different detectors ({first[3]}: "
            f"{_detector_text(first[5])}; {other[3]}: {_detector_text(other[5])}); a loss measures "
            "through one model: train them separately, or set loss.detector: ignore")
    noise = {repr(f[2]) for f in facts}
    noise_model = None
    if len(noise) == 1 and facts[0][2] is not None:
        from operators3d import noise_model_from_dict

        noise_model = noise_model_from_dict(facts[0][2])
    modality, geometry = facts[0][0], facts[0][1]
    return ScanFacts(modality, geometry, noise_model, 2 if modality == "mri" else 1,
                     without_reference=tuple(str(f[3]) for f in facts if not f[4]), detector=facts[0][5])


def _detector_text(record: dict | None) -> str:
    if record is None:
        return "linear"
    return ", ".join(f"{k} {record[k]}" for k in ("model", "low", "high", "bits", "threshold") if record.get(k) is not None)


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
    from pipeline.models import TiledBackbone
    from pipeline.models.registry import BACKBONES, RECONSTRUCTORS

    backbone = BACKBONES[cfg.backbone](cfg, facts.channels)
    if cfg.start_at_initial:
        zero_last_convolution(backbone)
    if precision != "fp32":
        backbone = cast_to_parameters(backbone)
    if cfg.tile is not None:
        backbone = TiledBackbone(backbone, tile_shape=cfg.tile.shape, overlap=cfg.tile.overlap,
                                 checkpoint=cfg.tile.activation_checkpointing, tiles_per_batch=cfg.tile.tiles_per_batch)
    if cfg.initial == "sense" and facts.modality != "mri":
        raise ConfigError("model.initial: 'sense' is for MRI scans; use 'fbp' or 'adjoint' for CT")
    model = RECONSTRUCTORS[cfg.reconstructor](backbone, cfg)
    if facts.detector is not None:
        from pipeline.models import set_scan_detector

        set_scan_detector(model, facts.detector)
    return model


def build_loss(cfg: LossConfig, facts: ScanFacts, *, seed: int) -> Any:
    """The weighted sum of the configured terms (built by :data:`~pipeline.losses.registry.LOSS_TERMS`);
    ``seed`` seeds each term's generator."""
    from pipeline.losses import WeightedSum
    from pipeline.losses.registry import LOSS_TERMS

    if cfg.detector == "ignore" and facts.detector is not None:
        facts = replace(facts, detector=None)
    terms = []
    for i, t in enumerate(cfg.terms):
        loss = LOSS_TERMS[t.name].build(t, facts, derived_seed(seed, "loss-term", i), f"loss.terms[{i}] ({t.name})")
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

    # every key of data: is a SlabStreamConfig setting (it refuses unknown ones)
    stream_cfg = SlabStreamConfig(**cfg.model_dump(), seed=seed, include_reference=include_reference)
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
