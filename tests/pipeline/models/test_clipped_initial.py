"""The detector-aware initial estimate (issue 18.2): :func:`pipeline.classical.clipped_fbp` takes a
clipped ray as a bound, not a value; a reconstructor with ``initial_detector="auto"`` starts from
it on a scan whose detector clips (training scans' record, or the reconstructed scan's), and
plain FBP otherwise."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from operators3d import ParallelBeamCT
from pipeline.classical import clipped_fbp, filtered_backprojection
from pipeline.models import ArtifactRemoval, UNet3D, set_scan_detector

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reconstruct"))


def _phantom(dtype=torch.float32):
    op = ParallelBeamCT(volume_shape=(2, 24, 24), angles=torch.linspace(0, math.pi, 31)[:-1]).to(dtype)
    x = torch.zeros(2, 24, 24, dtype=dtype)
    x[:, 6:18, 6:18] = 0.1
    x[:, 9:15, 9:15] = 0.4
    return op, x


def test_without_levels_it_is_the_fbp():
    op, x = _phantom()
    y = op(x)
    torch.testing.assert_close(clipped_fbp(y, op, filter="ram-lak"), filtered_backprojection(y, op, filter="ram-lak"))


@pytest.mark.parametrize("side", ["floor", "saturation"])
def test_it_honours_the_level_it_knows(side):
    """Towards ``A x = y`` on the rays inside the levels and ``A x ≥ high`` (a count floor) or
    ``A x ≤ low`` (a saturation) on the clipped ones; non-negative; closer to the truth than FBP."""
    op, x_true = _phantom()
    clean = op(x_true)
    if side == "floor":
        level = float(torch.quantile(clean.flatten(), 0.85))
        y, kw = clean.clamp_max(level), {"high": level}
        clipped = y >= level - 1e-6 * max(abs(level), 1.0)
        beyond = lambda ax: torch.relu(level - ax)  # noqa: E731
    else:
        level = float(torch.quantile(clean[clean > 0].flatten(), 0.3))
        y, kw = clean.clamp_min(level), {"low": level}
        clipped = y <= level + 1e-6 * max(abs(level), 1.0)
        beyond = lambda ax: torch.relu(ax - level)  # noqa: E731
    assert 0.05 < float(clipped.double().mean()) < 0.8  # saturation: the air rays too

    def misfit(x):
        ax = op(x)
        return float(((ax - y)[~clipped] ** 2).sum() + (beyond(ax)[clipped] ** 2).sum())

    x0 = filtered_backprojection(y, op, filter="hann")
    x = clipped_fbp(y, op, filter="hann", **kw)
    assert (x >= 0).all()
    assert misfit(x) < 0.5 * misfit(x0)
    assert float(((x - x_true) ** 2).sum()) < float(((x0 - x_true) ** 2).sum())


def test_it_is_differentiable_in_the_measurements():
    """A network's input: EI's second pass differentiates it. Piecewise linear in ``y`` with the
    clipped rays fixed, so a vector-Jacobian product equals a finite difference along a direction
    that moves only the rays inside the level (float64)."""
    op, x_true = _phantom(torch.float64)
    clean = op(x_true)
    level = float(torch.quantile(clean.flatten(), 0.85))
    y = clean.clamp_max(level).requires_grad_(True)
    inside = (y < level - 1e-3).detach()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(x_true.shape, generator=g, dtype=torch.float64)
    v = torch.randn(y.shape, generator=g, dtype=torch.float64) * inside
    out = clipped_fbp(y, op, high=level, iterations=3)
    (grad,) = torch.autograd.grad((out * w).sum(), y)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    eps = 1e-7
    with torch.no_grad():
        plus = clipped_fbp(y + eps * v, op, high=level, iterations=3)
        minus = clipped_fbp(y - eps * v, op, high=level, iterations=3)
    fd = float(((plus - minus) * w).sum() / (2 * eps))
    assert float((grad * v).sum()) == pytest.approx(fd, rel=1e-5)


def _model(**kw) -> ArtifactRemoval:
    return ArtifactRemoval(UNet3D(1, 1, widths=[2, 4]), initial="fbp", **kw)


def test_the_reconstructor_starts_from_it_only_when_asked_and_the_detector_clips():
    op, x = _phantom()
    level = float(torch.quantile(op(x).flatten(), 0.85))
    y = op(x).clamp_max(level)
    floor = {"model": "clip", "low": None, "high": level}
    aware = _model(initial_detector="auto", detector=floor)
    torch.testing.assert_close(aware.initial_image(y, op), clipped_fbp(y, op, high=level, filter="ram-lak"))
    assert "clipped_fbp" in repr(aware)
    plain = filtered_backprojection(y, op, filter="ram-lak")
    torch.testing.assert_close(_model(initial_detector="ignore", detector=floor).initial_image(y, op), plain)
    torch.testing.assert_close(_model(initial_detector="auto").initial_image(y, op), plain)  # linear scan
    one_bit = {"model": "sign", "threshold": 0.5, "width": 0.1}
    torch.testing.assert_close(_model(initial_detector="auto", detector=one_bit).initial_image(y, op), plain)
    # whole-scan reconstruction sets the reconstructed scan's record
    model = _model(initial_detector="auto")
    assert set_scan_detector(model, floor) and model.detector == floor
    assert not set_scan_detector(model, None) and model.detector is None
    assert not set_scan_detector(_model(initial_detector="ignore"), floor)
    with pytest.raises(ValueError, match="initial_detector must be 'auto' or 'ignore'"):
        _model(initial_detector="yes")


def test_training_builds_it_from_the_scans_record():
    from pipeline.train.build import ScanFacts, build_model
    from pipeline.train.config import ModelConfig

    floor = {"model": "clip", "low": None, "high": 2.0}
    facts = ScanFacts("ct", "parallel", None, 1, detector=floor)
    built = build_model(ModelConfig(widths=[2, 4], initial="fbp"), facts)
    assert built.initial_detector == "auto" and built.detector == floor
    assert build_model(ModelConfig(widths=[2, 4], initial="fbp", initial_detector="ignore"), facts).detector is None


def test_reconstruct_runs_an_aware_model_on_the_scans_own_levels(tmp_path, capsys):
    """``recon3d reconstruct --model`` of a count-floor scan with a model of
    ``initial_detector: auto`` (the default): the network's input is the clipped FBP of the scan's
    levels (the output's notes say so), equal to the whole volume through the model with that
    record, and not to the same model on plain FBP."""
    from reconstruct_helpers import save_model

    from pipeline.data import SimulateCTConfig, open_scan, simulate_ct
    from pipeline.models import intensity_scale
    from pipeline.reconstruct import ReconstructConfig, reconstruct
    from pipeline.train import load_exported
    from pipeline.train.build import scan_scale

    scan = tmp_path / "floor.zarr"
    simulate_ct(SimulateCTConfig(out=str(scan), shape=(4, 16, 16), angles=12, chunk_depth=2, seed=0,
                                 photons=1e4, floor=0.5, workers=1, scheduler="sync", progress=False))
    record = open_scan(str(scan)).metadata.detector
    assert record["model"] == "clip" and record["fraction_at_high"] > 0.02
    weights = save_model(tmp_path / "m.pt", "ct", widths=[4, 8], initial="fbp", fbp_filter="hann")
    out = tmp_path / "out.ome.zarr"
    reconstruct(ReconstructConfig(scan=str(scan), out=str(out), model=str(weights), slab=2, chunks=(2, 8, 8),
                                  scheduler="sync", progress=True))
    assert "the network's input is followed by the clipped-FBP steps" in capsys.readouterr().err
    info = dict(zarr.open_group(str(out), mode="r").attrs)["recon3d"]
    assert info["exact"] is True and not any("detector" in n for n in info["notes"])
    got = torch.from_numpy(np.asarray(zarr.open_group(str(out), mode="r")["0"][:]))

    def whole(detector):
        model = load_exported(weights)
        set_scan_detector(model, detector)
        y, op = open_scan(str(scan)).slab(slice(0, 4))
        with torch.no_grad(), intensity_scale(model, scan_scale(model, str(scan), thickness=None)):
            return model(y[None], op)[0]

    torch.testing.assert_close(got, whole(record), rtol=1e-5, atol=1e-6)
    assert float((whole(None) - got).abs().max()) > 1e-3


def test_an_export_from_before_the_setting_keeps_its_plain_fbp_input(tmp_path):
    """A model exported before ``model.initial_detector`` existed was trained on plain FBP: it must
    not start from the clipped FBP on a clipped scan now."""
    from reconstruct_helpers import save_model

    from pipeline.models import reconstructor_of
    from pipeline.train import load_exported

    path = save_model(tmp_path / "old.pt", "ct", widths=[4, 8], initial="fbp")
    payload = torch.load(path, weights_only=True)
    del payload["model_config"]["initial_detector"]
    torch.save(payload, path)
    model = load_exported(path)
    assert reconstructor_of(model).initial_detector == "ignore"
    assert not set_scan_detector(model, {"model": "clip", "low": None, "high": 2.0})
    assert reconstructor_of(load_exported(save_model(tmp_path / "new.pt", "ct", widths=[4, 8],
                                                     initial="fbp"))).initial_detector == "auto"
