"""Small scans shared by the data tests (made once per session; tests that damage a scan copy
it first)."""

from __future__ import annotations

import shutil

import pytest

from scan_factories import make_ct, make_mri


@pytest.fixture(scope="session")
def mri_scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("scans") / "mri.zarr"
    make_mri(path)
    return str(path)


@pytest.fixture(scope="session")
def noisy_mri_scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("scans") / "mri_noisy.zarr"
    make_mri(path, noise_sigma=0.05, seed=3)
    return str(path)


@pytest.fixture(scope="session")
def ct_scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("scans") / "ct.zarr"
    make_ct(path)
    return str(path)


@pytest.fixture
def copy_scan(tmp_path):
    """``copy_scan(path)`` → a private copy to damage."""

    def _copy(path):
        dest = tmp_path / ("copy_" + str(path).rstrip("/").split("/")[-1])
        shutil.copytree(path, dest)
        return str(dest)

    return _copy
