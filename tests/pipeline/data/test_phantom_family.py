"""The realistic held-out phantoms (issue 14.2): ``anatomy``, ``industrial``, ``organs`` and
their ``-crop`` variants — seeded, slab-consistent, any (D, H, W), with the structures they
promise. Small volumes only (the whole module runs in a few seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data import open_scan
from pipeline.data.phantoms import (
    HELD_OUT_PHANTOMS,
    PHANTOMS,
    TUNING_PHANTOMS,
    make_volume_source,
)

FAMILY = ("anatomy", "industrial", "organs")
SHAPE = (8, 40, 56)  # H != W on purpose


def _volume(name, shape=SHAPE, seed=0, **kw):
    return make_volume_source(name, shape, seed=seed, **kw).slab(0, shape[0])


def _border(vol):
    """The in-plane border ring of every D-slice."""
    return np.concatenate([vol[:, 0, :], vol[:, -1, :], vol[:, :, 0], vol[:, :, -1]], axis=1)


def _in_plane_radius(shape):
    """Distance from the centre in the phantoms' in-plane coordinates (square pixels)."""
    _, h, w = shape
    side = min(h, w)
    y = (2.0 * np.arange(h) + 1 - h) / side
    x = (2.0 * np.arange(w) + 1 - w) / side
    return np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)


def test_registry_separates_tuning_from_held_out():
    assert TUNING_PHANTOMS == ("ellipsoids",)
    assert set(HELD_OUT_PHANTOMS) >= {*FAMILY, *(f"{n}-crop" for n in FAMILY)}
    assert not set(TUNING_PHANTOMS) & set(HELD_OUT_PHANTOMS)
    assert set(TUNING_PHANTOMS) | set(HELD_OUT_PHANTOMS) <= set(PHANTOMS)


@pytest.mark.parametrize("name", FAMILY)
def test_seeded_slab_consistent_non_negative_with_zero_border(name):
    vol = _volume(name)
    assert vol.shape == SHAPE and vol.dtype == np.float32 and np.isfinite(vol).all()
    assert vol.min() >= 0 and 1.0 <= vol.max() <= 1.6
    assert (vol > 0).mean() > 0.1
    # the same seed gives the same volume, whatever the slab layout; another seed another one
    source = make_volume_source(name, SHAPE, seed=0)
    assert np.array_equal(np.concatenate([source.slab(0, 3), source.slab(3, 8)]), vol)
    assert np.array_equal(source.slab(5, 6)[0], vol[5])
    assert np.array_equal(_volume(name), vol)
    other = _volume(name, seed=1)
    assert np.abs(other - vol).mean() > 0.01
    # the whole object lies inside the field of view
    assert _border(vol).max() == 0


@pytest.mark.parametrize("name", FAMILY)
def test_crop_variant_crosses_the_edges_of_the_field_of_view(name):
    shape = (4, 48, 48)
    crop = make_volume_source(f"{name}-crop", shape, seed=0)
    assert crop.describe()["zoom"] == 1.5 and crop.describe()["kind"] == f"{name}-crop"
    vol = crop.slab(0, 4)
    assert _border(vol[1:3]).max() > 0.3
    assert (_border(vol[1:3]) > 0).mean() > 0.2
    assert _border(_volume(name, shape)).max() == 0
    # the same object magnified: zoom=1.5 on the plain name is the crop variant
    assert np.array_equal(make_volume_source(name, shape, seed=0, zoom=1.5).slab(1, 2), vol[1:2])


@pytest.mark.parametrize("name", FAMILY)
def test_shape_only_changes_sampling(name):
    # square pixels: a wider field of view adds columns and keeps the object (no stretching)
    narrow = _volume(name, (3, 32, 32))
    wide = _volume(name, (3, 32, 48))
    np.testing.assert_allclose(wide[:, :, 8:40], narrow, atol=1e-5)
    assert wide[:, :, :8].max() == 0 and wide[:, :, 40:].max() == 0
    # the draws do not depend on D: the slice at z = 0 is the same in D = 3 and D = 5
    np.testing.assert_allclose(_volume(name, (5, 32, 32))[2], narrow[1], atol=1e-5)
    # a finer grid samples the same object
    fine = _volume(name, (3, 64, 64))
    assert abs(fine.mean() - narrow.mean()) < 0.05 * narrow.mean()


def test_describe_records_name_seed_and_parameters():
    info = make_volume_source("industrial", (2, 16, 16), seed=7, num_features=40).describe()
    assert info["kind"] == "industrial" and info["seed"] == 7 and info["zoom"] == 1.0
    assert info["shape"] == [2, 16, 16] and info["parameters"]["num_pores"] == 40
    json.dumps(info)  # recorded in scan metadata as plain JSON
    assert make_volume_source("anatomy", (2, 16, 16), seed=0, zoom=2).describe()["zoom"] == 2.0
    with pytest.raises(ValueError, match="zoom"):
        make_volume_source("ellipsoids", (2, 16, 16), seed=0, zoom=2)
    with pytest.raises(ValueError, match="zoom"):
        make_volume_source("organs", (2, 16, 16), seed=0, zoom=0)


def test_anatomy_tissues_skull_rim_and_vessels():
    shape = (5, 128, 128)
    vol = _volume("anatomy", shape, seed=0)
    mid = vol[2]
    head = mid[mid > 0]
    # T1-like levels: CSF 0.2, GM 0.6, WM 0.8, skull 1.0 (texture ±2 %)
    for level in (0.2, 0.6, 0.8, 1.0):
        assert (np.abs(head - level) < 0.04).mean() > 0.01, level
    # a thin bright rim: along each axis from the edge, scalp, then 1–6 bright voxels, then dark CSF
    for ray in (mid[64], mid[64, ::-1], mid[:, 64], mid[::-1, 64]):
        start = int(np.argmax(ray > 0))
        bright = np.nonzero(ray[start:] >= 0.9)[0]
        first = start + int(bright[0])
        assert first - start <= 6
        run = int(np.argmax(ray[first:] < 0.9))
        assert 1 <= run <= 6
        assert ray[first + run : first + run + 4].min() < 0.5
    # folded cortex: the white matter's outline is much longer than a disc's of the same area
    wm = (mid > 0.7) & (mid < 0.9)
    inner = wm[1:-1, 1:-1] & wm[:-2, 1:-1] & wm[2:, 1:-1] & wm[1:-1, :-2] & wm[1:-1, 2:]
    outline = wm[1:-1, 1:-1].sum() - inner.sum()
    assert outline > 2.5 * 2 * np.sqrt(np.pi * wm.sum())
    # vessels: voxels brighter than any white matter, deep inside the brain (far from the skull)
    deep = _in_plane_radius(shape) < 0.45
    assert (vol[:, deep] > 0.92).sum() >= 3


def test_industrial_pores_fibres_inclusions():
    shape = (6, 96, 96)
    vol = _volume("industrial", shape, seed=0)
    inside = vol[:, _in_plane_radius(shape) < 0.7]
    assert 0.01 < (inside < 0.1).mean() < 0.4  # pores
    assert 0.5 < (np.abs(inside - 0.75) < 0.05).mean()  # the matrix
    assert ((inside > 1.1) & (inside < 1.3)).sum() > 10  # fibres
    info = make_volume_source("industrial", shape, seed=0).describe()["parameters"]
    assert info["num_cracks"] >= 2 and info["num_fibres"] > 0


def test_industrial_crack_is_a_thin_dark_sheet():
    from pipeline.data.phantom_family_ct import _Industrial

    model = _Industrial(np.random.default_rng(0), 0)
    model.fibres = model.fibres.__class__(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), 0.01)
    model.inclusions = []
    crack = model.cracks[0]
    z = float(crack["centre"][0])
    y = x = np.linspace(-1, 1, 401)
    row = model.row(z, y, x)
    inside = (np.sqrt(y[:, None] ** 2 + x[None, :] ** 2) < model.radius - 0.02)
    dark = inside & (row < 0.2)
    # the only holes in this row: a crack, as thin as its opening (<= 0.02) but long
    assert 30 < dark.sum() < 600


def test_organs_fat_organs_and_bone_rings():
    shape = (8, 64, 96)
    vol = _volume("organs", shape, seed=0)
    body = vol[vol > 0]
    assert (np.abs(body - 0.32) < 0.04).mean() > 0.1  # fat
    assert (np.abs(body - 0.65) < 0.04).mean() > 0.02  # muscle
    assert (body > 1.2).mean() > 0.002  # cortical bone
    assert (np.abs(body - 0.78) < 0.04).mean() > 0.01  # liver
    assert len(np.unique(np.round(body, 1))) >= 6


def test_cli_simulates_the_held_out_phantoms(tmp_path, capsys):
    out = str(tmp_path / "head.zarr")
    rc = main(["simulate", "ct", "--shape", "4", "24", "32", "--angles", "8", "--phantom", "anatomy",
               "--seed", "2", "--out", out, "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    reference = np.asarray(open_scan(out).reference.read())
    expected = make_volume_source("anatomy", (4, 24, 32), seed=2).slab(0, 4) * (4.0 / 32)
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-7)
    rc = main(["simulate", "mri", "--shape", "2", "16", "16", "--coils", "2", "--acceleration", "2",
               "--calibration", "4", "--phantom", "industrial-crop", "--out", str(tmp_path / "part.zarr"),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
