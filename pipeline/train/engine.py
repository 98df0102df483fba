"""The DeepSpeed engine: its config, initialisation, sharded save/load, universal conversion.

This is the only module that imports ``deepspeed``. The engine wraps the reconstructor
(``engine(y, op)`` runs it), owns the optimizer and applies ZeRO stage 0–3, bf16/fp16, CPU
offload, gradient accumulation and clipping. Learning rates are set by the training loop from
the step (no scheduler state), and activation checkpointing lives in the models
(non-reentrant torch checkpointing, which is safe under ZeRO-2/3 when a network runs twice in
a step, as EI and SURE do).

On CPU, DeepSpeed would compile a shared-memory all-reduce kernel on first use (a minute or
more on a fresh machine) and probe a compiler for every op it knows; recon3d uses torch
optimizers and gloo collectives, which need neither, so the probe is skipped unless
``RECON3D_DEEPSPEED_OPS=1``.

DeepSpeed reads its files with ``torch.load(..., weights_only=False)``, which would run a
crafted pickle; every load, conversion and merge here runs inside
:func:`pipeline.safeload.deepspeed_loads`, so those reads are weights-only too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import require_extra
from ..safeload import deepspeed_loads
from .config import ExperimentConfig
from .distributed import DistContext

__all__ = [
    "deepspeed_config",
    "create_engine",
    "save_engine",
    "load_engine",
    "convert_to_universal",
    "consolidated_state_dict",
    "full_state",
]


def _deepspeed():
    # DeepSpeed logs to stdout (its handler keeps the stream it saw at import): imported with
    # stdout pointing at stderr, its messages are chatter on stderr and stdout keeps the results.
    with contextlib.redirect_stdout(sys.stderr):
        require_extra("deepspeed", "train", "training (DeepSpeed ZeRO)")
        if os.environ.get("RECON3D_DEEPSPEED_OPS") != "1":
            import deepspeed.ops

            if "__compatible_ops__" not in vars(deepspeed.ops):
                # An empty table: every op counts as unavailable, so nothing is JIT-built.
                deepspeed.ops.__compatible_ops__ = {}
        import deepspeed
    for handler in logging.getLogger("DeepSpeed").handlers:  # imported earlier, elsewhere
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)

    # DeepSpeed's ZeRO calls torch's all_gather_into_tensor and reduce_scatter_tensor, deprecated
    # in recent torch: FutureWarnings per rank per run that say nothing to a user of recon3d.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*is deprecated",
                            category=FutureWarning)
    return deepspeed


def deepspeed_config(config: ExperimentConfig, *, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed's JSON config for an experiment (micro-batch 1 slab per rank)."""
    ds = config.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3 and ds.stage3_param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if ds.gradient_clipping > 0:
        out["gradient_clipping"] = ds.gradient_clipping
    if ds.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        out["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return out


def create_engine(config: ExperimentConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                  ctx: DistContext, *, load_universal: bool = False):
    """``deepspeed.initialize`` on the job's process group; returns the engine."""
    deepspeed = _deepspeed()
    deepspeed.init_distributed(dist_backend=ctx.backend or "gloo", dist_init_required=False)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer,
        config=deepspeed_config(config, load_universal=load_universal),
    )
    return engine


def save_engine(engine, directory: Path, tag: str) -> None:
    """DeepSpeed's sharded save on every rank (``latest`` is left to the checkpoint manager)."""
    engine.save_checkpoint(str(directory), tag=tag, save_latest=False)


def load_engine(engine, directory: Path, tag: str) -> None:
    """Load model and optimizer shards saved at ``directory/tag`` (same world size, or universal)."""
    with deepspeed_loads():
        path, _ = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint at {directory}/{tag}")


def convert_to_universal(src: Path, dst: Path) -> None:
    """DeepSpeed's universal checkpoint of the sharded checkpoint ``src`` (one process).

    ZeRO-1/2 checkpoints lack state the converter needs (``universal_checkpoint_info``); the
    converter's ``inject_missing_state`` adds it.
    """
    _deepspeed()
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = types.SimpleNamespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1,
                                 num_merge_workers=1, keep_temp_folder=False, strict=True,
                                 inject_missing_state=True)
    with deepspeed_loads(), contextlib.redirect_stdout(sys.stderr):  # its progress prints
        ds_to_universal(args)


def consolidated_state_dict(checkpoint_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 model state of a sharded checkpoint, without an engine or process group."""
    _deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with deepspeed_loads(), contextlib.redirect_stdout(sys.stderr):  # its progress prints
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def full_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's full fp32 value and Adam moments, gathered from the ZeRO partitions.

    A collective under ZeRO-3: every rank must call it. Returns
    ``{name: {"param", "exp_avg", "exp_avg_sq"}}`` (moments absent before the first step or for
    optimizers without them), on the CPU.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in engine.module.named_parameters():
        entry = {"param": safe_get_full_fp32_param(param).detach().cpu().clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            value = safe_get_full_optimizer_state(param, key)
            if value is not None:
                entry[key] = value.detach().cpu().clone()
        out[name] = entry
    return out
