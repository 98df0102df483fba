"""``recon3d reconstruct`` in one process: slabs equal the whole volume, classical methods equal
the in-memory operators, the pyramid equals NumPy means, OME metadata, resume, recompute."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
import zarr

from pipeline.data import ScanError, open_scan
from pipeline.data.units import ngff_unit
from pipeline.errors import OutputConflictError
from pipeline.reconstruct import (ReconstructConfig, ReconstructResult, completion_records, open_ome, reconstruct,
                                  validate_ome)
from pipeline.reconstruct.adapters import _Network
from pipeline.reconstruct.coordination import resolve_model
from pipeline.reconstruct.ome import downsample_mean, multiscales_metadata
from reconstruct_helpers import MRI_SHAPE, save_model, whole_volume

# The driver module (its name is shadowed by the function in the package namespace): where the
# job looks up the slab writer, so where a test replaces it.
module = importlib.import_module("pipeline.reconstruct.reconstruct")

UNET = dict(widths=[4, 8])
UNROLLED = dict(backbone="dncnn", dncnn_width=4, dncnn_depth=3, reconstructor="unrolled",
                unrolled={"iterations": 2})
CT_UNET = dict(widths=[4, 8], initial="fbp")


def _run(scan, out, **kw) -> ReconstructResult:
    kw.setdefault("chunks", (2, 8, 8))
    kw.setdefault("progress", False)
    kw.setdefault("scheduler", "sync")
    return reconstruct(ReconstructConfig(scan=scan, out=str(out), **kw))


def _level(out, level=0) -> torch.Tensor:
    return torch.from_numpy(np.asarray(open_ome(str(out), level)[:]))


def _info(out) -> dict:
    return dict(zarr.open_group(str(out), mode="r").attrs)["recon3d"]


# ----------------------------------------------------------------------------- equality
@pytest.mark.parametrize("kind, cfg", [("mri", UNET), ("mri", UNROLLED), ("ct", CT_UNET)],
                         ids=["unet-mri", "unrolled-dncnn-mri", "unet-fbp-ct"])
def test_slabs_equal_the_whole_volume(tmp_path, mri_scan, ct_scan, kind, cfg):
    scan = mri_scan if kind == "mri" else ct_scan
    weights = save_model(tmp_path / "model.pt", kind, **cfg)
    out = tmp_path / "out.ome.zarr"
    result = _run(scan, out, model=str(weights), slab=4, workers=2, scheduler="threads")
    assert result.state == "created" and result.complete
    assert result.slabs_run == result.slabs_total == -(-open_scan(scan).metadata.volume_shape[0] // 4)
    whole = whole_volume(weights, scan)
    info = _info(out)
    # Halo = receptive radius along D: U-Net 9, unrolled 2 iterations x DnCNN depth 3 = 6.
    assert info["receptive_radius"] == (6 if cfg is UNROLLED else 9)
    assert info["settings"]["layout"]["halo"] == info["receptive_radius"]
    if kind == "mri":
        # The unrolled step 1/L: max Σ|S|² per slab is 1 to float32 rounding (normalised maps).
        torch.testing.assert_close(_level(out), whole.abs(), rtol=1e-5, atol=1e-6)
        cplx = torch.from_numpy(np.asarray(zarr.open_group(str(out), mode="r")["complex"][:]))
        torch.testing.assert_close(cplx, whole, rtol=1e-5, atol=1e-6)
        assert info["value"] == "magnitude" and info["complex"] == "complex"
    else:
        torch.testing.assert_close(_level(out), whole, rtol=1e-5, atol=1e-6)
        assert info["complex"] is None and "complex" not in zarr.open_group(str(out), mode="r")
    assert info["exact"] is (cfg is not UNROLLED)  # unrolled MRI carries the 1/L note
    assert info["complete"] is True and info["intensity_scale"] > 0


def test_tile_override_and_untiling(tmp_path, mri_scan):
    """--tile retiles the backbone (exact overlap by default); 0 0 0 removes a model's tiling,
    and so does the default: training tiles (here D 4 < the slab, overlap 2 < 2r) are not used."""
    plain = save_model(tmp_path / "plain.pt", "mri", backbone="dncnn", dncnn_width=4, dncnn_depth=3)
    tiled = save_model(tmp_path / "tiled.pt", "mri", backbone="dncnn", dncnn_width=4, dncnn_depth=3,
                       tile={"shape": [4, 8, 8], "overlap": 2})  # inexact: overlap < 2r
    whole = whole_volume(plain, mri_scan).abs()
    _run(mri_scan, tmp_path / "a", model=str(plain), tile=(8, 8, 8), slab=4)
    torch.testing.assert_close(_level(tmp_path / "a"), whole, rtol=1e-5, atol=1e-6)
    assert _info(tmp_path / "a")["exact"] is True
    _run(mri_scan, tmp_path / "b", model=str(tiled), tile=(0, 0, 0), slab=4)
    torch.testing.assert_close(_level(tmp_path / "b"), whole, rtol=1e-5, atol=1e-6)
    _run(mri_scan, tmp_path / "c", model=str(tiled), slab=4)
    torch.testing.assert_close(_level(tmp_path / "c"), whole, rtol=1e-5, atol=1e-6)
    info = _info(tmp_path / "c")
    assert info["exact"] is True and info["settings"]["reconstructor"]["tile"] == [0, 0, 0]
    _run(mri_scan, tmp_path / "d", model=str(tiled), slab=4, tile=(8, 8, 8), overlap=2)
    info = _info(tmp_path / "d")
    assert info["exact"] is False and any("tiles overlap" in n for n in info["notes"])


@pytest.mark.parametrize("kind, method", [("mri", "adjoint"), ("ct", "fbp"), ("ct", "adjoint")])
def test_classical_methods_equal_in_memory_operators(tmp_path, mri_scan, ct_scan, kind, method):
    scan_path = mri_scan if kind == "mri" else ct_scan
    scan = open_scan(scan_path)
    out = tmp_path / "out"
    _run(scan_path, out, method=method, chunks=(4, 8, 8), **({"filter": "ram-lak"} if method == "fbp" else {}))
    y, op = scan.slab(slice(0, scan.metadata.volume_shape[0]))
    if method == "adjoint":
        ref = op.adjoint(y)
    else:
        from operators3d.ct import fbp

        ref = fbp(y, scan.full_operator())
    ref = ref.abs() if ref.is_complex() else ref
    torch.testing.assert_close(_level(out), ref.to(torch.float32), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_sense_runs_per_slab(tmp_path, mri_scan):
    from operators3d import sense_cg

    scan = open_scan(mri_scan)
    _run(mri_scan, tmp_path / "s", method="sense", chunks=(4, 8, 8), sense_iters=5, l2_weight=1e-3)
    y, op = scan.slab(slice(4, 8))
    ref = sense_cg(y, op, l2_weight=1e-3, num_iters=5)
    torch.testing.assert_close(_level(tmp_path / "s")[4:8], ref.abs(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- pyramid and OME
def test_pyramid_levels_are_numpy_means_and_metadata_validates(tmp_path, mri_scan):
    out = tmp_path / "p.ome.zarr"
    _run(mri_scan, out, method="adjoint", pyramid=4, chunks=(2, 4, 4))
    assert validate_ome(str(out)) == []
    group = zarr.open_group(str(out), mode="r")
    shapes = [tuple(group[str(level)].shape) for level in range(4)]
    assert shapes == [MRI_SHAPE, (12, 8, 6), (6, 4, 3), (3, 2, 1)]  # odd axes drop their last voxel
    for level in range(1, 4):
        prev = np.asarray(group[str(level - 1)][:], dtype=np.float64)
        z, y, x = (s // 2 for s in prev.shape)
        want = prev[: 2 * z, : 2 * y, : 2 * x].reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5))
        np.testing.assert_allclose(group[str(level)][:], want.astype(np.float32), rtol=1e-6)
        assert group[str(level)].metadata.dimension_names == ("z", "y", "x")
    ms = group.attrs["ome"]["multiscales"][0]
    assert group.attrs["ome"]["version"] == "0.5"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"micrometer"}  # the scan's "um"
    assert {a["type"] for a in ms["axes"]} == {"space"}
    for level, ds in enumerate(ms["datasets"]):
        assert ds["path"] == str(level)
        scale = ds["coordinateTransformations"][0]
        assert scale == {"type": "scale", "scale": [1.0 * 2**level, 0.5 * 2**level, 0.5 * 2**level]}
    assert _info(out)["levels_complete"] == [1, 2, 3]


def test_metadata_validates_against_the_official_ngff_schema(tmp_path, mri_scan):
    """The group's attributes against the OME-Zarr 0.5 JSON Schemas (image and strict_image)
    published with the NGFF specification, as the ``ngff-zarr`` package bundles them; a
    broken copy of the same attributes is rejected, so the check can fail."""
    import jsonschema  # test dependencies (pyproject's "test" extra): never skipped
    import ngff_zarr
    out = tmp_path / "v.ome.zarr"
    _run(mri_scan, out, method="adjoint", pyramid=2, chunks=(2, 4, 4))
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    for strict in (False, True):
        ngff_zarr.validate(attrs, version="0.5", model="image", strict=strict)
    broken = json.loads(json.dumps(attrs))
    del broken["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    with pytest.raises(jsonschema.ValidationError):
        ngff_zarr.validate(broken, version="0.5", model="image")
    broken = json.loads(json.dumps(attrs))
    broken["ome"]["version"] = "0.4"
    with pytest.raises(jsonschema.ValidationError):
        ngff_zarr.validate(broken, version="0.5", model="image")


def test_validator_finds_what_breaks_the_specification():
    group = zarr.open_group(store=zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    for level, shape in enumerate([(4, 4, 4), (2, 2, 2)]):
        group.create_array(str(level), shape=shape, dtype="float32", dimension_names=("z", "y", "x"))
    good = multiscales_metadata((1.0, 1.0, 1.0), "mm", 2)
    group.attrs["ome"] = good
    assert validate_ome(group) == []

    def problems(change) -> str:
        meta = json.loads(json.dumps(good))
        change(meta)
        group.attrs["ome"] = meta
        return " | ".join(validate_ome(group))

    assert "version" in problems(lambda m: m.update(version="0.4"))
    assert "non-empty list" in problems(lambda m: m.update(multiscales=[]))
    assert problems(lambda m: m["multiscales"][0]["axes"][0].update(type="channel")) == ""  # c, y, x is fine
    assert "2 or 3 axes of type 'space'" in problems(
        lambda m: [a.update(type="channel") for a in m["multiscales"][0]["axes"][:2]])
    assert "order" in problems(lambda m: m["multiscales"][0]["axes"][2].update(type="time"))
    assert "unit" in problems(lambda m: m["multiscales"][0]["axes"][0].update(unit="mm"))
    assert "exactly one 'scale'" in problems(
        lambda m: m["multiscales"][0]["datasets"][0].update(coordinateTransformations=[
            {"type": "translation", "translation": [0.0, 0.0, 0.0]}]))
    assert "3 axes" in problems(
        lambda m: m["multiscales"][0]["datasets"][0]["coordinateTransformations"][0].update(scale=[1.0, 1.0]))
    assert "no array" in problems(lambda m: m["multiscales"][0]["datasets"][1].update(path="7"))
    assert "highest resolution" in problems(lambda m: m["multiscales"][0]["datasets"].reverse())
    group.create_array("2", shape=(4, 4, 4), dtype="float32", dimension_names=("x", "y", "z"))
    assert "dimension_names" in problems(lambda m: m["multiscales"][0]["datasets"][0].update(path="2"))
    assert ngff_unit("µm") == "micrometer" and ngff_unit("millimetre") == "millimeter"
    assert ngff_unit("furlong") is None


def test_downsample_mean_drops_the_odd_trailing_voxel():
    block = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    want = block[:2, :4, :4].reshape(1, 2, 2, 2, 2, 2).mean(axis=(1, 3, 5))
    np.testing.assert_array_equal(downsample_mean(block), want)


# ----------------------------------------------------------------------------- resume
def test_crash_then_rerun_equals_an_uninterrupted_run(tmp_path, mri_scan, monkeypatch):
    weights = save_model(tmp_path / "m.pt", "mri", **UNET)
    writes: dict[int, int] = {}
    original = module._write_slab

    def counting(level0, cplx, a, b, x):
        if sum(writes.values()) == 3 and crash["on"]:
            raise RuntimeError("simulated crash")
        writes[a] = writes.get(a, 0) + 1
        return original(level0, cplx, a, b, x)

    crash = {"on": True}
    monkeypatch.setattr(module, "_write_slab", counting)
    out = tmp_path / "r.ome.zarr"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(mri_scan, out, model=str(weights), slab=4, pyramid=2)
    assert len(completion_records(str(out))) == 3 and _info(out)["complete"] is False
    crash["on"] = False
    result = _run(mri_scan, out, model=str(weights), slab=4, pyramid=2)
    assert result.state == "resumed" and result.slabs_run == 3 and result.slabs_total == 6
    assert writes == {a: 1 for a in range(0, MRI_SHAPE[0], 4)}  # every slab written exactly once
    torch.testing.assert_close(_level(out), whole_volume(weights, mri_scan).abs(), rtol=1e-5, atol=1e-6)
    assert validate_ome(str(out)) == [] and _info(out)["complete"] is True
    assert len({r["run"] for r in completion_records(str(out)).values()}) == 2


def test_changed_model_or_setting_recomputes_everything(tmp_path, mri_scan):
    a = save_model(tmp_path / "a.pt", "mri", seed=0, **UNET)
    b = save_model(tmp_path / "b.pt", "mri", seed=1, **UNET)
    out = tmp_path / "o.ome.zarr"
    first = _run(mri_scan, out, model=str(a), slab=4)
    again = _run(mri_scan, out, model=str(a), slab=4)
    assert (first.state, again.state, again.slabs_run) == ("created", "already complete", 0)
    changed = _run(mri_scan, out, model=str(b), slab=4)
    assert changed.state == "recomputed" and changed.slabs_run == changed.slabs_total
    assert changed.fingerprint != first.fingerprint
    torch.testing.assert_close(_level(out), whole_volume(b, mri_scan).abs(), rtol=1e-5, atol=1e-6)
    assert len(completion_records(str(out))) == changed.slabs_total
    # Only the new fingerprint's records remain.
    assert sorted(p.name for p in (out / "records").iterdir()) == sorted(["zarr.json", changed.fingerprint[:32]])
    # The records are zarr groups: walking the output meets nothing zarr does not know (no warning).
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        members = [k for k, _ in zarr.open_group(str(out), mode="r").members(max_depth=None)]
    assert f"records/{changed.fingerprint[:32]}/slab_000000" in members
    setting = _run(mri_scan, out, model=str(b), slab=2, halo=9)
    assert setting.state == "recomputed" and setting.slabs_run == setting.slabs_total == MRI_SHAPE[0] // 2
    torch.testing.assert_close(_level(out), whole_volume(b, mri_scan).abs(), rtol=1e-5, atol=1e-6)


def test_another_pyramid_depth_keeps_level_0(tmp_path, mri_scan):
    out = tmp_path / "l.ome.zarr"
    _run(mri_scan, out, method="adjoint", pyramid=1)
    level0 = _level(out)
    result = _run(mri_scan, out, method="adjoint", pyramid=3)
    assert result.state == "resumed" and result.slabs_run == 0
    assert validate_ome(str(out)) == [] and _info(out)["levels_complete"] == [1, 2]
    torch.testing.assert_close(_level(out), level0, rtol=0, atol=0)
    assert tuple(open_ome(str(out), 2).shape) == (6, 4, 3)


# ----------------------------------------------------------------------------- errors, CLI
def test_errors_name_what_to_change(tmp_path, mri_scan):
    with pytest.raises(ValueError, match="exactly one"):
        ReconstructConfig(scan=mri_scan, out=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="for CT scans"):
        _run(mri_scan, tmp_path / "x", method="fbp")
    with pytest.raises(OutputConflictError, match="is a recon3d scan"):
        _run(mri_scan, mri_scan, method="adjoint")  # never overwrite a scan
    with pytest.raises(ValueError, match="multiple of the output chunk depth"):
        _run(mri_scan, tmp_path / "y", method="adjoint", slab=3)
    norm = save_model(tmp_path / "n.pt", "mri", widths=[4, 8], norm="instance")
    with pytest.raises(ValueError, match="--halo"):
        _run(mri_scan, tmp_path / "z", model=str(norm))
    (tmp_path / "notzarr").mkdir()
    (tmp_path / "notzarr" / "keep.txt").write_text("user data")
    with pytest.raises(OutputConflictError, match="non-empty folder that recon3d did not write"):
        _run(mri_scan, tmp_path / "notzarr", method="adjoint")
    assert (tmp_path / "notzarr" / "keep.txt").exists()


def test_cli(tmp_path, mri_scan, capsys):
    from pipeline.cli import main

    out = tmp_path / "cli.ome.zarr"
    assert main(["reconstruct", "--method", "adjoint", "--scan", mri_scan, "--out", str(out),
                 "--pyramid", "2", "--chunks", "4", "8", "8", "--no-progress"]) == 0
    assert validate_ome(str(out)) == []
    assert main(["reconstruct", "--method", "fbp", "--scan", mri_scan, "--out", str(tmp_path / "e"),
                 "--no-progress"]) == 2
    assert "for CT scans" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reconstruct", "--method", "adjoint", "--model", "m.pt", "--scan", mri_scan, "--out", "o"])


def test_run_directory_is_exported_when_stale(tmp_path, monkeypatch):
    """A run directory resolves to export/model.pt, exported first if missing or older than
    the latest complete checkpoint."""
    import os
    import time

    import pipeline.train

    run = tmp_path / "run"
    manifest = run / "checkpoints" / "step_00000003" / "recon3d" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_00000003")
    calls = []

    def fake_export(run_dir, out=None, **kw):
        calls.append(run_dir)
        path = run_dir / "export" / "model.pt"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"weights")
        return path

    monkeypatch.setattr(pipeline.train, "export_run", fake_export)
    export = run / "export" / "model.pt"
    assert resolve_model(run) == export and len(calls) == 1  # missing: exported
    assert resolve_model(run) == export and len(calls) == 1  # fresh: reused
    past = time.time() - 100
    os.utime(export, (past, past))
    assert resolve_model(run) == export and len(calls) == 2  # older than the checkpoint
    assert resolve_model(export) == export
    with pytest.raises(FileNotFoundError):
        resolve_model(tmp_path / "nothing")


def test_cone_beam_fdk_copies_the_derived_volume(tmp_path):
    """Cone beam couples slabs: --method fdk takes the scan's derived/fbp (preprocess, out of
    core); without it, and for models, an error says what to run."""
    from pipeline.data import PreprocessConfig, SimulateCTConfig, preprocess, simulate_ct

    scan = str(tmp_path / "cone.zarr")
    simulate_ct(SimulateCTConfig(out=scan, shape=(6, 12, 12), angles=8, geometry="cone", src_dist=30.0,
                                 det_dist=10.0, chunk_depth=2, seed=0, workers=1, scheduler="sync", progress=False))
    with pytest.raises(ScanError, match="recon3d preprocess"):
        _run(scan, tmp_path / "a", method="fdk")
    with pytest.raises(ValueError, match="use --method fdk"):
        _run(scan, tmp_path / "b", method="adjoint")
    weights = save_model(tmp_path / "m.pt", "ct", widths=[4, 8], initial="fbp")
    with pytest.raises(ScanError, match="--method fdk"):
        _run(scan, tmp_path / "c", model=str(weights))
    preprocess(PreprocessConfig(scan=scan, outputs=("fbp",), workers=1, scheduler="sync", progress=False))
    _run(scan, tmp_path / "d", method="fdk", pyramid=2)
    want = open_scan(scan).derived("fbp").read()
    np.testing.assert_array_equal(np.asarray(open_ome(str(tmp_path / "d"))[:]), want)
    assert validate_ome(str(tmp_path / "d")) == []


@pytest.mark.parametrize("kind", ["mri", "ct-hann"])
def test_staged_initial_estimate_equals_the_model_call(tmp_path, mri_scan, ct_scan, monkeypatch, kind):
    """An ArtifactRemoval with an adjoint/fbp initial estimate runs as model(x0, None) with x0
    computed piece by piece; forcing the plain model(y, op) path gives the same output. With a
    Hann-windowed FBP the staged x0 is the model's own (Hann) FBP: it was the Ram-Lak FBP, so a
    network trained on Hann inputs got noisier ones and its CLI reconstruction fell below its
    own input (issue 14.1)."""
    scan, weights = (mri_scan, save_model(tmp_path / "m.pt", "mri", **UNET)) if kind == "mri" else \
        (ct_scan, save_model(tmp_path / "m.pt", "ct", **{**CT_UNET, "fbp_filter": "hann"}))
    _run(scan, tmp_path / "staged", model=str(weights), slab=4)
    if kind != "mri":
        torch.testing.assert_close(_level(tmp_path / "staged"), whole_volume(weights, scan), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(_Network, "staged", property(lambda self: False))
    _run(scan, tmp_path / "plain", model=str(weights), slab=4)
    torch.testing.assert_close(_level(tmp_path / "staged"), _level(tmp_path / "plain"), rtol=1e-5, atol=1e-6)


def test_model_given_by_url_is_fetched_and_equals_the_local_file(tmp_path, ct_scan):
    """``--model URL`` names an exported weights file on a store: it is fetched to a local copy and
    read weights-only, and reconstructs exactly as the local file; a URL cannot be a run directory
    (``--pick best``), and a missing one says so."""
    import fsspec

    from pipeline.cli import main

    weights = save_model(tmp_path / "m.pt", "ct", widths=[4, 8], initial="fbp")
    url = "memory://recon3d-tests-model-url/m.pt"
    with fsspec.open(url, "wb") as f:
        f.write(weights.read_bytes())
    try:
        local, remote = str(tmp_path / "local.ome.zarr"), str(tmp_path / "remote.ome.zarr")
        assert main(["reconstruct", "--model", str(weights), "--scan", ct_scan, "--out", local, "--no-progress"]) == 0
        assert main(["reconstruct", "--model", url, "--scan", ct_scan, "--out", remote, "--no-progress"]) == 0
        assert np.array_equal(np.asarray(open_ome(local)[...]), np.asarray(open_ome(remote)[...]))
        with pytest.raises(ValueError, match="--pick best needs a run directory"):
            resolve_model(url, pick="best")
        with pytest.raises(FileNotFoundError, match="no such weights file"):
            resolve_model("memory://recon3d-tests-model-url/missing.pt")
    finally:
        fsspec.filesystem("memory").rm("/recon3d-tests-model-url", recursive=True)


def test_classical_method_on_a_non_linear_detector_says_so(tmp_path, ct_scan, capsys):
    """FBP of a scan with a recorded count floor: by default (``--detector auto``) followed by the
    clipped-FBP steps of the scan's levels, which take a clipped ray as a bound (the log says so;
    slab by slab equals the whole volume, and it is closer to the reference than plain FBP); with
    ``--detector ignore`` it inverts A as if y = A x, and the log and the output's notes say so
    (not marked exact). A linear scan gets neither."""
    from pipeline.classical import clipped_fbp, fbp_slab
    from pipeline.data import SimulateCTConfig, simulate_ct

    clipped = tmp_path / "floor.zarr"
    simulate_ct(SimulateCTConfig(out=str(clipped), shape=(4, 16, 16), angles=12, chunk_depth=2, seed=0,
                                 photons=1e4, floor=0.5, workers=1, scheduler="sync", progress=False))
    scan = open_scan(str(clipped))
    record = scan.metadata.detector
    assert record["model"] == "clip" and record["fraction_at_high"] > 0.02
    reconstruct(ReconstructConfig(scan=str(clipped), out=str(tmp_path / "a"), method="fbp", filter="hann",
                                  filter_cutoff=1.0, chunks=(2, 16, 16), progress=True))
    assert "FBP is followed by the clipped-FBP steps" in capsys.readouterr().err
    info = _info(tmp_path / "a")
    assert info["exact"] is True and not any("non-linear detector" in n for n in info["notes"])
    y, op = scan.slab(slice(0, 4))
    whole = clipped_fbp(y, op, high=record["high"], start=fbp_slab(y, op, filter="hann"))
    torch.testing.assert_close(_level(tmp_path / "a"), whole, rtol=1e-5, atol=1e-6)
    reconstruct(ReconstructConfig(scan=str(clipped), out=str(tmp_path / "c"), method="fbp", filter="hann",
                                  filter_cutoff=1.0, detector="ignore", progress=True))
    info = _info(tmp_path / "c")
    said = [n for n in info["notes"] if "non-linear detector" in n]
    assert len(said) == 1 and "--method fbp" in said[0] and "clip" in said[0]
    assert info["exact"] is False
    assert "non-linear detector" in capsys.readouterr().err
    ref = scan.reference.read_torch(slice(0, 4))
    err = {k: float((_level(tmp_path / k) - ref).norm()) for k in ("a", "c")}
    assert err["a"] < err["c"], err
    reconstruct(ReconstructConfig(scan=ct_scan, out=str(tmp_path / "l"), method="fbp", progress=True))
    err = capsys.readouterr().err
    assert "non-linear detector" not in err and "clipped-FBP" not in err
    assert not any("non-linear detector" in n for n in _info(tmp_path / "l")["notes"])
