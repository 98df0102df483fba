"""``recon3d reconstruct --memory-budget``: the slab chosen from the estimated peak, its halo
overhead, its limits, ``--slab`` winning, exactness with a chosen slab, the size parser."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import zarr

from pipeline.data import open_scan
from pipeline.reconstruct import ReconstructConfig, open_ome, reconstruct
from pipeline.reconstruct.adapters import _Network
from pipeline.reconstruct.halo import _layout
from pipeline.reconstruct.memory import (PROCESS_BYTES, MemoryModel, _LiveBytes, activation_bytes_per_voxel,
                                        choose_slab, cpu_conv_workspace, parse_bytes)
from reconstruct_helpers import MRI_SHAPE, save_model, whole_volume

UNET = dict(widths=[4, 8])
UNROLLED = dict(backbone="dncnn", dncnn_width=4, dncnn_depth=3, reconstructor="unrolled",
                unrolled={"iterations": 2})
TILED = dict(widths=[4, 8], tile={"shape": [8, 8, 8]})


def _config(scan: str, weights, **kw) -> ReconstructConfig:
    kw.setdefault("chunks", (2, 8, 8))
    kw.setdefault("progress", False)
    kw.setdefault("scheduler", "sync")
    return ReconstructConfig(scan=scan, out=str(weights.parent / "out.ome.zarr"), model=str(weights), **kw)


def _net(config: ReconstructConfig) -> _Network:
    return _Network(open_scan(str(config.scan)), config, torch.device("cpu"), rank=0)


# ----------------------------------------------------------------------------- the size parser
@pytest.mark.parametrize("text, value", [("512MiB", 512 << 20), ("1GiB", 1 << 30), ("2G", 2 * 10**9),
                                         ("1.5GB", 1_500_000_000), ("4096", 4096), ("64 kib", 64 << 10),
                                         (12345, 12345)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "1 parsec", "GiB", "-1GiB", "0", True, "1e3MiB"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


def test_config_and_cli_take_sizes(tmp_path):
    from pipeline.reconstruct.cli import _config as cli_config, register

    config = ReconstructConfig(scan="s", out="o", method="adjoint", memory_budget="512MiB")
    assert config.memory_budget == 512 << 20
    assert ReconstructConfig(scan="s", out="o", method="adjoint").memory_budget == 1 << 30
    with pytest.raises(ValueError, match="memory size"):
        ReconstructConfig(scan="s", out="o", method="adjoint", memory_budget="lots")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["reconstruct", "--model", "m.pt", "--scan", "s", "--out", "o", "--memory-budget", "2G"])
    assert cli_config(args).memory_budget == 2 * 10**9
    assert parser.parse_args(["reconstruct", "--method", "fbp", "--scan", "s", "--out", "o"]).memory_budget == 1 << 30


# ----------------------------------------------------------------------------- the choice
@pytest.mark.parametrize("cfg", [UNET, UNROLLED, TILED], ids=["unet", "unrolled-dncnn", "unet-tiled"])
def test_default_budget_keeps_the_halo_overhead_low(tmp_path, mri_scan, cfg):
    """At the default budget the slab is thick enough that the halo adds at most 30 % on a deep
    scan (the test models' activations are small); a scan that fits is one slab (1.0x)."""
    weights = save_model(tmp_path / "model.pt", "mri", **cfg)
    config = _config(mri_scan, weights)
    net = _net(config)
    deep = (4096,) + MRI_SHAPE[1:]
    layout = _layout(config, deep, net)
    assert layout.memory["slab_from"] == "--memory-budget" and layout.slab % 2 == 0
    assert layout.memory["overhead"] <= 1.3, layout.memory
    assert layout.memory["estimated_peak"] <= 1 << 30
    whole = _layout(config, MRI_SHAPE, net)
    assert whole.slab >= MRI_SHAPE[0] and whole.memory["overhead"] == 1.0


def test_small_budget_smaller_slab_and_its_floor(tmp_path, mri_scan):
    weights = save_model(tmp_path / "model.pt", "mri", **UNET)
    config = _config(mri_scan, weights)
    net = _net(config)
    model = net.memory_model(MRI_SHAPE, config)
    one_chunk = model.estimate(2, 9, net.multiple)
    four = model.estimate(4, 9, net.multiple)
    assert one_chunk < four < model.estimate(24, 9, net.multiple)
    assert _layout(_config(mri_scan, weights, memory_budget=four), MRI_SHAPE, net).slab == 4
    assert _layout(_config(mri_scan, weights, memory_budget=one_chunk), MRI_SHAPE, net).slab == 2
    with pytest.raises(ValueError, match=f"at least that.*|{one_chunk} bytes") as err:
        _layout(_config(mri_scan, weights, memory_budget=one_chunk - 1), MRI_SHAPE, net)
    assert f"({one_chunk} bytes)" in str(err.value) and "one output chunk (2 slices" in str(err.value)
    # Two workers hold two slabs (one process): what is left after the process's own bytes, halved.
    both = PROCESS_BYTES + 2 * (one_chunk - PROCESS_BYTES)
    two = _layout(_config(mri_scan, weights, memory_budget=both, workers=2), MRI_SHAPE, net)
    assert two.slab == 2 and two.memory["workers"] == 2
    assert two.memory["estimated_peak"] == both
    assert _layout(_config(mri_scan, weights, memory_budget=both), MRI_SHAPE, net).slab > 2


def test_explicit_slab_wins_and_keeps_the_fingerprint(tmp_path, mri_scan):
    from pipeline.reconstruct.reconstruct import _settings

    weights = save_model(tmp_path / "model.pt", "mri", **UNET)
    net = _net(_config(mri_scan, weights))
    scan = open_scan(mri_scan)
    prints = set()
    for budget in ("1GiB", 1):  # a budget too small for any slab is ignored with --slab
        config = _config(mri_scan, weights, slab=4, memory_budget=budget)
        layout = _layout(config, MRI_SHAPE, net)
        assert layout.slab == 4 and layout.memory["slab_from"] == "--slab" and layout.memory["budget"] is None
        settings, fingerprint = _settings(config, scan, net, layout, True)
        assert "memory" not in settings["layout"] and settings["layout"]["slab"] == 4
        prints.add(fingerprint)
    assert len(prints) == 1


def test_choose_slab_steps_on_chunks_and_grid():
    model = MemoryModel(shape=(1000, 64, 64), data_per_slice=1000, image_per_slice=64 * 64 * 4,
                        activation_per_voxel=100.0, tile=None, tiles_per_batch=1, staged=False, workers=1)
    budget = PROCESS_BYTES + (50 << 20)  # the process's own bytes and 50 MiB of slabs
    slab = choose_slab(model, budget, chunk=6, halo=9, multiple=4)
    assert slab % 6 == 0 and slab % 12 == 0
    assert model.estimate(slab, 9, 4) <= budget < model.estimate(slab + 12, 9, 4)
    assert choose_slab(model, 1 << 40, chunk=6, halo=9, multiple=4) == 1002  # covers the volume
    tiled = MemoryModel(shape=(1000, 64, 64), data_per_slice=0, image_per_slice=0, activation_per_voxel=100.0,
                        tile=(16, 32, 32), tiles_per_batch=2, staged=True, workers=1)
    assert tiled.estimate(8, 9, 1) == tiled.estimate(800, 9, 1) == PROCESS_BYTES + 100 * 2 * 16 * 32 * 32


def test_activation_measure_is_linear_and_deterministic():
    from pipeline.models import UNet3D

    torch.manual_seed(0)
    net = UNet3D(in_channels=2, out_channels=2, widths=[4, 8]).eval()
    first = activation_bytes_per_voxel([net], 2, 2, torch.device("cpu"))
    assert first == activation_bytes_per_voxel([net], 2, 2, torch.device("cpu"))
    assert first >= 2 * 4 * 4  # at least the output and one width-4 feature map per voxel
    wide = UNet3D(in_channels=2, out_channels=2, widths=[8, 16]).eval()
    assert activation_bytes_per_voxel([wide], 2, 2, torch.device("cpu")) > first


@pytest.mark.parametrize("widths, workspace", [([4, 8], 96.0), ([16, 32], 64.0)])
def test_activation_measure_is_the_count_and_the_workspace_one_piece(widths, workspace):
    """On CPU the estimate per voxel is the dispatcher's count; the convolutions' workspace is
    that of one piece (the backbone runs them in pieces), a constant per worker: four
    buffers of PIECE_VOXELS voxels at the first width's padded channels, and the heap the pieces'
    buffers come from."""
    from pipeline.models import UNet3D
    from pipeline.reconstruct.memory import first_width, piece_workspace
    from pipeline.reconstruct.pieces import HEAP_BELOW, PIECE_VOXELS

    assert cpu_conv_workspace(widths[0]) == workspace
    assert [cpu_conv_workspace(w) for w in (2, 6, 8, 12, 32)] == [112.0, 80.0, 64.0, 64.0, 128.0]
    torch.manual_seed(0)
    net = UNet3D(in_channels=2, out_channels=2, widths=widths).eval()
    x = torch.zeros(1, 2, 4, 16, 16)  # the input activation_bytes_per_voxel runs on (grid 2)
    with torch.no_grad(), _LiveBytes() as live:
        net(x)
    counted = live.peak / (4 * 16 * 16)
    assert activation_bytes_per_voxel([net], 2, 2, torch.device("cpu")) == pytest.approx(counted)
    assert first_width([net]) == widths[0]
    assert piece_workspace(widths[0]) == 4 * workspace * PIECE_VOXELS + 2 * HEAP_BELOW
    assert piece_workspace(widths[0], "meta") == 0  # no pieces off the CPU
    model = MemoryModel(shape=(100, 64, 64), data_per_slice=0, image_per_slice=0, activation_per_voxel=10.0,
                        tile=None, tiles_per_batch=1, staged=True, workers=2, workspace=1000)
    assert model.estimate(10, 0, 1) == PROCESS_BYTES + 2 * (10 * 10 * 64 * 64 + 1000)


def test_activation_measure_does_not_import_the_compiler():
    """Counting under a dispatch mode must not pull in torch._dynamo, inductor and sympy (+72 MiB
    resident for the rest of a reconstruct process): checked in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from pipeline.models import UNet3D\n"
            "from pipeline.reconstruct.memory import activation_bytes_per_voxel\n"
            "net = UNet3D(in_channels=2, out_channels=2, widths=[4, 8]).eval()\n"
            "assert activation_bytes_per_voxel([net], 2, 2, torch.device('cpu')) > 0\n"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'sympy') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


# ----------------------------------------------------------------------------- exactness
def test_budget_chosen_slabs_equal_the_whole_volume(tmp_path, mri_scan):
    weights = save_model(tmp_path / "model.pt", "mri", **UNET)
    config = _config(mri_scan, weights)
    # A staged model reads one chunk at a time, so only the input slab's image and activations
    # grow with the slab: slab 4 reads 23 input slices, slab 6 all 24 (as the whole volume).
    model = _net(config).memory_model(MRI_SHAPE, config)
    budget = model.estimate(4, 9, 2)
    assert model.estimate(2, 9, 2) < budget < model.estimate(6, 9, 2) == model.estimate(24, 9, 2)
    result = reconstruct(_config(mri_scan, weights, memory_budget=budget))
    assert result.complete and result.slabs_total == 6
    info = dict(zarr.open_group(config.out, mode="r").attrs)["recon3d"]
    assert info["settings"]["layout"]["slab"] == 4 == info["memory"]["slab"]
    assert info["memory"]["slab_from"] == "--memory-budget" and info["memory"]["budget"] == budget
    computed = sum(min(24, b + 9) - max(0, a - 9) // 2 * 2 for a, b in ((a, a + 4) for a in range(0, 24, 4)))
    assert info["memory"]["overhead"] == pytest.approx(computed / 24, rel=1e-4)
    level0 = torch.from_numpy(np.asarray(open_ome(config.out)[:]))
    torch.testing.assert_close(level0, whole_volume(weights, mri_scan).abs(), rtol=1e-5, atol=1e-6)
    # Resumed with another budget (or --workers), which would choose another slab: the recorded
    # slab is kept, so the output is found complete, not recomputed.
    again = reconstruct(_config(mri_scan, weights, memory_budget=4 * budget))
    assert again.state == "already complete" and again.fingerprint == result.fingerprint
