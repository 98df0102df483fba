"""``recon3d reconstruct``: a whole scan, slab by slab, into an OME-Zarr 0.5 image; resumable, parallel.

The volume is cut along D into output slabs of ``slab`` slices (a multiple of the output chunk
depth, so every output chunk lies in exactly one slab and has exactly one writer). For each
slab the reconstructor runs on an *input* slab extended by a halo along D (clipped at the
volume's ends, its start rounded down to the network's pooling grid) and the result is cropped
to the output slab. With a halo of at least the model's receptive radius along D the slab-wise
result equals the model applied to the whole volume at once, to float rounding (see
:func:`model_halo` for the rule and its exceptions).

Resuming. A slab is recorded complete (a small object ``records/<fingerprint>/slab_NNNNNN.json``
in the output store) only after all its chunks are written; a rerun skips recorded slabs. The
fingerprint hashes the model weights (or the classical method and its parameters), every
setting that changes the values (slab, halo, tiling, chunks, codec) and the scan's identity;
an output made with another fingerprint is recomputed from scratch (its arrays and records are
deleted first), never mixed. Run settings (device, workers, scheduler, number of ranks) are
not part of it: a job may resume with other ones. The scan's intensity scale (a function of the
weights and the scan) is measured once, by rank 0 when it creates the output, and recorded
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
(bounded by its tiling), never the volume; see ``docs/output-format.md`` (*Memory*) and
``benchmarks/reconstruct.py``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from pipeline.allocator import malloc_trim, return_freed_memory_to_os
from pipeline.data.format import ATTRS_KEY, CodecConfig, CTGeometry, ScanError, now_iso, open_group, open_store
from pipeline.errors import Recon3dError

from . import ome
from .lease import HEARTBEAT_S, STALE_S, Lease, LeaseLostError, check_joined, read_lease

__all__ = [
    "ReconstructConfig",
    "ReconstructResult",
    "reconstruct",
    "resolve_model",
    "model_halo",
    "retile",
    "rank_and_world",
    "completion_records",
    "WaitTimeoutError",
    "WAIT_TIMEOUT_S",
    "return_freed_memory_to_os",
    "METHODS",
    "OUTPUT_FORMAT",
]

OUTPUT_FORMAT = 1
METHODS = ("adjoint", "fbp", "fdk", "sense", "tv")
AUTO = "auto"
#: Input slices added on each side of a slab for TV (3D TV couples neighbouring slices).
TV_HALO = 2
RECORDS = "records"
COMPLEX = "complex"
UNCERTAINTY = "uncertainty"
UNCERTAINTY_VERSION = 1  # of how the map is made (pilot, draws, noise); part of the fingerprint
# Minutes, not a day: a rank that waits this long is waiting for one that died or was refused.
WAIT_TIMEOUT_S = 600.0
_KIND = "reconstruction"


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ReconstructConfig:
    """Settings of ``recon3d reconstruct``.

    Args:
        scan: the scan to reconstruct (folder or fsspec URL).
        out: the OME-Zarr image to write.
        model: a run directory (its export, made first if missing or older than the latest
            checkpoint) or an exported weights file. Exclusive with ``method``.
        pick: with a run directory: ``latest`` (its latest checkpoint) or ``best`` (the one its
            best validation kept, ``checkpoint.keep_best``; exported to ``export/best.pt``).
        method: a classical reconstruction: ``adjoint`` (MRI zero-filled ``Aᴴy``, CT
            backprojection), ``fbp`` (parallel-beam CT; FDK for cone beam), ``fdk`` (cone
            beam: the scan's ``derived/fbp`` from ``recon3d preprocess``), ``sense`` (MRI,
            CG per slab) or ``tv`` (parallel-beam CT and MRI: TV-regularised least squares by
            PDHG per slab, with a halo of ``TV_HALO`` slices).
        pyramid: resolution levels (level ``l`` is the 2× mean of level ``l − 1``).
        slab: output slab thickness along D, a multiple of the output chunk depth (default:
            one chunk for classical methods; for a model the smallest multiple ≥ 2·halo).
        halo: input slices added on each side of a slab (default: the model's receptive
            radius along D; 0 for classical methods).
        chunks: output chunk shape ``(D, H, W)`` (default ``(16, 256, 256)`` clipped).
        tile: run the model's backbone on tiles of this ``(D, H, W)`` (overrides the model's
            own tiling); ``(0, 0, 0)`` removes the model's tiling.
        overlap: tile overlap (default ``2 × radius``: exact).
        filter, filter_cutoff: FBP window and its cutoff (a fraction of Nyquist); sense_iters,
            l2_weight: SENSE's CG iterations and Tikhonov weight; tv_weight, tv_iters: TV's
            weight and PDHG iterations. ``"auto"`` (the default of each) chooses the value
            without a reference from the scan's noise model on ``calibration_slabs`` evenly
            spaced D-blocks before the first slab (``pipeline.reconstruct.classical``,
            ``docs/classical.md``); the choice is recorded in the output (``calibration``)
            and reused when the job resumes. ``filter_cutoff=None``: auto with an auto
            window, else 1.
        calibration_slabs: how many D-blocks the calibration reads (default 3).
        keep_complex: MRI: also write the complex image as the array ``complex``.
        uncertainty: ``N > 0`` also writes the image ``uncertainty`` (a nested OME-Zarr image
            with the same levels): a per-voxel RMS error from ``N`` equivariant-bootstrap draws
            of the same reconstruction, slab by slab with the image's halo
            (:func:`pipeline.reconstruct.estimate.bootstrap_uncertainty`; about ``N + 1`` times
            the work). ``uncertainty_seed`` seeds the draws.
        codec: compression of the output arrays.
        overwrite: kept for scripts: an output of reconstruct made with other settings is
            recomputed anyway, and anything else at ``out`` (a scan, a run, a foreign group
            or folder) is refused with or without it.
        device: ``auto`` (the rank's GPU if any, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        workers: slabs in flight at once in this process (threads scheduler).
        scheduler: ``threads``, ``sync`` or ``distributed`` (the active dask client).
        progress: rich progress bars on stderr.
        wait_timeout_s: how long rank 0 waits for the other ranks' slabs (and they for rank
            0's preparation) before giving up with a message naming what is missing (rerunning
            resumes).
        lease_heartbeat_s, lease_stale_s: how often rank 0 renews the output's lease, and the
            heartbeat age after which another job takes it over (default: the environment's
            ``RECON3D_LEASE_HEARTBEAT_S`` / ``RECON3D_LEASE_STALE_S``, else 10 s and 60 s;
            see :mod:`pipeline.reconstruct.lease`).
        storage_options: fsspec options of ``scan`` and ``out`` URLs.
    """

    scan: str
    out: str
    model: str | None = None
    method: str | None = None
    pick: str = "latest"
    pyramid: int = 1
    slab: int | None = None
    halo: int | None = None
    chunks: tuple[int, int, int] | None = None
    tile: tuple[int, int, int] | None = None
    overlap: int | None = None
    filter: str = AUTO
    filter_cutoff: float | str | None = None
    sense_iters: int | str = AUTO
    l2_weight: float | str = AUTO
    tv_weight: float | str = AUTO
    tv_iters: int | str = AUTO
    calibration_slabs: int = 3
    keep_complex: bool = True
    uncertainty: int = 0
    uncertainty_seed: int = 0
    codec: CodecConfig = field(default_factory=CodecConfig)
    overwrite: bool = False
    device: str = "auto"
    workers: int = 1
    scheduler: str = "threads"
    progress: bool = True
    wait_timeout_s: float = WAIT_TIMEOUT_S
    lease_heartbeat_s: float | None = None
    lease_stale_s: float | None = None
    storage_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if (self.model is None) == (self.method is None):
            raise ValueError("reconstruct: give exactly one of --model RUN_DIR|WEIGHTS and --method")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"reconstruct: --method must be one of {METHODS}, got {self.method!r}")
        if int(self.pyramid) < 1:
            raise ValueError(f"reconstruct: --pyramid must be >= 1, got {self.pyramid}")
        if int(self.uncertainty) < 0:
            raise ValueError(f"reconstruct: --uncertainty must be >= 0 draws, got {self.uncertainty}")
        for name in ("slab", "halo", "overlap"):
            value = getattr(self, name)
            if value is not None and int(value) < (1 if name == "slab" else 0):
                raise ValueError(f"reconstruct: --{name} must be >= {1 if name == 'slab' else 0}, got {value}")
        if self.chunks is not None and (len(self.chunks) != 3 or min(self.chunks) < 1):
            raise ValueError(f"reconstruct: --chunks must be 3 positive ints (D H W), got {self.chunks}")
        if self.tile is not None and (len(self.tile) != 3 or min(self.tile) < 0):
            raise ValueError(f"reconstruct: --tile must be 3 ints >= 0 (D H W), got {self.tile}")
        if not float(self.wait_timeout_s) > 0:
            raise ValueError(f"reconstruct: --wait-timeout must be > 0 seconds, got {self.wait_timeout_s}")
        _check_classical(self)
        if self.scheduler not in ("threads", "sync", "distributed"):
            raise ValueError(
                f"reconstruct: --scheduler must be threads, sync or distributed, got {self.scheduler!r}"
            )


def _check_classical(config: "ReconstructConfig") -> None:
    """The classical settings: ``auto`` or a value in range, with a message naming the option."""
    from operators3d.ct import FILTERS

    if config.filter not in (AUTO,) + tuple(FILTERS):
        raise ValueError(f"reconstruct: --filter must be auto or one of {FILTERS}, got {config.filter!r}")
    checks = (("filter_cutoff", "--filter-cutoff", lambda v: 0 < float(v) <= 1, "in (0, 1]"),
              ("l2_weight", "--l2-weight", lambda v: float(v) >= 0, ">= 0"),
              ("tv_weight", "--tv-weight", lambda v: float(v) >= 0, ">= 0"),
              ("sense_iters", "--sense-iters", lambda v: int(v) >= 1 and int(v) == float(v), "an integer >= 1"),
              ("tv_iters", "--tv-iters", lambda v: int(v) >= 1 and int(v) == float(v), "an integer >= 1"))
    for name, flag, ok, what in checks:
        value = getattr(config, name)
        if value is None or value == AUTO:
            continue
        try:
            good = not isinstance(value, bool) and ok(value)
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ValueError(f"reconstruct: {flag} must be auto or {what}, got {value!r}")
    if int(config.calibration_slabs) < 1:
        raise ValueError(f"reconstruct: --calibration-slabs must be >= 1, got {config.calibration_slabs}")


@dataclass
class ReconstructResult:
    """What this process did.

    ``state``: ``created``, ``resumed``, ``recomputed`` (another fingerprint was there) or
    ``already complete`` on rank 0; ``joined`` on the other ranks.
    """

    path: str
    state: str
    fingerprint: str
    rank: int
    world_size: int
    slabs_run: int
    slabs_total: int
    complete: bool


# ----------------------------------------------------------------------------- helpers
def rank_and_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment (torchrun sets them), default ``(0, 1)``."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"reconstruct: RANK={rank} and WORLD_SIZE={world} must satisfy 0 <= RANK < WORLD_SIZE")
    return rank, world


def _device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(spec)


def _say(message: str, progress: bool) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold cyan]recon3d reconstruct[/] {message}", highlight=False)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("recon3d")
    except Exception:  # running from a checkout
        return "unknown"


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


class WaitTimeoutError(Recon3dError, TimeoutError):
    """A rank waited ``--wait-timeout`` seconds for another one: a failure (exit status 1)."""


def _poll(ready: Callable[[], bool], *, timeout_s: float, what: str,
          missing: Callable[[], str] | None = None) -> None:
    """Wait until ``ready()``; ``missing()`` adds what is still missing to the timeout's message."""
    delay, start = 0.2, time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout_s:
            detail = f" ({missing()})" if missing is not None else ""
            raise WaitTimeoutError(f"reconstruct: gave up after {timeout_s:.0f} s waiting for {what}{detail}; "
                                   "rerun the same command to resume, or raise --wait-timeout")
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


# ----------------------------------------------------------------------------- models
def _checkpoints_dir(run_dir: Path) -> Path:
    """A run's checkpoints directory (``checkpoint.dir`` of its resolved config, else RUN/checkpoints)."""
    import yaml

    directory = run_dir / "checkpoints"
    resolved = run_dir / "config.resolved.yaml"
    if resolved.is_file():
        cfg = yaml.safe_load(resolved.read_text()) or {}
        custom = (cfg.get("checkpoint") or {}).get("dir")
        if custom:
            directory = Path(custom)
    return directory


def _latest_checkpoint_time(run_dir: Path, pick: str = "latest") -> tuple[float, Path]:
    """``(mtime of its manifest, path)`` of the run's latest complete checkpoint, or of the one
    its best validation kept (``pick='best'``, ``checkpoint.keep_best``)."""
    from pipeline.train.checkpoint import read_best, read_checkpoint

    directory = _checkpoints_dir(run_dir)
    if pick == "best":
        best = read_best(directory)
        if best is None:
            raise FileNotFoundError(f"reconstruct: --pick best: run {run_dir} has no best checkpoint ({directory}/best.json); "
                                    "train with checkpoint.keep_best: estimate (or psnr, loss) and validation.scans")
        info = read_checkpoint(directory / best["tag"])
    else:
        info = read_checkpoint(directory)
    manifest = info.directory / info.tag / "recon3d" / "manifest.json"
    return manifest.stat().st_mtime, info.directory / info.tag


_FETCHED: dict[str, Path] = {}


def _fetch_weights(url: str) -> Path:
    """A local copy of the exported weights file at ``url`` (fsspec; ``--storage-options`` reach
    it), made once per process in a temporary folder removed at exit. It is then read like a local
    export: weights only, checked, nothing in it run."""
    if url in _FETCHED and _FETCHED[url].is_file():
        return _FETCHED[url]
    import atexit
    import shutil
    import tempfile

    import fsspec

    folder = Path(tempfile.mkdtemp(prefix="recon3d-model-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    local = folder / (url.rstrip("/").rsplit("/", 1)[-1] or "model.pt")
    try:
        with fsspec.open(url, "rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)
    except FileNotFoundError:
        raise FileNotFoundError(f"reconstruct: --model {url}: no such weights file (a URL must name an exported "
                                "weights file; a run directory must be a local or mounted path)") from None
    except IsADirectoryError:
        raise FileNotFoundError(f"reconstruct: --model {url} is a folder: a URL must name an exported weights file "
                                "(`recon3d export RUN`); a run directory must be a local or mounted path") from None
    _FETCHED[url] = local
    return local


def resolve_model(path: str | Path, *, rank: int = 0, timeout_s: float = 3600.0, pick: str = "latest") -> Path:
    """The exported weights file of ``path``: the file itself, or a run directory's
    ``export/model.pt`` — exported first (by rank 0; the other ranks wait) when it is missing or
    older than the run's latest complete checkpoint. ``pick='best'``: the checkpoint the run's
    best validation kept, exported to ``export/best.pt``. A URL names a weights file, fetched to
    a local temporary copy (:func:`_fetch_weights`)."""
    if pick not in ("latest", "best"):
        raise ValueError(f"reconstruct: --pick must be latest or best, got {pick!r}")
    from pipeline.paths import is_url

    if is_url(path):
        if pick == "best":
            raise ValueError(f"reconstruct: --pick best needs a run directory (a local or mounted path), and "
                             f"{path} is a URL; export the best checkpoint (`recon3d export RUN --checkpoint ...`) "
                             "and give that file")
        return _fetch_weights(str(path))
    p = Path(path)
    if p.is_file():
        if pick == "best":
            raise ValueError(f"reconstruct: --pick best needs a run directory, and {path} is a weights file")
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"reconstruct: --model {path}: no such run directory or weights file")
    export = p / "export" / ("best.pt" if pick == "best" else "model.pt")
    try:
        ckpt_time, ckpt = _latest_checkpoint_time(p, pick)
    except FileNotFoundError:
        if pick == "best":
            raise
        if export.is_file():
            return export
        raise
    except Exception as err:  # no checkpoint: an export alone is fine
        if export.is_file() and pick == "latest":
            return export
        raise FileNotFoundError(f"reconstruct: --model {path}: no {export.relative_to(p)} and no checkpoint "
                                f"({err})") from None

    def fresh() -> bool:
        return export.is_file() and export.stat().st_mtime >= ckpt_time

    if not fresh():
        if rank == 0:
            from pipeline.train import export_run

            export_run(p, export if pick == "best" else None, checkpoint=ckpt if pick == "best" else None)
        else:
            _poll(fresh, timeout_s=timeout_s, what=f"rank 0 to export {ckpt} to {export}")
    return export


def _reconstructor(model: torch.nn.Module):
    from pipeline.models import ArtifactRemoval, UnrolledNetwork

    return next((m for m in model.modules() if isinstance(m, (ArtifactRemoval, UnrolledNetwork))), None)


def _backbones(rec) -> list[torch.nn.Module]:
    from pipeline.models import UnrolledNetwork

    if isinstance(rec, UnrolledNetwork):
        return [rec.backbones[0 if rec.shared else k] for k in range(rec.num_iters)]
    return [rec.backbone]


def model_halo(model: torch.nn.Module) -> tuple[int | None, int, list[str]]:
    """``(radius, multiple, notes)``: the receptive radius of ``model`` along D, the pooling
    grid its input slabs must start on, and why slab-wise results may still differ.

    The rule: the backbone's radius ``r`` (``UNet3D``: ``unet_receptive_radius``; ``DnCNN3D``:
    ``depth·(k//2)``; a ``TiledBackbone``: its backbone's); an ``UnrolledNetwork`` couples D once
    per iteration through its backbone (its data-consistency step with a hybrid-space MRI or a
    parallel-beam CT operator acts on each D-slice alone), so ``Σ_k r_k``. ``radius`` is
    ``None`` when a backbone normalises with statistics over its whole input (instance or group
    norm): no halo makes slabs exact. Not D-local either, whatever the halo (``notes`` say so):
    a SENSE initial estimate or CG data consistency (conjugate gradient's step sizes are sums
    over the whole slab; equal only as CG converges), and a tiled backbone whose overlap is
    below twice its radius (tiles blend slightly different values).
    """
    from pipeline.models import TiledBackbone, UnrolledNetwork

    rec = _reconstructor(model)
    if rec is None:
        raise ValueError(f"reconstruct: {type(model).__name__} holds no ArtifactRemoval or UnrolledNetwork")
    notes: list[str] = []
    total: int | None = 0
    multiple = 1
    for bb in _backbones(rec):
        r = getattr(bb, "receptive_radius", None)
        multiple = max(multiple, int(getattr(bb, "size_multiple", 1)))
        if isinstance(bb, TiledBackbone) and not bb.exact:
            notes.append(f"tiles overlap {bb.overlap} < 2 x radius {r}: tiled values blend")
        if r is None:
            total = None
        elif total is not None:
            total += int(r)
    if rec.initial in ("sense", "classical"):
        notes.append("SENSE initial estimate: CG over each slab (equal to the whole volume's as CG converges)")
    if isinstance(rec, UnrolledNetwork) and rec.data_consistency == "cg":
        notes.append("CG data consistency: CG over each slab (equal to the whole volume's as CG converges)")
    return total, multiple, notes


def retile(model: torch.nn.Module, tile: tuple[int, int, int] | None, overlap: int | None) -> torch.nn.Module:
    """Replace the tiling of ``model``'s backbones (in place): tiles of ``tile`` with
    ``overlap`` (default exact, ``2·radius``); ``tile=(0, 0, 0)`` runs them untiled."""
    from pipeline.models import TiledBackbone, UnrolledNetwork

    if tile is None:
        return model
    rec = _reconstructor(model)

    def swap(bb: torch.nn.Module) -> torch.nn.Module:
        inner = bb.backbone if isinstance(bb, TiledBackbone) else bb
        if not any(tile):
            return inner
        return TiledBackbone(inner, tile_shape=tuple(tile), overlap=overlap, checkpoint=False)

    if isinstance(rec, UnrolledNetwork):
        for k, bb in enumerate(rec.backbones):
            rec.backbones[k] = swap(bb)
    else:
        rec.backbone = swap(rec.backbone)
    return model


def _weights_digest(path: Path) -> tuple[str, dict[str, Any]]:
    """sha256 of an export's weights (names, dtypes, shapes, values) and configs.

    The file is read weights-only and checked (:func:`pipeline.train.export.read_export`): a
    crafted pickle, a garbage file or weights with NaN/Inf are refused here, before any slab.
    """
    from pipeline.train.export import read_export

    payload = read_export(path)
    h = hashlib.sha256()
    for name in sorted(payload["state_dict"]):
        t = payload["state_dict"][name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    desc = {"model_config": payload.get("model_config"), "loss_config": payload.get("loss_config"),
            "modality": payload.get("modality"), "channels": payload.get("channels")}
    h.update(json.dumps(desc, sort_keys=True, default=str).encode())
    return h.hexdigest(), {**desc, "step": payload.get("step")}


# ----------------------------------------------------------------------------- reconstructors
class _SlabReader:
    """``(y, op)`` of a D-range of a scan, as ``Scan.slab`` gives, read chunk by chunk into
    preallocated tensors: the peak is the slab plus one chunk, not twice the slab (which
    ``ScanArray.read``'s concatenation of the chunks costs). The MRI mask is read once, so
    every slab operator shares it (and its cached FFT phases)."""

    def __init__(self, scan) -> None:
        self.scan = scan
        self.mask = scan.mask.read_torch() if scan.modality == "mri" else None

    @staticmethod
    def _read(array, lo: int, hi: int) -> torch.Tensor:
        axis, step = array.d_axis, array.chunk_depth
        shape = list(array.shape)
        shape[axis] = hi - lo
        out: torch.Tensor | None = None
        for start in range(lo // step * step, hi, step):
            a, b = max(lo, start), min(hi, start + step)
            part = array.read_torch(slice(a, b))  # one chunk: checked present, decoded, finite
            if out is None:
                out = torch.empty(shape, dtype=part.dtype)
            out.narrow(axis, a - lo, b - a).copy_(part)
            del part
        assert out is not None
        return out

    def __call__(self, lo: int, hi: int):
        if self.mask is not None:
            from operators3d import MultiCoilMRI

            op = MultiCoilMRI(mask=self.mask, coil_maps=self._read(self.scan.coil_maps, lo, hi))
        else:
            op = self.scan.operator(slice(lo, hi))
        return self._read(self.scan.measurements, lo, hi), op


class _Classical:
    """A classical reconstruction of each input slab (no D coupling: halo 0; TV: a halo of
    ``TV_HALO`` slices), with its parameters given or chosen by a calibration (``auto``)."""

    multiple = 1

    def __init__(self, scan, config: ReconstructConfig, device: torch.device) -> None:
        geom = scan.metadata.geometry
        m = config.method
        mri = scan.modality == "mri"
        cone = isinstance(geom, CTGeometry) and geom.kind == "cone"
        if m == "sense" and not mri:
            raise ValueError("reconstruct: --method sense is for MRI scans; use fbp (or fdk, tv) for CT")
        if m in ("fbp", "fdk") and mri:
            raise ValueError(f"reconstruct: --method {m} is for CT scans; use adjoint, sense or tv for MRI")
        if m == "fdk" and isinstance(geom, CTGeometry) and geom.kind == "parallel":
            raise ValueError("reconstruct: --method fdk is for cone-beam scans; use fbp for parallel beam")
        if m == "adjoint" and cone:
            raise ValueError("reconstruct: a cone-beam slab has no operator of its own; use --method fdk")
        if m == "tv" and cone:
            raise ValueError("reconstruct: --method tv runs slab by slab, which cone-beam rays do not allow "
                             "(a ray crosses slabs); use --method fdk")
        self.scan, self.method, self.device = scan, m, device
        self.read = _SlabReader(scan)
        self.config = config
        self.is_complex = mri
        self.noise = scan.metadata.noise()
        self.radius = TV_HALO if m == "tv" else 0
        self.notes = ([f"3D TV couples neighbouring slices: each slab is solved with a halo of {TV_HALO} "
                       "slices (default), close to but not equal to the whole volume's solution"]
                      if m == "tv" else [])
        c = config
        cutoff = c.filter_cutoff if c.filter_cutoff is not None else (AUTO if c.filter == AUTO else 1.0)
        given: dict[str, Any] = {}
        if m == "fbp":
            given = {"filter": c.filter, "cutoff": cutoff}
        elif m == "sense":
            given = {"l2_weight": c.l2_weight, "iterations": c.sense_iters}
        elif m == "tv":
            given = {"tv_weight": c.tv_weight, "iterations": c.tv_iters}
        self.given = {k: (v if v == AUTO else (int(v) if k == "iterations" else
                                               v if k == "filter" else float(v))) for k, v in given.items()}
        self.params: dict[str, Any] = dict(self.given)
        self.calibration: dict[str, Any] | None = None

    @property
    def needs_calibration(self) -> bool:
        return any(v == AUTO for v in self.given.values())

    def describe(self) -> dict[str, Any]:
        # What is hashed: the settings as given ("auto" for a chosen value) and how the choice is
        # made; the chosen values are recorded in the attributes (``calibration``) and reused.
        params: dict[str, Any] = {"method": self.method, **self.given}
        if self.needs_calibration:
            from .classical import CALIBRATION_VERSION

            params["calibration"] = {"version": CALIBRATION_VERSION, "slabs": int(self.config.calibration_slabs)}
        return params

    def parameters(self) -> dict[str, Any]:
        """The values every slab uses (given or chosen)."""
        return dict(self.params)

    def calibrate(self, say: Callable[[str], None]) -> None:
        """Choose the ``auto`` values on a few D-blocks of the scan (rank 0, before any slab)."""
        from . import classical as cl

        given, scan = self.given, self.scan
        depth = int(scan.metadata.volume_shape[0])
        mri = scan.modality == "mri"
        thickness = {"fbp": 4, "sense": 1, "tv": 2 if mri else 4}[self.method]
        blocks = cl.calibration_blocks(depth, int(self.config.calibration_slabs), thickness)
        variance = None
        if self.noise is not None:
            variance = cl.measurement_variance(self.noise, torch.zeros(1))
        if variance is None or (self.method == "sense" and torch.is_tensor(variance)):
            self.calibration = self._fallback(say)
        else:
            data = cl.calibration_data(scan, self.read, blocks, self.device)
            if self.method == "fbp":
                record = cl.select_fbp(
                    data, self.noise,
                    windows=cl.FBP_WINDOWS if given["filter"] == AUTO else (given["filter"],),
                    cutoffs=cl.FBP_CUTOFFS if given["cutoff"] == AUTO else (given["cutoff"],), say=say)
            elif self.method == "sense":
                fixed = given["l2_weight"] != AUTO
                record = cl.select_sense(
                    data, self.noise, weights=[given["l2_weight"]] if fixed else cl.SENSE_WEIGHTS,
                    relative=not fixed,
                    iterations=cl.SENSE_ITERATIONS if given["iterations"] == AUTO else (given["iterations"],),
                    say=say)
            else:
                record = cl.select_tv(
                    data, self.noise, cl.tv_problem(scan),
                    iterations=cl.TV_ITERATIONS if given["iterations"] == AUTO else (given["iterations"],),
                    weight=None if given["tv_weight"] == AUTO else given["tv_weight"], say=say)
            del data
            self.calibration = record
        self.apply_calibration(self.calibration)
        chosen = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in self.calibration["chosen"].items())
        say(f"calibration ({self.calibration['criterion']}, {self.calibration.get('seconds', 0):.0f} s): {chosen}")

    def _fallback(self, say: Callable[[str], None]) -> dict[str, Any]:
        """No usable noise model: the former fixed defaults (TV has none: its weight must be given)."""
        why = ("the scan records no noise model" if self.noise is None
               else f"its noise model ({self.noise.to_dict()}) has no estimate here")
        if self.method == "tv" and self.given["tv_weight"] == AUTO:
            raise ValueError(f"reconstruct: --tv-weight auto needs the scan's noise model, and {why}; "
                             "give --tv-weight (and --tv-iters)")
        defaults = {"filter": "ram-lak", "cutoff": 1.0, "l2_weight": 1e-3, "iterations": 20 if self.method == "sense" else 100}
        chosen = {k: (defaults[k] if v == AUTO else v) for k, v in self.given.items()}
        say(f"no reference-free choice: {why}; using {chosen}")
        return {"version": None, "method": self.method, "criterion": "none", "reason": why,
                "chosen": chosen, "candidates": []}

    def apply_calibration(self, record: Mapping[str, Any] | None) -> None:
        """Use a calibration's choice (this job's, or the one recorded in the output)."""
        if not self.needs_calibration:
            return
        if not record or "chosen" not in record:
            raise ScanError("reconstruct: the output records no calibration for its auto parameters; "
                            "rerun with --overwrite or another --out")
        self.calibration = dict(record)
        for key, value in self.given.items():
            if value == AUTO:
                self.params[key] = record["chosen"][key]

    @torch.no_grad()
    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        y, op = self.read(lo, hi)
        return self.apply(y.to(self.device), op.to(self.device)).cpu()

    @torch.no_grad()
    def apply(self, y: torch.Tensor, op) -> torch.Tensor:
        """The method with this job's parameters on measurements ``y`` of operator ``op``
        (a slab's, or another of the scan's kind: fewer views, another k-space mask)."""
        p = self.params
        if self.method == "adjoint":
            x = op.adjoint(y)
        elif self.method == "fbp":
            from pipeline.data.ct_ops import fbp_slab

            x = fbp_slab(y, op, filter=p["filter"], cutoff=float(p["cutoff"]))
        elif self.method == "sense":
            from operators3d import sense_cg

            x = sense_cg(y, op, l2_weight=float(p["l2_weight"]), num_iters=int(p["iterations"]))
        else:
            from .classical import tv_problem, tv_reconstruct

            x = tv_reconstruct(y, op, tv_problem(self.scan), self.noise, float(p["tv_weight"]),
                               int(p["iterations"]))
        return x


class _Derived:
    """Cone-beam FDK: the scan's ``derived/fbp`` (made out of core by ``recon3d preprocess``)."""

    radius, multiple, notes = 0, 1, []
    is_complex = False

    def __init__(self, scan) -> None:
        self.scan = scan
        try:
            self.array = scan.derived("fbp")
        except ScanError:
            raise ScanError(
                f"scan '{scan.path}': a cone-beam scan's FDK is computed out of core by "
                f"`recon3d preprocess {scan.path} --outputs fbp`; run it, then reconstruct again"
            ) from None
        self.parameters = dict(self.array.array.attrs).get(ATTRS_KEY, {}).get("parameters")

    def describe(self) -> dict[str, Any]:
        return {"method": "fdk", "source": "derived/fbp", "parameters": self.parameters}

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        return self.array.read_torch(slice(lo, hi))


class _Network:
    """An exported model ``model(y, op)`` on each input slab, under the scan's intensity scale."""

    def __init__(self, scan, config: ReconstructConfig, device: torch.device, *, rank: int) -> None:
        from pipeline.train import load_exported

        geom = scan.metadata.geometry
        if isinstance(geom, CTGeometry) and geom.kind == "cone":
            raise ScanError(
                f"scan '{scan.path}': cone-beam rays cross slabs, so a model cannot run slab by slab "
                "on its measurements; reconstruct it with --method fdk"
            )
        self.weights = resolve_model(config.model, rank=rank, timeout_s=config.wait_timeout_s,  # type: ignore[arg-type]
                                     pick=config.pick)
        self.digest, self.info = _weights_digest(self.weights)
        if self.info.get("modality") not in (None, scan.modality):
            raise ValueError(
                f"reconstruct: the model was trained on {self.info['modality']} scans, the scan is {scan.modality}"
            )
        model = load_exported(self.weights)
        self.model = retile(model, config.tile, config.overlap).to(device).eval()
        radius, self.multiple, self.notes = model_halo(self.model)
        if radius is None and config.halo is None:
            raise ValueError(
                "reconstruct: the model normalises over its whole input (instance/group norm), so "
                "slabs cannot equal the whole volume; pass --halo N to reconstruct anyway"
            )
        self.radius = int(radius or 0)
        if scan.modality == "mri" and type(_reconstructor(self.model)).__name__ == "UnrolledNetwork":
            self.notes = self.notes + [
                "unrolled step 1/L uses max sum|S|^2 over each input slab: the whole volume's for "
                "coil maps normalised to sum|S|^2 = 1 (simulated, ESPIRiT), to float32 rounding"
            ]
        self.scan, self.device = scan, device
        self.read = _SlabReader(scan)
        self.is_complex = scan.modality == "mri"
        self.scale_thickness = _training_thickness(config.model)
        self.storage_options = dict(config.storage_options or {}) or None
        self.scale: float | None = None
        self.piece = scan.chunk_depth  # slices per read of a staged initial estimate (set per job)
        self.tile = config.tile
        self.overlap = config.overlap

    def measure_scale(self) -> float | None:
        """The scan's intensity scale for this model (as training computes it; rank 0 only:
        the other ranks, and resumed runs, take the one recorded in the output)."""
        from pipeline.train.build import scan_scale

        return scan_scale(self.model, self.scan.path, thickness=self.scale_thickness,
                          storage_options=self.storage_options, device=self.device)

    def describe(self) -> dict[str, Any]:
        # The scale is a function of the weights, the scan and the thickness, all in here; its
        # value is recorded in the attributes, not hashed (ranks and devices round it apart).
        return {"model": {"sha256": self.digest, **self.info}, "tile": self.tile, "overlap": self.overlap,
                "scale_thickness": self.scale_thickness}

    @property
    def staged(self) -> bool:
        """Whether the model is an ``ArtifactRemoval`` with a D-local initial estimate, which
        is then computed piece by piece: ``model(y, op)`` is ``model(initial_estimate(y, op),
        None)`` (its image mode), so the multi-coil k-space and coil maps of the whole input
        slab (16× the image for 8 coils) are never held at once."""
        from pipeline.models import ArtifactRemoval

        return isinstance(self.model, ArtifactRemoval) and self.model.initial in ("adjoint", "fbp")

    @torch.no_grad()
    def apply(self, y: torch.Tensor, op) -> torch.Tensor:
        """The model on measurements ``y`` of operator ``op`` (under the active intensity scale)."""
        return self.model(y.unsqueeze(0).to(self.device), op.to(self.device))[0]

    @torch.no_grad()
    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        if not self.staged:
            y, op = self.read(lo, hi)
            y, op = y.unsqueeze(0).to(self.device), op.to(self.device)
            return self.model(y, op)[0].cpu()
        parts = []
        for a in range(lo, hi, self.piece):
            y, op = self.read(a, min(a + self.piece, hi))
            # the model's own initial estimate (its FBP window...): the network's training input
            parts.append(self.model.initial_image(y.unsqueeze(0).to(self.device), op.to(self.device)))
            del y, op
        x0 = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-3)
        del parts
        return self.model(x0, None)[0].cpu()


def _training_thickness(model: str | None) -> int | None:
    """The slab thickness the run trained with (its intensity scale used it), if known."""
    if model is None or not Path(model).is_dir():
        return None
    resolved = Path(model) / "config.resolved.yaml"
    if not resolved.is_file():
        return None
    import yaml

    cfg = yaml.safe_load(resolved.read_text()) or {}
    value = (cfg.get("data") or {}).get("slab_thickness")
    return int(value) if value else None


# ----------------------------------------------------------------------------- output store
class _Output:
    """The output group: arrays, attributes and completion records (plain objects in its store)."""

    def __init__(self, path: str, storage_options: Mapping[str, Any] | None) -> None:
        self.path = str(path)
        self.storage_options = dict(storage_options or {})
        self.store = open_store(self.path, read_only=False, storage_options=self.storage_options)

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

    def recorded(self, fingerprint: str) -> set[int]:
        """The slabs that have a record object under ``fingerprint``'s prefix (content unchecked)."""
        from zarr.core.sync import sync

        prefix = self._prefix(fingerprint)

        async def keys() -> list[str]:
            return [k async for k in self.store.list_prefix(prefix)]

        out = set()
        for key in sync(keys()):
            name = key.rsplit("/", 1)[-1]
            if name.startswith("slab_") and name.endswith(".json"):
                out.add(int(name[5:-5]))
        return out

    def _read(self, fingerprint: str, index: int) -> dict[str, Any] | None:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        key = f"{self._prefix(fingerprint)}slab_{index:06d}.json"
        buf = sync(self.store.get(key, prototype=default_buffer_prototype()))
        if buf is None:
            return None
        try:
            value = json.loads(buf.to_bytes())
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

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

        key = f"{self._prefix(fingerprint)}slab_{index:06d}.json"
        data = json.dumps({**info, "fingerprint": fingerprint}, sort_keys=True).encode()
        sync(self.store.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def read_records(self, fingerprint: str) -> dict[int, dict[str, Any]]:
        """Every completion record of ``fingerprint`` (for inspection and tests)."""
        out = {}
        for index in sorted(self.done(fingerprint)):
            record = self._read(fingerprint, index)
            if record is not None:
                out[index] = record
        return out


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


# ----------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class _Layout:
    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    slab: int
    halo: int
    multiple: int

    def slabs(self) -> list[tuple[int, int]]:
        d = self.shape[0]
        return [(a, min(a + self.slab, d)) for a in range(0, d, self.slab)]

    def input_range(self, a: int, b: int) -> tuple[int, int]:
        """The input slab of output slab ``[a, b)``: the halo on each side, clipped to the
        volume, its start rounded down to the pooling grid (the whole volume's starts at 0)."""
        lo = max(0, a - self.halo) // self.multiple * self.multiple
        return lo, min(self.shape[0], b + self.halo)


def _layout(config: ReconstructConfig, shape: tuple[int, int, int], recon) -> _Layout:
    d, h, w = shape
    chunks = tuple(config.chunks) if config.chunks else (16, 256, 256)
    chunks = tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks, shape))
    halo = int(config.halo) if config.halo is not None else int(recon.radius)
    if config.slab is not None:
        slab = int(config.slab)
        if slab % chunks[0] and slab < d:
            raise ValueError(
                f"reconstruct: --slab {slab} must be a multiple of the output chunk depth {chunks[0]} "
                "(every output chunk must lie in one slab: one writer per chunk)"
            )
    else:
        want = max(chunks[0], 2 * halo)
        slab = -(-want // chunks[0]) * chunks[0]
    return _Layout(shape, chunks, min(slab, max(d, chunks[0])), halo, int(recon.multiple))  # type: ignore[arg-type]


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
    from .estimate import HANDLED_NOISE

    if isinstance(recon, _Derived):
        raise ValueError("reconstruct: --uncertainty re-runs each slab from its measurements, which a cone-beam "
                         "scan's FDK (its rays cross slabs) does not allow")
    noise = scan.metadata.noise()
    if noise is None:
        raise ValueError(f"reconstruct: --uncertainty draws new measurements from the scan's noise model, and "
                         f"scan '{scan.path}' records none (record it when ingesting: --photons, --noise-sigma)")
    if noise.kind not in HANDLED_NOISE:
        raise ValueError(f"reconstruct: --uncertainty handles the noise models {list(HANDLED_NOISE)}, and scan "
                         f"'{scan.path}' has {noise.to_dict()}")


def _uncertainty(recon, scan, lo: int, hi: int, config: ReconstructConfig) -> torch.Tensor:
    """The bootstrap RMS-error map of input slab ``[lo, hi)`` (the output slab is cut from it)."""
    from .estimate import bootstrap_uncertainty

    y, op = recon.read(lo, hi)
    device = recon.device
    u = bootstrap_uncertainty(y.to(device), op.to(device), scan.metadata.noise(), recon.apply,
                              draws=int(config.uncertainty), seed=int(config.uncertainty_seed), start=lo)
    return u.cpu()


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
    from pipeline.data.writer import jsonable

    rank, world = rank_and_world()
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
    if isinstance(recon, _Network):
        recon.piece = max(scan.chunk_depth, layout.slab // scan.chunk_depth * scan.chunk_depth)
    keep_complex = bool(recon.is_complex and config.keep_complex)
    described = {
        "format_version": OUTPUT_FORMAT,
        "scan": _scan_identity(scan, config),
        "reconstructor": recon.describe(),
        "layout": {"shape": layout.shape, "chunks": layout.chunks, "slab": layout.slab, "halo": layout.halo,
                   "input_grid": layout.multiple, "complex": keep_complex, "codec": config.codec.to_dict()},
    }
    if int(config.uncertainty) > 0:
        _check_uncertainty(scan, recon)
        described["uncertainty"] = {"draws": int(config.uncertainty), "seed": int(config.uncertainty_seed),
                                    "version": UNCERTAINTY_VERSION}
    settings = jsonable(described)
    fingerprint = _digest(settings)
    notes = list(recon.notes)
    if layout.halo < recon.radius:
        notes.append(f"halo {layout.halo} < receptive radius {recon.radius}: slab edges differ from the whole volume")
    out = _Output(config.out, config.storage_options)
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


def _lease_times(config: ReconstructConfig) -> tuple[float, float]:
    """``(heartbeat_s, stale_s)`` of the output's lease: the config's, else the environment's."""
    def pick(value: float | None, env: str, default: float) -> float:
        if value is not None:
            return float(value)
        text = os.environ.get(env)
        try:
            return float(text) if text else default
        except ValueError:
            raise ValueError(f"reconstruct: {env}={text!r} must be a number of seconds") from None

    stale = pick(config.lease_stale_s, "RECON3D_LEASE_STALE_S", STALE_S)
    # A heartbeat left at its default beats often enough for a shortened stale age.
    return pick(config.lease_heartbeat_s, "RECON3D_LEASE_HEARTBEAT_S", min(HEARTBEAT_S, stale / 4)), stale


def _missing(out: _Output, fingerprint: str, total: int, verified: set[int] | None = None) -> str:
    """The slabs without a record carrying ``fingerprint``, in words (for timeout messages)."""
    done = out.done(fingerprint, verified)
    missing = [i for i in range(total) if i not in done]
    foreign = sorted(out.recorded(fingerprint) & set(missing))
    text = (f"{len(missing)} of {total} slabs have no record with fingerprint {fingerprint[:12]}: "
            f"{', '.join(map(str, missing[:20]))}{' ...' if len(missing) > 20 else ''}")
    if foreign:
        text += f" (slabs {', '.join(map(str, foreign[:20]))} have a record of another fingerprint)"
    return text


def _check_lease(out: str, fingerprint: str, token: str, storage_options) -> None:
    """Before a slab is written: this job's rank 0 must still hold the output's lease.

    Stateless (it reads the lease and compares its token), so it also runs in the worker
    processes of ``--scheduler distributed``.
    """
    info = read_lease(out, storage_options)
    if info is None or info.token != token:
        who = "was removed (rank 0 ended)" if info is None else f"was taken over by {info.describe()}"
        raise LeaseLostError(f"reconstruct: stopped writing '{out}': this job's lease {who} (this job's "
                             f"fingerprint {fingerprint[:12]}); rerun the command once the other job has "
                             "finished, or choose another --out")


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


def _reopen(out: _Output, info: dict[str, Any]) -> None:
    """Clear ``complete`` (and the pyramid's progress) of an output whose records do not all
    carry its fingerprint: the slabs without one are computed again, then the pyramid."""
    from pipeline.data.writer import jsonable

    attrs = dict(info)
    attrs.update(complete=False, levels_complete=[])
    attrs.pop("completed", None)
    out.group("r+").attrs[ATTRS_KEY] = jsonable(attrs)


def _write_slab(level0, cplx, a: int, b: int, x: torch.Tensor) -> None:
    """Write output slab ``[a, b)``: whole chunks of level 0 (and of ``complex``)."""
    if x.is_complex():
        level0[a:b] = x.abs().to(torch.float32).numpy()
        if cplx is not None:
            cplx[a:b] = x.to(torch.complex64).numpy()
    else:
        level0[a:b] = x.to(torch.float32).numpy()


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
        ome.create_level(group, str(level), shape, layout.chunks, compressors=compressors)
    if keep_complex:
        ome.create_level(group, COMPLEX, layout.shape, layout.chunks, dtype="complex64", compressors=compressors)
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


def _wait_for_slabs(out: _Output, fingerprint: str, total: int, config: ReconstructConfig,
                    lease: Lease | None = None) -> None:
    """Rank 0: wait until every slab's completion record exists and carries ``fingerprint``
    (the other ranks' included); stops at once if another job takes the output's lease."""
    verified: set[int] = set()
    have = len(out.done(fingerprint, verified))
    if have >= total:
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold cyan]waiting for the other ranks' slabs"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                  disable=not config.progress) as bar:
        task = bar.add_task("wait", total=total, completed=have)

        def ready() -> bool:
            if lease is not None:
                lease.check()
            n = len(out.done(fingerprint, verified))
            bar.update(task, completed=n)
            return n >= total

        _poll(ready, timeout_s=config.wait_timeout_s, what=f"the other ranks' slabs of {config.out}",
              missing=lambda: _missing(out, fingerprint, total, verified) + "; check the other ranks' logs")


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
        raise Recon3dError(f"reconstruct: '{config.out}' not marked complete: {_missing(out, fingerprint, total)}; "
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


def completion_records(out: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[int, dict[str, Any]]:
    """The completion records of the output's current fingerprint (slab index → record)."""
    o = _Output(out, storage_options)
    info = o.info() or {}
    if "fingerprint" not in info:
        return {}
    return o.read_records(info["fingerprint"])
