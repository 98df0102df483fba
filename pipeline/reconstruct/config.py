"""The settings of ``recon3d reconstruct`` (:class:`ReconstructConfig`, checked when made), what a
process returns (:class:`ReconstructResult`) and the constants both name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from pipeline.data.format import CodecConfig

__all__ = ["ReconstructConfig", "ReconstructResult", "METHODS", "AUTO", "TV_HALO", "WAIT_TIMEOUT_S"]

METHODS = ("adjoint", "fbp", "fdk", "sense", "tv")
AUTO = "auto"
#: Input slices added on each side of a slab for TV (3D TV couples neighbouring slices).
TV_HALO = 2
# Minutes, not a day: a rank that waits this long is waiting for one that died or was refused.
WAIT_TIMEOUT_S = 600.0


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
            spaced D-blocks before the first slab (``pipeline.classical``,
            ``docs/classical.md``); the choice is recorded in the output (``calibration``)
            and reused when the job resumes. ``filter_cutoff=None``: auto with an auto
            window, else 1.
        calibration_slabs: how many D-blocks the calibration reads (default 3).
        keep_complex: MRI: also write the complex image as the array ``complex``.
        uncertainty: ``N > 0`` also writes the image ``uncertainty`` (a nested OME-Zarr image
            with the same levels): a per-voxel RMS error from ``N`` equivariant-bootstrap draws
            of the same reconstruction, slab by slab with the image's halo
            (:func:`pipeline.reconstruct.uncertainty.bootstrap_uncertainty`; about ``N + 1`` times
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
