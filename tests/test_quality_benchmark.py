"""benchmarks/quality.py reads the shipped recipes (one source of truth) and reports the tuning
and held-out volume sets separately, per volume, with the network's own input and a dB/step curve."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _run(tmp_path, *extra):
    import quality

    out = tmp_path / "q.json"
    quality.main(["--modality", "ct", "--shape", "4", "32", "32", "--steps", "3", "--volumes", "1",
                  "--train-volumes", "1", "--held-out", "anatomy@4x32x32", "--methods", "fbp", "rei", "supervised",
                  "--curve-every", "3", "--scratch", str(tmp_path / "scr"), "--json", str(out), *extra])
    return json.loads(out.read_text())


def test_quality_reads_the_shipped_recipes_and_reports_both_sets(tmp_path, capsys):
    res = _run(tmp_path)["ct"]
    tuning, held = res["sets"]["tuning"], res["sets"]["held_out"]
    assert held["rei"]["volumes"] == ["anatomy 4x32x32"] and tuning["rei"]["volumes"] == ["ellipsoids 201"]
    assert held["rei"]["labels"][0].startswith("ct_rei.yaml, 3 steps")
    assert held["fbp"]["labels"][0].endswith("(oracle)")
    # the recipe starts at its input (model.start_at_initial in ct_rei.yaml): step 0 of the curve
    # is the input's PSNR
    first = res["curves"]["rei"][0]
    assert first["step"] == 0
    inputs = tuning["rei"]["input_psnr_per_volume"] + held["rei"]["input_psnr_per_volume"]
    assert first["psnr_per_volume"] == pytest.approx(inputs, abs=1e-3)
    assert "anatomy 4x32x32" in res["targets"]["held_out"]
    assert "held-out set" in capsys.readouterr().out

    # the benchmark builds what the file says: another learning rate in a copy of the recipes
    # gives another network
    recipes = tmp_path / "recipes"
    shutil.copytree(ROOT / "launch" / "configs", recipes)
    text = (recipes / "ct_rei.yaml").read_text().replace("lr: 1.0e-3", "lr: 1.0e-1")
    (recipes / "ct_rei.yaml").write_text(text)
    other = _run(tmp_path, "--recipe-dir", str(recipes))["ct"]["sets"]["held_out"]["rei"]["psnr"]
    assert other != pytest.approx(held["rei"]["psnr"], abs=1e-4)


def test_per_scan_alone_reports_without_classical_rows(tmp_path, capsys):
    """``--per-scan --no-transfer`` with learned methods only: the transfer sets are empty and
    are skipped, not a crash after the training (it was, with a StopIteration)."""
    import quality

    out = tmp_path / "q.json"
    quality.main(["--modality", "ct", "--shape", "4", "32", "32", "--steps", "2", "--volumes", "1",
                  "--train-volumes", "1", "--held-out", "anatomy@4x32x32", "--methods", "supervised",
                  "--per-scan", "--no-transfer", "--scratch", str(tmp_path / "scr"), "--json", str(out)])
    res = json.loads(out.read_text())["ct"]
    assert res["per_scan"]["supervised"]["volumes"] == ["anatomy 4x32x32"]
    assert "per scan" in capsys.readouterr().out


def test_a_held_out_volume_keeps_its_seed_whatever_else_is_selected():
    import argparse

    import quality

    every = quality.held_out_specs(argparse.Namespace(held_out=["all"], shape=(16, 128, 128)))
    alone = quality.held_out_specs(argparse.Namespace(held_out=["organs"], shape=(16, 128, 128)))
    assert alone == [s for s in every if s[0] == "organs"] and alone[0][2] == quality.HELD_OUT_SEED + 4
