"""``recon3d simulate ct --saturation S --bits B``: the stored measurements are the linear scan's
put through the recorded detector, the record rebuilds the forward model, and the share of
saturated measurements is counted on what is stored."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from operators3d import Clip, Identity, Quantize, nonlinear_from_dict
from pipeline.cli import _build_parser
from pipeline.data import open_scan
from pipeline.data.cli import _simulate_config
from pipeline.data.format import ScanError, ScanMetadata
from pipeline.data.simulate import SimulateCTConfig
from scan_factories import kill_phantom_at_slab, make_ct


def _stored(path) -> np.ndarray:
    return open_scan(path).measurements.read()


def _detector(path) -> dict:
    return open_scan(path).metadata.detector


def _apply(record: dict, y: np.ndarray) -> np.ndarray:
    """The recorded detector, rebuilt as an operators3d model on ``y`` (identity linear part)."""
    model = nonlinear_from_dict(record, Identity(y.shape))
    return model(torch.from_numpy(y)).numpy()


def _check_fractions(record: dict, y: np.ndarray) -> None:
    """The recorded shares are those of the stored values at the detector's two end readings."""
    bottom, top = _apply(record, np.array([-np.inf, np.inf], dtype=np.float32))
    for end, at in (("low", y == bottom), ("high", y == top)):
        if record[end] is None:
            assert record[f"fraction_at_{end}"] is None
        else:
            assert record[f"fraction_at_{end}"] == at.mean()


def test_saturation_clips_the_photon_counts_as_recorded(tmp_path):
    linear = _stored(make_ct(tmp_path / "linear.zarr", photons=1e3, seed=4).path)
    out = make_ct(tmp_path / "sat.zarr", photons=1e3, seed=4, saturation=0.5)
    y, record = _stored(out.path), _detector(out.path)
    assert record["model"] == "clip" and record["saturation"] == 0.5
    assert record["saturation_count"] == 500.0
    assert record["low"] == pytest.approx(-math.log(0.5)) and record["high"] == pytest.approx(math.log(1e3))
    # the same noise, then the detector: the linear scan clipped, bit for bit
    np.testing.assert_array_equal(y, np.clip(linear, np.float32(record["low"]), np.float32(record["high"])))
    np.testing.assert_array_equal(y, _apply(record, linear))
    assert y.min() == np.float32(-math.log(0.5)) and (linear < y.min()).any()
    assert 0 < record["fraction_at_low"] < 1
    _check_fractions(record, y)
    assert isinstance(nonlinear_from_dict(record, Identity((2,))), Clip)


def test_noise_free_saturated_scan_is_the_recorded_model_of_its_operator(tmp_path):
    out = make_ct(tmp_path / "sat.zarr", saturation=0.7)
    scan = open_scan(out.path)
    record = scan.metadata.detector
    assert record["high"] is None and record["saturation_count"] is None and record["fraction_at_high"] is None
    for sl in scan.slab_slices():
        y, op = scan.slab(sl)
        model = nonlinear_from_dict(record, op)
        x = torch.from_numpy(scan.reference.read(sl))
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.linear_part(x).clamp_min(-math.log(0.7)), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bits", "changes"), [
    (3, {"noise_sigma": 0.05}),
    (4, {"photons": 300.0, "saturation": 0.8}),
    (1, {"phantom": "foam"}),  # one bit: foam's rays straddle the midpoint attenuation/2
])
def test_bits_quantise_the_line_integrals_as_recorded(tmp_path, bits, changes):
    linear = _stored(make_ct(tmp_path / "linear.zarr", seed=2, **changes).path)
    out = make_ct(tmp_path / "q.zarr", seed=2, bits=bits, **changes)
    y, record = _stored(out.path), _detector(out.path)
    lo = -math.log(changes["saturation"]) if "saturation" in changes else 0.0
    assert record["model"] == "quantize" and record["bits"] == bits
    assert record["low"] == pytest.approx(lo) and record["high"] == 4.0  # [−log S or 0, attenuation]
    np.testing.assert_array_equal(y, _apply(record, linear))
    levels = np.float32(lo) + np.arange(2**bits, dtype=np.float32) * np.float32((4.0 - lo) / (2**bits - 1))
    assert np.isclose(y.reshape(-1, 1), levels[None], rtol=0, atol=1e-6).any(axis=1).all()
    assert len(np.unique(y)) <= 2**bits
    if bits == 1:
        assert set(np.unique(y).tolist()) == {np.float32(lo), np.float32(4.0)}
        np.testing.assert_array_equal(y == np.float32(4.0), linear >= (lo + 4.0) / 2)
        assert 0 < record["fraction_at_high"] < 1
    assert record["fraction_at_low"] > 0
    _check_fractions(record, y)
    assert isinstance(nonlinear_from_dict(record, Identity((2,))), Quantize)


def test_cone_beam_measurements_go_through_the_detector_too(tmp_path):
    common = dict(geometry="cone", angles=12, seed=1, noise_sigma=0.02)
    linear = _stored(make_ct(tmp_path / "linear.zarr", **common).path)
    out = make_ct(tmp_path / "q.zarr", bits=2, saturation=0.9, **common)
    y, record = _stored(out.path), _detector(out.path)
    np.testing.assert_array_equal(y, _apply(record, linear))
    _check_fractions(record, y)


def test_a_resumed_job_counts_the_fractions_on_everything_stored(tmp_path, monkeypatch):
    from pipeline.data import phantoms

    original = phantoms.AnalyticPhantom.slab
    kill_phantom_at_slab(monkeypatch, 3)
    path = tmp_path / "killed.zarr"
    with pytest.raises(KeyboardInterrupt):
        make_ct(path, photons=1e3, saturation=0.5)
    monkeypatch.setattr(phantoms.AnalyticPhantom, "slab", original)
    outcome = make_ct(path, photons=1e3, saturation=0.5)
    assert outcome.state == "resumed" and 0 < outcome.tasks_run < outcome.tasks_total
    clean = make_ct(tmp_path / "clean.zarr", photons=1e3, saturation=0.5)
    assert _detector(path) == _detector(clean.path) and _detector(path)["fraction_at_low"] > 0
    assert make_ct(path, photons=1e3, saturation=0.5).state == "already complete"


def test_the_fractions_are_reported(tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "s.zarr"
    assert main(["simulate", "ct", "--shape", "4", "12", "12", "--angles", "6", "--saturation", "0.5",
                 "--photons", "1e3", "--out", str(out), "--no-progress", "--scheduler", "sync"]) == 0
    record = _detector(out)
    said = capsys.readouterr()
    text = said.out + said.err
    assert f"{100 * record['fraction_at_low']:.2f}% at low" in text
    assert f"{100 * record['fraction_at_high']:.2f}% at high" in text
    assert ("of the rays saturate" in text) == (record["fraction_at_low"] > 0.5)


def test_a_level_that_clips_most_rays_is_warned_about(tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "s.zarr"  # shepp-logan's line integrals stay below -log 0.3 = 1.2: every ray clips
    assert main(["simulate", "ct", "--shape", "4", "16", "16", "--angles", "6", "--saturation", "0.3",
                 "--out", str(out), "--no-progress", "--scheduler", "sync"]) == 0
    said = capsys.readouterr()
    assert _detector(out)["fraction_at_low"] > 0.5
    assert "warning: " in said.err and "of the rays saturate" in said.err


def test_an_ideal_detector_records_nothing_and_old_scans_still_resume(tmp_path):
    out = make_ct(tmp_path / "s.zarr")
    assert _detector(out.path) is None
    params = SimulateCTConfig(out="x.zarr").parameters()
    assert "saturation" not in params and "bits" not in params
    assert SimulateCTConfig(out="x.zarr", bits=2).parameters()["bits"] == 2


def test_cli_flags_fill_the_config():
    args = _build_parser().parse_args(["simulate", "ct", "--out", "x.zarr", "--saturation", "0.25", "--bits", "6"])
    config = _simulate_config(args)
    assert config.saturation == 0.25 and config.bits == 6


@pytest.mark.parametrize(("changes", "match"), [
    ({"saturation": 0.0}, "--saturation must be > 0"),
    ({"saturation": -1.0}, "--saturation must be > 0"),
    ({"saturation": math.inf}, "--saturation"),
    ({"bits": 0}, "--bits must be >= 1"),
    ({"bits": 33}, "--bits must be <= 32"),
    ({"bits": 2, "saturation": math.exp(-4.5)}, "raise --saturation or --attenuation"),
])
def test_bad_detector_settings_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        SimulateCTConfig(out="x.zarr", **changes)


def test_detector_metadata_round_trips_and_is_checked(tmp_path):
    meta = open_scan(make_ct(tmp_path / "s.zarr", bits=2).path).metadata
    assert ScanMetadata.from_dict(meta.to_dict()) == meta
    assert ScanMetadata.from_dict({k: v for k, v in meta.to_dict().items() if k != "detector"}).detector is None
    with pytest.raises(ScanError, match="detector must be null or a mapping"):
        ScanMetadata.from_dict(meta.to_dict() | {"detector": "clipped"})


def test_a_count_floor_clips_the_densest_rays_from_above(tmp_path):
    linear = _stored(make_ct(tmp_path / "linear.zarr", photons=1e4, seed=3).path)
    floor = float(np.exp(-np.quantile(linear, 0.85)))
    out = make_ct(tmp_path / "floor.zarr", photons=1e4, seed=3, floor=floor)
    y, record = _stored(out.path), _detector(out.path)
    assert record["model"] == "clip" and record["low"] is None and record["floor"] == floor
    assert record["high"] == pytest.approx(-math.log(floor))  # below log I0 = 9.2, so the floor wins
    np.testing.assert_array_equal(y, np.minimum(linear, np.float32(record["high"])))
    assert record["fraction_at_high"] == pytest.approx(0.15, abs=0.01)
    _check_fractions(record, y)
    both = _detector(make_ct(tmp_path / "both.zarr", photons=1e4, seed=3, floor=floor, saturation=0.9).path)
    assert both["low"] == pytest.approx(-math.log(0.9)) and both["high"] == record["high"]


def test_one_bit_stores_the_comparator_and_records_a_sign_model(tmp_path):
    from operators3d import Sign

    linear = _stored(make_ct(tmp_path / "linear.zarr", noise_sigma=0.02, seed=6).path)
    out = make_ct(tmp_path / "bit.zarr", noise_sigma=0.02, seed=6, one_bit=0.5, one_bit_width=0.2)
    y, record = _stored(out.path), _detector(out.path)
    assert record == {**record, "model": "sign", "threshold": 0.5, "width": 0.2, "gradient": "zero"}
    np.testing.assert_array_equal(y, np.where(linear >= np.float32(0.5), 1.0, -1.0).astype(np.float32))
    assert record["fraction_at_high"] == pytest.approx((y == 1).mean()) and 0 < record["fraction_at_high"] < 1
    model = nonlinear_from_dict(record, Identity((3,)))
    assert isinstance(model, Sign) and model.gradient == "zero" and model.width == 0.2


@pytest.mark.parametrize(("changes", "match"), [
    ({"floor": 1.0}, "--floor must be < 1"),
    ({"floor": 0.5, "saturation": 0.4}, "must be below --saturation"),
    ({"one_bit": 1.0, "bits": 2}, "not with --bits"),
    ({"one_bit": 1.0, "floor": 0.1}, "not with --bits, --saturation or --floor"),
    ({"one_bit": 1.0, "one_bit_width": 0.0}, "--one-bit-width must be > 0"),
])
def test_bad_floor_and_one_bit_settings_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        SimulateCTConfig(out="x.zarr", **changes)


def test_floor_and_one_bit_flags_fill_the_config():
    args = _build_parser().parse_args(["simulate", "ct", "--out", "x.zarr", "--floor", "0.2"])
    assert _simulate_config(args).floor == 0.2
    args = _build_parser().parse_args(["simulate", "ct", "--out", "x.zarr", "--one-bit", "1.5", "--one-bit-width", "0.3"])
    config = _simulate_config(args)
    assert config.one_bit == 1.5 and config.one_bit_width == 0.3
    assert "one_bit_width" not in SimulateCTConfig(out="x.zarr").parameters()


def test_one_bit_mri_stores_the_signs_of_the_sampled_parts(tmp_path):
    from pipeline.data import SimulateMRIConfig, simulate_mri

    common = dict(shape=(4, 16, 16), coils=2, acceleration=2.0, calibration=4, noise_sigma=0.02, seed=3,
                  chunk_depth=2, workers=1, scheduler="sync", progress=False)
    linear = open_scan(simulate_mri(SimulateMRIConfig(out=str(tmp_path / "l.zarr"), **common)).path)
    bits = open_scan(simulate_mri(SimulateMRIConfig(out=str(tmp_path / "b.zarr"), one_bit=True, one_bit_width=0.2,
                                                    **common)).path)
    record = bits.metadata.detector
    assert record["model"] == "sign" and record["threshold"] == 0.0 and record["width"] == 0.2
    y, y_lin = bits.measurements.read(), linear.measurements.read()
    sampled = np.broadcast_to(bits.mask.read() != 0, y.shape)
    for part in (np.real, np.imag):
        np.testing.assert_array_equal(part(y)[sampled], np.where(part(y_lin)[sampled] >= 0, 1.0, -1.0))
    assert (y[~sampled] == 0).all()
    share = np.mean(np.concatenate([np.real(y)[sampled], np.imag(y)[sampled]]) > 0)
    assert record["fraction_at_high"] == pytest.approx(share)
    assert "one_bit" not in SimulateMRIConfig(out="x.zarr").parameters()
