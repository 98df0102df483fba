"""Fixtures of the reconstruction tests: tiny MRI and parallel-beam CT scans."""

from __future__ import annotations

import pytest
from reconstruct_helpers import CT_SHAPE, MRI_SHAPE


@pytest.fixture(scope="session")
def mri_scan(tmp_path_factory) -> str:
    """A 24×16×12 MRI scan, 2 coils, chunks of 2 slices."""
    from pipeline.data import SimulateMRIConfig, simulate_mri

    out = tmp_path_factory.mktemp("scans") / "mri.zarr"
    simulate_mri(SimulateMRIConfig(out=str(out), shape=MRI_SHAPE, coils=2, acceleration=2.5, calibration=6,
                                   chunk_depth=2, seed=0, noise_sigma=0.01, voxel_size=(1.0, 0.5, 0.5),
                                   units="um", workers=1, scheduler="sync", progress=False))
    return str(out)


@pytest.fixture(scope="session")
def ct_scan(tmp_path_factory) -> str:
    """A 12×16×16 parallel-beam CT scan, 12 angles, chunks of 2 slices."""
    from pipeline.data import SimulateCTConfig, simulate_ct

    out = tmp_path_factory.mktemp("scans") / "ct.zarr"
    simulate_ct(SimulateCTConfig(out=str(out), shape=CT_SHAPE, angles=12, chunk_depth=2, seed=0,
                                 workers=1, scheduler="sync", progress=False))
    return str(out)
