"""The model card of an export (issue 16.2): ``recon3d export`` writes it, it round-trips, and
``recon3d reconstruct`` takes the training slab thickness from it rather than from the run's
``config.resolved.yaml``; an export made before cards still reconstructs (the former path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
import zarr

from pipeline.errors import InputError
from pipeline.modelcard import CARD_VERSION, ModelCard, read_card
from pipeline.reconstruct import ReconstructConfig, reconstruct
from pipeline.train import export_run
from pipeline.train.export import read_export

UNET = dict(widths=[4, 8])


def _fake_run(root: Path, modality: str, *, thickness: int | None, **model_config) -> Path:
    """A run directory holding one complete ZeRO-0 checkpoint of a fresh model: what export reads
    (no training); its manifest's config says ``data.slab_thickness = thickness``."""
    from pipeline.train.build import ScanFacts, build_model
    from pipeline.losses.registry import MCTerm
    from pipeline.train.config import LossConfig, ModelConfig

    channels = 2 if modality == "mri" else 1
    cfg = ModelConfig.model_validate(model_config)
    torch.manual_seed(0)
    model = build_model(cfg, ScanFacts(modality, "", None, channels))
    step = root / "checkpoints" / "step_00000002"
    (step / "recon3d").mkdir(parents=True)
    torch.save({"module": model.state_dict()}, step / "mp_rank_00_model_states.pt")
    manifest = {
        "model_config": cfg.model_dump(mode="json"),
        "loss_config": LossConfig(terms=[MCTerm(name="mc")]).model_dump(mode="json"),
        "param_shapes": {k: list(p.shape) for k, p in model.named_parameters()},
        "zero_stage": 0, "modality": modality, "channels": channels, "step": 2, "world_size": 1,
        "config": {"data": {"scans": [], "mode": "measurements", "slab_thickness": thickness}},
    }
    (step / "recon3d" / "manifest.json").write_text(json.dumps(manifest))
    (root / "checkpoints" / "latest").write_text("step_00000002")
    return root


def _reconstruct(scan: str, out: Path, model: Path, **kw) -> dict:
    kw.setdefault("progress", False)
    reconstruct(ReconstructConfig(scan=scan, out=str(out), model=str(model), chunks=(2, 8, 8), slab=4,
                                  scheduler="sync", **kw))
    return dict(zarr.open_group(str(out), mode="r").attrs)["recon3d"]


@pytest.mark.parametrize("modality, config, want", [
    ("mri", UNET, dict(operator="mri", slab_thickness=4, intensity_scale="initial-rms", receptive_radius=9)),
    ("ct", dict(widths=[4, 8], initial="fbp", normalize=False),
     dict(operator="parallel", slab_thickness=4, intensity_scale=None, receptive_radius=9)),
    ("mri", dict(backbone="dncnn", dncnn_width=4, dncnn_depth=3, reconstructor="unrolled", unrolled={"iterations": 2}),
     dict(operator="mri", slab_thickness=4, intensity_scale="initial-rms", receptive_radius=6)),
], ids=["unet-mri", "unet-ct-unnormalised", "unrolled-mri"])
def test_export_writes_a_card_that_round_trips(tmp_path, modality, config, want):
    run = _fake_run(tmp_path / "run", modality, thickness=4, **config)
    path = export_run(run)
    raw = torch.load(path, map_location="cpu", weights_only=True)["model_card"]  # plain values only
    assert raw == {"modality": modality, **want, "version": CARD_VERSION}
    card = read_card(read_export(path), path)
    assert card == ModelCard(modality=modality, **want)
    assert ModelCard.from_dict(card.to_dict()) == card


def test_a_malformed_card_is_refused_naming_the_file(tmp_path):
    good = ModelCard("mri", "mri", 4, "initial-rms", 9).to_dict()
    for bad in ({**good, "version": CARD_VERSION + 1}, {**good, "operator": "fan"}, {**good, "extra": 1},
                {**good, "slab_thickness": -1}, "a card"):
        with pytest.raises(InputError, match="m.pt"):
            read_card({"model_card": bad}, "m.pt")
    assert read_card({}, "m.pt") is None  # an export made before cards


def test_reconstruct_takes_the_thickness_from_the_card(tmp_path, mri_scan):
    """A run directory is exported first; the intensity scale is measured on slabs of the card's
    thickness (4) although the run's resolved config, written after the export, says 8."""
    from pipeline.train import load_exported
    from pipeline.train.build import scan_scale

    run = _fake_run(tmp_path / "run", "mri", thickness=4, **UNET)
    export = export_run(run)
    (run / "config.resolved.yaml").write_text(yaml.safe_dump({"data": {"slab_thickness": 8}}))
    info = _reconstruct(mri_scan, tmp_path / "out.ome.zarr", run)
    assert info["settings"]["reconstructor"]["scale_thickness"] == 4
    want = scan_scale(load_exported(export), mri_scan, thickness=4)
    assert info["intensity_scale"] == pytest.approx(want, rel=1e-6)
    # An exported file carries its card: the same thickness without the run directory.
    info = _reconstruct(mri_scan, tmp_path / "file.ome.zarr", export)
    assert info["settings"]["reconstructor"]["scale_thickness"] == 4


def test_an_export_without_a_card_still_reconstructs(tmp_path, mri_scan, capsys, monkeypatch):
    """An export made before cards: with a run directory the thickness comes from its resolved
    config, as before, and a note says so; a bare weights file has none (the scan's chunks)."""
    monkeypatch.setenv("COLUMNS", "500")  # the note on one line
    run = _fake_run(tmp_path / "run", "mri", thickness=4, **UNET)
    export = export_run(run)
    payload = torch.load(export, map_location="cpu", weights_only=True)
    del payload["model_card"]
    torch.save(payload, export)  # newer than the checkpoint: reused, not exported again
    (run / "config.resolved.yaml").write_text(yaml.safe_dump({"data": {"slab_thickness": 8}}))
    info = _reconstruct(mri_scan, tmp_path / "out.ome.zarr", run, progress=True)
    assert info["settings"]["reconstructor"]["scale_thickness"] == 8
    assert info["complete"] is True
    err = capsys.readouterr().err
    assert "no model card" in err and "config.resolved.yaml (8)" in err
    assert "model_card" not in torch.load(export, map_location="cpu", weights_only=True)
    info = _reconstruct(mri_scan, tmp_path / "file.ome.zarr", export)
    assert info["settings"]["reconstructor"]["scale_thickness"] is None and info["complete"] is True
