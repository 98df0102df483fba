"""Whole-scan reconstruction, evaluation metrics and reports.

* :func:`reconstruct` (``recon3d reconstruct``) — a scan, slab by slab with a halo along D,
  through a trained model or a classical method, into an OME-Zarr 0.5 image; resumable
  (completion records keyed by a fingerprint) and parallel (torchrun ranks, dask workers).
  The driver is :mod:`.reconstruct`; its parts: :mod:`.config` (settings), :mod:`.coordination`
  (ranks, waits, the model's export), :mod:`.halo` (the slab layout),
  :mod:`.adapters` (the reconstructors), :mod:`.store` (the output and its records), :mod:`.lease`.
* :mod:`.ome` — OME-Zarr 0.5 metadata, the out-of-core mean pyramid, :func:`open_ome` and
  :func:`validate_ome`. The output format is written down in ``docs/output-format.md``.
"""

from .config import ReconstructConfig, ReconstructResult
from .ome import check_ome, open_ome, validate_ome
from .reconstruct import reconstruct
from .store import completion_records

__all__ = [
    "reconstruct",
    "ReconstructConfig",
    "ReconstructResult",
    "completion_records",
    "open_ome",
    "validate_ome",
    "check_ome",
]
