"""Cone-beam simulation and FDK slab by slab: equal to the whole-volume computation, memory
bounded by a slab and a block of rows, independent of how the job runs, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import PreprocessConfig, check_scan, open_scan, preprocess
from scan_factories import make_ct

SHAPE = (11, 16, 18)
ANGLES = 14


@pytest.fixture
def small_pieces(monkeypatch):
    """Slabs of 3 slices and blocks of 2 (simulation) or 2 (FDK, aligned to chunks of 2) rows,
    so a tiny scan is cut into many pieces; returns the module to read the sizes from."""
    import pipeline.data.cone as cone

    monkeypatch.setattr(cone, "SLAB_BYTES", SHAPE[1] * SHAPE[2] * 4 * 3)
    monkeypatch.setattr(cone, "ROW_BLOCK_BYTES", ANGLES * 80 * 4 * 2)
    return cone


def _make(path, **changes):
    config = dict(geometry="cone", shape=SHAPE, angles=ANGLES, chunk_depth=2, src_dist=30.0,
                  det_dist=15.0)
    config.update(changes)
    return make_ct(path, **config)


def _preprocess(path, **changes):
    config = dict(scan=str(path), n2i_splits=3, filter="hann", progress=False, workers=1,
                  scheduler="sync")
    config.update(changes)
    return preprocess(PreprocessConfig(**config))


def test_simulation_equals_the_whole_volume_projection(tmp_path, small_pieces, monkeypatch):
    from operators3d.ct import ConeBeamCT

    seen = []
    forward = ConeBeamCT._forward

    def record(self, x):
        seen.append((self.domain_shape[0], self.range_shape[0]))
        return forward(self, x)

    monkeypatch.setattr(ConeBeamCT, "_forward", record)
    _make(tmp_path / "clean.zarr")
    monkeypatch.setattr(ConeBeamCT, "_forward", forward)
    scan = open_scan(tmp_path / "clean.zarr")
    num_v = scan.measurements.shape[0]
    # Every projection held one slab and one block of rows, never the volume or the detector.
    assert len(seen) > 10
    assert max(d for d, _ in seen) <= 3 and max(v for _, v in seen) <= 2
    op = scan.full_operator()
    x = torch.from_numpy(scan.reference.read())
    whole = op(x)
    assert whole.shape[0] == num_v > 2 * SHAPE[0]
    torch.testing.assert_close(scan.measurements.read_torch(), whole, rtol=1e-5, atol=1e-6)
    assert float(whole.abs().max()) > 0.5


def test_noise_is_drawn_per_measurement_chunk_as_before(tmp_path, small_pieces):
    from pipeline.data.phantoms import derive_seed

    sigma = 0.05
    _make(tmp_path / "noisy.zarr", noise_sigma=sigma, seed=4)
    scan = open_scan(tmp_path / "noisy.zarr")
    clean = scan.full_operator()(torch.from_numpy(scan.reference.read()))
    expected = clean.clone()
    cd = scan.chunk_depth
    for k0 in range(0, clean.shape[0], cd):
        gen = torch.Generator().manual_seed(derive_seed(4, "noise", k0 // cd))
        part = clean[k0 : k0 + cd]
        expected[k0 : k0 + cd] = part + sigma * torch.randn(part.shape, generator=gen)
    torch.testing.assert_close(scan.measurements.read_torch(), expected, rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_workers_or_row_blocks(tmp_path, small_pieces, monkeypatch):
    _make(tmp_path / "a.zarr", photons=300.0)
    _make(tmp_path / "b.zarr", photons=300.0, workers=2, scheduler="threads")
    a, b = open_scan(tmp_path / "a.zarr"), open_scan(tmp_path / "b.zarr")
    assert np.array_equal(a.measurements.read(), b.measurements.read())
    # Row blocks three times larger (the slab grid unchanged): the same values to rounding.
    _make(tmp_path / "c.zarr")
    monkeypatch.setattr(small_pieces, "ROW_BLOCK_BYTES", small_pieces.ROW_BLOCK_BYTES * 3)
    _make(tmp_path / "d.zarr")
    c, d = open_scan(tmp_path / "c.zarr"), open_scan(tmp_path / "d.zarr")
    np.testing.assert_allclose(c.measurements.read(), d.measurements.read(), rtol=1e-6, atol=1e-7)


def test_fdk_preprocessing_equals_the_whole_volume_fdk(tmp_path, small_pieces, monkeypatch):
    from operators3d.ct import ConeBeamCT, fdk

    _make(tmp_path / "s.zarr", noise_sigma=0.01)
    seen = []
    backproject = ConeBeamCT._fdk_backproject

    def record(self, y):
        seen.append((self.domain_shape[0], self.range_shape[0]))
        return backproject(self, y)

    monkeypatch.setattr(ConeBeamCT, "_fdk_backproject", record)
    assert _preprocess(tmp_path / "s.zarr") == {"fbp": "created", "n2i": "created"}
    monkeypatch.setattr(ConeBeamCT, "_fdk_backproject", backproject)
    # One slab of the volume (a stored object of 2 slices) and 2 rows at a time.
    assert max(d for d, _ in seen) <= 2 and max(v for _, v in seen) <= 2
    scan = open_scan(tmp_path / "s.zarr")
    y = scan.measurements.read_torch()
    op = scan.full_operator()
    whole = fdk(y, op, filter="hann")
    got = scan.derived("fbp").read_torch()
    scale = float(whole.abs().max())
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6 * scale)
    n2i = scan.derived("n2i").read_torch()
    assert n2i.shape == (3,) + SHAPE
    for j in range(3):
        sub = fdk(y[:, j::3].contiguous(), op.subset(slice(j, None, 3)), filter="hann")
        torch.testing.assert_close(n2i[j], sub, rtol=1e-5, atol=1e-6 * scale)
    assert check_scan(tmp_path / "s.zarr").ok


def test_interrupted_cone_simulation_and_fdk_resume(tmp_path, small_pieces, monkeypatch):
    from operators3d.ct import ConeBeamCT

    _make(tmp_path / "clean.zarr", noise_sigma=0.02)
    _preprocess(tmp_path / "clean.zarr")
    path = tmp_path / "killed.zarr"
    for method in ("_forward", "_fdk_backproject"):
        original = getattr(ConeBeamCT, method)
        calls = {"n": 0}

        def flaky(self, t, original=original, calls=calls):
            calls["n"] += 1
            if calls["n"] == 25:
                raise KeyboardInterrupt("killed")
            return original(self, t)

        monkeypatch.setattr(ConeBeamCT, method, flaky)
        with pytest.raises(KeyboardInterrupt):
            if method == "_forward":
                _make(path, noise_sigma=0.02)
            else:
                _preprocess(path)
        monkeypatch.setattr(ConeBeamCT, method, original)
        assert not check_scan(path).ok
        if method == "_forward":
            outcome = _make(path, noise_sigma=0.02)
            assert outcome.state == "resumed" and 0 < outcome.tasks_run < outcome.tasks_total
        else:
            assert _preprocess(path) == {"fbp": "resumed", "n2i": "resumed"}
    assert check_scan(path).ok
    a, b = open_scan(path), open_scan(tmp_path / "clean.zarr")
    for name in ("measurements", "reference"):
        assert np.array_equal(getattr(a, name).read(), getattr(b, name).read()), name
    for name in ("fbp", "n2i"):
        assert np.array_equal(a.derived(name).read(), b.derived(name).read()), name


def test_fdk_filters_each_block_of_rows_once_for_neighbouring_slabs(tmp_path, small_pieces, monkeypatch):
    """Thin slabs reach the same detector rows: the filtered blocks on the row grid are kept for
    the next slabs (a slab used to read and filter every row it reaches), and the result is the
    same as with nothing kept."""
    import pipeline.classical as classical

    _make(tmp_path / "s.zarr", noise_sigma=0.01)
    # blocks of 16 rows (half the budget): the 30 rows are 2 blocks, as many as are kept
    monkeypatch.setattr(small_pieces, "ROW_BLOCK_BYTES", small_pieces.ROW_BLOCK_BYTES * 16)
    filtered = []
    original = classical.fdk_filtered

    def count(rows, op, **kwargs):
        filtered.append(rows.shape[0])
        return original(rows, op, **kwargs)

    monkeypatch.setattr(classical, "fdk_filtered", count)
    assert _preprocess(tmp_path / "s.zarr", n2i_splits=2) == {"fbp": "created", "n2i": "created"}
    num_v = open_scan(tmp_path / "s.zarr").measurements.array.shape[0]
    reached = sum(filtered)
    assert num_v == 30 and reached == num_v  # each row filtered once, for 6 slabs of 2 slices
    kept = open_scan(tmp_path / "s.zarr").derived("fbp").read()

    monkeypatch.setattr(small_pieces._FilteredBlocks, "KEEP", 0)  # nothing kept: refiltered
    filtered.clear()
    assert _preprocess(tmp_path / "s.zarr", n2i_splits=2, overwrite=True)["fbp"] == "created"
    assert sum(filtered) > 2 * num_v
    assert np.array_equal(open_scan(tmp_path / "s.zarr").derived("fbp").read(), kept)
