"""Fine-tuning: ``recon3d train --init`` starts from pretrained weights (an export or a run
directory), ``model.freeze`` leaves parts untrained, a mismatched network is refused before any
step, and a fine-tuning run resumes exactly without its init source."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_job, tiny_config, write_config

from pipeline.train import ConfigError
from pipeline.train.config import ModelConfig
from pipeline.train.finetune import apply_freeze, check_architecture


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _export(run, out) -> dict[str, torch.Tensor]:
    run_job(1, ["export", str(run), "--out", str(out)])
    return _weights(out)


def _events(run, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == kind]


def test_init_freeze_and_exact_resume(tmp_path, tiny_mri):
    pre_run = tmp_path / "pre"
    run_job(1, ["train", str(write_config(tmp_path / "pre.yaml", tiny_config(tiny_mri, run={"max_steps": 3}))),
                "--run-dir", str(pre_run)])
    pretrained = _export(pre_run, tmp_path / "pre.pt")

    # Fine-tune with another loss (robust EI's noise term off: MC + EI with rotations), the
    # encoder frozen, its own schedule; checkpoints at steps 2 and 4.
    fine = tiny_config(tiny_mri, run={"max_steps": 4, "seed": 1}, model={"widths": [4, 8], "freeze": ["encoder"]},
                       checkpoint={"every": 2, "keep_last": 3}, optimizer={"lr": 3e-3},
                       loss={"terms": [{"name": "mc"}, {"name": "ei", "transform": "rotate"}]})
    cfg = write_config(tmp_path / "fine.yaml", fine)
    run_a = tmp_path / "a"
    run_job(1, ["train", str(cfg), "--run-dir", str(run_a), "--init", str(tmp_path / "pre.pt")])
    init = _events(run_a, "init")
    assert len(init) == 1 and init[0]["step"] == 0 and init[0]["frozen"] > 0
    tuned = _export(run_a, tmp_path / "a.pt")
    encoder = [k for k in pretrained if ".encoders." in k]
    others = [k for k in pretrained if ".encoders." not in k]
    assert encoder and others
    assert all(torch.equal(tuned[k], pretrained[k]) for k in encoder)  # frozen: bitwise unchanged
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in others)  # the rest trained

    # --init RUN_DIR (its latest checkpoint, merged) starts from the same weights as its export.
    run_c = tmp_path / "c"
    run_job(1, ["train", str(cfg), "--run-dir", str(run_c), "--init", str(pre_run)])
    from_dir = _export(run_c, tmp_path / "c.pt")
    assert all(torch.equal(from_dir[k], tuned[k]) for k in tuned)

    # Resume from step 2 of run a into a new run, the init file gone: bitwise the uninterrupted run.
    (tmp_path / "pre.pt").rename(tmp_path / "moved.pt")
    run_b = tmp_path / "b"
    run_job(1, ["train", str(cfg), "--run-dir", str(run_b), "--init", str(tmp_path / "pre.pt"),
                "--resume", str(run_a / "checkpoints" / "step_00000002")])
    assert not _events(run_b, "init") and _events(run_b, "resume")
    resumed = _export(run_b, tmp_path / "b.pt")
    assert all(torch.equal(resumed[k], tuned[k]) for k in tuned)


def test_init_refuses_another_network_before_training(tmp_path, tiny_mri, tiny_ct):
    pre_run = tmp_path / "pre"
    run_job(1, ["train", str(write_config(tmp_path / "pre.yaml", tiny_config(tiny_mri, run={"max_steps": 1}))),
                "--run-dir", str(pre_run)])
    wide = write_config(tmp_path / "wide.yaml", tiny_config(tiny_mri, model={"widths": [8, 16]}))
    proc = run_job(1, ["train", str(wide), "--run-dir", str(tmp_path / "w"), "--init", str(pre_run)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.widths: [4, 8] there, [8, 16] here" in proc.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()
    ct = write_config(tmp_path / "ct.yaml", tiny_config(tiny_ct, model={"widths": [4, 8], "initial": "fbp"}))
    proc = run_job(1, ["train", str(ct), "--run-dir", str(tmp_path / "x"), "--init", str(pre_run)], check=False)
    assert proc.returncode == 2 and "modality: mri there, ct here" in proc.stderr, proc.stderr[-2000:]
    proc = run_job(1, ["train", str(wide), "--run-dir", str(tmp_path / "y"), "--init", str(tmp_path / "none.pt")],
                   check=False)
    assert proc.returncode == 2 and "no such file or run directory" in proc.stderr, proc.stderr[-2000:]


def test_architecture_check_ignores_memory_settings_and_names_every_mismatch():
    base = ModelConfig(widths=[4, 8])
    payload = {"modality": "mri", "channels": 2, "model_config": base.model_dump(mode="json")}
    same_function = ModelConfig(widths=[4, 8], activation_checkpointing="level",
                                tile={"shape": [8, 16, 16]}, freeze=["encoder"], init="x.pt")
    check_architecture(payload, same_function, modality="mri", channels=2, source="x.pt")
    with pytest.raises(ConfigError) as err:
        check_architecture(payload, ModelConfig(widths=[4, 8, 16], activation="silu"), modality="mri",
                           channels=2, source="x.pt")
    text = str(err.value)
    assert "model.widths: [4, 8] there, [4, 8, 16] here" in text and "model.activation: 'relu' there" in text


def test_freeze_names_parts_and_refuses_unknown_or_everything():
    from pipeline.train.build import ScanFacts, build_model

    model = build_model(ModelConfig(widths=[4, 8]), ScanFacts("mri", "cartesian", None, 2))
    frozen = apply_freeze(model, ["encoder", "head"])
    assert frozen and all(".encoders." in n or ".head." in n for n in frozen)
    assert all(p.requires_grad == (n not in frozen) for n, p in model.backbone.named_parameters(prefix="backbone"))
    with pytest.raises(ConfigError, match="names no parameter"):
        apply_freeze(model, ["bottleneck_xyz"])
    with pytest.raises(ConfigError, match="freezes every parameter"):
        apply_freeze(build_model(ModelConfig(widths=[4, 8]), ScanFacts("mri", "cartesian", None, 2)), ["backbone"])
