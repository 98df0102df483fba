"""``recon3d reconstruct``: a whole scan, slab by slab, into an OME-Zarr 0.5 image; resumable, parallel.

The volume is cut along D into output slabs of ``slab`` slices (a multiple of the output chunk
depth, so every output chunk lies in exactly one slab and has exactly one writer). For each
slab the reconstructor runs on an *input* slab extended by a halo along D (clipped at the
volume's ends, its start rounded down to the network's pooling grid) and the result is cropped
to the output slab. With a halo of at least the model's receptive radius along D the slab-wise
result equals the model applied to the whole volume at once, to float rounding (see
:func:`~pipeline.models.receptive.model_halo` for the rule and its exceptions).

This module is the driver (:func:`reconstruct`); the parts of the job live beside it:
:mod:`.config` (the settings), :mod:`.coordination` (ranks, waits, the model and its export, the
lease checks), :mod:`.halo` (receptive radius, slab layout), :mod:`.adapters` (the
reconstructors: classical, cone-beam FDK, a network) and :mod:`.store` (the output, its
attributes and completion records, the pyramid).

Resuming. A slab is recorded complete (a small object ``records/<fingerprint>/slab_NNNNNN.json``
in the output store) only after all its chunks are written; a rerun skips recorded slabs. The
fingerprint hashes the model weights (or the classical method and its parameters), every
setting that changes the values (slab, halo, tiling, chunks, codec) and the scan's identity;
an output made with another fingerprint is recomputed from scratch (its arrays and records are
deleted first), never mixed. Run settings (device, workers, scheduler, number of ranks) are
not part of it: a job may resume with other ones. The scan's intensity scale (a function of the
weights, the scan and the training slab thickness of the export's model card,
:mod:`pipeline.modelcard`) is measured once, by rank 0 when it creates the output, and recorded
there: the other ranks and resumed runs use the recorded value.

A record counts only if its content carries the whole fingerprint: the output is marked (and
found) complete only when every slab has such a record.

One writer per output. Rank 0 takes the output's lease (:mod:`pipeline.reconstruct.lease`: a
heartbeat object beside ``out``) before it looks at the output and releases it at the end; a
job of another owner is refused at once (:class:`~pipeline.errors.OutputConflictError`), a
stale lease (a killed job) is taken over, and every rank checks before each slab that its job
still holds it.

Parallelism. Under ``torchrun`` (or with ``RANK``/``WORLD_SIZE`` set by hand) rank ``r`` of
``W`` owns the output slabs ``i ≡ r (mod W)``; no process group is needed. Rank 0 prepares the
output (the others wait until its attributes carry their fingerprint and their job holds the
lease), and after its own slabs waits until the records of *all* slabs exist, then builds the
pyramid and marks the output complete. Waits end after ``wait_timeout_s`` (10 min by default)
with a message naming what is missing. Within a rank, slabs run as dask tasks (threads, sync,
or a ``dask.distributed`` cluster), ``workers`` at a time.

Memory: ``workers`` input slabs with halo, their measurements and the network's activations
(bounded by its tiling), never the volume. Without ``--slab`` a model's slab is the thickest
whose estimated peak fits ``--memory-budget`` (:mod:`.memory`; logged, recorded in the output's
``memory`` attribute; a resumed output keeps its recorded slab); see ``docs/output-format.md``
(*Memory*) and ``benchmarks/reconstruct.py``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
import uuid
from typing import Any

import torch

from pipeline.allocator import malloc_trim
from pipeline.data.format import CTGeometry, now_iso

from .adapters import _Classical, _Derived, _Network
from .config import ReconstructConfig, ReconstructResult
from .coordination import _check_lease, _device, _lease_times, _poll, _say, _wait_for_slabs, env_rank_and_world
from .halo import _Layout, _layout, describe_memory
from .lease import Lease, check_joined
from .store import (COMPLEX, OUTPUT_FORMAT, UNCERTAINTY, UNCERTAINTY_VERSION, _KIND, _finish, _Output, _prepare,
                    _reopen, _write_slab)

__all__ = ["reconstruct"]


def _release_memory() -> None:
    """After a slab: free what it left and hand the freed heap pages back to the OS.

    glibc keeps freed slab-sized blocks in its heaps (its mmap threshold rises to 32 MiB after
    large frees); ``malloc_trim`` returns their pages between slabs without slowing the
    allocations within one. A collection first frees whatever a reference cycle still holds
    (operators no longer form one with their adjoints, but models and user code may). A full
    collection costs ~0.1 s in a large process, so it runs at most once a second (slabs of
    real scans take longer; tiny test slabs would pay it for nothing).
    """
    now = time.monotonic()
    if now - _LAST_FULL_COLLECT[0] < 1.0:
        gc.collect(1)
        return
    _LAST_FULL_COLLECT[0] = now
    gc.collect()
    malloc_trim()


_LAST_FULL_COLLECT = [0.0]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _scan_identity(scan, config: ReconstructConfig) -> dict[str, Any]:
    path = str(config.scan)
    if "://" not in path:
        path = os.path.abspath(path)
    prov = scan.metadata.provenance or {}
    return {"path": path, "created": prov.get("created"), "parameters": prov.get("parameters"),
            "volume_shape": list(scan.metadata.volume_shape), "modality": scan.modality}


def _check_uncertainty(scan, recon) -> None:
    """``--uncertainty`` re-measures and re-runs each slab: it needs a slab operator and a noise
    model it can draw from."""
    from pipeline.estimate import HANDLED_NOISE, not_estimable_detector

    if isinstance(recon, _Derived):
        raise ValueError("reconstruct: --uncertainty re-runs each slab from its measurements, which a cone-beam "
                         "scan's FDK (its rays cross slabs) does not allow")
    why = not_estimable_detector(scan.metadata)
    if why is not None:  # its pilot and its re-measurements are of linear data
        raise ValueError(f"reconstruct: --uncertainty cannot map scan '{scan.path}': {why}")
    noise = scan.metadata.noise()
    if noise is None:
        raise ValueError(f"reconstruct: --uncertainty draws new measurements from the scan's noise model, and "
                         f"scan '{scan.path}' records none (record it when ingesting: --photons, --noise-sigma)")
    if noise.kind not in HANDLED_NOISE:
        raise ValueError(f"reconstruct: --uncertainty handles the noise models {list(HANDLED_NOISE)}, and scan "
                         f"'{scan.path}' has {noise.to_dict()}")


def _uncertainty(recon, scan, lo: int, hi: int, config: ReconstructConfig) -> torch.Tensor:
    """The bootstrap RMS-error map of input slab ``[lo, hi)`` (the output slab is cut from it)."""
    from .uncertainty import bootstrap_uncertainty

    y, op = recon.read(lo, hi)
    device = recon.device
    u = bootstrap_uncertainty(y.to(device), op.to(device), scan.metadata.noise(), recon.apply,
                              draws=int(config.uncertainty), seed=int(config.uncertainty_seed), start=lo)
    return u.cpu()


def _settings(config: ReconstructConfig, scan, recon, layout: _Layout, keep_complex: bool) -> tuple[Any, str]:
    """The output's ``settings`` (everything that determines the values) and their fingerprint."""
    from pipeline.data.writer import jsonable

    described = {
        "format_version": OUTPUT_FORMAT,
        "scan": _scan_identity(scan, config),
        "reconstructor": recon.describe(),
        "layout": {"shape": layout.shape, "chunks": layout.chunks, "slab": layout.slab, "halo": layout.halo,
                   "input_grid": layout.multiple, "complex": keep_complex, "codec": config.codec.recorded(config.out)},
    }
    if int(config.uncertainty) > 0:
        described["uncertainty"] = {"draws": int(config.uncertainty), "seed": int(config.uncertainty_seed),
                                    "version": UNCERTAINTY_VERSION}
    settings = jsonable(described)
    return settings, _digest(settings)


def _keep_recorded_slab(out: _Output, config: ReconstructConfig, scan, recon, layout: _Layout, keep_complex: bool,
                        settings: Any, fingerprint: str) -> tuple[_Layout, Any, str]:
    """A budget-chosen slab depends on ``--workers`` and the budget, which a job may change when
    it resumes: an output whose budget-chosen slab differs, but which matches in everything else,
    keeps its slab (and is resumed, not recomputed)."""
    before = out.info() or {}
    recorded = before.get("memory") or {}
    if (before.get("kind") != _KIND or before.get("fingerprint") == fingerprint
            or recorded.get("slab_from") != "--memory-budget" or not recorded.get("slab")):
        return layout, settings, fingerprint
    kept = layout.with_slab(int(recorded["slab"]), "the output's record (resumed)", int(config.memory_budget))
    kept_settings, kept_fingerprint = _settings(config, scan, recon, kept, keep_complex)
    if kept_fingerprint != before.get("fingerprint"):
        return layout, settings, fingerprint
    return kept, kept_settings, kept_fingerprint


def reconstruct(config: ReconstructConfig) -> ReconstructResult:
    """Reconstruct ``config.scan`` into the OME-Zarr image ``config.out`` (this rank's share).

    Every rank of a job calls it with the same config. Returns what this process did; rank 0
    returns once the output is complete.

    Raises:
        ScanError: an unreadable scan, or ``out`` holding something else.
        ValueError: settings that do not fit the scan or the model.
        OutputConflictError: another job holds the output's lease (or, on a rank other than 0,
            another job's rank 0 does).
        LeaseLostError: another job took the lease over while this one wrote.
        WaitTimeoutError: a rank waited longer than ``wait_timeout_s`` for the others.
    """
    from pipeline.data import open_scan

    rank, world = env_rank_and_world()
    device = _device(config.device)
    scan = open_scan(config.scan, storage_options=config.storage_options)
    geom = scan.metadata.geometry
    if config.method is not None:
        cone = isinstance(geom, CTGeometry) and geom.kind == "cone"
        recon = _Derived(scan) if cone and config.method in ("fbp", "fdk") else _Classical(scan, config, device)
    else:
        recon = _Network(scan, config, device, rank=rank)
    shape = tuple(int(s) for s in scan.metadata.volume_shape)
    layout = _layout(config, shape, recon)  # type: ignore[arg-type]
    keep_complex = bool(recon.is_complex and config.keep_complex)
    if int(config.uncertainty) > 0:
        _check_uncertainty(scan, recon)
    settings, fingerprint = _settings(config, scan, recon, layout, keep_complex)
    out = _Output(config.out, config.storage_options)
    if layout.memory is not None and config.slab is None:
        layout, settings, fingerprint = _keep_recorded_slab(out, config, scan, recon, layout, keep_complex,
                                                            settings, fingerprint)
    if layout.memory is not None:
        _say(describe_memory(layout.memory), config.progress and rank == 0)
    detector_notes = _detector_notes(scan, config, recon)
    notes = list(recon.notes) + detector_notes
    handled = _detector_handling(recon)
    for line in detector_notes + ([handled] if handled else []):
        _say(line, config.progress and rank == 0)
    if layout.halo < recon.radius:
        notes.append(f"halo {layout.halo} < receptive radius {recon.radius}: slab edges differ from the whole volume")
    slabs = layout.slabs()
    heartbeat_s, stale_s = _lease_times(config)
    if rank != 0:
        return _run(config, out, recon, scan, layout, slabs, settings, fingerprint, keep_complex, notes,
                    rank, world, None, stale_s)
    # One writer per output: rank 0 holds the output's lease from before it looks at the output
    # until it is complete (or this job fails); another job is refused, a stale lease taken over.
    lease = Lease(config.out, fingerprint, heartbeat_s=heartbeat_s, stale_s=stale_s,
                  storage_options=config.storage_options)
    with lease.acquire():
        return _run(config, out, recon, scan, layout, slabs, settings, fingerprint, keep_complex, notes,
                    rank, world, lease, stale_s)


def _detector_notes(scan, config: ReconstructConfig, recon) -> list[str]:
    """A classical method on a scan read through a non-linear detector (its ``detector``
    record: clipping, a count floor, quantisation, one bit) inverts ``A`` as if ``y = A x``; say
    so, in the log and in the output's ``notes`` (which then also marks it not ``exact``). A
    model trained with ``loss.detector: auto`` knew the detector; an export says which."""
    detector = getattr(scan.metadata, "detector", None)
    if detector is None or isinstance(recon, _Network) or getattr(recon, "clip_levels", None) is not None:
        return []  # linear, a network, or a clipping detector the method accounts for (_detector_handling)
    what = str(detector.get("model"))
    share = detector.get("fraction_at_high")
    extent = f", {100 * float(share):.1f}% of the measurements at its upper level" if share is not None else ""
    return [f"the scan's measurements went through a non-linear detector ({what}{extent}); --method "
            f"{config.method} treats them as linear (y = A x), so the clipped or quantised values bias it "
            "(a network trained with loss.detector: auto accounts for the detector)"]


def _detector_handling(recon) -> str | None:
    """What the job does about the scan's clipping detector, for the log (``None``: nothing)."""
    levels = getattr(recon, "clip_levels", None)
    if levels is None:
        return None
    what = "the network's input" if isinstance(recon, _Network) else "FBP"
    return (f"the scan's detector clips its line integrals (low {levels[0]}, high {levels[1]}): {what} is "
            "followed by the clipped-FBP steps, which take a clipped ray as a bound"
            + ("" if isinstance(recon, _Network) else " (--detector ignore: plain FBP)"))


def _run(config: ReconstructConfig, out: _Output, recon, scan, layout: _Layout, slabs, settings,
         fingerprint: str, keep_complex: bool, notes: list[str], rank: int, world: int,
         lease: Lease | None, stale_s: float) -> ReconstructResult:
    """The job once rank 0 holds the lease: prepare (or wait for rank 0), the slabs, the finish."""
    from pipeline.data.writer import SlabTask, run_tasks
    from pipeline.models import intensity_scale

    mine = [i for i in range(len(slabs)) if i % world == rank]
    token = None
    if rank == 0:
        if isinstance(recon, _Network):
            before = out.info() or {}
            same = before.get("kind") == _KIND and before.get("fingerprint") == fingerprint
            # A resumed output keeps the scale its first slabs were computed with.
            recon.scale = before.get("intensity_scale") if same else recon.measure_scale()
        if isinstance(recon, _Classical) and recon.needs_calibration:
            before = out.info() or {}
            same = before.get("kind") == _KIND and before.get("fingerprint") == fingerprint
            # A resumed output keeps the parameters its first slabs were computed with.
            if same and before.get("calibration"):
                recon.apply_calibration(before["calibration"])
                _say(f"parameters recorded in the output: {recon.parameters()}", config.progress)
            else:
                from pipeline.allocator import heap_for_small_work

                with heap_for_small_work():  # thousands of small solver temporaries
                    recon.calibrate(lambda text: _say(text, config.progress))
        state = _prepare(out, config, scan, recon, layout, settings, fingerprint, keep_complex, notes, world)
    else:
        seen: dict[str, Any] = {}
        held: list = [None]

        def prepared() -> bool:
            # Refuses at once if a live lease belongs to another job or fingerprint.
            ready, held[0] = check_joined(config.out, fingerprint, stale_s=stale_s,
                                          storage_options=config.storage_options)
            seen.update(out.info() or {})
            return ready and seen.get("fingerprint") == fingerprint

        def why() -> str:
            lease_text = f"its lease: {held[0].describe()}" if held[0] is not None else "no live lease"
            return (f"the output's fingerprint is {str(seen.get('fingerprint'))[:12]}, this rank's "
                    f"{fingerprint[:12]}; {lease_text}; every rank must get the same settings and scan path")

        _poll(prepared, timeout_s=config.wait_timeout_s, what=f"rank 0 to prepare {config.out}", missing=why)
        token = held[0].token
        state = "joined"
    info = out.info() or {}
    if isinstance(recon, _Network):
        recon.scale = info.get("intensity_scale")
    if isinstance(recon, _Classical) and recon.needs_calibration:
        recon.apply_calibration(info.get("calibration"))  # every rank: rank 0's recorded choice
    if info.get("complete") and info.get("fingerprint") == fingerprint:
        if out.done(fingerprint) >= set(range(len(slabs))):
            return ReconstructResult(config.out, "already complete" if rank == 0 else state, fingerprint, rank,
                                     world, 0, len(slabs), True)
        # Marked complete, but a record is missing or not of this fingerprint: every rank
        # computes its slabs without a valid record again, rank 0 then the pyramid.
        if rank == 0:
            state = "resumed"
            _reopen(out, info)

    group = out.group("r+")
    level0 = group["0"]
    cplx = group[COMPLEX] if keep_complex else None
    unc = group[UNCERTAINTY]["0"] if int(config.uncertainty) > 0 else None
    done = out.done(fingerprint)
    todo = [i for i in mine if i not in done]
    run_id = uuid.uuid4().hex

    if lease is not None:
        token = lease.token
    path, options = config.out, config.storage_options

    def work(i: int) -> None:
        a, b = slabs[i]
        lo, hi = layout.input_range(a, b)
        _check_lease(path, fingerprint, token, options)  # never write into an output another job took
        x = recon(lo, hi)[a - lo : b - lo]
        u = _uncertainty(recon, scan, lo, hi, config)[a - lo : b - lo] if unc is not None else None
        _check_lease(path, fingerprint, token, options)
        _write_slab(level0, cplx, a, b, x)
        if u is not None:
            unc[a:b] = u.numpy()
        out.record(fingerprint, i, {"slab": i, "d": [a, b], "input": [lo, hi], "rank": rank, "run": run_id,
                                    "written": now_iso()})
        del x
        _release_memory()

    tasks = [SlabTask(f"slab{i}", (lambda i=i: work(i)), []) for i in todo]
    label = f"reconstruct {'rank ' + str(rank) + ' ' if world > 1 else ''}slabs"
    if todo:
        _say(f"{len(todo)} of {len(mine)} slabs of {layout.slab} slices to run (halo {layout.halo}, "
             f"{len(slabs)} in all, {world} rank(s))", config.progress and rank == 0)
    scale = getattr(recon, "scale", None)
    model = getattr(recon, "model", None)
    if model is not None:
        with intensity_scale(model, scale):
            run_tasks(tasks, description=label, workers=config.workers, scheduler=config.scheduler,
                      progress=config.progress)
    else:
        run_tasks(tasks, description=label, workers=config.workers, scheduler=config.scheduler,
                  progress=config.progress)
    if rank != 0:
        return ReconstructResult(config.out, state, fingerprint, rank, world, len(todo), len(slabs), False)

    _wait_for_slabs(out, fingerprint, len(slabs), config, lease)
    _finish(out, config, fingerprint, len(slabs), lease)
    return ReconstructResult(config.out, state, fingerprint, rank, world, len(todo), len(slabs), True)
