"""The one guard every recon3d command that writes runs on its output target first.

An input is never destroyed: a command may only write into a path that holds nothing (missing,
or an empty folder), or replace/resume what recon3d wrote *as an output of that same command*.
Everything else is refused with :class:`~pipeline.errors.OutputConflictError`, with or without
``--overwrite``, and the message says what the target is and never suggests ``--overwrite``
(which could not help).

What each command writes, and how its output is recognised (new outputs carry ``written_by``;
outputs of older versions are recognised by what they already recorded):

=============  ====================================  ==========================================
command        output                                recognised by
=============  ====================================  ==========================================
simulate       a scan (zarr group)                   ``recon3d.provenance.written_by``, or
ingest                                               ``provenance.tool`` ``"recon3d simulate …"``
                                                     / ``"recon3d ingest …"``
preprocess     ``derived/NAME`` arrays of a scan     the array's ``recon3d.written_by``, or its
                                                     ``status`` + ``parameters``
reconstruct    an OME-Zarr image                     ``recon3d.written_by``, or ``kind:
                                                     "reconstruction"`` + ``tool: "recon3d
                                                     reconstruct"``; never a group that is a scan
export         a weights file                        its ``format`` ``"recon3d-weights-…"``
report         a folder of PNGs and ``report.md``    the marker file ``.recon3d-report.json``, or
                                                     only ``report.md`` and its known files
quickstart     a folder of the above + README.md     holding only the names it writes
=============  ====================================  ==========================================

A scan is always an input (of reconstruct, preprocess and train) to every command but the one
that wrote it; a run directory (``checkpoints/``, ``config.resolved.yaml`` or
``metrics.jsonl``), a foreign zarr group, a non-empty folder or a file recon3d did not write
is never replaced. An output path equal to or inside an input, or inside any zarr group, is
refused too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.errors import OutputConflictError
from pipeline.paths import is_url, local_path

__all__ = [
    "Target",
    "classify",
    "check_output",
    "check_outside",
    "REPORT_MARKER",
    "write_report_marker",
    "check_job_folder",
    "scan_writer",
    "is_scan_attrs",
]

#: The marker file of a report folder (written by ``recon3d report``).
REPORT_MARKER = ".recon3d-report.json"
#: The files a report folder of an older recon3d (without the marker) can hold.
_REPORT_FILES = frozenset({"report.md", "metrics.json", "training.png", "validation.png", "slices.png",
                           REPORT_MARKER})
#: What a run directory holds (any one of them makes a folder a run).
_RUN_ENTRIES = ("checkpoints", "config.resolved.yaml", "metrics.jsonl")
#: The arrays only a scan has (a reconstruct output never holds them).
_SCAN_ARRAYS = ("measurements", "kspace", "mask", "angles")
_EXPORT_PREFIX = "recon3d-weights-"
_INPUT_OF = {
    "scan": "an input of reconstruct, preprocess and train",
    "reconstruction": "an input of report and evaluate",
    "run": "the input of export, reconstruct --model and train --resume",
}


@dataclass(frozen=True)
class Target:
    """What an output path holds today.

    Attributes:
        path: the path as given.
        kind: ``missing``, ``empty`` (an empty folder or an empty zarr group), ``scan``,
            ``reconstruction``, ``run``, ``zarr`` (a foreign zarr group), ``folder`` (a
            non-empty folder), ``report``, ``export`` or ``file``.
        written_by: the recon3d command that wrote it as an output, or ``None``.
        what: a phrase for messages, e.g. ``"a recon3d scan written by simulate"``.
    """

    path: str
    kind: str
    written_by: str | None
    what: str

    @property
    def vacant(self) -> bool:
        """Nothing there that could be lost."""
        return self.kind in ("missing", "empty")


# ----------------------------------------------------------------------------- recognising
def is_scan_attrs(attrs: Any) -> bool:
    """Whether ``recon3d`` attributes describe a scan (its geometry), not an output image."""
    return isinstance(attrs, Mapping) and "geometry" in attrs and "volume_shape" in attrs


def scan_writer(attrs: Mapping[str, Any]) -> str | None:
    """The command that wrote a scan (``simulate`` or ``ingest``), from its provenance."""
    prov = attrs.get("provenance") or {}
    if not isinstance(prov, Mapping):
        return None
    by = prov.get("written_by")
    if by in ("simulate", "ingest"):
        return str(by)
    tool = str(prov.get("tool") or "")
    for command in ("simulate", "ingest"):
        if tool == f"recon3d {command}" or tool.startswith(f"recon3d {command} "):
            return command
    return None


def _zarr_target(path: str, storage_options: Mapping[str, Any] | None) -> Target | None:
    """The target when ``path`` is a zarr group (v3 read through recon3d's store), else ``None``."""
    from pipeline.data.format import ATTRS_KEY
    from pipeline.data.store import open_group

    try:
        group = open_group(path, mode="r", storage_options=storage_options)
    except FileNotFoundError:
        return None
    except ValueError as err:
        # A zarr.json recon3d cannot read (not v3, invalid JSON): not ours to replace. The
        # reason (which metadata file, what is wrong with it) is part of the refusal.
        return Target(path, "zarr", None, f"a zarr group recon3d cannot read ({err})")
    attrs = dict(group.attrs)
    members = list(group.keys())
    ours = attrs.get(ATTRS_KEY)
    if not members and not attrs:
        return Target(path, "empty", None, "an empty zarr group")
    if is_scan_attrs(ours) or (isinstance(ours, Mapping) and any(name in members for name in _SCAN_ARRAYS)):
        # Checked first, so a scan never passes for an output image whatever else it records.
        by = scan_writer(ours) if isinstance(ours, Mapping) else None
        what = f"a recon3d scan written by {by}" if by else "a recon3d scan"
        return Target(path, "scan", by, f"{what} ({_INPUT_OF['scan']})")
    if isinstance(ours, Mapping) and ours.get("kind") == "reconstruction" and (
            ours.get("written_by") == "reconstruct" or ours.get("tool") == "recon3d reconstruct"):
        return Target(path, "reconstruction", "reconstruct",
                      f"a reconstruction written by recon3d reconstruct ({_INPUT_OF['reconstruction']})")
    return Target(path, "zarr", None, "a zarr group that recon3d did not write")


def _is_report_folder(p: Path) -> bool:
    if (p / REPORT_MARKER).is_file():
        try:
            return json.loads((p / REPORT_MARKER).read_text()).get("written_by") == "report"
        except (OSError, ValueError, AttributeError):
            return False
    if not (p / "report.md").is_file():
        return False
    # A report of an older recon3d: only its own files, and nested report folders (quickstart
    # puts the training report inside the image report).
    return all(e.name in _REPORT_FILES or (e.is_dir() and _is_report_folder(e)) for e in p.iterdir())


def _is_export_file(p: Path) -> bool:
    from pipeline.safeload import load

    try:
        # weights-only (pipeline.safeload): a crafted pickle is never run while we look at it.
        payload = load(p, map_location="cpu")
    except Exception:  # noqa: BLE001 - anything unreadable is simply not an export
        return False
    return isinstance(payload, Mapping) and str(payload.get("format", "")).startswith(_EXPORT_PREFIX)


def classify(path: Any, *, storage_options: Mapping[str, Any] | None = None,
             probe_export: bool = False) -> Target:
    """What ``path`` holds, and which recon3d command wrote it as an output (if any).

    Args:
        path: a local path or an fsspec URL (for URLs only zarr groups are recognised).
        storage_options: fsspec options of a URL.
        probe_export: read a file to see whether it is a recon3d export (``weights_only``).
    """
    text = str(path)
    if is_url(text):
        found = _zarr_target(text, storage_options)
        return found if found is not None else Target(text, "missing", None, "nothing")
    p = local_path(text)
    if not p.exists():
        return Target(text, "missing", None, "nothing")
    if not p.is_dir():
        if probe_export and _is_export_file(p):
            return Target(text, "export", "export", "a weights file written by recon3d export")
        return Target(text, "file", None, "a file that recon3d did not write")
    if (p / "zarr.json").exists() or (p / ".zgroup").exists() or (p / ".zarray").exists():
        found = _zarr_target(text, storage_options)
        if found is not None and (p / "zarr.json").exists():
            return found
        return Target(text, "zarr", None, "a zarr group that recon3d did not write")
    if any((p / name).exists() for name in _RUN_ENTRIES):
        return Target(text, "run", None, f"a training run directory ({_INPUT_OF['run']})")
    if not any(p.iterdir()):
        return Target(text, "empty", None, "an empty folder")
    if _is_report_folder(p):
        return Target(text, "report", "report", "a report folder written by recon3d report")
    return Target(text, "folder", None, "a non-empty folder that recon3d did not write")


# ----------------------------------------------------------------------------- guarding
def _same_or_inside(inner: Path, outer: Path) -> bool:
    try:
        inner.relative_to(outer)
        return True
    except ValueError:
        return False


def _resolved(path: str) -> Path:
    return Path(os.path.realpath(local_path(path)))


def check_outside(out: Any, command: str, inputs: Iterable[Any] = (), *, option: str = "--out") -> None:
    """Refuse an output path equal to or inside one of ``inputs``, or inside any zarr group.

    Raises:
        OutputConflictError: naming the input (or group) it lies in.
    """
    text = str(out)
    if is_url(text):
        target = text.rstrip("/")
        for item in inputs:
            if item is None:
                continue
            src = str(item).rstrip("/")
            if target == src or target.startswith(src + "/"):
                raise OutputConflictError(
                    f"{command}: {option} {text} is {'the input' if target == src else 'inside the input'} "
                    f"{item}; choose an {option} outside it")
        return
    here = _resolved(text)
    for item in inputs:
        if item is None or is_url(str(item)):
            continue
        src = _resolved(str(item))
        if not src.exists():
            continue  # a built-in phantom's name, not a path: nothing there to lose
        if _same_or_inside(here, src):
            where = "the input" if here == src else "inside the input"
            raise OutputConflictError(f"{command}: {option} {text} is {where} {item}; choose an {option} outside it")
    for parent in here.parents:
        if (parent / "zarr.json").exists() or (parent / ".zgroup").exists():
            what = classify(str(parent)).what
            raise OutputConflictError(
                f"{command}: {option} {text} is inside {parent}, {what}; choose an {option} outside it")


def check_output(out: Any, command: str, *, inputs: Iterable[Any] = (),
                 storage_options: Mapping[str, Any] | None = None, option: str = "--out") -> Target:
    """The guard of every writing command: returns the target if ``command`` may write there.

    ``command`` may write into a vacant target (nothing, an empty folder or zarr group) or into
    its own earlier output (the caller then resumes or, with ``--overwrite``, replaces it).

    Args:
        out: the output path or URL.
        command: ``simulate``, ``ingest``, ``reconstruct``, ``export`` or ``report``.
        inputs: the paths this job reads (the output must lie outside them).
        storage_options: fsspec options of a URL.
        option: the option that named ``out`` (for the message).

    Raises:
        OutputConflictError: anything else is there (say what, and to choose another path).
    """
    target = classify(out, storage_options=storage_options, probe_export=command == "export")
    if not (target.vacant or target.written_by == command):
        # Files are only opened to look for an export; say no more than what was checked.
        what = f"a file that recon3d {command} did not write" if target.kind == "file" else target.what
        raise OutputConflictError(
            f"{command}: {option} {out} is {what}; recon3d {command} never replaces it: "
            f"choose another {option}")
    check_outside(out, command, inputs, option=option)
    return target


def check_run_dir(run_dir: Any, *, inputs: Iterable[Any] = ()) -> Target:
    """The guard of ``recon3d train --run-dir``: a new or empty folder, an earlier run, or a plain
    folder (a user's experiment folder holding its YAML); never a scan, an output or a file,
    nor a path inside one of ``inputs`` (the scans it reads) or inside any zarr group.

    Raises:
        OutputConflictError: the run directory would be written into something recon3d must not
            touch (training writes ``checkpoints/``, ``metrics.jsonl`` and the resolved config).
    """
    target = classify(run_dir)
    if target.kind not in ("missing", "empty", "run", "folder"):
        raise OutputConflictError(
            f"train: --run-dir {run_dir} is {target.what}; recon3d train never writes into it: "
            "choose another --run-dir")
    check_outside(run_dir, "train", inputs, option="--run-dir")
    return target


def write_report_marker(folder: Path, target: Any) -> None:
    """Mark ``folder`` as written by ``recon3d report`` (so a later report may replace it)."""
    from pipeline.data.format import now_iso

    data = {"written_by": "report", "format": 1, "target": str(target), "written": now_iso()}
    (Path(folder) / REPORT_MARKER).write_text(json.dumps(data, indent=2) + "\n")


def check_job_folder(out: Any, command: str, names: Iterable[str]) -> None:
    """Refuse a job folder (``quickstart --out``) holding anything but the job's own ``names``.

    The job writes plain files (``README.md``, ``summary.json``...) straight into the folder, so
    a folder with anything else in it is someone else's: refused, whatever it holds.

    Raises:
        OutputConflictError: ``out`` is a file, or holds entries the job does not write.
    """
    p = local_path(str(out))
    if not p.exists():
        return
    if not p.is_dir():
        raise OutputConflictError(f"{command}: --out {out} is a file; choose another --out")
    foreign = sorted(e.name for e in p.iterdir() if e.name not in set(names))
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise OutputConflictError(
            f"{command}: --out {out} is a folder that recon3d {command} did not write (it holds "
            f"{shown}); recon3d {command} never writes into it: choose another --out")
