"""Whole-scan reconstruction, evaluation metrics and reports.

* :func:`reconstruct` (``recon3d reconstruct``) — a scan, slab by slab with a halo along D,
  through a trained model or a classical method, into an OME-Zarr 0.5 image; resumable
  (completion records keyed by a fingerprint) and parallel (torchrun ranks, dask workers).
* :mod:`.ome` — OME-Zarr 0.5 metadata, the out-of-core mean pyramid, :func:`open_ome` and
  :func:`validate_ome`. The output format is written down in ``docs/output-format.md``.
* :mod:`.metrics` — PSNR, NMSE, SSIM.
"""

from .metrics import nmse, psnr
from .ome import check_ome, open_ome, validate_ome
from .reconstruct import ReconstructConfig, ReconstructResult, completion_records, reconstruct

__all__ = [
    "psnr",
    "nmse",
    "reconstruct",
    "ReconstructConfig",
    "ReconstructResult",
    "completion_records",
    "open_ome",
    "validate_ome",
    "check_ome",
]
