"""``recon3d simulate mri --one-bit --one-bit-dither D``: each sampled part is compared with its
own seeded threshold ``τ ~ U[−D, D)``; the scan records ``{"dither": {"amplitude", "seed"}}``
and a slab operator rebuilds the ``τ`` the slab was measured with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cli import _build_parser
from pipeline.data import SimulateMRIConfig, open_scan, simulate_mri
from pipeline.data.cli import _simulate_config
from pipeline.losses.detector import detector_model


def test_dithered_one_bit_mri_bits_are_the_linear_data_about_the_rebuilt_threshold(tmp_path):
    args = ["--shape", "5", "16", "16", "--coils", "2", "--acceleration", "2", "--calibration", "4",
            "--noise-sigma", "0.02", "--seed", "3", "--chunk-depth", "2", "--workers", "1", "--no-progress"]
    parser = _build_parser()
    linear_cfg = _simulate_config(parser.parse_args(["simulate", "mri", "--out", str(tmp_path / "l.zarr"), *args]))
    bits_cfg = _simulate_config(parser.parse_args(["simulate", "mri", "--out", str(tmp_path / "b.zarr"), *args,
                                                   "--one-bit", "--one-bit-dither", "0.3"]))
    assert bits_cfg.one_bit and bits_cfg.one_bit_dither == 0.3
    linear = open_scan(simulate_mri(linear_cfg).path)
    bits = open_scan(simulate_mri(bits_cfg).path)
    record = bits.metadata.detector
    assert record["model"] == "sign" and record["threshold"] == 0.0
    assert record["dither"]["amplitude"] == 0.3 and isinstance(record["dither"]["seed"], int)
    y_all = bits.measurements.read()
    sampled = np.broadcast_to(bits.mask.read() != 0, y_all.shape)
    assert (y_all[~sampled] == 0).all()
    undithered = np.where(np.real(linear.measurements.read())[sampled] >= 0, 1.0, -1.0)
    assert np.mean(np.real(y_all)[sampled] != undithered) > 0.05  # the dither moves bits
    # slab by slab (slabs across the stored chunks of 2), the rebuilt model on the slab operator
    # reproduces the stored bits from the linear data exactly
    for d0, d1 in ((0, 5), (1, 4), (3, 5)):
        y_lin, op = linear.slab(slice(d0, d1))
        y_bits, op_bits = bits.slab(slice(d0, d1))
        model = detector_model(record, op_bits)
        assert tuple(model.threshold.shape) == (2, 1, 16, 16, 2)
        assert torch.equal(model.apply_values(y_lin), y_bits)
    share = np.mean(np.concatenate([np.real(y_all)[sampled], np.imag(y_all)[sampled]]) > 0)
    assert record["fraction_at_high"] == pytest.approx(share)


def test_the_dither_needs_one_bit_and_stays_out_of_older_scans_parameters():
    with pytest.raises(ValueError, match="set one_bit"):
        SimulateMRIConfig(out="x.zarr", one_bit_dither=0.5)
    with pytest.raises(ValueError):
        SimulateMRIConfig(out="x.zarr", one_bit=True, one_bit_dither=0.0)
    assert "one_bit_dither" not in SimulateMRIConfig(out="x.zarr", one_bit=True).parameters()
    assert SimulateMRIConfig(out="x.zarr", one_bit=True, one_bit_dither=0.5).parameters()["one_bit_dither"] == 0.5
