"""benchmarks/finetune.py (issue 18.1): pretrain, export, fine-tune a new scan from the export and
from scratch; its tables agree with its JSON, the fine-tuned run starts at the exported model and
the three targets are judged from the curves as the issue states them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _curve(step_psnr):
    return [{"step": s, "psnr": p, "ssim": 0.5} for s, p in step_psnr]


def test_targets_follow_the_issue():
    import finetune

    scratch = _curve([(0, 20.0), (10, 24.0), (20, 25.0), (50, 26.0), (100, 27.0)])
    fine = _curve([(0, 25.0), (10, 26.5), (20, 27.2), (50, 27.4), (100, 27.6)])
    t = finetune.targets(scratch, fine, zero_shot=25.0, n=100)
    assert t["steps_to_reach_scratch"] == 20 and t["reach_within_fifth"]
    assert t["gain_db"] == pytest.approx(0.6) and t["gain_met"]
    assert t["never_below_zero_shot"] and t["margin_over_zero_shot_db"] == pytest.approx(0.0)

    slow = _curve([(0, 25.0), (10, 24.9), (20, 26.0), (50, 27.1), (100, 27.3)])
    t = finetune.targets(scratch, slow, zero_shot=25.0, n=100)
    assert t["steps_to_reach_scratch"] == 50 and not t["reach_within_fifth"]
    assert not t["gain_met"] and not t["never_below_zero_shot"]
    assert t["margin_over_zero_shot_db"] == pytest.approx(-0.1)
    never = _curve([(0, 25.0), (10, 25.0), (20, 25.0), (50, 25.0), (100, 25.0)])
    assert finetune.targets(scratch, never, zero_shot=25.0, n=100)["steps_to_reach_scratch"] is None
    assert finetune.eval_steps(100) == [0, 10, 20, 50, 100] and finetune.eval_steps(3) == [0, 1, 2, 3]


def test_pretraining_phantoms_cycle_and_never_include_a_held_out_one():
    import finetune

    args = SimpleNamespace(pretrain_phantoms=finetune.parse_pretrain_phantoms("ellipsoids, foam"), pretrain_volumes=5)
    assert finetune.pretrain_scans(args) == [("ellipsoids", 101), ("foam", 102), ("ellipsoids", 103),
                                             ("foam", 104), ("ellipsoids", 105)]
    for bad in ("ellipsoids,anatomy", "organs-crop", "no-such-phantom", " , "):
        with pytest.raises(SystemExit, match="pretrain-phantoms"):
            finetune.parse_pretrain_phantoms(bad)
    # self-supervised pretraining reads no reference, so earlier scans of the held-out kind may serve
    assert finetune.parse_pretrain_phantoms("anatomy", self_supervised=True) == ["anatomy"]
    with pytest.raises(SystemExit, match="unknown phantom"):
        finetune.parse_pretrain_phantoms("no-such-phantom", self_supervised=True)


def test_self_supervised_pretraining_takes_the_scratch_loss_and_no_reference():
    import finetune
    import quality
    import torch

    args = SimpleNamespace(recipe_dir=str(ROOT / "launch" / "configs"), set=[], finetune_set=[],
                           pretrain_steps=7, pretrain_with="self-supervised")
    label, path, cfg = finetune.pretrain_recipe("ct", args)
    _, sup = finetune.recipe("ct", "pretrain", 7, args)
    _, scratch = finetune.recipe("ct", "scratch", 7, args)
    assert path.name == "pretrain_ct_supervised.yaml" and "ct_rei.yaml" in label
    assert cfg.model == sup.model and cfg.loss == scratch.loss and cfg.run.max_steps == 7
    assert [t.name for t in sup.loss.terms] == ["supervised"] != [t.name for t in cfg.loss.terms]
    vol = quality.Volume("v", torch.zeros(2, 3), None, torch.ones(2, 4, 4), "ct")
    (blind,) = finetune.without_references([vol])
    assert blind.reference.shape == (2, 4, 4) and torch.isnan(blind.reference).all()
    assert torch.equal(vol.reference, torch.ones(2, 4, 4)) and blind.y is vol.y


def _table(text: str, *parts: str) -> list[list[str]]:
    """The body rows of the one Markdown table whose ``## `` title contains every one of ``parts``."""
    sections = [sec for sec in text.split("\n## ")[1:] if all(p in sec.splitlines()[0] for p in parts)]
    assert len(sections) == 1, (parts, [sec.splitlines()[0] for sec in text.split("\n## ")[1:]])
    lines = [line for line in sections[0].splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def test_quick_run_reports_consistent_tables(tmp_path):
    out = tmp_path / "f.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "finetune.py"), "--quick",
                           "--scratch", str(tmp_path / "scr"), "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    text = proc.stdout
    for modality, title in (("mri", "MRI, 8 coils"), ("ct", "CT, parallel beam")):
        r = res[modality]
        assert r["recipes"] == {"pretrain": f"pretrain_{modality}_supervised.yaml",
                                "scratch": f"{modality}_rei.yaml", "finetune": f"finetune_{modality}_rei.yaml"}
        assert r["export"].startswith(f"pretrained_{modality}_") and (tmp_path / "scr" / r["export"]).is_file()
        steps = [c["step"] for c in r["scratch"]]
        assert steps == [c["step"] for c in r["finetune"]] == [0, 1, 2, 5, 10] and r["steps"] == 10
        # the scratch run starts at its input (start_at_initial; MRI's unrolled network adds a CG
        # data-consistency step after it), the fine-tuned one at the exported pretrained model
        # (the zero-shot figure), which pretraining moved off the scratch run's start
        if modality == "ct":
            assert r["scratch"][0]["psnr"] == pytest.approx(r["input"]["psnr"], abs=1e-4)
        assert r["finetune"][0]["psnr"] == pytest.approx(r["zero_shot"]["psnr"], abs=1e-4)
        assert r["finetune"][0]["ssim"] == pytest.approx(r["zero_shot"]["ssim"], abs=1e-5)
        assert abs(r["finetune"][0]["ssim"] - r["scratch"][0]["ssim"]) > 1e-6
        assert r["new_scan"] == "anatomy 301"

        table = _table(text, title, f"new scan {r['new_scan']}")
        assert [int(row[0]) for row in table] == steps
        for row, s, f in zip(table, r["scratch"], r["finetune"]):
            assert row[1] == f"{s['psnr']:.2f} / {s['ssim']:.4f}" and row[2] == f"{f['psnr']:.2f} / {f['ssim']:.4f}"
            assert row[3] == f"{r['zero_shot']['psnr']:.2f}"
            assert float(row[4]) == pytest.approx(f["psnr"] - s["psnr"], abs=0.011)

        # the verdicts, recomputed here from the curves
        t = r["targets"]
        end_s, end_f = r["scratch"][-1]["psnr"], r["finetune"][-1]["psnr"]
        reach = next((c["step"] for c in r["finetune"] if c["psnr"] >= end_s), None)
        assert t["steps_to_reach_scratch"] == reach and t["reach_within_fifth"] == (reach is not None and reach <= 2)
        assert t["gain_db"] == pytest.approx(end_f - end_s) and t["gain_met"] == (end_f - end_s >= 0.5)
        low = min(c["psnr"] for c in r["finetune"])
        assert t["never_below_zero_shot"] == (low >= r["zero_shot"]["psnr"])
        verdicts = [row[-1] for row in _table(text, title, "targets of issue 18.1")]
        want = [t["reach_within_fifth"], t["gain_met"], t["never_below_zero_shot"]]
        assert verdicts == ["MET" if ok else "not met" for ok in want]


def test_tuning_scan_is_labelled_and_the_scratch_curve_is_reused(tmp_path):
    """--tune-on runs on a tuning-family scan, says so in table and JSON; --finetune-set changes the
    fine-tuning recipe only, so a second run reuses the cached scratch curve; bad --tune-on values
    are refused."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, str(ROOT / "benchmarks" / "finetune.py"), "--quick", "--modality", "ct",
            "--scratch", str(tmp_path / "scr")]
    runs = []
    for lr in ("1e-4", "3e-5"):
        out = tmp_path / f"t{lr}.json"
        proc = subprocess.run(base + ["--tune-on", "ellipsoids:201", "--finetune-set", f"optimizer.lr={lr}",
                                      "--json", str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((json.loads(out.read_text())["ct"], proc.stdout))
    (first, text1), (second, text2) = runs
    assert first["new_scan_role"] == "tuning" and first["new_scan"] == "ellipsoids 201"
    assert first["finetune_set"] == ["optimizer.lr=1e-4"]
    assert "TUNING scan" in text1 and "held out)" not in text1
    assert first["train_s"]["scratch"] is not None and second["train_s"]["scratch"] is None  # reused
    assert second["scratch"] == first["scratch"]
    assert second["finetune"] != first["finetune"]  # another learning rate, another curve
    assert "reusing the from-scratch curve" in text2
    for bad in ("anatomy:201", "ellipsoids:101", "ellipsoids"):
        proc = subprocess.run(base + ["--tune-on", bad], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=120)
        assert proc.returncode != 0 and "--tune-on" in (proc.stderr + proc.stdout)


def test_held_out_seed_names_the_new_scan_and_refuses_a_pretraining_scan(tmp_path):
    """--held-out-seed picks another held-out scan (labelled with its seed in the JSON); a seed
    that one of the pretraining scans already has is refused before any training."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, str(ROOT / "benchmarks" / "finetune.py"), "--quick", "--modality", "ct",
            "--scratch", str(tmp_path / "scr")]
    out = tmp_path / "h.json"
    proc = subprocess.run(base + ["--held-out-seed", "302", "--json", str(out)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["ct"]
    assert res["new_scan"] == "anatomy 302" and res["new_scan_role"] == "held-out"
    assert "new scan anatomy 302" in proc.stdout
    proc = subprocess.run(base + ["--pretrain-with", "self-supervised", "--pretrain-phantoms", "anatomy",
                                  "--held-out-seed", "101"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "one of the pretraining scans" in (proc.stderr + proc.stdout)
