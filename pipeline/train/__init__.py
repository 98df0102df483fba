"""Training at scale: config, DeepSpeed engine, training loop, checkpoints, export.

``recon3d train CONFIG`` runs alone or under ``torchrun`` (one or many nodes) unchanged::

    recon3d train launch/configs/mri_ei.yaml --run-dir runs/mri_ei
    torchrun --standalone --nproc_per_node=2 -m pipeline.cli train launch/configs/mri_ei.yaml \\
        --run-dir runs/mri_ei --resume auto
    recon3d export runs/mri_ei            # runs/mri_ei/export/model.pt

* :mod:`.config` — the typed experiment config (YAML, ``--set`` overrides, clear errors).
* :mod:`.build` — stream, model, loss, optimizer and learning-rate schedule from the config.
* :mod:`.distributed` — process group, device and backend (gloo on CPU, NCCL on GPU).
* :mod:`.engine` — DeepSpeed (the only module that imports it).
* :mod:`.checkpoint` — sharded saves plus per-rank state, ``latest``, resume at another size.
* :mod:`.loop` — :func:`train`: the steps, validation, preemption.
* :mod:`.monitor` — progress bar, ``metrics.jsonl``, TensorBoard.
* :mod:`.export` — one consolidated fp32 weights file, loadable without DeepSpeed.
"""

from .checkpoint import CheckpointError, CheckpointManager, read_checkpoint
from .config import ConfigError, ExperimentConfig, dump_config, load_config
from .export import export_run, load_exported
from .loop import TrainResult, Trainer, train
from .monitor import read_metrics

__all__ = [
    "ExperimentConfig",
    "ConfigError",
    "load_config",
    "dump_config",
    "train",
    "Trainer",
    "TrainResult",
    "CheckpointManager",
    "CheckpointError",
    "read_checkpoint",
    "export_run",
    "load_exported",
    "read_metrics",
]
