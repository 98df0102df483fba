"""Starting a run from trained weights (``model.init``) and training only part of the network
(``model.freeze``): pretrain once, then adapt to each new scan in a fraction of the steps.

``model.init`` (or ``recon3d train CONFIG --init SOURCE``) names an exported weights file
(``recon3d export``) or a run directory (its latest checkpoint, merged as export does). The
weights are read weights-only (:mod:`pipeline.safeload`: nothing in the file can run) and
checked against the config before any step:

* the modality and the network's input channels must be the scan's;
* every field of ``model`` that defines the network's function or parameters (backbone,
  widths, convolutions per level, normalisation, activation, residual, DnCNN width and depth,
  reconstructor, initial estimate, unrolled settings, ...) must equal the pretrained model's;
  memory settings (``activation_checkpointing``, ``tile``) and ``start_at_initial``,
  ``init``, ``freeze`` may differ. A mismatch is a :class:`~pipeline.train.config.ConfigError`
  naming each field, both values and what to do.

Only the reconstructor's weights are taken (the network ``model(y, op)``), so a model trained
with a splitting loss (Noise2Inverse, SSDU: a wrapper around the reconstructor) can start an
EI run and the other way round. The loss, optimizer and schedule are the new config's: Adam's
moments start at zero and the schedule at step 0.

``init`` is applied at step 0 only. A resumed run continues from its own checkpoint, which
holds the fine-tuned weights, so fine-tuning resumes exactly like any run and the init source
may be gone by then.

``model.freeze`` lists parts left untrained (``requires_grad`` off before the optimizer is
built, so they get no Adam state): a name matches a parameter when it is one of the dotted
components of the parameter's name inside the reconstructor, also with an ``s`` appended
(``encoder`` matches ``backbone.encoders.0...``), or a dotted prefix of it (``backbone.head``,
``backbone.convs.0``). A name that matches nothing is an error listing the top-level parts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .config import ConfigError, ModelConfig

__all__ = ["init_payload", "check_architecture", "load_init", "apply_freeze", "frozen_count", "NOT_ARCHITECTURE"]

#: ``model`` fields that may differ between the pretrained model and the config.
NOT_ARCHITECTURE = frozenset({"activation_checkpointing", "tile", "start_at_initial", "init", "freeze"})


def init_payload(source: str | Path) -> dict[str, Any]:
    """The pretrained model of ``source``: an export's payload, or a run's latest checkpoint merged
    into the same form.

    Raises:
        InputError: nothing usable there (no file or run, not an export, no checkpoint), or the
            weights hold NaN/Inf.
        UntrustedFileError: a file that would need to run code to load.
    """
    from ..paths import is_url
    from .checkpoint import CheckpointError
    from .export import check_finite, read_export, run_payload

    text = str(source)
    if is_url(text):
        raise InputError(f"model.init: {text}: a URL; copy the weights file to a local path first")
    path = Path(text)
    if path.is_dir():
        try:
            payload = run_payload(path)
        except (CheckpointError, FileNotFoundError) as err:
            raise InputError(f"model.init: {path}: a folder without checkpoints ({err}); name an exported "
                             "weights file or a run directory that holds checkpoints") from None
        check_finite(payload["state_dict"], path)
        return payload
    if not path.is_file():
        raise InputError(f"model.init: {path}: no such file or run directory")
    return read_export(path)


def _fields(config: dict[str, Any]) -> dict[str, Any]:
    """A model config's architecture fields, defaults filled in."""
    full = ModelConfig.model_validate(config).model_dump(mode="json")
    return {k: v for k, v in full.items() if k not in NOT_ARCHITECTURE}


def check_architecture(payload: dict[str, Any], config: ModelConfig, *, modality: str, channels: int,
                       source: str) -> None:
    """Refuse pretrained weights that do not fit the config's network (see the module doc)."""
    problems: list[str] = []
    if payload.get("modality") != modality:
        problems.append(f"modality: {payload.get('modality')} there, {modality} here (the training scans)")
    if int(payload.get("channels", -1)) != int(channels):
        problems.append(f"input channels: {payload.get('channels')} there, {channels} here")
    theirs = _fields(payload["model_config"])
    ours = _fields(config.model_dump(mode="json"))
    for key in sorted(ours):
        if theirs.get(key) != ours[key]:
            problems.append(f"model.{key}: {theirs.get(key)!r} there, {ours[key]!r} here")
    if problems:
        raise ConfigError(f"model.init: {source} does not fit this config's network: " + "; ".join(problems)
                          + ". Set these model.* values to the pretrained model's, or train from scratch "
                          "without model.init")


def load_init(model: nn.Module, payload: dict[str, Any], source: str) -> int:
    """Copy the pretrained reconstructor's weights into ``model``'s reconstructor; the number of
    tensors copied."""
    from pipeline.models import reconstructor_of

    from .export import _build

    pretrained = reconstructor_of(_build(payload))
    target = reconstructor_of(model)
    if pretrained is None or target is None:
        raise ConfigError(f"model.init: {source}: no reconstructor found in the "
                          f"{'pretrained model' if pretrained is None else 'new model'}")
    state = pretrained.state_dict()
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shapes the field check could not see (e.g. a newer export)
        raise ConfigError(f"model.init: {source}: the weights do not fit the network: {err}") from None
    return len(state)


def _matches(name: str, part: str) -> bool:
    components = name.split(".")
    return part in components or part + "s" in components or name.startswith(part + ".")


def apply_freeze(model: nn.Module, parts: list[str]) -> list[str]:
    """Turn off gradients of the reconstructor's parameters named by ``parts``; their names.

    Raises:
        ConfigError: a part matches no parameter (the message lists the top-level parts), or
            every parameter would be frozen.
    """
    from pipeline.models import reconstructor_of

    if not parts:
        return []
    rec = reconstructor_of(model) or model
    named = list(rec.named_parameters())
    frozen: list[str] = []
    for part in parts:
        hits = [n for n, _ in named if _matches(n, part)]
        if not hits:
            tops = sorted({".".join(n.split(".")[:2]) for n, _ in named})
            raise ConfigError(f"model.freeze: {part!r} names no parameter of the network; its parts are "
                              f"{', '.join(tops)} (a U-Net's encoder, decoder and head match by name)")
        frozen.extend(h for h in hits if h not in frozen)
    if len(frozen) == len(named):
        raise ConfigError(f"model.freeze: {parts} freezes every parameter: nothing would train")
    by_name = dict(named)
    for n in frozen:
        by_name[n].requires_grad_(False)
    return frozen


def frozen_count(model: nn.Module) -> tuple[int, int]:
    """(frozen, total) parameter elements."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if not p.requires_grad), total

