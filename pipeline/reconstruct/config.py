"""The settings of ``recon3d reconstruct`` (:class:`ReconstructConfig`, a pydantic model checked when made), what a
process returns (:class:`ReconstructResult`) and the constants both name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping

from pydantic import Field, NonNegativeInt, PositiveInt, StrictFloat, StrictInt, field_validator, model_validator

from pipeline.config_base import PathStr, Settings

from pipeline.data.format import CodecConfig

from pipeline.classical.auto import AUTO  # one spelling of 'choose it', for classical and reconstruct

__all__ = ["ReconstructConfig", "ReconstructResult", "METHODS", "AUTO", "TV_HALO", "WAIT_TIMEOUT_S"]

METHODS = ("adjoint", "fbp", "fdk", "sense", "tv")
#: Input slices added on each side of a slab for TV (3D TV couples neighbouring slices).
TV_HALO = 2
# Minutes, not a day: a rank that waits this long is waiting for one that died or was refused.
WAIT_TIMEOUT_S = 600.0


class ReconstructConfig(Settings):
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
            one chunk for classical methods; for a model the thickest whose estimated peak fits
            ``memory_budget``, :mod:`pipeline.reconstruct.memory`).
        memory_budget: bytes (or a string: ``512MiB``, ``1GiB``, ``2G``) the process may take at
            its estimated peak with a model's slabs in flight, when ``slab`` is not given
            (default 1 GiB; :mod:`pipeline.reconstruct.memory`).
            Not part of the fingerprint; the slab it chooses is.
        halo: input slices added on each side of a slab (default: the model's receptive
            radius along D; 0 for classical methods).
        chunks: output chunk shape ``(D, H, W)`` (default ``(16, 256, 256)`` clipped).
        tile: run the model's backbone on tiles of this ``(D, H, W)``; ``(0, 0, 0)`` or
            ``None`` (the default): untiled, also for a model trained on tiles (training tiles
            bound a step's memory; here the memory budget chooses the slab).
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
        detector: ``auto``: ``fbp`` of a parallel-beam scan read through a clipping detector (a
            count floor or a saturation in its ``detector`` record) is followed by the steps of
            :func:`pipeline.classical.clipped_fbp`, which take a clipped ray as a bound, not a
            value; ``ignore``: plain FBP, the measurements taken as linear. (A model's input is
            what it was trained on: ``model.initial_detector``.)
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

    _where: ClassVar[str] = "reconstruct"
    _flags: ClassVar[bool] = True
    scan: PathStr
    out: PathStr
    model: PathStr | None = None
    method: Literal[METHODS] | None = None
    pick: str = "latest"
    pyramid: int = Field(1, ge=1)
    slab: int | None = Field(None, ge=1)
    halo: int | None = Field(None, ge=0)
    memory_budget: int = 1 << 30
    chunks: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None
    tile: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt] | None = None
    overlap: int | None = Field(None, ge=0)
    filter: str = AUTO
    # "auto" or a number, kept as given (``_check_classical`` checks it)
    filter_cutoff: StrictFloat | StrictInt | str | None = None
    sense_iters: StrictInt | StrictFloat | str = AUTO
    l2_weight: StrictFloat | StrictInt | str = AUTO
    tv_weight: StrictFloat | StrictInt | str = AUTO
    tv_iters: StrictInt | StrictFloat | str = AUTO
    calibration_slabs: int = Field(3, ge=1)
    detector: Literal["auto", "ignore"] = "auto"
    keep_complex: bool = True
    uncertainty: int = Field(0, ge=0)
    uncertainty_seed: int = 0
    codec: CodecConfig = CodecConfig()
    overwrite: bool = False
    device: str = "auto"
    workers: int = 1
    scheduler: Literal["threads", "sync", "distributed"] = "threads"
    progress: bool = True
    wait_timeout_s: float = Field(WAIT_TIMEOUT_S, gt=0)
    lease_heartbeat_s: float | None = None
    lease_stale_s: float | None = None
    storage_options: Mapping[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _model_or_method(cls, data: Any) -> Any:
        if isinstance(data, dict) and (data.get("model") is None) == (data.get("method") is None):
            raise ValueError("give exactly one of --model RUN_DIR|WEIGHTS and --method")
        return data

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> int:
        from .memory import parse_bytes

        return parse_bytes(value)

    @model_validator(mode="after")
    def _classical(self) -> "ReconstructConfig":
        _check_classical(self)
        return self


def _check_classical(config: "ReconstructConfig") -> None:
    """The classical settings: ``auto`` or a value in range, with a message naming the option."""
    from operators3d.ct import FILTERS

    if config.filter not in (AUTO,) + tuple(FILTERS):
        raise ValueError(f"--filter must be auto or one of {FILTERS}, got {config.filter!r}")
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
            raise ValueError(f"{flag} must be auto or {what}, got {value!r}")


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
