"""Scans as chunked zarr v3: format, simulate, ingest, inspect, preprocessing, slab stream.

The format is written down in ``docs/scan-format.md``. Typical use::

    from pipeline.data import open_scan, SlabStream, SlabStreamConfig

    scan = open_scan("scans/foam.zarr")          # read-only, validated
    y, op = scan.slab(slice(0, 8))               # measurements of a D-slab and its operator
    x = scan.reference.read(slice(0, 8))         # (8, H, W), or scan.reference is None

    stream = SlabStream(SlabStreamConfig(scans=("a.zarr", "b.zarr"), seed=0))
    for y, op, meta in stream:                   # this rank's shard of the epoch
        ...
    state = stream.state_dict()                  # exact mid-epoch resume

Nothing here reads a whole scan (cone-beam simulation and FDK go slab by slab and block of
detector rows by block, see :mod:`pipeline.data.cone`), and every read checks that the chunks
it needs exist and decode.
"""

from .format import (
    CodecConfig,
    CorruptChunkError,
    CTGeometry,
    IncompleteScanError,
    MissingChunkError,
    MRIGeometry,
    ScanError,
    ScanMetadata,
)
from .inspect import ScanReport, check_scan, inspect_scan
from .ingest import IngestCTConfig, IngestMRIConfig, ingest_ct, ingest_mri
from .preprocess import PreprocessConfig, preprocess
from .scan import Scan, ScanArray, open_scan
from .simulate import SimulateCTConfig, SimulateMRIConfig, simulate_ct, simulate_mri
from .sampler import SampleKey, SlabSample, SlabSampler, SlabStreamConfig
from .stream import SlabDataset, SlabStream, collate_slabs

__all__ = [
    "open_scan",
    "Scan",
    "ScanArray",
    "ScanMetadata",
    "MRIGeometry",
    "CTGeometry",
    "CodecConfig",
    "ScanError",
    "MissingChunkError",
    "CorruptChunkError",
    "IncompleteScanError",
    "inspect_scan",
    "check_scan",
    "ScanReport",
    "SimulateMRIConfig",
    "SimulateCTConfig",
    "simulate_mri",
    "simulate_ct",
    "IngestMRIConfig",
    "IngestCTConfig",
    "ingest_mri",
    "ingest_ct",
    "PreprocessConfig",
    "preprocess",
    "SlabStream",
    "SlabStreamConfig",
    "SlabSampler",
    "SlabDataset",
    "SlabSample",
    "SampleKey",
    "collate_slabs",
]
