"""A CT scan's non-linear detector record: made, applied to line integrals, counted, reported.

``simulate ct`` and ``ingest ct`` write a ``detector`` record (``docs/scan-format.md``) when the
detector clips (``--saturation``, ``--floor``), quantises (``--bits``) or reads one bit
(``--one-bit``), and ``simulate mri --one-bit`` a ``sign`` record, dithered with
``--one-bit-dither`` (``"dither": {"amplitude", "seed"}``: the threshold of each measurement is
rebuilt from the seed and the operator's range, :func:`operators3d.nonlinear.dither_threshold`);
:func:`operators3d.nonlinear_from_dict` turns it into the forward model.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from .store import d_axis_of, stored_depth_of

__all__ = ["clip_record", "detector_levels", "apply_detector", "detector_fractions", "say_detector"]


def detector_levels(saturation: float | None, floor: float | None, photons: float | None) -> dict[str, Any]:
    """The record's ``saturation``, ``saturation_count`` (``S·I0`` with a photon count) and ``floor``."""
    return {"saturation": saturation,
            "saturation_count": saturation * photons if saturation is not None and photons else None,
            "floor": floor}


def clip_record(saturation: float | None, floor: float | None, *, photons: float | None = None,
                starved: float | None = None) -> dict[str, Any] | None:
    """The ``clip`` detector record of a detector that saturates at the fraction ``saturation``
    of the open-beam count and reads no less than the fraction ``floor`` of it (line integrals
    clipped to ``[−log S, −log F]``); ``starved`` is a further top bound (a zero count read as
    one: ``log I0``), the lower of the two is kept. ``None`` when nothing clips."""
    if saturation is None and floor is None and starved is None:
        return None
    low = -math.log(saturation) if saturation is not None else None
    tops = [v for v in (-math.log(floor) if floor is not None else None, starved) if v is not None]
    return {"model": "clip", "low": low, "high": min(tops) if tops else None,
            **detector_levels(saturation, floor, photons), "fraction_at_low": None, "fraction_at_high": None}


def apply_detector(y: torch.Tensor, record: dict[str, Any] | None) -> torch.Tensor:
    """The detector of ``record`` on (noisy) line integrals ``y``, entry by entry."""
    from operators3d.nonlinear import clip_values, quantize_values, sign_values

    if record is None:
        return y
    if record["model"] == "sign":
        if record.get("dither") is not None:  # τ depends on the entry: the operator's range is needed
            raise ValueError("apply_detector: a dithered one-bit record needs the operator's range to rebuild "
                             "its threshold: use operators3d.nonlinear_from_dict(record, A).apply_values(y)")
        return sign_values(y, record["threshold"])
    if record["model"] == "quantize":
        return quantize_values(y, record["bits"], record["low"], record["high"])
    return clip_values(y, record["low"], record["high"])


def detector_fractions(meas, record: dict[str, Any], *, sampled: np.ndarray | None = None) -> dict[str, float | None]:
    """The share of the stored measurements read at the detector's lowest and highest values
    (``None`` for an unbounded side), counted stored object by stored object along the array's
    D axis. A complex array's real and imaginary parts count as two readings; ``sampled`` (bool,
    over the trailing axes: an MRI mask) leaves out the entries that are not measurements."""
    if record["model"] == "sign":  # the bits are stored as ±1, whatever the threshold (dithered or not)
        ends = np.array([-1.0, 1.0], dtype=np.float32)
    else:
        ends = apply_detector(torch.tensor([-math.inf, math.inf], dtype=torch.float32), record).numpy()
    at_low = at_high = total = 0
    axis = d_axis_of(meas) or 0
    v = meas.shape[axis]
    stored = stored_depth_of(meas)
    for d0 in range(0, v, stored):
        sel = [slice(None)] * meas.ndim
        sel[axis] = slice(d0, min(d0 + stored, v))
        block = np.asarray(meas[tuple(sel)])
        if sampled is not None:
            block = block[..., sampled]
        if np.iscomplexobj(block):
            block = np.stack([block.real, block.imag])
        at_low += int(np.count_nonzero(block <= ends[0]))
        at_high += int(np.count_nonzero(block >= ends[1]))
        total += block.size
    return {"fraction_at_low": at_low / total if np.isfinite(ends[0]) else None,
            "fraction_at_high": at_high / total if np.isfinite(ends[1]) else None}


def say_detector(path: Any, record: dict[str, Any], tool: str = "recon3d simulate ct") -> None:
    """Print the shares of ``record`` (as ``tool``), and a warning where most rays clip."""
    from pipeline.log import say

    if record["model"] == "sign":
        dither = record.get("dither")
        dithered = f", dithered ±{dither['amplitude']:.4g}" if dither is not None else ""
        say(f"{tool}: {path}: detector (one bit, threshold {record['threshold']:.4g}{dithered}): "
            f"{100 * record['fraction_at_high']:.2f}% of the bits read +1", "data")
        return
    parts = [f"{100 * record[f'fraction_at_{end}']:.2f}% at {end} = {record[end]:.4g}"
             for end in ("low", "high") if record[f"fraction_at_{end}"] is not None]
    kind = f"{record['bits']}-bit quantiser" if record["model"] == "quantize" else "clipping"
    say(f"{tool}: {path}: detector ({kind}): measurements {', '.join(parts)}", "data")
    low = record.get("fraction_at_low") or 0.0
    high = record.get("fraction_at_high") or 0.0
    if record["model"] == "clip" and low > 0.5:
        say(f"{tool}: warning: {100 * low:.0f}% of the rays saturate (line integrals below "
            f"{record['low']:.4g}): the level is below most of this object's attenuation; a level closer "
            "to 1 clips only the rays through air and thin edges", "data", level=logging.WARNING)
    if record["model"] == "clip" and high > 0.5:
        say(f"{tool}: warning: {100 * high:.0f}% of the rays read the count floor (line "
            f"integrals above {record['high']:.4g}): a lower --floor clips only the rays through the densest "
            "parts", "data", level=logging.WARNING)


