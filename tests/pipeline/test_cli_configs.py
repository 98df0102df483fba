"""The command-line options of each command match the settings model they fill: an option left
out gives the model's default (the CLI never repeats a default that drifted), and every option
is a setting of the model (or one of the few that steer the process, listed here)."""

from __future__ import annotations

import argparse

import pytest

from pipeline.cli import _build_parser, _quickstart_config
from pipeline.data.cli import _ingest_config, _preprocess_config, _simulate_config
from pipeline.data.ingest import IngestCTConfig, IngestMRIConfig
from pipeline.data.preprocess import PreprocessConfig
from pipeline.data.simulate import SimulateCTConfig, SimulateMRIConfig
from pipeline.quickstart import QuickstartConfig
from pipeline.reconstruct.cli import _config as _reconstruct_config
from pipeline.reconstruct.config import ReconstructConfig

#: Options named other than their setting: ``dest`` → the setting's path in the model.
_RENAMED = {"no_progress": "progress", "no_phase": "phase", "no_log": "log", "no_complex": "keep_complex",
            "no_checksum": "codec.checksum", "checksum": "codec.checksum", "codec": "codec.compressor",
            "clevel": "codec.clevel", "shuffle": "codec.shuffle", "shard_chunks": "codec.shard_chunks",
            "path": "scan", "wait_timeout": "wait_timeout_s"}
#: Options that are no setting of the model: argparse's own, the URLs' fsspec options (read from
#: the environment too) and reconstruct's allocator choice (how the process runs, not the job).
_NOT_SETTINGS = {"help", "storage_options", "memory"}
#: Options a command accepts and does not use (none: an ignored option is a silent surprise).
_UNUSED: dict[tuple[str, ...], set[str]] = {}

# (command words, required arguments, how the command builds its config, the model, settings the
# required arguments set)
COMMANDS = [
    (["simulate", "mri"], ["--out", "x.zarr"], _simulate_config, SimulateMRIConfig, {"out"}),
    (["simulate", "ct"], ["--out", "x.zarr"], _simulate_config, SimulateCTConfig, {"out"}),
    (["ingest", "mri"], ["k.h5", "--out", "x.zarr"], _ingest_config, IngestMRIConfig, {"source", "out"}),
    (["ingest", "ct"], ["p.npy", "--out", "x.zarr"], _ingest_config, IngestCTConfig, {"source", "out"}),
    (["preprocess"], ["x.zarr"], _preprocess_config, PreprocessConfig, {"scan"}),
    (["reconstruct"], ["--method", "fbp", "--scan", "x.zarr", "--out", "o.ome.zarr"], _reconstruct_config,
     ReconstructConfig, {"scan", "out", "method"}),
    (["quickstart"], [], _quickstart_config, QuickstartConfig, set()),
]
IDS = [" ".join(c[0]) for c in COMMANDS]


def _leaf(words: list[str]) -> argparse.ArgumentParser:
    parser = _build_parser()
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _setting(model: type, path: str) -> bool:
    head, _, rest = path.partition(".")
    field = model.model_fields.get(head)
    if field is None:
        return False
    return not rest or _setting(field.annotation, rest)


@pytest.mark.parametrize(("words", "required", "build", "model", "given"), COMMANDS, ids=IDS)
def test_an_option_left_out_gives_the_models_default(words, required, build, model, given):
    config = build(_build_parser().parse_args([*words, *required]))
    assert isinstance(config, model)
    for name, field in model.model_fields.items():
        if name not in given:
            assert getattr(config, name) == field.get_default(call_default_factory=True), \
                f"{' '.join(words)}: the default of {name} differs from {model.__name__}'s"


@pytest.mark.parametrize(("words", "required", "build", "model", "given"), COMMANDS, ids=IDS)
def test_every_option_is_a_setting_of_the_model(words, required, build, model, given):
    for action in _leaf(words)._actions:
        if action.dest in _NOT_SETTINGS | _UNUSED.get(tuple(words), set()):
            continue
        path = _RENAMED.get(action.dest, action.dest)
        assert _setting(model, path), f"{' '.join(words)} {action.option_strings or action.dest}: " \
            f"no setting {path} in {model.__name__}"


def test_voxel_size_is_three_numbers_for_mri_and_one_for_ct():
    mri = _simulate_config(_build_parser().parse_args(["simulate", "mri", "--out", "x", "--voxel-size", "1", "2", "3"]))
    ct = _simulate_config(_build_parser().parse_args(["simulate", "ct", "--out", "x", "--voxel-size", "0.5"]))
    assert mri.voxel_size == (1.0, 2.0, 3.0) and ct.voxel_size == 0.5
    for words in (["simulate", "mri"], ["simulate", "ct"], ["ingest", "mri"], ["ingest", "ct"]):
        action = next(a for a in _leaf(words)._actions if a.dest == "voxel_size")
        assert action.help and ("three" in action.help and "one" in action.help)


def test_preprocess_has_no_chunk_depth_to_ignore(capsys):
    """The derived arrays take the scan's chunk depth: the option is refused, not dropped."""
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["preprocess", "scan.zarr", "--chunk-depth", "4"])
    assert exit_.value.code == 2 and "--chunk-depth" in capsys.readouterr().err
