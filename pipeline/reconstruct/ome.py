"""OME-Zarr 0.5 images: metadata, level arrays, an out-of-core mean pyramid, a reader and a validator.

An OME-Zarr 0.5 image is a zarr v3 group whose ``zarr.json`` attributes hold, under ``ome``,
``version: "0.5"`` and ``multiscales``: the axes (here ``z, y, x``, type ``space``, with a unit
from the specification's list) and one dataset per resolution level, each with exactly one
``scale`` transformation (and optionally one ``translation`` after it). Each level is an array
of the group whose ``dimension_names`` are the axis names. Standard viewers (napari, neuroglancer,
Fiji/MoBIE, ...) open it. The format recon3d writes is described in ``docs/output-format.md``.

Level ``l ≥ 1`` is the 2×2×2 mean of level ``l − 1`` (the last slice, row or column of an odd
axis is dropped), so its voxel size is ``2^l`` times level 0's and its first voxel centre sits
at ``(2^l − 1)/2`` level-0 voxels: the ``translation`` keeps the levels aligned in a viewer.

No validator or schema of the specification is installed here, so :func:`validate_ome` checks
the rules of the NGFF 0.5 ``image.schema`` (https://ngff.openmicroscopy.org/0.5/schemas/image.schema:
required keys, counts, types, one ``scale`` per transformation list) and the specification's
prose MUSTs that the schema cannot express (axis order, transformation lengths, units, arrays
that exist with ``dimension_names`` equal to the axes), written down here, not copied.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import zarr

from pipeline.data.units import SPACE_UNITS, TIME_UNITS, ngff_unit

__all__ = [
    "NGFF_VERSION",
    "level_shapes",
    "multiscales_metadata",
    "create_level",
    "downsample_mean",
    "pyramid_tasks",
    "validate_ome",
    "check_ome",
    "open_ome",
    "OMEError",
]

NGFF_VERSION = "0.5"
AXES = ("z", "y", "x")


class OMEError(ValueError):
    """An OME-Zarr image that does not follow the specification (the message lists why)."""


def level_shapes(shape: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """The shape of each level: level ``l`` halves level ``l − 1`` (rounded down) on every axis.

    Raises:
        ValueError: ``levels < 1``, or a level would have an axis of size 0.
    """
    if int(levels) < 1:
        raise ValueError(f"pyramid levels must be >= 1, got {levels}")
    out = [tuple(int(s) for s in shape)]
    for level in range(1, int(levels)):
        nxt = tuple(s // 2 for s in out[-1])
        if min(nxt) < 1:
            most = len(out)
            raise ValueError(
                f"a volume of shape {tuple(shape)} has at most {most} pyramid levels (level "
                f"{level} would be {nxt}); use --pyramid {most} or fewer"
            )
        out.append(nxt)
    return out


def multiscales_metadata(
    voxel_size: Sequence[float],
    units: str | None,
    levels: int,
    *,
    name: str = "reconstruction",
) -> dict[str, Any]:
    """The ``ome`` attribute of a ``z, y, x`` image with ``levels`` 2× mean levels ``"0"…``.

    Level ``l``: ``scale = voxel_size · 2^l``, ``translation = voxel_size · (2^l − 1)/2``.
    """
    unit = ngff_unit(units)
    axes = []
    for axis in AXES:
        entry: dict[str, Any] = {"name": axis, "type": "space"}
        if unit is not None:
            entry["unit"] = unit
        axes.append(entry)
    datasets = []
    for level in range(int(levels)):
        f = 2**level
        transforms: list[dict[str, Any]] = [
            {"type": "scale", "scale": [float(v) * f for v in voxel_size]}
        ]
        if level:
            transforms.append(
                {"type": "translation", "translation": [float(v) * (f - 1) / 2 for v in voxel_size]}
            )
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    return {
        "version": NGFF_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": axes,
                "datasets": datasets,
                "type": "mean",
                "metadata": {
                    "description": "level l is the 2x2x2 mean of level l-1 (odd trailing "
                    "slice, row or column dropped), computed chunk by chunk with dask",
                    "method": "numpy.mean over 2x2x2 blocks, float64 accumulation",
                },
            }
        ],
    }


def create_level(
    group: zarr.Group,
    path: str,
    shape: Sequence[int],
    chunks: Sequence[int],
    *,
    dtype: str = "float32",
    compressors: list | None = None,
    shards: Sequence[int] | None = None,
) -> zarr.Array:
    """Create (replacing) the array ``path`` of an image: dims ``z, y, x``, NaN fill value;
    ``shards``: zarr sharding, a shard of that shape one stored object (whole chunks).

    A chunk never written reads as NaN, never as zeros that look like data.
    """
    chunks = tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks, shape))
    fill: Any = complex(np.nan, np.nan) if np.dtype(dtype).kind == "c" else np.nan
    extra: dict[str, Any] = {} if shards is None else {"shards": tuple(int(s) for s in shards)}
    return group.create_array(
        path,
        shape=tuple(int(s) for s in shape),
        chunks=chunks,
        dtype=dtype,
        compressors=compressors or [],
        fill_value=fill,
        dimension_names=AXES,
        config={"write_empty_chunks": True},
        overwrite=True,
        **extra,
    )


def downsample_mean(block: np.ndarray) -> np.ndarray:
    """The 2×2×2 mean of a ``(z, y, x)`` block (an odd trailing element per axis dropped),
    accumulated in float64 and returned in the block's dtype."""
    z, y, x = (s // 2 for s in block.shape)
    trimmed = np.asarray(block[: 2 * z, : 2 * y, : 2 * x], dtype=np.float64)
    out = trimmed.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5))
    return out.astype(block.dtype, copy=False)


def pyramid_tasks(source: zarr.Array, target: zarr.Array, *, name: str) -> list:
    """One :class:`~pipeline.data.writer.SlabTask` per chunk of ``target`` (one writer each):
    it reads the ``2×2×2`` chunk block of ``source`` under it and writes its mean.

    Memory per task: 8 source chunks (float64 while averaging).
    """
    from pipeline.data.writer import SlabTask

    cz, cy, cx = target.chunks
    grid = [range(0, n, c) for n, c in zip(target.shape, target.chunks)]
    tasks = []
    for z0 in grid[0]:
        for y0 in grid[1]:
            for x0 in grid[2]:
                def work(z0: int = z0, y0: int = y0, x0: int = x0) -> None:
                    z1 = min(z0 + cz, target.shape[0])
                    y1 = min(y0 + cy, target.shape[1])
                    x1 = min(x0 + cx, target.shape[2])
                    try:
                        block = source[2 * z0 : 2 * z1, 2 * y0 : 2 * y1, 2 * x0 : 2 * x1]
                    except (ValueError, RuntimeError, TypeError) as err:  # a CRC32C or decode failure
                        raise OMEError(
                            f"'{source.store_path}': the region z {2 * z0}:{2 * z1}, y {2 * y0}:{2 * y1}, "
                            f"x {2 * x0}:{2 * x1} under level chunk ({z0}, {y0}, {x0}) of '{name}' cannot be "
                            f"decoded ({type(err).__name__}: {err}); remove the output and rerun the command"
                        ) from None
                    target[z0:z1, y0:y1, x0:x1] = downsample_mean(np.asarray(block))

                tasks.append(SlabTask(f"{name}-{z0}-{y0}-{x0}", work, []))
    return tasks


# ----------------------------------------------------------------------------- validation
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_transforms(transforms: Any, ndim: int | None, where: str, problems: list[str]) -> None:
    if not isinstance(transforms, list) or not transforms:
        problems.append(f"{where}: coordinateTransformations must be a non-empty list")
        return
    kinds = []
    for i, t in enumerate(transforms):
        w = f"{where}.coordinateTransformations[{i}]"
        if not isinstance(t, dict) or t.get("type") not in ("scale", "translation"):
            problems.append(f"{w}: type must be 'scale' or 'translation'")
            continue
        kind = t["type"]
        kinds.append(kind)
        values = t.get(kind)
        if not isinstance(values, list) or len(values) < 2 or not all(_is_number(v) for v in values):
            problems.append(f"{w}: '{kind}' must be a list of >= 2 numbers")
            continue
        if ndim is not None and len(values) != ndim:
            problems.append(f"{w}: '{kind}' has {len(values)} entries for {ndim} axes")
        if kind == "scale" and any(v <= 0 for v in values):
            problems.append(f"{w}: scale factors must be positive")
    if kinds.count("scale") != 1:
        problems.append(f"{where}: exactly one 'scale' transformation is required, got {kinds.count('scale')}")
    if kinds.count("translation") > 1:
        problems.append(f"{where}: at most one 'translation' transformation is allowed")
    if kinds and kinds[0] != "scale":
        problems.append(f"{where}: the 'scale' must come first (before a 'translation')")


def _check_axes(axes: Any, where: str, problems: list[str]) -> list[str]:
    if not isinstance(axes, list) or not 2 <= len(axes) <= 5:
        problems.append(f"{where}.axes: must be a list of 2 to 5 axes")
        return []
    names: list[str] = []
    order = {"time": 0, "channel": 1, "space": 3}
    ranks = []
    for i, axis in enumerate(axes):
        w = f"{where}.axes[{i}]"
        if not isinstance(axis, dict) or not isinstance(axis.get("name"), str):
            problems.append(f"{w}: must be an object with a string 'name'")
            continue
        names.append(axis["name"])
        kind = axis.get("type")
        if kind is not None and not isinstance(kind, str):
            problems.append(f"{w}: 'type' must be a string")
        ranks.append(order.get(kind, 2))
        unit = axis.get("unit")
        if unit is not None:
            allowed = SPACE_UNITS if kind == "space" else TIME_UNITS if kind == "time" else None
            if not isinstance(unit, str) or (allowed is not None and unit not in allowed):
                problems.append(f"{w}: unit {unit!r} is not one the specification allows for {kind} axes")
    if len(set(names)) != len(names):
        problems.append(f"{where}.axes: names must be unique, got {names}")
    num_space = sum(1 for a in axes if isinstance(a, dict) and a.get("type") == "space")
    if not 2 <= num_space <= 3:
        problems.append(f"{where}.axes: 2 or 3 axes of type 'space' are required, got {num_space}")
    if ranks != sorted(ranks):
        problems.append(f"{where}.axes: the order must be time, channel (or custom), then space axes")
    if sum(1 for r in ranks if r == 0) > 1:
        problems.append(f"{where}.axes: at most one 'time' axis")
    return names


def validate_ome(group: zarr.Group | str, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The ways an OME-Zarr 0.5 image group breaks the specification (empty: valid).

    Checks the ``image.schema`` rules (``ome`` with ``version`` ``"0.5"`` and a non-empty,
    duplicate-free ``multiscales``; each with 2–5 uniquely named ``axes`` of which 2–3 are
    ``space``, and ``datasets`` with a ``path`` and transformations holding exactly one
    ``scale``) and the prose rules (axes ordered time, channel, space; transformation vectors
    as long as the axes; space/time units from the specification's lists; every dataset an
    array of the group whose ``dimension_names`` equal the axis names; levels ordered from the
    highest resolution down).
    """
    if not isinstance(group, zarr.Group):
        from pipeline.data.store import open_group

        group = open_group(group, mode="r", storage_options=storage_options)
    problems: list[str] = []
    attrs = dict(group.attrs)
    ome = attrs.get("ome")
    if not isinstance(ome, dict):
        return ["attributes: 'ome' (an object) is required"]
    if ome.get("version") != NGFF_VERSION:
        problems.append(f"ome.version: must be {NGFF_VERSION!r}, got {ome.get('version')!r}")
    if "multiscales" in attrs:
        problems.append("attributes: 'multiscales' belongs under 'ome' in 0.5, not at the top level")
    ms_list = ome.get("multiscales")
    if not isinstance(ms_list, list) or not ms_list:
        problems.append("ome.multiscales: a non-empty list is required")
        return problems
    import json

    if len({json.dumps(m, sort_keys=True) for m in ms_list}) != len(ms_list):
        problems.append("ome.multiscales: items must be unique")
    if group.metadata.zarr_format != 3:
        problems.append(f"the group must be zarr v3 for OME-Zarr 0.5, got v{group.metadata.zarr_format}")
    for m, ms in enumerate(ms_list):
        where = f"ome.multiscales[{m}]"
        if not isinstance(ms, dict):
            problems.append(f"{where}: must be an object")
            continue
        if "name" in ms and not isinstance(ms["name"], str):
            problems.append(f"{where}.name: must be a string")
        names = _check_axes(ms.get("axes"), where, problems)
        ndim = len(names) if names else None
        if "coordinateTransformations" in ms:
            _check_transforms(ms["coordinateTransformations"], ndim, where, problems)
        datasets = ms.get("datasets")
        if not isinstance(datasets, list) or not datasets:
            problems.append(f"{where}.datasets: a non-empty list is required")
            continue
        previous_scale = None
        for d, ds in enumerate(datasets):
            w = f"{where}.datasets[{d}]"
            if not isinstance(ds, dict) or not isinstance(ds.get("path"), str):
                problems.append(f"{w}: must be an object with a string 'path'")
                continue
            _check_transforms(ds.get("coordinateTransformations"), ndim, w, problems)
            scale = next((t.get("scale") for t in ds.get("coordinateTransformations") or []
                          if isinstance(t, dict) and t.get("type") == "scale"), None)
            if previous_scale is not None and isinstance(scale, list) and len(scale) == len(previous_scale):
                if any(b < a for a, b in zip(previous_scale, scale) if _is_number(a) and _is_number(b)):
                    problems.append(f"{w}: levels must go from the highest resolution down")
            previous_scale = scale if isinstance(scale, list) else previous_scale
            try:
                arr = group[ds["path"]]
            except KeyError:
                problems.append(f"{w}: no array at path {ds['path']!r}")
                continue
            if not isinstance(arr, zarr.Array):
                problems.append(f"{w}: {ds['path']!r} is not an array")
                continue
            if ndim is not None and arr.ndim != ndim:
                problems.append(f"{w}: array {ds['path']!r} has {arr.ndim} dimensions for {ndim} axes")
            dims = arr.metadata.dimension_names
            if dims is None or list(dims) != names:
                problems.append(
                    f"{w}: array {ds['path']!r} dimension_names {dims} must equal the axis names {names}"
                )
    return problems


def check_ome(group: zarr.Group | str, *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`OMEError` listing every problem :func:`validate_ome` finds."""
    problems = validate_ome(group, storage_options=storage_options)
    if problems:
        raise OMEError(f"not a valid OME-Zarr {NGFF_VERSION} image: " + "; ".join(problems))


def open_ome(path: str, level: int = 0, *, storage_options: Mapping[str, Any] | None = None) -> zarr.Array:
    """Level ``level`` of an OME-Zarr image (its first multiscale), read-only.

    ``dask.array.from_zarr(open_ome(path))`` reads it out of core.
    """
    from pipeline.data.store import open_group

    group = open_group(path, mode="r", storage_options=storage_options)
    ome = dict(group.attrs).get("ome")
    if not isinstance(ome, dict) or not ome.get("multiscales"):
        raise OMEError(f"'{path}': no OME-Zarr multiscales metadata (attributes 'ome')")
    datasets = ome["multiscales"][0]["datasets"]
    if not 0 <= level < len(datasets):
        raise OMEError(f"'{path}': level {level} does not exist (it has {len(datasets)})")
    return group[datasets[level]["path"]]
