"""Package-level contracts: operators3d's import boundary, the CLI, the quickstart."""

import json
import subprocess
import sys

from pipeline.cli import main


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
    out = tmp_path / "qs"
    rc = main(["quickstart", "--out", str(out), "--shape", "6", "48", "40", "--coils", "4",
               "--calibration", "12"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    zf = report["metrics"]["zero-filled"]["psnr_db_in_object"]
    assert report["metrics"]["SENSE"]["psnr_db_in_object"] > zf
    assert (out / "slices.png").stat().st_size > 10_000
    assert (out / "report.md").read_text().startswith("# recon3d quickstart report")


def test_cli_bad_argument_is_a_clear_error(tmp_path, capsys):
    rc = main(["quickstart", "--out", str(tmp_path), "--acceleration", "0.5"])
    assert rc == 2
    assert "acceleration must be >= 1" in capsys.readouterr().err
