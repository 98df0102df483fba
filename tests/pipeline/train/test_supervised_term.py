"""The supervised loss term of a config: the gap to supervised, measured through ``recon3d train``.

``{name: supervised}`` trains against the scan's ``reference`` array (MSE or L1); a scan without
one is refused before training, naming it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import zarr

from conftest import run_job, tiny_config, write_config

from pipeline.train import ConfigError, Trainer, load_config
from pipeline.train.distributed import DistContext


def _ctx() -> DistContext:
    import torch

    return DistContext(rank=0, world_size=1, local_rank=0, backend=None, device=torch.device("cpu"))


def _without_reference(scan: str, dest) -> str:
    shutil.copytree(scan, dest)
    group = zarr.open_group(str(dest), mode="r+")
    del group["reference"]
    return str(dest)


def test_supervised_term_trains_against_the_reference(tmp_path, tiny_ct):
    cfg = tiny_config(tiny_ct, loss={"terms": [{"name": "supervised"}]}, run={"max_steps": 6, "seed": 0},
                      validation={"scans": [tiny_ct], "every": 3, "max_slabs": 2}, logging={"every": 1})
    run = tmp_path / "run"
    run_job(1, ["train", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir", str(run)])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(set(r["parts"]) == {"supervised.mse"} for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]  # learns from the reference
    validations = [r for r in records if r.get("event") == "validation"]
    assert len(validations) == 2 and all("psnr" in r for r in validations)


def test_a_scan_without_reference_is_refused_naming_it(tmp_path, tiny_ct):
    bare = _without_reference(tiny_ct, tmp_path / "measured.zarr")
    cfg = load_config(tiny_config(bare, loss={"terms": [{"name": "mc"}, {"name": "supervised", "metric": "l1"}]}))
    with pytest.raises(ConfigError, match=r"loss.terms\[1\] \(supervised\): needs the scans' reference array.*measured.zarr"):
        Trainer(cfg, tmp_path / "run", _ctx())
    cfg = load_config(tiny_config(tiny_ct, loss={"terms": [{"name": "supervised"}]}, validation={"scans": [bare]}))
    with pytest.raises(ConfigError, match=r"validation.scans: the supervised loss term needs a reference.*measured.zarr"):
        Trainer(cfg, tmp_path / "run2", _ctx())
