"""Model selection without a reference: ``validation.estimate`` reports the reference-free error
estimate (and the classical baseline's, warning when the network is estimated worse),
``checkpoint.keep_best`` keeps the best validation's checkpoint out of the pruning, and
``recon3d reconstruct --model RUN --pick best`` reconstructs with it."""

from __future__ import annotations

import json

import pytest

from conftest import run_job, tiny_config, write_config

from pipeline.train import ConfigError, load_config


def _events(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


SELECT = dict(validation={"every": 2, "max_slabs": 1, "estimate": True, "estimate_draws": 2, "estimate_folds": 1},
              checkpoint={"every": 100, "keep_last": 1, "keep_best": "estimate"}, run={"max_steps": 6, "seed": 0})


@pytest.mark.parametrize("nproc", [1, 2])
def test_keep_best_by_the_estimate_and_reconstruct_picks_it(tmp_path, tiny_ct, nproc):
    cfg = tiny_config(tiny_ct, **SELECT)
    cfg["validation"]["scans"] = [tiny_ct]
    run = tmp_path / "run"
    run_job(nproc, ["train", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir", str(run)])
    events = _events(run)
    validations = [e for e in events if e.get("event") == "validation"]
    assert [v["step"] for v in validations] == [2, 4, 6]
    for v in validations:
        assert {"estimated_psnr", "estimated_mse", "baseline_estimated_psnr", "baseline_method"} <= set(v)
        assert v["baseline_method"] == "fbp (auto)"
    # the baseline does not change with training: computed once, the same at every validation
    assert len({v["baseline_estimated_mse"] for v in validations}) == 1
    # a warning exactly where the network is estimated worse than the baseline
    warned = {e["step"] for e in events if e.get("event") == "warning" and e.get("what") == "below_baseline"}
    assert warned == {v["step"] for v in validations if v["estimated_mse"] > v["baseline_estimated_mse"]}
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    winner = min(validations, key=lambda v: v["estimated_mse"])
    assert best["step"] == winner["step"] and best["metric"] == "estimated_mse"
    assert best["value"] == pytest.approx(winner["estimated_mse"])
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*") if not p.name.endswith(".universal"))
    assert best["tag"] in kept and "step_00000006" in kept  # keep_last 1 keeps the latest, and the best besides
    assert len(kept) == (1 if best["tag"] == "step_00000006" else 2)
    if nproc == 2:
        return
    out = tmp_path / "best.ome.zarr"
    run_job(1, ["reconstruct", "--model", str(run), "--pick", "best", "--scan", tiny_ct, "--out", str(out),
                "--no-progress"])
    exported = run / "export" / "best.pt"
    import torch

    assert torch.load(exported, map_location="cpu", weights_only=False)["step"] == best["step"]
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]["recon3d"]
    assert attrs["pick"] == "best" and attrs["settings"]["reconstructor"]["model"]["step"] == best["step"]


def test_keep_best_needs_what_it_ranks_by(tmp_path, tiny_ct):
    with pytest.raises(ConfigError, match="keep_best: estimate needs validation.estimate"):
        load_config(tiny_config(tiny_ct, validation={"scans": [tiny_ct]}, checkpoint={"keep_best": "estimate"}))
    with pytest.raises(ConfigError, match="picks among validations; give validation.scans"):
        load_config(tiny_config(tiny_ct, checkpoint={"keep_best": "loss"}))


def test_pick_best_of_a_run_without_one_is_refused(tmp_path, tiny_ct):
    cfg = tiny_config(tiny_ct, run={"max_steps": 2, "seed": 0})
    run = tmp_path / "run"
    run_job(1, ["train", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir", str(run)])
    proc = run_job(1, ["reconstruct", "--model", str(run), "--pick", "best", "--scan", tiny_ct, "--out",
                       str(tmp_path / "o.ome.zarr"), "--no-progress"], check=False)
    assert proc.returncode != 0 and "has no best checkpoint" in proc.stderr and "keep_best" in proc.stderr
