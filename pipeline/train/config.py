"""The experiment config of ``recon3d train``: typed, validated, resolved into the run directory.

An experiment is a YAML file (examples in ``launch/configs/``) with the sections below; every
key has a default except ``data.scans``. ``--set key.path=value`` overrides a key (the value
is parsed as YAML: ``--set optimizer.lr=3e-4 --set data.scans=[a.zarr,b.zarr]``). Errors name
the key and what is allowed::

    config error in launch/configs/mri_ei.yaml:
      optimizer.name: Input should be 'adam', 'adamw' or 'sgd' (got 'adamm')

The resolved config (defaults filled in) is written to ``RUN_DIR/config.resolved.yaml``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pipeline.config_base import ConfigError, FrozenModel
from pipeline.losses.registry import LOSS_TERMS, SPLITTING_TERMS, EITerm, MCTerm, TermConfig
from pipeline.models.registry import BACKBONES, RECONSTRUCTORS

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "DeepSpeedConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "ValidationConfig",
    "RunConfig",
    "load_config",
    "apply_overrides",
    "dump_config",
]


def _renamed_key(data: Any, old: str, new: str, where: str) -> Any:
    """Read a key under its old name, with a message saying the new one (both given: refused)."""
    if not isinstance(data, dict) or old not in data:
        return data
    if new in data:
        raise ValueError(f"{where}.{old} is the old name of {where}.{new}; give only {new}")
    warnings.warn(f"{where}.{old} is renamed {where}.{new} (activation checkpointing, not the saving of "
                  f"training checkpoints); the old key is read for now", FutureWarning, stacklevel=2)
    data = dict(data)
    data[new] = data.pop(old)
    return data


# ----------------------------------------------------------------------------- sections
class RunConfig(FrozenModel):
    """How long to train and the root seed.

    ``max_steps`` counts optimizer steps (a step takes ``gradient_accumulation_steps``
    micro-batches on every rank). ``seed`` seeds the model's initialisation, the stream's order
    and the losses' generators.

    A step whose loss, loss parts or gradient norm is NaN/Inf always stops the run (exit 1,
    nothing of that step saved). ``loss_growth_warning`` is the factor by which the loss may grow
    over the smallest |loss| seen after 5 warm-up steps before a ``warning`` event (and a line
    on stderr) says training may be diverging; it warns again at each further tenfold, never
    stops the run; 0 disables it.
    """

    max_steps: int = Field(100, ge=1)
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads per rank; None: OMP_NUM_THREADS if "
                                "set, else the CPUs this process may use (affinity, cgroup quota) divided by "
                                "the ranks on this node (pipeline/threads.py)")
    loss_growth_warning: float = Field(1000.0, ge=0, description="warn when the loss grows by this factor "
                                       "over its smallest value after warm-up (0: never)")
    memory: Literal["fast", "lean"] = Field("fast", description="fast: freed heap pages are kept for the next "
                                            "step (faster steps, RSS holds the heap's high-water mark); lean: "
                                            "blocks of 1 MiB or more go back to the OS when freed, so RSS "
                                            "follows the live tensors (pipeline/allocator.py)")


class DataConfig(FrozenModel):
    """Training scans and how they are streamed (``pipeline.data.SlabStream``)."""

    scans: list[str] = Field(min_length=1)
    slab_thickness: int | None = Field(None, ge=1)
    mode: Literal["measurements", "image"] = "measurements"
    image_arrays: list[str] = ["n2i"]
    crop_shape: tuple[int, int, int] | None = None
    crops_per_scan: int = Field(16, ge=1)
    num_workers: int = Field(2, ge=0, description="reader threads (or processes) per rank; 0 reads in the loop")
    worker_type: Literal["thread", "process"] = "thread"
    prefetch_factor: int = Field(2, ge=1)
    shuffle: bool = True
    storage_options: dict[str, Any] = {}
    order: Literal["auto", "shuffle", "shard_local"] = Field(
        "auto", description="slab order: shard_local takes a stored object's slabs one after another, each "
        "object fetched whole once (auto: for sharded scans on object stores); see SlabStreamConfig.order")

    @model_validator(mode="after")
    def _image_mode(self) -> "DataConfig":
        if self.mode == "image" and self.crop_shape is None:
            raise ValueError("mode 'image' needs crop_shape: [d, h, w]")
        return self


class TileConfig(FrozenModel):
    """Tiled evaluation of the backbone with activation checkpointing per tile."""

    shape: tuple[int, int, int]
    overlap: int | tuple[int, int, int] | None = None
    activation_checkpointing: bool = True
    tiles_per_batch: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return _renamed_key(data, "checkpoint", "activation_checkpointing", "model.tile")


class UnrolledConfig(FrozenModel):
    iterations: int = Field(5, ge=1)
    data_consistency: Literal["gradient", "cg"] = "gradient"
    shared: bool = True
    step_size: float = Field(1.0, gt=0)


class ModelConfig(FrozenModel):
    """The reconstructor ``model(y, op)``: a backbone on an initial estimate, or unrolled."""

    backbone: Literal[tuple(BACKBONES)] = "unet"
    widths: list[int] = [16, 32]
    convs_per_level: int = Field(2, ge=1)
    norm: Literal["none", "batch", "instance", "group"] = "none"
    activation: Literal["relu", "leaky_relu", "silu", "gelu"] = "relu"
    residual: bool = True
    dncnn_width: int = Field(32, ge=1)
    dncnn_depth: int = Field(5, ge=2)
    # Recompute activations in the backward pass instead of keeping them (torch's non-reentrant
    # checkpointing): per U-Net level, or the whole network around its level checkpoints.
    activation_checkpointing: Literal["none", "level", "network"] = "none"
    reconstructor: Literal[tuple(RECONSTRUCTORS)] = "artifact_removal"
    initial: Literal["adjoint", "fbp", "sense"] = "adjoint"
    fbp_filter: Literal["ram-lak", "shepp-logan", "cosine", "hann"] = "ram-lak"  # initial: fbp's window
    initial_detector: Literal["auto", "ignore"] = Field(
        "auto", description="auto: on scans read through a clipping detector (a count floor or a saturation in "
        "their detector record) the fbp initial estimate is the detector-aware clipped FBP "
        "(pipeline.classical.clipped_fbp: FBP-preconditioned steps that take a clipped ray as a bound, not a "
        "value); ignore: plain FBP whatever the detector. artifact_removal only")
    normalize: bool = True
    # Zero the backbone's last convolution: the residual network then starts exactly at its
    # initial estimate (FBP, SENSE...) and training can only move away from it where the loss asks.
    start_at_initial: bool = False
    unrolled: UnrolledConfig = UnrolledConfig()
    tile: TileConfig | None = None
    init: str | None = Field(None, description="start from trained weights: an exported file (recon3d export) "
                             "or a run directory (its latest checkpoint); the architecture must match this "
                             "config's; applied at step 0 only (a resumed run continues from its checkpoint); "
                             "pipeline/train/finetune.py")
    freeze: list[str] = Field([], description="parts of the network left untrained, by name: a U-Net's "
                              "encoder, decoder or head, a DnCNN's body/head, or any dotted parameter-name "
                              "prefix of the reconstructor")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return _renamed_key(data, "checkpoint", "activation_checkpointing", "model")

    @model_validator(mode="after")
    def _start(self) -> "ModelConfig":
        if self.start_at_initial and not self.residual:
            raise ValueError("start_at_initial needs residual: true (a zeroed non-residual network outputs 0)")
        return self

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if not v or any(w < 1 for w in v):
            raise ValueError("widths must be a non-empty list of positive ints")
        return v


class LossConfig(FrozenModel):
    """The loss: a weighted sum of terms (at most one splitting term, which wraps the model)."""

    terms: list[TermConfig] = Field(default_factory=lambda: [MCTerm(name="mc"), EITerm(name="ei")], min_length=1)
    #: ``auto``: scans measured through a non-linear detector (their ``detector`` record:
    #: saturation, quantisation, one bit) are re-measured through it by the mc and ei terms;
    #: ``ignore``: every term treats the measurements as linear, ``y = A x + n``.
    detector: Literal["auto", "ignore"] = "auto"

    @model_validator(mode="after")
    def _one_split(self) -> "LossConfig":
        splits = [t.name for t in self.terms if t.name in SPLITTING_TERMS]
        if len(splits) > 1:
            raise ValueError(f"at most one splitting term ({', '.join(SPLITTING_TERMS)}), got {splits}")
        return self


class OptimizerConfig(FrozenModel):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0)


class ScheduleConfig(FrozenModel):
    """Learning rate as a pure function of the step (nothing to checkpoint)."""

    name: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class DeepSpeedConfig(FrozenModel):
    """DeepSpeed engine settings (``pipeline.train.engine`` turns them into DeepSpeed's dict)."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload_optimizer: bool = False
    offload_param: bool = False
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_clipping: float = Field(0.0, ge=0)
    stage3_param_persistence_threshold: int | None = Field(None, ge=0)
    timeout_s: int = Field(600, ge=10, description="collective timeout: a dead rank ends the job after it")

    @model_validator(mode="after")
    def _offload(self) -> "DeepSpeedConfig":
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class CheckpointConfig(FrozenModel):
    every: int = Field(50, ge=1, description="save every N optimizer steps (and at the end)")
    keep_last: int = Field(3, ge=1)
    dir: str | None = Field(None, description="default RUN_DIR/checkpoints")
    keep_best: Literal["none", "estimate", "psnr", "loss"] = Field(
        "none", description="also keep the checkpoint of the best validation, never pruned: 'estimate' the lowest "
        "reference-free estimated error (needs validation.estimate), 'psnr' the highest PSNR against the validation "
        "references, 'loss' the lowest validation loss; `recon3d reconstruct --model RUN --pick best` uses it")
    mirror: str | None = Field(None, description="an fsspec URL (s3://bucket/run, ...) that rank 0 copies each complete "
                               "save to, then writes URL/latest; old copies pruned like keep_last; a failed copy is a "
                               "warning, not an error. To resume from it, copy it back to a local path (DeepSpeed "
                               "needs one) and pass that to --resume")


class LoggingConfig(FrozenModel):
    every: int = Field(1, ge=1)
    tensorboard: bool = True
    progress: bool = True


class ValidationConfig(FrozenModel):
    """Held-out scans: PSNR/SSIM where a reference exists, the training loss otherwise."""

    scans: list[str] = []
    every: int = Field(100, ge=1)
    max_slabs: int = Field(4, ge=1)
    estimate: bool = Field(False, description="also estimate the error without a reference (as `recon3d evaluate "
                           "--estimate`) on the validation slabs, with the auto classical baseline's beside it; "
                           "a warning when the network is estimated worse than the baseline")
    estimate_draws: int = Field(4, ge=2, description="bootstrap draws per validation slab")
    estimate_folds: int = Field(2, ge=1, description="held-out parts per cross-validation")


class ExperimentConfig(FrozenModel):
    @model_validator(mode="after")
    def _keep_best(self) -> "ExperimentConfig":
        best = self.checkpoint.keep_best
        if best != "none" and not self.validation.scans:
            raise ValueError(f"checkpoint.keep_best: {best} picks among validations; give validation.scans")
        if best == "estimate" and not self.validation.estimate:
            raise ValueError("checkpoint.keep_best: estimate needs validation.estimate: true")
        return self

    run: RunConfig = RunConfig()
    data: DataConfig
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    validation: ValidationConfig = ValidationConfig()


# ----------------------------------------------------------------------------- loading
def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"config error in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in LOSS_TERMS))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            parent = _section_at(e["loc"][:-1])
            if parent is not None:
                msg += f" (allowed: {', '.join(parent.model_fields)})"
        elif e["type"] == "missing":
            msg = "required key is missing"
        given = e.get("input")
        if e["type"] not in ("missing",) and not isinstance(given, (dict, list)):
            msg += f" (got {given!r})"
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The config class at a location of the raw YAML (for listing the allowed keys)."""
    cls: type[BaseModel] | None = ExperimentConfig
    for part in loc:
        if cls is None:
            return None
        if isinstance(part, int):
            continue
        if part in LOSS_TERMS and cls is LossConfig:
            return LOSS_TERMS[part].config
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        if str(part) == "terms":
            cls = LossConfig
            continue
        cls = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return cls


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: a refused tag (``!!python/...``) or where the syntax broke."""
    if isinstance(exc, yaml.constructor.ConstructorError) and exc.problem and "tag" in exc.problem:
        tag = exc.problem.split("tag", 1)[1].strip(" '").replace("tag:yaml.org,2002:", "!!")
        return (f"the tag {tag} is not allowed: recon3d reads plain YAML only (numbers, strings, "
                "lists, mappings), never Python objects")
    where = ""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        where = f" at line {mark.line + 1}, column {mark.column + 1}"
    problem = getattr(exc, "problem", None) or str(exc)
    return f"not valid YAML{where}: {' '.join(str(problem).split())}"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``raw`` with ``key.path=value`` overrides applied (values parsed as YAML)."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node = out
        for p in parts[:-1]:
            if isinstance(node, list):
                try:
                    node = node[int(p)]
                except (ValueError, IndexError):
                    raise ConfigError(f"--set {item!r}: {p!r} is not an index of the list at that key") from None
                continue
            node = node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key.strip()}: {_yaml_problem(exc)}") from None
        if isinstance(node, list):
            try:
                node[int(parts[-1])] = parsed
            except (ValueError, IndexError):
                raise ConfigError(f"--set {item!r}: {parts[-1]!r} is not an index of the list at that key") from None
        else:
            node[parts[-1]] = parsed
    return out


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment config.

    Args:
        source: a YAML file or an already parsed dict.
        overrides: ``key.path=value`` strings (``--set``).

    Raises:
        ConfigError: an unreadable file, a bad override or a key that fails validation (the
            message lists each key, what is wrong and what is allowed).
    """
    if isinstance(source, dict):
        raw, name = source, "config"
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {name} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {name}: {_yaml_problem(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {name}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, name)) from None


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (defaults filled in)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
