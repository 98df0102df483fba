"""Experiment configs: validation errors that name the key, overrides, the resolved file; and
the errors a run gives before its first step (missing scan, checkpoint of another model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_job, tiny_config, write_config

from pipeline.train import CheckpointError, ConfigError, dump_config, load_config
from pipeline.train.build import learning_rate
from pipeline.train.distributed import DistContext

CONFIGS = sorted((ROOT / "launch" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_validate(path):
    cfg = load_config(path)
    assert load_config(dict(__import__("yaml").safe_load(dump_config(cfg)))) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_scan_command_in_each_example_makes_a_scan_it_trains_on(path, tmp_path):
    """Each example config names the command that makes its scan: that scan must fit the config
    (its slabs aligned to the scan's chunks), or a user following the file is refused at once."""
    import shlex

    from pipeline.cli import main
    from pipeline.data import open_scan

    line = next(l for l in path.read_text().splitlines() if l.startswith("#") and "recon3d simulate" in l)
    args = shlex.split(line.split("recon3d", 1)[1])
    out = args.index("--out") + 1
    args[out] = str(tmp_path / "scan.zarr")
    assert main([*args, "--no-progress"]) == 0
    cfg = load_config(path)
    assert open_scan(args[out]).slab_slices(cfg.data.slab_thickness)


def test_errors_name_each_bad_key_and_what_is_allowed(tmp_path):
    raw = tiny_config("scan.zarr")
    raw["model"]["widthz"] = [4]
    raw["optimizer"]["name"] = "adamm"
    raw["loss"]["terms"][1]["transform"] = "spin"
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path / "bad.yaml", raw))
    text = str(err.value)
    assert "model.widthz: unknown key (allowed: backbone, widths" in text
    assert "optimizer.name: Input should be 'adam', 'adamw' or 'sgd' (got 'adamm')" in text
    assert "loss.terms.1.transform: Input should be 'rotate90'" in text and "'spin'" in text
    assert str(tmp_path / "bad.yaml") in text


def test_missing_required_and_cross_field_checks():
    with pytest.raises(ConfigError, match="data: required key is missing"):
        load_config({})
    with pytest.raises(ConfigError, match="offload_param needs zero_stage 3"):
        load_config(tiny_config("s.zarr", deepspeed={"offload_param": True, "zero_stage": 2}))
    two_splits = tiny_config("s.zarr")
    two_splits["loss"] = {"terms": [{"name": "ssdu"}, {"name": "n2i"}]}
    with pytest.raises(ConfigError, match="at most one splitting term"):
        load_config(two_splits)
    with pytest.raises(ConfigError, match="not valid YAML"):
        bad = Path(__file__).with_name("_bad.yaml")
        try:
            bad.write_text("run: [\n")
            load_config(bad)
        finally:
            bad.unlink()


def test_overrides_parse_yaml_values():
    cfg = load_config(tiny_config("a.zarr"), ["optimizer.lr=3e-4", "data.scans=[b.zarr, c.zarr]",
                                              "loss.terms.1.transform=reflect", "deepspeed.zero_stage=3"])
    assert cfg.optimizer.lr == 3e-4 and cfg.data.scans == ["b.zarr", "c.zarr"]
    assert cfg.loss.terms[1].transform == "reflect" and cfg.deepspeed.zero_stage == 3
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(tiny_config("a.zarr"), ["optimizer.lr"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(tiny_config("a.zarr"), ["loss.terms.9.weight=2"])


def test_activation_checkpointing_keys_are_named_apart_from_saving_and_old_names_still_read():
    raw = tiny_config("scan.zarr")
    raw["model"]["activation_checkpointing"] = "level"
    raw["model"]["tile"] = {"shape": [4, 8, 8], "activation_checkpointing": False}
    new = load_config(raw)
    assert new.model.activation_checkpointing == "level" and new.model.tile.activation_checkpointing is False

    old = tiny_config("scan.zarr")
    old["model"]["checkpoint"] = "level"
    old["model"]["tile"] = {"shape": [4, 8, 8], "checkpoint": False}
    with pytest.warns(FutureWarning, match=r"model\.checkpoint is renamed model\.activation_checkpointing"):
        assert load_config(old) == new
    # the resolved file carries the new names only
    assert "activation_checkpointing: level" in dump_config(new) and "checkpoint: level" not in dump_config(new)

    both = tiny_config("scan.zarr")
    both["model"]["checkpoint"] = "level"
    both["model"]["activation_checkpointing"] = "none"
    with pytest.raises(ConfigError, match="give only activation_checkpointing"):
        load_config(both)


def test_learning_rate_schedule():
    cfg = load_config(tiny_config("a.zarr", run={"max_steps": 110},
                                  schedule={"name": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}))
    lrs = [learning_rate(cfg, s) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4, rel=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def _ctx() -> DistContext:
    return DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


def test_missing_scan_is_a_config_error(tmp_path):
    from pipeline.train import Trainer

    cfg = load_config(tiny_config(str(tmp_path / "nowhere.zarr")))
    with pytest.raises(ConfigError, match=r"data.scans\[0\]: cannot open scan .*nowhere.zarr"):
        Trainer(cfg, tmp_path / "run", _ctx())
    # Through the command: exit status 2, the message, no traceback, no run directory.
    proc = run_job(1, ["train", str(write_config(tmp_path / "c.yaml", tiny_config(str(tmp_path / "x.zarr")))),
                       "--run-dir", str(tmp_path / "run")], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "cannot open scan" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_another_model_is_refused_before_training(tmp_path, tiny_mri):
    from pipeline.train import Trainer

    run = tmp_path / "run"
    cfg = tiny_config(tiny_mri, run={"max_steps": 1}, validation={"scans": [tiny_mri], "every": 1, "max_slabs": 2},
                      logging={"tensorboard": True})
    run_job(1, ["train", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir", str(run)])
    # The run logged its step, a validation against the reference and TensorBoard events.
    lines = [__import__("json").loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    validation = [x for x in lines if x.get("event") == "validation"]
    assert len(validation) == 1 and validation[0]["psnr"] > 10 and 0 < validation[0]["ssim"] <= 1
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(run / "config.resolved.yaml") == load_config(cfg)
    other = load_config(tiny_config(tiny_mri, model={"widths": [4, 16]}))
    trainer = Trainer(other, run, _ctx())
    with pytest.raises(CheckpointError, match=r"holds another model: widths: checkpoint \[4, 8\], config \[4, 16\]"):
        trainer.find_resume("auto")
    # Same config: found; an interrupted save (no manifest) is not resumable.
    same = Trainer(load_config(tiny_config(tiny_mri)), run, _ctx())
    info = same.find_resume("auto")
    assert info.step == 1 and info.world_size == 1
    (info.path / "recon3d" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        same.find_resume(str(info.path))


def test_bf16_engine_trains_and_exports_fp32(tmp_path, tiny_mri):
    """bf16 under DeepSpeed (ZeRO-2): the network runs in bf16, the operators in complex64, and
    the export holds fp32 weights that run without DeepSpeed."""
    from pipeline.data import open_scan
    from pipeline.train import load_exported, read_metrics

    run = tmp_path / "run"
    cfg = tiny_config(tiny_mri, run={"max_steps": 2}, deepspeed={"precision": "bf16"})
    run_job(1, ["train", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir", str(run)])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(run / "metrics.jsonl"))
    run_job(1, ["export", str(run)])
    model = load_exported(run / "export" / "model.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    y, op = open_scan(tiny_mri).slab(slice(0, 2))
    with torch.no_grad():
        assert model(y[None], op).dtype == torch.complex64


@pytest.mark.parametrize("case", ["mri-ssdu-unrolled", "ct-n2i", "ct-ei-tiled", "ct-rei-image"])
def test_each_loss_family_trains_under_the_engine(tmp_path, tiny_mri, tiny_ct, case):
    """Splitting losses find their adapted model inside the DeepSpeed engine; CT with FBP."""
    from pipeline.train import read_metrics

    if case == "mri-ssdu-unrolled":
        cfg = tiny_config(tiny_mri, loss={"terms": [{"name": "ssdu", "rho": 0.4}]},
                          model={"backbone": "dncnn", "dncnn_width": 4, "dncnn_depth": 2,
                                 "reconstructor": "unrolled", "unrolled": {"iterations": 2}})
    elif case == "ct-n2i":
        cfg = tiny_config(tiny_ct, loss={"terms": [{"name": "n2i", "num_splits": 4}]},
                          model={"initial": "fbp"})
    elif case == "ct-rei-image":  # robust EI with the image-domain SURE, on a Hann FBP
        cfg = tiny_config(tiny_ct, model={"initial": "fbp", "fbp_filter": "hann"},
                          loss={"terms": [{"name": "sure", "metric": "image"},
                                          {"name": "ei", "transform": "rotate", "noise": True}]})
    else:
        cfg = tiny_config(tiny_ct, model={"initial": "fbp", "tile": {"shape": [2, 16, 16], "overlap": 4}},
                          loss={"terms": [{"name": "mc"}, {"name": "ei", "transform": "rotate90"}]})
    cfg["run"]["max_steps"] = 2
    run = tmp_path / "run"
    run_job(1, ["train", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir", str(run)])
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("backbone", ["unet", "dncnn"])
def test_start_at_initial_makes_the_network_its_initial_estimate(tiny_ct, backbone):
    """``model.start_at_initial``: the residual backbone's last convolution is zeroed, so the
    untrained model returns exactly its initial estimate (FBP here); without it, it does not."""
    from pipeline.data import open_scan
    from pipeline.models.operator_steps import initial_estimate
    from pipeline.train.build import build_model, scan_facts

    facts = scan_facts([tiny_ct])
    y, op = open_scan(tiny_ct).slab(slice(0, 4))
    y = y.unsqueeze(0)
    outputs = {}
    for start in (True, False):
        cfg = load_config(tiny_config(tiny_ct, model={"backbone": backbone, "initial": "fbp", "fbp_filter": "hann",
                                                      "widths": [4, 8], "dncnn_width": 4,
                                                      "start_at_initial": start}))
        torch.manual_seed(0)
        with torch.no_grad():
            outputs[start] = build_model(cfg.model, facts)(y, op)
    x0 = initial_estimate(y, op, "fbp", fbp_filter="hann")
    torch.testing.assert_close(outputs[True], x0, rtol=1e-5, atol=1e-6 * float(x0.abs().max()))
    assert (outputs[False] - x0).abs().max() > 1e-3 * x0.abs().max()
    with pytest.raises(ConfigError, match="start_at_initial needs residual"):
        load_config(tiny_config(tiny_ct, model={"start_at_initial": True, "residual": False}))
