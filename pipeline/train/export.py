"""``recon3d export RUN_DIR``: one consolidated fp32 weights file for inference and sharing.

The file is a plain ``torch.save`` of ``{"format", "state_dict", "model_config",
"loss_config", "modality", "channels", "step", "source", "model_card"}`` made only of tensors,
strings, numbers, lists and dicts, so ``torch.load(path, weights_only=True)`` reads it and
:func:`load_exported` rebuilds the model without DeepSpeed or a process group. The model card
(:class:`~pipeline.modelcard.ModelCard`: modality, operator, training slab thickness, intensity
scale, receptive radius) is what applying the model needs of its run; ZeRO shards
are merged with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (a function: its
``zero_to_fp32.py`` script needs extra packages).

Nothing read here can run code: the shards, the merge and the export are read weights-only
(:mod:`pipeline.safeload`), and a model whose weights hold NaN or Inf is refused when loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..modelcard import ModelCard
from ..safeload import load as safe_load
from .checkpoint import CheckpointInfo, read_checkpoint

__all__ = ["export_run", "run_payload", "load_exported", "read_export", "check_finite", "model_card", "EXPORT_FORMAT"]

EXPORT_FORMAT = "recon3d-weights-1"


def _state_dict(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    if int(info.manifest.get("zero_stage", 0)) == 0:
        files = sorted(info.path.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{info.path}: no mp_rank_*_model_states.pt")
        state = safe_load(files[0], map_location="cpu")["module"]
    else:
        from .engine import consolidated_state_dict

        state = consolidated_state_dict(info.directory, info.tag)
    return {k: v.detach().to(torch.float32).clone() if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def export_run(run_dir: str | Path, out: str | Path | None = None, *, checkpoint: str | Path | None = None) -> Path:
    """Write the consolidated weights of a run's latest checkpoint (or ``checkpoint``).

    Returns:
        The path written (default ``RUN_DIR/export/model.pt``).

    Raises:
        OutputConflictError: ``out`` holds something other than an earlier export (a
            checkpoint, a config, any other file, a folder) or lies inside the checkpoints.
    """
    run_dir = Path(run_dir)
    path = Path(out) if out is not None else run_dir / "export" / "model.pt"
    # Checked before anything is read: a refused target costs nothing and loses nothing.
    _check_target(path, Path(checkpoint) if checkpoint is not None else run_dir / "checkpoints")
    payload = run_payload(run_dir, checkpoint=checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def run_payload(run_dir: str | Path, *, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """What :func:`export_run` writes, in memory: the merged weights of the run's latest
    checkpoint (or ``checkpoint``) with their configs and model card (``model.init`` reads a
    run directory this way)."""
    run_dir = Path(run_dir)
    info = read_checkpoint(checkpoint if checkpoint is not None else run_dir / "checkpoints")
    state = _state_dict(info)
    expected = info.manifest["param_shapes"]
    missing = [k for k in expected if k not in state]
    if missing:
        raise RuntimeError(f"export of {info.path}: parameters missing from the merged state: {missing[:5]}")
    payload: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "state_dict": state,
        "model_config": info.manifest["model_config"],
        "loss_config": info.manifest["loss_config"],
        "modality": info.manifest["modality"],
        "channels": int(info.manifest["channels"]),
        "step": info.step,
        "source": str(info.path),
    }
    payload["model_card"] = model_card(_build(payload), info, run_dir).to_dict()
    return payload


def _training_config(info: CheckpointInfo, run_dir: Path) -> dict[str, Any]:
    """The resolved config the checkpoint was trained with (its manifest's; an older checkpoint's
    run directory's ``config.resolved.yaml``), or ``{}``."""
    config = info.manifest.get("config")
    if isinstance(config, dict):
        return config
    resolved = run_dir / "config.resolved.yaml"
    if not resolved.is_file():
        return {}
    import yaml

    return yaml.safe_load(resolved.read_text()) or {}


def _operator(modality: str, data: dict[str, Any]) -> str | None:
    """The training scans' forward operator: ``mri``, or the CT geometry (``parallel``, ``cone``)."""
    if modality == "mri":
        return "mri"
    if data.get("mode", "measurements") == "measurements":
        return "parallel"  # cone-beam scans stream only as images (their slabs have no operator)
    from pipeline.data import open_scan

    try:
        scan = open_scan(data["scans"][0], storage_options=data.get("storage_options") or None)
        return str(scan.metadata.geometry.kind)
    except Exception:  # the run's scans are gone or unreachable: the card says unknown
        return None


def model_card(model: nn.Module, info: CheckpointInfo, run_dir: Path) -> ModelCard:
    """The model card of ``model``, trained by the run at ``run_dir`` up to checkpoint ``info``."""
    from pipeline.models import model_halo, reconstructor_of

    data = _training_config(info, run_dir).get("data") or {}
    modality = str(info.manifest["modality"])
    thickness = data.get("slab_thickness")
    radius = model_halo(model)[0]
    normalize = bool(getattr(reconstructor_of(model), "normalize", False))
    return ModelCard(modality=modality, operator=_operator(modality, data),
                     slab_thickness=int(thickness) if thickness else None,
                     intensity_scale="initial-rms" if normalize else None, receptive_radius=radius)


def _check_target(path: Path, checkpoints: Path) -> None:
    """Refuse an export target that is not an earlier export (or vacant), or lies in the checkpoints.

    An export replaces an earlier export file (its ``format`` says so); a checkpoint, a
    config, any other file or a folder is refused, and so is a path inside the checkpoint
    folders it reads (:class:`~pipeline.errors.OutputConflictError`).
    """
    from pipeline.errors import OutputConflictError
    from pipeline.outputs import check_output

    target = check_output(path, "export", inputs=[checkpoints])
    if target.kind == "empty":
        raise OutputConflictError(f"export: --out {path} is a folder; give the weights file to write, "
                                  f"e.g. {path / 'model.pt'}")


def check_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse weights that hold NaN or Inf (a diverged run): names the file and the parameters.

    Raises:
        InputError: some floating-point tensor of ``state`` is not finite.
    """
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise InputError(f"{path}: the weights hold NaN or Inf (parameters {', '.join(bad[:3])}{more}): the run "
                         "diverged; retrain with a lower learning rate or gradient clipping, or use an earlier "
                         "checkpoint")


def read_export(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The payload of an exported file, read weights-only and checked (format, finite weights).

    Raises:
        UntrustedFileError: the file needs a pickle global or is not a torch file.
        InputError: not a recon3d export, or weights with NaN/Inf.
    """
    payload = safe_load(path, map_location=map_location)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise InputError(f"{path}: not a recon3d export (format {found!r}); make one with `recon3d export RUN_DIR`")
    if not isinstance(payload.get("state_dict"), dict):
        raise InputError(f"{path}: a recon3d export without a state_dict; export the run again")
    check_finite(payload["state_dict"], path)
    return payload


def load_exported(path: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model of an exported file, in eval mode (``model(y, op)``), built without DeepSpeed."""
    payload = read_export(path, map_location=map_location)
    return _build(payload).eval()


def _build(payload: dict[str, Any]) -> nn.Module:
    """The model of an export's payload, its weights loaded."""
    from .build import ScanFacts, build_model, wrap_for_loss
    from pipeline.losses.registry import SPLITTING_TERMS, MCTerm

    from .config import LossConfig, ModelConfig

    facts = ScanFacts(payload["modality"], "", None, int(payload["channels"]))
    # An export made before model.initial_detector existed was trained on plain FBP: keep it so.
    model_config = {"initial_detector": "ignore", **payload["model_config"]}
    model = build_model(ModelConfig.model_validate(model_config), facts)
    loss_cfg = LossConfig.model_validate(payload["loss_config"])
    # Only a splitting term changes the model (it wraps it); the other terms are not needed.
    split = [t for t in loss_cfg.terms if t.name in SPLITTING_TERMS]
    splitting = LossConfig(terms=split or [MCTerm(name="mc")])
    model = wrap_for_loss(model, splitting, facts)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model
