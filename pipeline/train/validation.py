"""Validation during training (``validation:``): metrics on a few slabs of held-out scans.

Every rank runs every validation slab (under ZeRO-3 each forward needs all ranks; the set is a few
slabs). With a reference: PSNR and SSIM; always: the loss on the held-out slabs; with
``validation.estimate``: the reference-free estimate of the error (:mod:`pipeline.estimate`)
and the classical baseline's on the same slabs and draws, with a warning when the network is
estimated worse than the baseline. ``checkpoint.keep_best`` ranks validations by one metric
(:data:`BEST_METRIC`) and keeps the best checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import build
from .config import ConfigError
from .distributed import barrier
from .monitor import Monitor
from pipeline.models import intensity_scale

if TYPE_CHECKING:
    from .loop import Trainer

__all__ = ["Validation", "BEST_METRIC", "check_estimable"]


def check_estimable(paths: list[str]) -> None:
    """``validation.estimate``: every validation scan has a noise model the estimate handles and
    slabs of its own (not cone beam)."""
    from pipeline.data import open_scan
    from pipeline.data.format import CTGeometry
    from pipeline.estimate import HANDLED_NOISE, not_estimable_detector

    for path in paths:
        scan = open_scan(path)
        noise = scan.metadata.noise()
        if noise is None or noise.kind not in HANDLED_NOISE:
            raise ConfigError(f"validation.estimate: scan {path} has noise model "
                              f"{None if noise is None else noise.to_dict()}; the estimate needs one of "
                              f"{list(HANDLED_NOISE)}")
        geom = scan.metadata.geometry
        if isinstance(geom, CTGeometry) and geom.kind == "cone":
            raise ConfigError(f"validation.estimate: scan {path} is cone beam; its slabs cannot be reconstructed "
                              "again from their own views")
        why = not_estimable_detector(scan.metadata)
        if why is not None:
            raise ConfigError(f"validation.estimate: scan {path}: {why}")


#: The validation metric ``checkpoint.keep_best`` ranks by, and whether higher is better.
BEST_METRIC = {"estimate": ("estimated_mse", False), "psnr": ("psnr", True), "loss": ("loss", False)}


class Validation:
    """A run's validation; it reads the trainer's engine, loss, step and checkpoints, and keeps what
    does not change with training (the classical baseline's estimate, the pilots' peaks)."""

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer
        self._baselines: dict[str, dict[str, float]] = {}  # the classical baseline's estimate per slab set
        self._estimate_peaks: dict[tuple[str, int], float] = {}  # the pilot's peak per validation slab

    def is_best(self, metrics: dict[str, Any]) -> bool:
        """Whether this validation beats the best recorded one (``checkpoint.keep_best``)."""
        key, higher = BEST_METRIC[self.trainer.config.checkpoint.keep_best]
        if key not in metrics:
            return False
        best = self.trainer.checkpoints.best()
        if best is None or best.get("metric") != key:
            return True
        return metrics[key] > best["value"] if higher else metrics[key] < best["value"]

    def mark_best(self, metrics: dict[str, Any], monitor: Monitor) -> None:
        from .checkpoint import tag_of

        key, _ = BEST_METRIC[self.trainer.config.checkpoint.keep_best]
        record = {"tag": tag_of(self.trainer.step), "step": self.trainer.step, "metric": key, "value": metrics[key],
                  "validation": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
        self.trainer.checkpoints.mark_best(record)
        barrier(self.trainer.ctx)
        monitor.event("best", self.trainer.step, f"best validation so far ({key} {metrics[key]:.4g}): kept as "
                      f"{record['tag']}", metric=key, value=metrics[key])

    @torch.no_grad()
    def run(self, monitor: Monitor) -> dict[str, float]:
        """PSNR/SSIM (or the held-out loss) over a few slabs of each validation scan; all ranks join."""
        from pipeline.data import open_scan
        from pipeline.metrics import psnr, ssim

        cfg = self.trainer.config
        jobs = []
        for path in cfg.validation.scans:
            scan = open_scan(path)
            slabs = scan.slab_slices(cfg.data.slab_thickness)
            pick = torch.linspace(0, len(slabs) - 1, min(len(slabs), cfg.validation.max_slabs)).round().long().unique()
            jobs += [(scan, slabs[int(i)]) for i in pick]
        # Every rank runs every slab: under ZeRO-3 each forward needs all ranks, and the
        # validation set is a few slabs.
        sums = torch.zeros(4, dtype=torch.float64)  # psnr, ssim, count with reference, loss
        estimated: list[tuple[float, float, float]] = []  # per slab: MSE, low, high
        peaks: list[float] = []
        loss_state = self.trainer.loss.state_dict()  # validation must not move the training draws
        self.trainer.engine.eval()
        try:
            for index, (scan, d_slice) in enumerate(jobs):
                y, op = scan.slab(d_slice)
                y, op = y.unsqueeze(0).to(self.trainer.ctx.device), op.to(self.trainer.ctx.device)
                with intensity_scale(self.trainer.engine.module, self.trainer.scale_for(scan.path)):
                    x_hat = self.trainer.engine(y, op)
                    ref = {}
                    if self.trainer.loss.needs_reference:
                        ref = {"reference": scan.reference.read_torch(d_slice).unsqueeze(0).to(self.trainer.ctx.device)}
                    sums[3] += float(self.trainer.loss(x_hat, y, op, self.trainer.engine, **ref).total)
                    if cfg.validation.estimate:
                        est, peak = self._estimate(scan, y[0], op, x_hat[0], index)
                        estimated.append(est)
                        peaks.append(peak)
                if scan.reference is not None:
                    ref = scan.reference.read_torch(d_slice)
                    sums[0] += psnr(x_hat[0].cpu(), ref)
                    sums[1] += ssim(x_hat[0].cpu(), ref)
                    sums[2] += 1
        finally:
            self.trainer.engine.train()
            self.trainer.loss.load_state_dict(loss_state)
        n = len(jobs)
        metrics = {"loss": float(sums[3]) / max(n, 1)}
        if sums[2] > 0:
            metrics.update(psnr=float(sums[0] / sums[2]), ssim=float(sums[1] / sums[2]))
        if estimated:
            metrics.update(self._estimate_metrics(jobs, estimated, max(peaks)))
        shown = ("loss", "psnr", "ssim", "estimated_psnr", "baseline_estimated_psnr")
        text = ", ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics)
        monitor.event("validation", self.trainer.step, f"validation: {text}", **metrics)
        base = metrics.get("baseline_estimated_mse")
        if base is not None and metrics["estimated_mse"] > base:
            monitor.event("warning", self.trainer.step,
                          f"validation: the reference-free estimate puts the network at "
                          f"{metrics['estimated_psnr']:.2f} dB, below the classical baseline "
                          f"({metrics['baseline_method']}, {metrics['baseline_estimated_psnr']:.2f} dB) on the same "
                          "slabs: it is estimated worse than a reconstruction without training",
                          what="below_baseline", estimated_psnr=metrics["estimated_psnr"],
                          baseline_estimated_psnr=metrics["baseline_estimated_psnr"])
        return metrics

    def _slab_estimate(self, scan, y: torch.Tensor, op, f, index: int, x_hat: torch.Tensor | None = None):
        """``(estimate, peak)`` of reconstructor ``f`` on validation slab ``index``: the draws are
        seeded by the slab alone, so every validation, and the baseline, use the same ones (every
        rank too: ZeRO-3 needs all ranks in each forward); the peak is the pilot's, which does not
        change with training, so PSNRs of different steps compare."""
        from pipeline.estimate import estimate_error, estimate_pilot, pilot_estimate

        cfg = self.trainer.config.validation
        noise = scan.metadata.noise()
        x_hat = f(y, op) if x_hat is None else x_hat
        seed = build.derived_seed(self.trainer.config.run.seed, "validation-estimate", index)
        est = estimate_error(y, op, noise, f, x_hat=x_hat, draws=cfg.estimate_draws,
                             folds=cfg.estimate_folds, seed=seed, pilot=estimate_pilot(y, op, noise, x_hat))
        key = (str(scan.path), index)
        if key not in self._estimate_peaks:  # it does not change with training: one pilot per slab
            self._estimate_peaks[key] = float(pilot_estimate(y, op).abs().max())
        return est, self._estimate_peaks[key]

    def _estimate(self, scan, y: torch.Tensor, op, x_hat: torch.Tensor, index: int) -> tuple[tuple[float, float, float], float]:
        """The network's estimate on one validation slab: ``((mse, low, high), peak)``."""
        engine = self.trainer.engine

        def f(yy: torch.Tensor, oo) -> torch.Tensor:
            return engine(yy.unsqueeze(0), oo)[0]

        est, peak = self._slab_estimate(scan, y, op, f, index, x_hat=x_hat)
        return (est.mse, est.mse_low, est.mse_high), peak

    def _estimate_metrics(self, jobs, estimated, peak: float) -> dict[str, Any]:
        """The validation's estimate (mean over its slabs) and the classical baseline's on the
        same slabs and draws (computed once per run: it does not change with training)."""
        import math

        db = lambda m: 10.0 * math.log10(peak * peak / max(m, 1e-30))  # noqa: E731
        mse = sum(e[0] for e in estimated) / len(estimated)
        out: dict[str, Any] = {"estimated_mse": mse, "estimated_psnr": db(mse),
                               "estimated_psnr_low": db(sum(e[2] for e in estimated) / len(estimated)),
                               "estimated_psnr_high": db(sum(e[1] for e in estimated) / len(estimated)),
                               "estimate_peak": peak}
        key = "|".join(f"{scan.path}:{d.start}:{d.stop}" for scan, d in jobs)
        if key not in self._baselines:
            from pipeline.classical import AutoClassical

            recons: dict[str, Any] = {}  # one calibration per scan
            values, method = [], None
            for index, (scan, d_slice) in enumerate(jobs):
                method = "fbp" if scan.modality == "ct" else "sense"
                if str(scan.path) not in recons:
                    recon = AutoClassical(scan, method, device=self.trainer.ctx.device)  # every parameter auto
                    recon.calibrate(lambda _: None)
                    recons[str(scan.path)] = recon
                y, op = scan.slab(d_slice)
                est, _ = self._slab_estimate(scan, y.to(self.trainer.ctx.device), op.to(self.trainer.ctx.device),
                                             recons[str(scan.path)].apply, index)
                values.append(est.mse)
            self._baselines[key] = {"mse": sum(values) / len(values), "method": f"{method} (auto)"}
        base = self._baselines[key]
        out.update(baseline_estimated_mse=base["mse"], baseline_estimated_psnr=db(base["mse"]),
                   baseline_method=base["method"])
        return out
