"""The output of ``recon3d reconstruct``: its group, attributes and completion records.

Rank 0 prepares the output (:func:`_prepare`: created, resumed, or cleared when it holds another
fingerprint), every rank writes its slabs (:func:`_write_slab`) and records each one complete
(:meth:`_Output.record`, a small zarr group whose attributes carry the fingerprint, so zarr sees
a valid hierarchy and never warns about foreign objects), and rank 0 finally builds the
pyramid and marks the output complete (:func:`_finish`). The format is written down in
``docs/output-format.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.data.format import ATTRS_KEY, CodecConfig, ScanError, now_iso, on_object_store
from pipeline.data.store import open_group, open_store
from pipeline.errors import Recon3dError

from . import ome
from .adapters import _Classical
from .config import ReconstructConfig
from .halo import _Layout
from .lease import Lease

__all__ = ["completion_records", "OUTPUT_FORMAT"]

OUTPUT_FORMAT = 1
RECORDS = "records"
COMPLEX = "complex"
UNCERTAINTY = "uncertainty"
UNCERTAINTY_VERSION = 1  # of how the map is made (pilot, draws, noise); part of the fingerprint
_KIND = "reconstruction"


def _version() -> str:
    """The installed recon3d's version (recorded in the output); ``unknown`` in a checkout."""
    try:
        from importlib.metadata import version

        return version("recon3d")
    except Exception:  # running from a checkout
        return "unknown"


class _Output:
    """The output group: arrays, attributes and completion records (plain objects in its store)."""

    def __init__(self, path: str, storage_options: Mapping[str, Any] | None) -> None:
        self.path = str(path)
        self.storage_options = dict(storage_options or {})
        self.store = open_store(self.path, read_only=False, storage_options=self.storage_options)
        self._prefixes_made: set[str] = set()

    def group(self, mode: str = "r+"):
        return open_group(self.path, mode=mode, storage_options=self.storage_options)

    def info(self) -> dict[str, Any] | None:
        try:
            group = open_group(self.path, mode="r", storage_options=self.storage_options)
        except (FileNotFoundError, ScanError):
            return None
        return dict(group.attrs).get(ATTRS_KEY)

    # ------------------------------------------------------------------ records
    @staticmethod
    def _prefix(fingerprint: str) -> str:
        return f"{RECORDS}/{fingerprint[:32]}/"

    @staticmethod
    def _slab_of(key: str) -> int | None:
        """The slab of a record key: ``.../slab_NNNNNN/zarr.json`` (a group), or the plain
        ``.../slab_NNNNNN.json`` object of outputs written before records were groups."""
        parts = key.split("/")
        name = parts[-2] if parts[-1] == "zarr.json" and len(parts) >= 2 else parts[-1]
        name = name[:-5] if name.endswith(".json") else name
        if name.startswith("slab_") and name[5:].isdigit():
            return int(name[5:])
        return None

    def recorded(self, fingerprint: str) -> set[int]:
        """The slabs that have a record object under ``fingerprint``'s prefix (content unchecked)."""
        from zarr.core.sync import sync

        prefix = self._prefix(fingerprint)

        async def keys() -> list[str]:
            return [k async for k in self.store.list_prefix(prefix)]

        return {slab for slab in map(self._slab_of, sync(keys())) if slab is not None}

    def _read(self, fingerprint: str, index: int) -> dict[str, Any] | None:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        for key in (f"{self._prefix(fingerprint)}slab_{index:06d}/zarr.json",
                    f"{self._prefix(fingerprint)}slab_{index:06d}.json"):  # the earlier plain object
            buf = sync(self.store.get(key, prototype=default_buffer_prototype()))
            if buf is None:
                continue
            try:
                value = json.loads(buf.to_bytes())
            except ValueError:
                return None
            if isinstance(value, dict) and key.endswith("/zarr.json"):
                value = value.get("attributes")
            return value if isinstance(value, dict) else None
        return None

    def done(self, fingerprint: str, verified: set[int] | None = None) -> set[int]:
        """The slabs recorded complete **with** ``fingerprint``: the record exists and carries it.

        The key prefix holds only 32 hex digits of the fingerprint, and a record may come from
        an older recon3d or another writer, so each record's content is checked. ``verified``
        (updated in place) caches the slabs already checked: records are written once.
        """
        verified = set() if verified is None else verified
        for index in self.recorded(fingerprint) - verified:
            record = self._read(fingerprint, index)
            if record is not None and record.get("fingerprint") == fingerprint:
                verified.add(index)
        return set(verified)

    def record(self, fingerprint: str, index: int, info: dict[str, Any]) -> None:
        """Mark slab ``index`` complete (after its chunks are written): one atomic object that
        carries the output's fingerprint."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        prefix = self._prefix(fingerprint)
        if prefix not in self._prefixes_made:  # the fingerprint's group (same bytes from every rank)
            sync(self.store.set(f"{prefix}zarr.json", default_buffer_prototype().buffer.from_bytes(_group_json({}))))
            self._prefixes_made.add(prefix)
        data = _group_json({**info, "fingerprint": fingerprint})
        sync(self.store.set(f"{prefix}slab_{index:06d}/zarr.json", default_buffer_prototype().buffer.from_bytes(data)))

    def read_records(self, fingerprint: str) -> dict[int, dict[str, Any]]:
        """Every completion record of ``fingerprint`` (for inspection and tests)."""
        out = {}
        for index in sorted(self.done(fingerprint)):
            record = self._read(fingerprint, index)
            if record is not None:
                out[index] = record
        return out

    def missing(self, fingerprint: str, total: int, verified: set[int] | None = None) -> str:
        """The slabs without a record carrying ``fingerprint``, in words (for timeout messages)."""
        done = self.done(fingerprint, verified)
        missing = [i for i in range(total) if i not in done]
        foreign = sorted(self.recorded(fingerprint) & set(missing))
        text = (f"{len(missing)} of {total} slabs have no record with fingerprint {fingerprint[:12]}: "
                f"{', '.join(map(str, missing[:20]))}{' ...' if len(missing) > 20 else ''}")
        if foreign:
            text += f" (slabs {', '.join(map(str, foreign[:20]))} have a record of another fingerprint)"
        return text


def _group_json(attributes: Mapping[str, Any]) -> bytes:
    """The ``zarr.json`` of a zarr v3 group with these attributes (one object, written at once)."""
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": dict(attributes)},
                      sort_keys=True).encode()


def completion_records(out: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[int, dict[str, Any]]:
    """The completion records of the output's current fingerprint (slab index → record)."""
    o = _Output(out, storage_options)
    info = o.info() or {}
    if "fingerprint" not in info:
        return {}
    return o.read_records(info["fingerprint"])


def _guard_local(path: str, config: ReconstructConfig):
    """Refuse an ``--out`` that reconstruct must not write: returns what is there if it may.

    Allowed: nothing, an empty folder or group, or an earlier output of reconstruct (resumed or
    recomputed). Refused with or without ``--overwrite``: the scan itself or a path inside it,
    any other scan, a run directory, a foreign zarr group, a non-empty folder, a file.

    Raises:
        OutputConflictError: naming what ``path`` is.
    """
    from pipeline.outputs import check_output

    return check_output(path, "reconstruct", inputs=[config.scan], storage_options=config.storage_options)


def _level0_shards(codec: CodecConfig, layout: _Layout, itemsize: int, group) -> tuple[int, int, int] | None:
    """The shard shape of the arrays written slab by slab (level 0, ``complex``), or ``None``.

    ``shard_chunks: auto`` shards an output on an object store (one object per shard instead of
    per chunk): whole planes (H, W) and a depth of chunks that divides the output slab, so each
    slab's writer writes whole shards and no two writers share one; about 64 MiB when the slab
    allows. Pyramid levels and the uncertainty map, written chunk by chunk, are not sharded."""
    d, h, w = layout.shape
    c0 = layout.chunks[0]
    wanted = codec.chunks_per_shard(c0 * h * w * itemsize, -(-d // c0), object_store=on_object_store(group))
    if wanted <= 0 and not (codec.shard_chunks == "auto" and on_object_store(group)):
        return None
    in_slab = -(-min(layout.slab, d) // c0)  # chunks per slab (slabs are whole chunks, but for the last)
    whole = layout.slab >= d  # one slab: any shard depth; else one that divides the slab
    count = max(k for k in range(1, min(max(wanted, 1), in_slab) + 1) if whole or in_slab % k == 0)
    c1, c2 = layout.chunks[1:]
    shard = (count * c0, -(-h // c1) * c1, -(-w // c2) * c2)  # whole chunks; edge shards partial, as chunks
    return None if shard == tuple(layout.chunks) else shard


def _write_slab(level0, cplx, a: int, b: int, x: torch.Tensor) -> None:
    """Write output slab ``[a, b)``: whole chunks of level 0 (and of ``complex``)."""
    if x.is_complex():
        level0[a:b] = x.abs().to(torch.float32).numpy()
        if cplx is not None:
            cplx[a:b] = x.to(torch.complex64).numpy()
    else:
        level0[a:b] = x.to(torch.float32).numpy()


def _reopen(out: _Output, info: dict[str, Any]) -> None:
    """Clear ``complete`` (and the pyramid's progress) of an output whose records do not all
    carry its fingerprint: the slabs without one are computed again, then the pyramid."""
    from pipeline.data.writer import jsonable

    attrs = dict(info)
    attrs.update(complete=False, levels_complete=[])
    attrs.pop("completed", None)
    out.group("r+").attrs[ATTRS_KEY] = jsonable(attrs)


def _create_uncertainty(group, config: ReconstructConfig, scan, levels, chunks, compressors) -> None:
    """The nested OME-Zarr image ``uncertainty``: the same levels and chunks as the image."""
    from pipeline.data.writer import jsonable

    sub = group.require_group(UNCERTAINTY)
    for level, shape in enumerate(levels):
        ome.create_level(sub, str(level), shape, chunks, compressors=compressors)
    complex_image = scan.modality == "mri"
    sub.attrs.update({
        "ome": ome.multiscales_metadata(scan.metadata.voxel_size, scan.metadata.units, len(levels), name=UNCERTAINTY),
        ATTRS_KEY: jsonable({
            "kind": "uncertainty",
            "written_by": "reconstruct",
            "quantity": "per-voxel root-mean-square error of the reconstruction, estimated by an equivariant "
                        "parametric bootstrap" + (" (of the complex image)" if complex_image else ""),
            "definition": "sqrt(mean_b T_b^-1 |f(y_b) - T_b p|^2): p the undersmoothed pilot reconstruction, T_b a "
                          "random in-plane rotation, y_b measurements of T_b p drawn from the scan's noise model, "
                          "f the reconstruction of the image (docs/estimate.md)",
            "units": "those of the image",
            "draws": int(config.uncertainty),
            "seed": int(config.uncertainty_seed),
            "version": UNCERTAINTY_VERSION,
            "noise_model": scan.metadata.noise_model,
        }),
    })


def _prepare(out: _Output, config, scan, recon, layout: _Layout, settings, fingerprint: str,
             keep_complex: bool, notes: list[str], world: int) -> str:
    """Rank 0: create the output, resume it, or clear one of another fingerprint; returns the state."""
    from pipeline.data.writer import jsonable

    info = out.info()
    levels = ome.level_shapes(layout.shape, config.pyramid)
    meta = scan.metadata
    ome_attrs = ome.multiscales_metadata(meta.voxel_size, meta.units, len(levels),
                                         name=Path(str(config.out).rstrip("/")).name or "reconstruction")
    compressors = config.codec.compressors()
    # Only an output of reconstruct may be resumed or recomputed; a scan, a run, a foreign group
    # or folder is refused, --overwrite or not (it never replaces an input).
    target = _guard_local(str(config.out), config)
    if target.kind != "reconstruction":
        info = None
    if info is not None and info.get("kind") == _KIND and info.get("fingerprint") == fingerprint:
        if info.get("levels") == len(levels):
            return "already complete" if info.get("complete") else "resumed"
        # Another pyramid depth: level 0 stands, the other levels are made again.
        group = out.group("r+")
        for level in range(1, max(len(levels), int(info.get("levels") or 1))):
            if str(level) in group:
                del group[str(level)]
        for level, shape in enumerate(levels[1:], start=1):
            ome.create_level(group, str(level), shape, layout.chunks, compressors=compressors)
        if UNCERTAINTY in group:
            sub = group[UNCERTAINTY]
            for level in range(1, max(len(levels), int(info.get("levels") or 1))):
                if str(level) in sub:
                    del sub[str(level)]
            for level, shape in enumerate(levels[1:], start=1):
                ome.create_level(sub, str(level), shape, layout.chunks, compressors=compressors)
            sub.attrs["ome"] = ome.multiscales_metadata(scan.metadata.voxel_size, scan.metadata.units, len(levels),
                                                       name=UNCERTAINTY)
        attrs = dict(info)
        attrs.update(levels=len(levels), levels_complete=[], complete=False)
        group.attrs.update({"ome": ome_attrs, ATTRS_KEY: jsonable(attrs)})
        return "resumed"
    state = "created" if info is None else "recomputed"
    group = out.group("w")  # deletes the old arrays and records: nothing of another run remains
    # Marked ours before the arrays exist, so a prepare cut short leaves a group reconstruct may
    # still replace (and no fingerprint yet: the other ranks keep waiting).
    group.attrs.update({ATTRS_KEY: {"kind": _KIND, "written_by": "reconstruct", "tool": "recon3d reconstruct",
                                    "complete": False}})
    group.require_group(RECORDS)
    for level, shape in enumerate(levels):
        ome.create_level(group, str(level), shape, layout.chunks, compressors=compressors,
                         shards=None if level else _level0_shards(config.codec, layout, 4, group))
    if keep_complex:
        ome.create_level(group, COMPLEX, layout.shape, layout.chunks, dtype="complex64", compressors=compressors,
                         shards=_level0_shards(config.codec, layout, 8, group))
    if int(config.uncertainty) > 0:
        _create_uncertainty(group, config, scan, levels, layout.chunks, compressors)
    attrs = {
        "kind": _KIND,
        "written_by": "reconstruct",
        "format_version": OUTPUT_FORMAT,
        "tool": "recon3d reconstruct",
        "recon3d_version": _version(),
        "scan": str(config.scan),
        "modality": scan.modality,
        "method": config.method,
        "model": str(config.model) if config.model is not None else None,
        "pick": config.pick if config.model is not None else None,
        "fingerprint": fingerprint,
        "settings": settings,
        "value": "magnitude" if recon.is_complex else "real",
        "complex": COMPLEX if keep_complex else None,
        "intensity_scale": getattr(recon, "scale", None),
        "parameters": recon.parameters() if isinstance(recon, _Classical) else None,
        "calibration": getattr(recon, "calibration", None),
        "receptive_radius": recon.radius,
        "memory": layout.memory,  # the slab choice and its estimated peak (pipeline/reconstruct/memory.py)
        "exact": layout.halo >= recon.radius and not notes,
        "notes": notes,
        "slabs": len(layout.slabs()),
        "levels": len(levels),
        "levels_complete": [],
        "run": {"world_size": world, "device": config.device, "workers": config.workers,
                "scheduler": config.scheduler},
        "units": meta.units,
        "voxel_size": list(meta.voxel_size),
        "created": now_iso(),
        "complete": False,
    }
    # The fingerprint goes in last: the other ranks start writing once they see it.
    group.attrs.update({"ome": ome_attrs, ATTRS_KEY: jsonable(attrs)})
    return state


def _finish(out: _Output, config: ReconstructConfig, fingerprint: str, total: int,
            lease: Lease | None = None) -> None:
    """Rank 0, once level 0 is complete: the pyramid (resumable per level), then ``complete`` —
    only if every slab's record carries the output's fingerprint and this job holds the lease."""
    from pipeline.data.writer import jsonable, run_tasks

    group = out.group("r+")
    attrs = dict(dict(group.attrs)[ATTRS_KEY])
    if attrs.get("fingerprint") != fingerprint:
        raise ScanError(f"reconstruct: '{config.out}' was re-prepared by another job while this one ran")
    if not out.done(fingerprint) >= set(range(total)):
        raise Recon3dError(f"reconstruct: '{config.out}' not marked complete: {out.missing(fingerprint, total)}; "
                           "rerun the same command to compute them")
    done = set(attrs.get("levels_complete") or [])
    for level in range(1, int(attrs["levels"])):
        if level in done:
            continue
        tasks = ome.pyramid_tasks(group[str(level - 1)], group[str(level)], name=f"level{level}")
        if UNCERTAINTY in group:
            sub = group[UNCERTAINTY]
            tasks += ome.pyramid_tasks(sub[str(level - 1)], sub[str(level)], name=f"uncertainty{level}")
        run_tasks(tasks, description=f"pyramid level {level}", workers=config.workers,
                  scheduler=config.scheduler, progress=config.progress)
        done.add(level)
        attrs["levels_complete"] = sorted(done)
        group.attrs[ATTRS_KEY] = jsonable(attrs)
    if lease is not None:
        lease.check()
    attrs.update(complete=True, completed=now_iso())
    group.attrs[ATTRS_KEY] = jsonable(attrs)
