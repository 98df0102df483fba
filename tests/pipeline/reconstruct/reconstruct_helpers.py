"""Helpers of the reconstruction tests: exported models built without training, the
whole-volume reference, and subprocess launchers of ``recon3d reconstruct``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]

MRI_SHAPE = (24, 16, 12)
CT_SHAPE = (12, 16, 16)


def save_model(path: Path, modality: str, *, seed: int = 0, **model_config) -> Path:
    """An export file (``pipeline.train.export`` format) of a freshly initialised model."""
    from pipeline.train.build import ScanFacts, build_model
    from pipeline.losses.registry import MCTerm
    from pipeline.train.config import LossConfig, ModelConfig
    from pipeline.train.export import EXPORT_FORMAT

    channels = 2 if modality == "mri" else 1
    cfg = ModelConfig.model_validate(model_config)
    torch.manual_seed(seed)
    model = build_model(cfg, ScanFacts(modality, "", None, channels))
    payload = {
        "format": EXPORT_FORMAT,
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "model_config": cfg.model_dump(mode="json"),
        "loss_config": LossConfig(terms=[MCTerm(name="mc")]).model_dump(mode="json"),
        "modality": modality,
        "channels": channels,
        "step": 0,
        "source": "tests",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def whole_volume(weights: Path, scan_path: str) -> torch.Tensor:
    """The model applied to the whole volume at once, under the scan's intensity scale."""
    from pipeline.data import open_scan
    from pipeline.models import intensity_scale
    from pipeline.train import load_exported
    from pipeline.train.build import scan_scale

    model = load_exported(weights)
    scan = open_scan(scan_path)
    y, op = scan.slab(slice(0, scan.metadata.volume_shape[0]))
    scale = scan_scale(model, scan_path, thickness=None)
    with torch.no_grad(), intensity_scale(model, scale):
        return model(y[None], op)[0]


def env() -> dict:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    out["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        out.pop(key, None)
    return out


def command(args: list[str], *, driver: list[str] | None = None) -> list[str]:
    if driver is not None:
        return [sys.executable, str(HERE / "_driver.py"), *driver, "--", *args]
    return [sys.executable, "-m", "pipeline.cli", "reconstruct", *args]
