"""``recon3d inspect``: what a scan holds, and ``--check``: whether every chunk is sound.

:func:`inspect_scan` summarises metadata and arrays (shapes, chunks, codecs, stored bytes,
compression ratio, chunks present). :func:`check_scan` reads every chunk of every array and
reports each one that is missing, does not decode or holds NaN/Inf, plus metadata that
disagrees with the arrays and a scan whose writer has not finished. Nothing is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .format import (
    ATTRS_KEY,
    CTGeometry,
    MRIGeometry,
    ScanError,
)
from .scan import Scan, ScanArray, open_scan
from .store import missing_chunks, num_stored_objects

__all__ = ["ArrayReport", "ScanReport", "inspect_scan", "check_scan", "format_report"]


@dataclass
class ArrayReport:
    """One array: layout, codecs, sizes and how many stored objects are present."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    codecs: list[str]
    nbytes: int
    stored_bytes: int
    objects_present: int
    objects_total: int
    status: str | None = None

    @property
    def ratio(self) -> float:
        return self.nbytes / self.stored_bytes if self.stored_bytes else math.inf


@dataclass
class ScanReport:
    """The summary of a scan and, after :func:`check_scan`, its problems."""

    path: str
    metadata: dict[str, Any]
    arrays: list[ArrayReport]
    summary: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    checked: bool = False

    @property
    def complete(self) -> bool:
        return self.metadata.get("status") == "complete"

    @property
    def ok(self) -> bool:
        return not self.problems


def _codecs(array) -> list[str]:
    out = []
    for codec in array.metadata.codecs:
        info = codec.to_dict()
        name = info.get("name", type(codec).__name__)
        conf = info.get("configuration") or {}
        if name == "blosc":
            out.append(f"blosc({conf.get('cname')}, clevel={conf.get('clevel')}, {conf.get('shuffle')})")
        elif name == "sharding_indexed":
            inner = [c.get("name") for c in conf.get("codecs", [])]
            out.append(f"sharding(inner {conf.get('chunk_shape')}: {'+'.join(map(str, inner))})")
        else:
            out.append(str(name))
    return out


def _array_report(sa: ScanArray) -> ArrayReport:
    arr = sa.array
    total = num_stored_objects(arr)
    present = total - len(missing_chunks(arr))
    status = (dict(arr.attrs).get(ATTRS_KEY) or {}).get("status")
    return ArrayReport(
        name=sa.name,
        shape=sa.shape,
        dtype=str(sa.dtype),
        chunks=tuple(int(c) for c in arr.chunks),
        shards=None if arr.shards is None else tuple(int(s) for s in arr.shards),
        codecs=_codecs(arr),
        nbytes=sa.nbytes,
        stored_bytes=int(arr.nbytes_stored()),
        objects_present=present,
        objects_total=total,
        status=status,
    )


def _all_arrays(scan: Scan) -> list[ScanArray]:
    names = ("measurements", "mask", "coil_maps", "angles", "reference")
    out = [a for a in (scan._get(n) for n in names) if a is not None]
    if "derived" in set(scan.group.group_keys()):
        for name in sorted(scan.group["derived"].array_keys()):
            out.append(scan.derived(name, allow_incomplete=True))
    return out


def _summary(scan: Scan) -> dict[str, Any]:
    meta = scan.metadata
    geom = meta.geometry
    out: dict[str, Any] = {
        "modality": meta.modality,
        "volume_shape": meta.volume_shape,
        "voxel_size": f"{meta.voxel_size} {meta.units}",
        "chunk_depth": meta.chunk_depth,
        "noise_model": meta.noise_model,
    }
    if meta.acquisition_noise:
        out["acquisition_noise"] = meta.acquisition_noise
    if isinstance(geom, MRIGeometry):
        out["geometry"] = f"Cartesian hybrid space, {geom.num_coils} coils, matrix {geom.matrix}"
        out["acceleration"] = round(geom.acceleration, 3)
        out["calibration"] = geom.calibration
    else:
        assert isinstance(geom, CTGeometry)
        text = f"{geom.kind} beam, {geom.num_angles} angles, detector {geom.det_shape} (V, U)"
        if geom.kind == "cone":
            text += f", src_dist {geom.src_dist:g}, det_dist {geom.det_dist:g}"
        out["geometry"] = text
    prov = meta.provenance
    out["made_by"] = f"{prov.get('tool', '?')} ({prov.get('created', '?')})"
    return out


def inspect_scan(path: Any, *, storage_options: Mapping[str, Any] | None = None) -> ScanReport:
    """Summarise a scan without reading its chunks (metadata, layout, sizes, presence)."""
    scan = open_scan(path, allow_incomplete=True, storage_options=storage_options)
    arrays = [_array_report(a) for a in _all_arrays(scan)]
    return ScanReport(str(path), scan.metadata.to_dict(), arrays, _summary(scan))


def check_scan(
    path: Any,
    *,
    storage_options: Mapping[str, Any] | None = None,
    max_problems_per_array: int = 20,
    on_chunk: Callable[[], None] | None = None,
) -> ScanReport:
    """Read every chunk of every array and report what is wrong (:attr:`ScanReport.problems`).

    Problems: the writer has not finished; a required array missing or disagreeing with the
    metadata (dtype, shape, chunking, angle or coil count); a chunk missing, not decoding or
    holding NaN/Inf; a mask whose acceleration disagrees with the metadata.
    """
    try:
        scan = open_scan(path, allow_incomplete=True, storage_options=storage_options)
    except (ScanError, FileNotFoundError) as err:
        return ScanReport(str(path), {}, [], {}, [str(err)], checked=True)
    report = ScanReport(str(path), scan.metadata.to_dict(), [], _summary(scan), checked=True)
    if scan.metadata.status != "complete":
        report.problems.append(
            f"scan '{scan.path}': incomplete (status '{scan.metadata.status}'): the job that "
            f"writes it ({scan.metadata.provenance.get('tool', 'unknown')}) has not finished; "
            "rerun the same command to finish it"
        )
    for sa in _all_arrays(scan):
        rep = _array_report(sa)
        report.arrays.append(rep)
        if rep.status is not None and rep.status != "complete":
            report.problems.append(
                f"{sa.where()}: incomplete (status '{rep.status}', {rep.objects_present} of "
                f"{rep.objects_total} chunks written); rerun `recon3d preprocess` to finish it"
            )
        found = 0
        if sa.d_axis is None:
            ranges = [None]
        else:
            cd = sa.chunk_depth
            ranges = [slice(d0, min(d0 + cd, sa.depth)) for d0 in range(0, sa.depth, cd)]
        for d_slice in ranges:
            if on_chunk is not None:
                on_chunk()
            if found >= max_problems_per_array:
                continue
            try:
                sa.read(d_slice, check_finite=True)
            except ScanError as err:
                report.problems.append(str(err))
                found += 1
        if found >= max_problems_per_array:
            report.problems.append(f"{sa.where()}: stopped listing after {found} problems")
    geom = scan.metadata.geometry
    if isinstance(geom, MRIGeometry) and scan.mask is not None:
        try:
            mask = scan.mask.read()
            acc = mask.size / max(1, int(np.count_nonzero(mask)))
            if abs(acc - geom.acceleration) > 0.01 * geom.acceleration:
                report.problems.append(
                    f"scan '{scan.path}': array 'mask' has acceleration {acc:.3f}, but the "
                    f"metadata says {geom.acceleration:.3f}"
                )
        except ScanError:
            pass  # reported above
    return report


def count_chunks(path: Any, *, storage_options: Mapping[str, Any] | None = None) -> int:
    """How many chunk reads :func:`check_scan` will make (for progress bars)."""
    try:
        scan = open_scan(path, allow_incomplete=True, storage_options=storage_options)
    except (ScanError, FileNotFoundError):
        return 0
    total = 0
    for sa in _all_arrays(scan):
        total += 1 if sa.d_axis is None else math.ceil(sa.depth / sa.chunk_depth)
    return total


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_report(report: ScanReport) -> str:
    """The report as plain text (what ``recon3d inspect`` prints)."""
    lines = [f"scan {report.path}"]
    meta = report.metadata
    if meta:
        lines.append(f"  status       {meta.get('status')}  (format version {meta.get('format_version')})")
    for key, value in report.summary.items():
        lines.append(f"  {key:<12} {value}")
    if report.arrays:
        lines.append("  arrays:")
        for a in report.arrays:
            shard = f" shards {a.shards}" if a.shards else ""
            status = f" [{a.status}]" if a.status else ""
            lines.append(
                f"    {a.name:<16} {str(a.shape):<22} {a.dtype:<9} chunks {a.chunks}{shard}{status}"
            )
            lines.append(
                f"    {'':<16} codecs {' → '.join(a.codecs) or 'none'}; {_size(a.nbytes)} → "
                f"{_size(a.stored_bytes)} stored (ratio {a.ratio:.2f}); "
                f"{a.objects_present}/{a.objects_total} chunks present"
            )
    if report.checked:
        if report.problems:
            lines.append(f"  check: {len(report.problems)} problem(s)")
            lines += [f"    - {p}" for p in report.problems]
        else:
            lines.append("  check: every chunk present, decodes and is finite")
    return "\n".join(lines)
