"""Paths and URLs (pipeline/paths.py): local-only arguments refuse URLs with the reason, and
never leave a local folder named after the URL's scheme (``Path("s3://b/run")`` is ``s3:/b/run``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.paths import LocalPathRequired, is_url, local_path, require_local


@pytest.mark.parametrize("text, url", [
    ("s3://bucket/run", True), ("gs://b/x.zarr", True), ("memory://scan.zarr", True),
    ("simplecache::s3://b/k", True), ("file:///tmp/x", False), ("runs/x", False), ("/tmp/a://b", False),
    (Path("outputs/q"), False),
])
def test_is_url(text, url):
    assert is_url(text) is url


def test_local_path_strips_file_scheme_and_refuses_urls():
    assert local_path("file:///tmp/run") == Path("/tmp/run")
    assert local_path("runs/x") == Path("runs/x")
    with pytest.raises(LocalPathRequired, match="train --run-dir must be a local path.*'s3://b/run': because"):
        require_local("s3://b/run", "train --run-dir", "because")


@pytest.mark.parametrize("argv, named", [
    (["train", "CONFIG", "--run-dir", "s3://b/run"], "--run-dir"),
    (["train", "CONFIG", "--run-dir", "runs/x", "--resume", "s3://b/run/checkpoints"], "--resume"),
    (["train", "s3://b/experiment.yaml"], "the experiment file"),
    (["export", "s3://b/run"], "export RUN_DIR"),
    (["export", "runs/x", "--out", "s3://b/model.pt"], "export --out"),
    (["export", "runs/x", "--checkpoint", "gs://b/run/checkpoints/step_10"], "export --checkpoint"),
    (["quickstart", "--out", "s3://b/quickstart"], "quickstart --out"),
    (["report", "out.ome.zarr", "--out", "s3://b/report"], "report --out"),
    (["evaluate", "out.ome.zarr", "--json", "s3://b/metrics.json"], "evaluate --json"),
    (["ingest", "mri", "s3://b/kspace.dat", "--out", "scan.zarr"], "ingest SOURCE"),  # .npy/.h5 URLs are read
])
def test_local_only_arguments_refuse_urls_and_write_nothing(argv, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[2] / "launch" / "configs" / "ct_rei.yaml"
    argv = [str(config) if a == "CONFIG" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "must be a local path" in err and "got the URL" in err
    assert not list(tmp_path.iterdir()), "a refused URL left something in the working folder"


def test_file_urls_are_local_paths(tmp_path, monkeypatch, capsys):
    # `file://` names a local path: accepted where a local path is needed (the export then fails
    # for want of a checkpoint, naming the local folder, not 'file:')
    monkeypatch.chdir(tmp_path)
    code = main(["export", f"file://{tmp_path}/run"])
    assert code != 0
    assert f"{tmp_path}/run" in capsys.readouterr().err
    assert not (tmp_path / "file:").exists()


# ----------------------------------------------------------------------------- --storage-options
class _TokenMemory(__import__("fsspec.implementations.memory", fromlist=["MemoryFileSystem"]).MemoryFileSystem):
    """An in-memory store that, like a cloud store, refuses to open without its credential."""

    protocol = ("r3dtoken",)

    def __init__(self, *args, token=None, **kwargs):
        if token != "secret":
            raise PermissionError(f"r3dtoken: no valid token (got {token!r})")
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("r3dtoken://"):] if path.startswith("r3dtoken://") else path
        return super()._strip_protocol(path)


@pytest.fixture
def token_store():
    import fsspec

    fsspec.register_implementation("r3dtoken", _TokenMemory, clobber=True)
    yield "r3dtoken://recon3d-tests-storage-options"
    _TokenMemory.store.clear()
    _TokenMemory.pseudo_dirs[:] = [""]


def test_storage_options_reach_every_store_a_command_opens(token_store, monkeypatch, capsys):
    import fsspec.config

    scan, out = f"{token_store}/scan.zarr", f"{token_store}/fbp.ome.zarr"
    opts = ["--storage-options", '{"token": "secret"}']
    assert main(["simulate", "ct", "--shape", "4", "24", "24", "--angles", "12", "--photons", "1e4",
                 "--phantom", "shepp-logan", "--out", scan, "--no-progress", *opts]) == 0
    # without the credential the store cannot be opened, and the command says so
    assert main(["inspect", scan]) != 0
    assert "no valid token" in capsys.readouterr().err
    # every store of a command gets it: the scan read and the output written
    assert main(["reconstruct", "--method", "fbp", "--scan", scan, "--out", out, "--no-progress", *opts]) == 0
    # the environment gives the default
    monkeypatch.setenv("RECON3D_STORAGE_OPTIONS", '{"token": "secret"}')
    assert main(["evaluate", out, "--reference", scan, "--no-object"]) == 0
    monkeypatch.delenv("RECON3D_STORAGE_OPTIONS")
    # and nothing stays behind in this process
    assert "r3dtoken" not in fsspec.config.conf
    assert main(["inspect", scan]) != 0


@pytest.mark.parametrize("value, message", [("{token: 1}", "not valid JSON"), ('["a"]', "must be a JSON object")])
def test_storage_options_must_be_a_json_object(value, message, capsys):
    assert main(["inspect", "memory://nothing.zarr", "--storage-options", value]) == 2
    assert message in capsys.readouterr().err
