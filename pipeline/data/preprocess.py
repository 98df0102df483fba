"""``recon3d preprocess``: classical baselines and splits under ``SCAN/derived/``, slab by slab.

Outputs (each a ``(D, H, W)`` volume chunked like the scan, or ``(K, D, H, W)`` for splits):

* CT ``fbp`` — filtered back-projection of every slab (parallel beam), or FDK (cone beam);
* CT ``n2i`` — Noise2Inverse sub-reconstructions (Hendriksen et al. 2020): subset ``k`` of
  ``K`` holds the angles ``k, k + K, k + 2K, ...`` and ``n2i[k]`` is their FBP/FDK;
* MRI ``adjoint`` — the zero-filled reconstruction ``Aᴴ y`` of every slab;
* MRI ``sense`` — SENSE by conjugate gradient per slab (``operators3d.sense_cg``).

The reconstructions themselves are :mod:`pipeline.classical`'s (cone-beam FDK by blocks of
detector rows: :func:`pipeline.data.cone.fdk_tasks`).

Each output array carries its own ``recon3d`` attributes (``status``, ``parameters``); the
work is a set of :mod:`pipeline.data.writer` tasks, so a killed run resumes, and only the
``derived/`` group of the scan is written (the scan's own arrays and attributes are not
touched).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import zarr

from pipeline.config_base import PathStr, Settings

from .format import (
    ATTRS_KEY,
    ArraySpec,
    CodecConfig,
    CTGeometry,
    ScanError,
    now_iso,
    on_object_store,
)
from .store import create_array, open_group, stored_depth_of
from .scan import open_scan
from .writer import SlabTask, jsonable, run_tasks, task_groups

__all__ = ["PreprocessConfig", "preprocess", "DERIVED_OUTPUTS"]

DERIVED_OUTPUTS = {"ct": ("fbp", "n2i"), "mri": ("adjoint", "sense")}
_DEFAULTS = {"ct": ("fbp", "n2i"), "mri": ("adjoint",)}


class PreprocessConfig(Settings):
    """Settings of ``recon3d preprocess``.

    Args:
        scan: the scan (its ``derived/`` group is written).
        outputs: which outputs (default CT ``fbp, n2i``; MRI ``adjoint``).
        n2i_splits: ``K`` angle subsets for ``n2i``.
        filter: FBP/FDK filter window (``ram-lak``, ``shepp-logan``, ``cosine``, ``hann``).
        sense_iters, l2_weight: SENSE settings.
        codec: compression of the outputs.
    """

    _where: ClassVar[str] = "preprocess"
    _flags: ClassVar[bool] = True
    scan: PathStr
    outputs: tuple[str, ...] | None = None
    n2i_splits: int = 4
    filter: str = "ram-lak"
    sense_iters: int = 20
    l2_weight: float = 1e-3
    codec: CodecConfig = CodecConfig()
    overwrite: bool = False
    workers: int = 2
    scheduler: str = "threads"
    progress: bool = True

    def parameters(self, output: str) -> dict[str, Any]:
        base: dict[str, Any] = {"codec": self.codec.recorded(self.scan)}
        if output in ("fbp", "n2i"):
            base["filter"] = self.filter
        if output == "n2i":
            base["splits"] = self.n2i_splits
        if output == "sense":
            base.update(iterations=self.sense_iters, l2_weight=self.l2_weight)
        return jsonable(base)


def _spec(name: str, shape: tuple[int, int, int], splits: int, modality: str) -> ArraySpec:
    if name == "n2i":
        return ArraySpec(name, (splits,) + shape, "float32", ("subset", "d", "h", "w"))
    dtype = "float32" if modality == "ct" else "complex64"
    return ArraySpec(name, shape, dtype, ("d", "h", "w"))


def _check_derived(scan_path: Any, derived: Any, name: str) -> None:
    """Refuse to touch ``derived/NAME`` unless it is missing or an array preprocess wrote.

    Preprocess writes only inside the scan's ``derived`` group; ``--overwrite`` recomputes its
    own arrays (``written_by: "preprocess"``, or the ``status`` and ``parameters`` older
    versions recorded) and never replaces a group or an array someone else put there.
    """
    from pipeline.errors import OutputConflictError

    if name not in derived:
        return
    member = derived[name]
    info = dict(member.attrs).get(ATTRS_KEY) if isinstance(member, zarr.Array) else None
    ours = isinstance(info, dict) and (
        info.get("written_by") == "preprocess"
        or ("written_by" not in info and "parameters" in info and "status" in info))
    if not ours:
        what = "an array" if isinstance(member, zarr.Array) else "a group"
        raise OutputConflictError(
            f"preprocess: 'derived/{name}' of scan '{scan_path}' is {what} that recon3d preprocess did "
            "not write; recon3d preprocess never replaces it: move it out of the scan first")


def preprocess(config: PreprocessConfig) -> dict[str, str]:
    """Compute the derived outputs; returns ``{output: "created"|"resumed"|"already complete"}``.

    Raises:
        ScanError: an output unknown for the modality, or one that exists with other
            parameters (pass ``overwrite``).
    """
    scan = open_scan(config.scan)
    modality = scan.modality
    outputs = tuple(config.outputs) if config.outputs else _DEFAULTS[modality]
    for name in outputs:
        if name not in DERIVED_OUTPUTS[modality]:
            raise ScanError(
                f"scan '{scan.path}': preprocess output {name!r} is not one of "
                f"{DERIVED_OUTPUTS[modality]} for {modality}"
            )
    if "n2i" in outputs and not 2 <= config.n2i_splits <= scan.metadata.geometry.num_angles:  # type: ignore[union-attr]
        raise ValueError(f"preprocess: --n2i-splits must be in 2..A, got {config.n2i_splits}")
    root = open_group(config.scan, mode="r+")
    derived = root.require_group("derived")
    shape = tuple(scan.metadata.volume_shape)
    codec = config.codec.resolved(8 * config.n2i_splits * shape[1] * shape[2], scan.chunk_depth, shape[0],
                                  object_store=on_object_store(root))  # one shard depth for every derived array
    states: dict[str, str] = {}
    arrays = {}
    for name in outputs:
        params = config.parameters(name)
        existing = set(derived.array_keys())
        _check_derived(scan.path, derived, name)
        state = "created"
        if name in existing and not config.overwrite:
            info = dict(derived[name].attrs).get(ATTRS_KEY) or {}
            if jsonable(info.get("parameters")) != params:
                raise ScanError(
                    f"scan '{scan.path}': array 'derived/{name}' exists with other parameters "
                    f"({info.get('parameters')} vs {params}); pass --overwrite to recompute it"
                )
            state = "already complete" if info.get("status") == "complete" else "resumed"
            arr = derived[name]
        else:
            spec = _spec(name, shape, config.n2i_splits, modality)
            arr = create_array(derived, spec, chunk_depth=scan.chunk_depth, codec=codec, overwrite=True)
            arr.attrs[ATTRS_KEY] = {"status": "incomplete", "parameters": params, "created": now_iso(),
                                    "written_by": "preprocess"}
        states[name] = state
        if state != "already complete":
            arrays[name] = arr.with_config({"write_empty_chunks": True})
    if not arrays:
        return states

    geom = scan.metadata.geometry
    tasks: list[SlabTask] = []
    if isinstance(geom, CTGeometry) and geom.kind == "cone":
        from .cone import fdk_tasks

        tasks = fdk_tasks(scan, arrays, config)
    else:
        from pipeline.classical import fbp_slab, n2i_slab, reconstruct_slab, sense_slab

        d = shape[0]
        stored = min(stored_depth_of(a) for a in arrays.values())

        def work(d0: int, d1: int) -> None:
            d_slice = slice(d0, d1)
            y, op = scan.slab(d_slice)
            with torch.no_grad():
                if "fbp" in arrays:
                    arrays["fbp"][d0:d1] = fbp_slab(y, op, filter=config.filter).to(torch.float32).numpy()
                if "n2i" in arrays:
                    subs = n2i_slab(y, op, config.n2i_splits, filter=config.filter)
                    arrays["n2i"][:, d0:d1] = subs.to(torch.float32).numpy()
                if "adjoint" in arrays:
                    arrays["adjoint"][d0:d1] = reconstruct_slab("adjoint", y, op, {}).numpy()
                if "sense" in arrays:
                    x = sense_slab(y, op, l2_weight=config.l2_weight, iterations=config.sense_iters)
                    arrays["sense"][d0:d1] = x.numpy()

        # parallel beam: slices are independent, and the projector's cost per update falls with
        # the slab, so a task takes several stored objects; MRI: one object a task (SENSE's
        # iterations couple the slices of a slab)
        grouped = isinstance(geom, CTGeometry) and not ({"adjoint", "sense"} & set(arrays))
        per_slice = math.prod(scan.measurements.shape[1:]) * 4 + sum(
            math.prod(a.shape) // d * 4 for a in arrays.values())
        for objects, d0, d1 in task_groups(d, stored, per_slice, budget=None if grouped else 0):
            tasks.append(
                SlabTask(f"slab{objects.start}", (lambda a=d0, b=d1: work(a, b)),
                         [(arr, i) for i in objects for arr in arrays.values()])
            )
    run_tasks(tasks, description=f"preprocess {'+'.join(arrays)}", workers=config.workers,
              scheduler=config.scheduler, progress=config.progress)
    for name, arr in arrays.items():
        info = dict(dict(arr.attrs).get(ATTRS_KEY) or {})
        info.update(status="complete", completed=now_iso())
        arr.attrs[ATTRS_KEY] = info
    return states
