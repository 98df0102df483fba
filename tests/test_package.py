"""Package-level contracts: operators3d's import boundary, the CLI, the quickstart."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_operators3d_imports_nothing_from_pipeline_or_heavy_stacks():
    code = (
        "import sys, operators3d, operators3d.testing\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'pipeline', 'deepspeed', 'dask', 'zarr', 'numcodecs', 'scipy'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_names():
    import operators3d

    for name in ("LinearOperator", "MultiCoilMRI", "sense_cg", "poisson_disc_mask",
                 "simulate_coil_maps", "estimate_coil_maps"):
        assert hasattr(operators3d, name), name
    assert set(operators3d.__all__) <= set(dir(operators3d))


def test_cli_help(capsys):
    assert main([]) == 0
    assert "quickstart" in capsys.readouterr().out


def test_quickstart_small(tmp_path):
    """The main job at reduced size: simulate → baseline → train on 2 processes (torchrun) →
    reconstruct → evaluate → report, every file in place; a rerun resumes and redoes nothing."""
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--shape", "8", "32", "32", "--angles", "24",
            "--steps", "3", "--nproc", "2", "--no-progress", "--set", "model.widths=[4,8]"]
    rc = main(args)
    assert rc in (0, 3)  # 3: the network (3 steps) does not beat the baseline
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {"network (self-supervised)", "fbp (baseline)", "tv (baseline)"}
    assert all(m["psnr"] > 5 and 0 < m["ssim"] <= 1 for m in summary["metrics"].values())
    assert summary["beats_baseline"] == (rc == 0)
    # TV, the strongest classical method on this phantom, is shown and compared, with its auto parameters
    psnr = {k: m["psnr"] for k, m in summary["metrics"].items()}
    assert summary["best_classical"] == max(("fbp (baseline)", "tv (baseline)"), key=psnr.get)
    # "beats" is a higher PSNR and a higher SSIM, both
    net = summary["metrics"]["network (self-supervised)"]
    assert summary["beats_best_classical"] == all(
        net["psnr"] > m["psnr"] and net["ssim"] > m["ssim"] for k, m in summary["metrics"].items() if k != "network (self-supervised)")
    base = summary["metrics"]["fbp (baseline)"]
    assert summary["beats_baseline"] == (net["psnr"] > base["psnr"] and net["ssim"] > base["ssim"])
    readme = (out / "README.md").read_text()
    assert " TV (" in readme and " FBP (" in readme
    # what a user without a reference is told: an estimate beside each true PSNR (TV's excepted)
    assert set(summary["estimates"]) == {"network (self-supervised)", "fbp (baseline)"}
    for e in summary["estimates"].values():
        assert e["estimated_psnr_low"] <= e["estimated_psnr"] <= e["estimated_psnr_high"]
    assert "estimated PSNR without the reference" in readme
    assert "chosen" in json.loads((out / "tv.ome.zarr" / "zarr.json").read_text())["attributes"]["recon3d"]["calibration"]
    for key in ("scan", "run", "network", "baseline", "report", "training_report"):
        assert Path(summary["files"][key]).exists(), key
    assert list((out / "report").glob("*.png")) and list((out / "report" / "training").glob("*.png"))
    assert (out / "run" / "export" / "model.pt").is_file()
    assert "quickstart" in (out / "README.md").read_text()
    steps = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    starts = [e for e in steps if e.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2
    # Rerun: everything is reused (the scan, both reconstructions, the finished training).
    assert main(args) == rc
    steps = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for e in steps if "loss" in e and "event" not in e) == 3


def test_quickstart_mri_small(tmp_path):
    """The MRI path (robust EI, unrolled CG data consistency on SENSE) against SENSE."""
    out = tmp_path / "qs"
    rc = main(["quickstart", "--modality", "mri", "--out", str(out), "--shape", "8", "48", "48",
               "--calibration", "8", "--steps", "2", "--nproc", "2", "--no-progress",
               "--set", "model.widths=[4,8]"])
    assert rc in (0, 3)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["metrics"]) == {"network (self-supervised)", "sense (baseline)", "tv (baseline)"}
    assert all(m["psnr"] > 5 for m in summary["metrics"].values())
    assert set(summary["estimates"]) == {"network (self-supervised)", "sense (baseline)"}
    assert all(e["of"] == "the complex image" for e in summary["estimates"].values())
    cfg = yaml.safe_load((out / "train.yaml").read_text())
    shipped = yaml.safe_load((ROOT / "launch" / "configs" / "mri_rei.yaml").read_text())
    # one source of truth: the quickstart trains the shipped recipe (its loss and network)
    assert cfg["loss"] == shipped["loss"] and cfg["model"]["reconstructor"] == "unrolled"
    assert {k: v for k, v in cfg["model"].items() if k != "widths"} == \
        {k: v for k, v in shipped["model"].items() if k != "widths"}


def test_cli_bad_argument_is_a_clear_error(tmp_path, capsys):
    rc = main(["quickstart", "--out", str(tmp_path), "--modality", "mri", "--acceleration", "0.5"])
    assert rc == 2
    assert "acceleration must be >= 1" in capsys.readouterr().err


_WITHOUT_EXTRAS = """
import sys
BLOCKED = ("deepspeed", "matplotlib", "tensorboard", "distributed", "tqdm")
for name in BLOCKED:
    sys.modules[name] = None  # import raises ModuleNotFoundError, find_spec says "not installed"
from pipeline.cli import main
rc = main(sys.argv[1:])
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in BLOCKED)
assert not loaded, loaded
sys.exit(rc)
"""


def _bare(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``recon3d ARGS`` as after ``pip install recon3d`` alone: the extras' packages cannot be imported."""
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_core_works_without_the_extras_and_commands_that_need_one_name_it(tmp_path):
    """``pip install recon3d`` gives operators3d, the data layer, classical reconstruction and
    evaluation; training, pictures and dask clusters are extras, named when missing."""
    for args in (["simulate", "ct", "--shape", "4", "24", "24", "--angles", "12", "--seed", "0", "--no-progress",
                  "--out", "scan.zarr"],
                 ["inspect", "scan.zarr", "--check"],
                 ["reconstruct", "--method", "fbp", "--scan", "scan.zarr", "--out", "fbp.ome.zarr", "--no-progress"],
                 ["evaluate", "fbp.ome.zarr", "--reference", "scan.zarr"]):
        proc = _bare(args, tmp_path)
        assert proc.returncode == 0, (args, proc.stderr[-3000:])
    proc = _bare(["report", "fbp.ome.zarr", "--out", "rep"], tmp_path)
    assert proc.returncode == 1 and "pip install 'recon3d[report]'" in proc.stderr, proc.stderr[-3000:]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": {"scans": ["scan.zarr"]}, "run": {"max_steps": 1}}))
    proc = _bare(["train", "c.yaml", "--run-dir", "run"], tmp_path)
    assert proc.returncode == 1 and "pip install 'recon3d[train]'" in proc.stderr, proc.stderr[-3000:]
