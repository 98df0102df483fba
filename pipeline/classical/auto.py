"""A classical method with its parameters given or chosen on the scan itself (``"auto"``).

:class:`AutoClassical` holds a scan's method (``adjoint``, ``fbp``, ``sense``, ``tv``) and its
parameters as given — values, or ``"auto"`` for one a reference-free calibration on a few
D-blocks of the scan chooses (:mod:`.select`, ``docs/classical.md``) — and applies the method
with the values in use to any measurements of the scan's kind. ``recon3d reconstruct`` wraps it
(its slab reader, halo and notes) and the training's validation runs it as the classical
baseline.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from pipeline.data.format import ScanError

__all__ = ["AUTO", "AutoClassical"]

AUTO = "auto"
#: The parameters of each method, in the order they are recorded.
PARAMETERS = {"adjoint": (), "fbp": ("filter", "cutoff"), "sense": ("l2_weight", "iterations"),
              "tv": ("tv_weight", "iterations")}


class AutoClassical:
    """``method`` on ``scan`` with the parameters ``given`` (a value or ``"auto"`` each; a
    parameter left out is ``"auto"``); ``calibration_slabs`` D-blocks choose the ``auto`` ones.

    ``read(lo, hi) -> (y, op)`` reads a D-range of the scan for the calibration (default
    ``scan.slab``); the calibration runs on ``device``.

    ``detector="auto"``: FBP of a parallel-beam scan read through a clipping detector (its
    ``detector`` record has a count floor ``high`` or a saturation ``low``) is followed by the
    steps of :func:`~pipeline.classical.clipped_fbp`, which take a clipped ray as a bound;
    ``"ignore"``: plain FBP, the measurements taken as linear.
    """

    def __init__(self, scan, method: str, given: Mapping[str, Any] | None = None, *, calibration_slabs: int = 3,
                 device: torch.device = torch.device("cpu"),
                 read: Callable[[int, int], tuple[torch.Tensor, Any]] | None = None, detector: str = "auto") -> None:
        if detector not in ("auto", "ignore"):
            raise ValueError(f"detector must be 'auto' or 'ignore', got {detector!r}")
        given = dict(given or {})
        self.scan, self.method, self.device = scan, method, device
        self.clip_levels = _clip_levels(scan) if detector == "auto" and method == "fbp" else None
        self.calibration_slabs = int(calibration_slabs)
        self.read = read if read is not None else (lambda lo, hi: scan.slab(slice(lo, hi)))
        self.noise = scan.metadata.noise()
        self.given = {k: (v if v == AUTO else (int(v) if k == "iterations" else v if k == "filter" else float(v)))
                      for k, v in ((k, given.get(k, AUTO)) for k in PARAMETERS.get(method, ()))}
        self.params: dict[str, Any] = dict(self.given)
        self.calibration: dict[str, Any] | None = None

    @property
    def needs_calibration(self) -> bool:
        return any(v == AUTO for v in self.given.values())

    def describe(self) -> dict[str, Any]:
        """What an output's fingerprint hashes: the settings as given (``"auto"`` for a chosen
        value) and how the choice is made; the chosen values are recorded beside it and reused."""
        params: dict[str, Any] = {"method": self.method, **self.given}
        if self.clip_levels is not None:
            from .baseline import CLIPPED_FBP_ITERATIONS, CLIPPED_FBP_STEP

            params["clipped"] = {"low": self.clip_levels[0], "high": self.clip_levels[1],
                                 "iterations": CLIPPED_FBP_ITERATIONS, "step": CLIPPED_FBP_STEP}
        if self.needs_calibration:
            from .select import CALIBRATION_VERSION

            params["calibration"] = {"version": CALIBRATION_VERSION, "slabs": self.calibration_slabs}
        return params

    def parameters(self) -> dict[str, Any]:
        """The values every slab uses (given or chosen)."""
        return dict(self.params)

    def calibrate(self, say: Callable[[str], None]) -> None:
        """Choose the ``auto`` values on a few D-blocks of the scan."""
        from . import select as cl
        from .tv import tv_problem

        given, scan = self.given, self.scan
        depth = int(scan.metadata.volume_shape[0])
        mri = scan.modality == "mri"
        thickness = {"fbp": 4, "sense": 1, "tv": 2 if mri else 4}[self.method]
        blocks = cl.calibration_blocks(depth, self.calibration_slabs, thickness)
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
                    data, self.noise, tv_problem(scan),
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
        """Use a calibration's choice (this job's, or the one recorded in an output)."""
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
    def apply(self, y: torch.Tensor, op) -> torch.Tensor:
        """The method with the parameters in use on measurements ``y`` of operator ``op`` (a
        slab's, or another of the scan's kind: fewer views, another k-space mask)."""
        from .slab import reconstruct_slab
        from .tv import tv_problem

        problem = tv_problem(self.scan) if self.method == "tv" else None
        x = reconstruct_slab(self.method, y, op, self.params, noise=self.noise, problem=problem)
        if self.clip_levels is not None and getattr(op, "is_ct", False):
            from .baseline import clipped_fbp

            x = clipped_fbp(y, op, low=self.clip_levels[0], high=self.clip_levels[1], start=x)
        return x


def _clip_levels(scan) -> tuple[float | None, float | None] | None:
    """``(low, high)`` of a parallel-beam scan's clipping detector (``None``: none, or cone beam,
    whose FDK is not computed slab by slab)."""
    from .baseline import clip_levels_of

    if getattr(getattr(scan.metadata, "geometry", None), "kind", None) != "parallel":
        return None
    return clip_levels_of(getattr(scan.metadata, "detector", None))
