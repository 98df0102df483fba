"""Scan factories shared by the data tests (tiny sizes: the suite runs on 2 cores)."""

from __future__ import annotations

from pipeline.data import SimulateCTConfig, SimulateMRIConfig, simulate_ct, simulate_mri

MRI_SHAPE = (10, 24, 20)
CT_SHAPE = (8, 20, 20)


def make_mri(path, **changes):
    config = dict(out=str(path), shape=MRI_SHAPE, coils=3, acceleration=2.5, calibration=8,
                  chunk_depth=2, workers=1, scheduler="sync", progress=False)
    config.update(changes)
    return simulate_mri(SimulateMRIConfig(**config))


def make_ct(path, **changes):
    config = dict(out=str(path), shape=CT_SHAPE, angles=18, chunk_depth=2, workers=1,
                  scheduler="sync", progress=False)
    config.update(changes)
    return simulate_ct(SimulateCTConfig(**config))


def kill_phantom_at_slab(monkeypatch, n: int = 3) -> None:
    """Make the ``n``-th phantom slab a simulation asks for raise ``KeyboardInterrupt``: a job
    killed part-way, its earlier slabs written (``monkeypatch.undo()`` or a new setattr restores)."""
    from pipeline.data import phantoms

    original = phantoms.AnalyticPhantom.slab
    calls = {"n": 0}

    def flaky(self, d0, d1):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("killed")
        return original(self, d0, d1)

    monkeypatch.setattr(phantoms.AnalyticPhantom, "slab", flaky)
