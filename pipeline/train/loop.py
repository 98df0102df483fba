"""``recon3d train``: config → build → engine → resume → steps → checkpoints.

:func:`train` is the whole job on one rank; under ``torchrun`` every rank runs it. A step is
``gradient_accumulation_steps`` slabs on every rank, each: ``x̂ = engine(y, op)``,
``loss(x̂, y, op, engine)`` (EI and SURE run the engine again inside the loss), backward and
DeepSpeed's step. The learning rate is a function of the step. At each step boundary the ranks
agree on whether a stop was requested (SIGTERM/SIGUSR1, or the torchrun agent died); if so they
save and return.

Divergence: the all-reduce that averages each step's loss values over the ranks also carries
whether this rank saw a NaN/Inf in its loss, its loss parts or the gradient norm, so every rank
learns of a non-finite step in the same collective and they stop together, without saving that
step (:class:`DivergenceError`, exit status 1). The gradient norm is DeepSpeed's global norm
where it computes one (ZeRO 1–3, which norm their partitions in ``step()``; bf16/fp16
optimizers), else (ZeRO 0 in fp32) the norm of the all-reduced ``p.grad`` taken here before
``engine.step()``. Under fp16 an overflowing gradient is the loss scaler's business (DeepSpeed
skips the step and lowers the scale), so only the loss is checked there.

A run directory that holds checkpoints is never restarted silently: without ``--resume`` the
job is refused (``--restart`` moves the old checkpoints and log aside and starts over).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from . import build
from .checkpoint import (MANIFEST, OWN, CheckpointError, CheckpointInfo, CheckpointManager, read_checkpoint,
                         rng_state, set_rng_state)
from .config import ConfigError, ExperimentConfig, dump_config
from .distributed import DistContext, any_rank, barrier, init_distributed, shutdown_distributed
from .monitor import LossGrowthWatch, Monitor
from .preemption import ParentWatch, StopRequest, under_torchrun
from pipeline.errors import InputError, Recon3dError
from pipeline.models import intensity_scale

__all__ = ["TrainResult", "train", "Trainer", "DivergenceError", "checkpoints_in", "schedule_changes"]


class DivergenceError(Recon3dError):
    """A training step whose loss or gradient norm is NaN/Inf: the run stopped without saving it."""


@dataclass
class TrainResult:
    """What a run did: its last step, why it ended and its loss history on this rank."""

    run_dir: Path
    step: int
    stopped_by: str | None  # None: reached max_steps; else the signal's name
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None


def _param_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters()}


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint {a!r}, config {b!r}"]


def _check_estimable(paths: list[str]) -> None:
    """``validation.estimate``: every validation scan has a noise model the estimate handles and
    slabs of its own (not cone beam)."""
    from pipeline.data import open_scan
    from pipeline.data.format import CTGeometry
    from pipeline.reconstruct.estimate import HANDLED_NOISE

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


#: The validation metric ``checkpoint.keep_best`` ranks by, and whether higher is better.
BEST_METRIC = {"estimate": ("estimated_mse", False), "psnr": ("psnr", True), "loss": ("loss", False)}


class Trainer:
    """One rank's training run. Use :func:`train`; the pieces are public for tests and tools."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, ctx: DistContext) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.ctx = ctx
        cfg = config
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.facts = build.scan_facts(cfg.data.scans, storage_options=cfg.data.storage_options)
        if cfg.validation.scans:
            vf = build.scan_facts(cfg.validation.scans, what="validation.scans")
            if vf.modality != self.facts.modality:
                raise ConfigError(f"validation.scans are {vf.modality}, training scans {self.facts.modality}")
            if vf.without_reference and any(t.name == "supervised" for t in cfg.loss.terms):
                raise ConfigError(f"validation.scans: the supervised loss term needs a reference array, and "
                                  f"{vf.without_reference[0]} has none; validate on simulated scans")
            if vf.without_reference and cfg.checkpoint.keep_best == "psnr":
                raise ConfigError(f"checkpoint.keep_best: psnr needs a reference in every validation scan, and "
                                  f"{vf.without_reference[0]} has none; use keep_best: estimate")
            if cfg.validation.estimate:
                _check_estimable(cfg.validation.scans)
        precision = cfg.deepspeed.precision
        torch.manual_seed(build.derived_seed(cfg.run.seed, "init"))  # identical on every rank
        model = build.build_model(cfg.model, self.facts, precision=precision)
        self.loss = build.build_loss(cfg.loss, self.facts, seed=build.derived_seed(cfg.run.seed, "loss", ctx.rank))
        self.model = self.loss.adapt_model(model)
        self.param_shapes = _param_shapes(self.model)  # before ZeRO-3 partitions them to size 0
        # One intensity scale per scan (not per slab), as whole-scan reconstruction uses.
        self.scales: dict[str, float | None] = {}
        if cfg.data.mode == "measurements":
            for path in cfg.data.scans:
                self.scales[str(path)] = build.scan_scale(self.model, path, thickness=cfg.data.slab_thickness,
                                                          storage_options=cfg.data.storage_options)
        self.stream = build.build_stream(cfg.data, seed=build.derived_seed(cfg.run.seed, "stream"),
                                         rank=ctx.rank, world_size=ctx.world_size,
                                         include_reference=self.loss.needs_reference)
        ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.checkpoints = CheckpointManager(ckpt_dir, ctx, keep_last=cfg.checkpoint.keep_last)
        self.engine = None
        self.step = 0
        self._grad_norm_here: bool | None = None
        self._baselines: dict[str, dict[str, float]] = {}  # the classical baseline's estimate per scan
        self._estimate_peaks: dict[tuple[str, int], float] = {}  # the pilot's peak per validation slab

    # ------------------------------------------------------------------ resume
    def find_resume(self, resume: str | None) -> CheckpointInfo | None:
        """The checkpoint to continue from: ``auto`` (this run's latest, if any) or a path."""
        if resume is None:
            return None
        if resume == "auto":
            info = self.checkpoints.latest()
        else:
            info = read_checkpoint(resume)
        if info is None:
            return None
        manifest = info.manifest
        if manifest.get("param_shapes") != self.param_shapes:
            diffs = _diff(manifest.get("model_config", {}), self.config.model.model_dump(mode="json"))
            raise CheckpointError(
                f"checkpoint {info.path} holds another model: "
                + ("; ".join(diffs) if diffs else "its parameters differ from this config's")
            )
        return info

    def manifest(self) -> dict[str, Any]:
        return {
            "model_config": self.config.model.model_dump(mode="json"),
            "loss_config": self.config.loss.model_dump(mode="json"),
            "param_shapes": self.param_shapes,
            "zero_stage": self.config.deepspeed.zero_stage,
            "precision": self.config.deepspeed.precision,
            "modality": self.facts.modality,
            "channels": self.facts.channels,
            "config": self.config.model_dump(mode="json"),  # what a resume compares against
        }

    def rank_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "rank": self.ctx.rank,
            "world_size": self.ctx.world_size,
            "stream": self.stream.state_dict(),
            "rng": rng_state(),
            "loss": self.loss.state_dict(),
        }

    def restore(self, info: CheckpointInfo) -> None:
        """Load the engine and this rank's state from ``info`` (converting it if the world size differs)."""
        from .engine import load_engine

        same = info.world_size == self.ctx.world_size
        if same:
            load_engine(self.engine, info.directory, info.tag)
            state = self.checkpoints.rank_state(info, self.ctx.rank)
            self.stream.load_state_dict(state["stream"])
            self.loss.load_state_dict(state["loss"])
            set_rng_state(state["rng"])
        else:
            universal = self.checkpoints.universal(info)
            load_engine(self.engine, universal, info.tag)
            state = self.checkpoints.rank_state(info, 0)
            self.stream.load_state_dict(state["stream"])  # continues from the global position
            self.reseed(info.step)
        self.step = int(info.step)

    def reseed(self, step: int) -> None:
        """Fresh RNG and loss-generator states, a pure function of (seed, step, rank)."""
        import random

        import numpy as np

        s = build.derived_seed(self.config.run.seed, "resume", step, self.ctx.rank)
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)
        for i, module in enumerate(self.loss.modules()):
            if hasattr(module, "_rng") and isinstance(module._rng, torch.Generator):
                module.seed = build.derived_seed(s, i)
                module._rng.manual_seed(module.seed)

    # ------------------------------------------------------------------ steps
    def _samples(self) -> Iterator[Any]:
        while True:
            yield from self.stream

    def _reduce_mean(self, values: list[float | torch.Tensor]) -> list[float]:
        """The mean over the ranks of each value (floats or 0-d tensors): one all-reduce, one copy."""
        dev = self.ctx.device if self.ctx.backend == "nccl" else torch.device("cpu")
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(dev).reshape(()) for v in values])
        if self.ctx.world_size > 1:
            dist.all_reduce(t)
            t = t / self.ctx.world_size
        return t.tolist()

    def save(self, monitor: Monitor, reason: str) -> Path:
        path, seconds, nbytes = self.checkpoints.save(self.engine, self.step, self.rank_state(), self.manifest())
        monitor.event("checkpoint", self.step, f"saved {path} ({nbytes / 2**20:.1f} MiB, {seconds:.2f} s, {reason})",
                      path=str(path), seconds=seconds, bytes=nbytes, reason=reason)
        return path

    def fit(self, resume: str | None = None) -> TrainResult:
        from .engine import create_engine

        cfg = self.config
        info = self.find_resume(resume)
        optimizer = build.build_optimizer(cfg, self.model)
        universal = info is not None and info.world_size != self.ctx.world_size
        self.engine = create_engine(cfg, self.model.to(self.ctx.device), optimizer, self.ctx, load_universal=universal)
        load_s = 0.0
        if info is not None:
            t0 = time.perf_counter()
            self.restore(info)
            load_s = time.perf_counter() - t0
        changes = schedule_changes(self._saved_config(info), cfg, self.step) if info is not None else []
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.resolved.yaml").write_text(dump_config(cfg))
        monitor = Monitor(self.run_dir, enabled=self.ctx.is_main, total_steps=cfg.run.max_steps,
                          start_step=self.step, tensorboard=cfg.logging.tensorboard,
                          progress=cfg.logging.progress)
        monitor.event("start", self.step,
                      f"{self.ctx.world_size} rank(s), backend {self.ctx.backend or 'none'}, device "
                      f"{self.ctx.device}, precision {cfg.deepspeed.precision}, ZeRO {cfg.deepspeed.zero_stage}",
                      world_size=self.ctx.world_size, backend=self.ctx.backend or "none",
                      device=str(self.ctx.device), precision=cfg.deepspeed.precision)
        if info is not None:
            how = "same world size" if not universal else f"world size {info.world_size} → {self.ctx.world_size} (universal)"
            monitor.event("resume", self.step, f"resumed from {info.path} ({how}, {load_s:.2f} s)",
                          path=str(info.path), seconds=load_s, bytes=int(info.manifest.get("bytes", 0)),
                          world_size_saved=info.world_size)
            for line in changes:
                monitor.event("config_change", self.step, line)
        result = TrainResult(self.run_dir, self.step, None)
        last_saved = self.step if info is not None else None
        samples = self._samples()
        accum = cfg.deepspeed.gradient_accumulation_steps
        growth = LossGrowthWatch(cfg.run.loss_growth_warning)
        try:
            with StopRequest() as stop, ParentWatch(stop, enabled=under_torchrun()):
                while self.step < cfg.run.max_steps:
                    if any_rank(stop.requested, self.ctx):
                        result.stopped_by = stop.signal_name or "signal on another rank"
                        break
                    record = self._train_step(samples, accum)
                    if "nonfinite" in record:
                        # Every rank has the same reduced flag: all raise here, before any save
                        # (this step's weights and moments are poisoned, and so is the end save).
                        self._diverged(record, monitor)
                    self.step += 1
                    result.losses.append(record["loss"])
                    warning = growth.update(record["loss"])
                    if warning:
                        monitor.event("warning", self.step, warning, what="loss_growth", loss=record["loss"],
                                      smallest_loss=growth.smallest)
                    if self.step % cfg.logging.every == 0 or self.step == cfg.run.max_steps:
                        monitor.log_step(record)
                    if cfg.validation.scans and self.step % cfg.validation.every == 0:
                        metrics = self.validate(monitor)
                        if cfg.checkpoint.keep_best != "none" and any_rank(self._is_best(metrics), self.ctx):
                            if last_saved != self.step:
                                result.checkpoint = self.save(monitor, f"best {cfg.checkpoint.keep_best}")
                                last_saved = self.step
                            self._mark_best(metrics, monitor)
                    if self.step % cfg.checkpoint.every == 0 and last_saved != self.step:
                        result.checkpoint = self.save(monitor, "every")
                        last_saved = self.step
                if last_saved != self.step:
                    reason = "stop requested" if result.stopped_by else "end"
                    result.checkpoint = self.save(monitor, reason)
                if result.stopped_by:
                    waited = time.monotonic() - stop.time if stop.time else float("nan")
                    monitor.event("stop", self.step, f"stopped by {result.stopped_by}: saved and exiting "
                                  f"{waited:.1f} s after the signal", seconds_after_signal=waited)
        finally:
            monitor.close()
        result.step = self.step
        return result

    def _is_best(self, metrics: dict[str, Any]) -> bool:
        """Whether this validation beats the best recorded one (``checkpoint.keep_best``)."""
        key, higher = BEST_METRIC[self.config.checkpoint.keep_best]
        if key not in metrics:
            return False
        best = self.checkpoints.best()
        if best is None or best.get("metric") != key:
            return True
        return metrics[key] > best["value"] if higher else metrics[key] < best["value"]

    def _mark_best(self, metrics: dict[str, Any], monitor: Monitor) -> None:
        from .checkpoint import tag_of

        key, _ = BEST_METRIC[self.config.checkpoint.keep_best]
        record = {"tag": tag_of(self.step), "step": self.step, "metric": key, "value": metrics[key],
                  "validation": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
        self.checkpoints.mark_best(record)
        barrier(self.ctx)
        monitor.event("best", self.step, f"best validation so far ({key} {metrics[key]:.4g}): kept as "
                      f"{record['tag']}", metric=key, value=metrics[key])

    def _saved_config(self, info: CheckpointInfo) -> dict[str, Any] | None:
        """The resolved config the resumed checkpoint was trained with (manifest, else the run's YAML)."""
        if isinstance(info.manifest.get("config"), dict):
            return info.manifest["config"]
        path = self.run_dir / "config.resolved.yaml"
        if path.is_file():
            import yaml

            try:
                saved = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                return None
            return saved if isinstance(saved, dict) else None
        return None

    def _diverged(self, record: dict[str, Any], monitor: Monitor) -> None:
        """Log the non-finite step and raise :class:`DivergenceError` (on every rank alike)."""
        step = record["step"]
        try:
            info = self.checkpoints.latest()
        except CheckpointError:
            info = None
        last = f"the last good checkpoint is {info.path} (step {info.step})" if info else "no checkpoint saved yet"
        values = ", ".join([f"loss {record['loss']:.4g}"] + [f"{k} {v:.4g}" for k, v in record["parts"].items()]
                           + ([f"grad norm {record['grad_norm']:.4g}"] if "grad_norm" in record else []))
        remedy = ("lower optimizer.lr (now {:g}) or set deepspeed.gradient_clipping (e.g. 1.0), then "
                  .format(self.config.optimizer.lr)
                  + ("continue with --resume auto" if info else "rerun"))
        message = (f"training diverged at step {step}: {', '.join(record['nonfinite'])} not finite ({values}); "
                   f"nothing of this step was saved; {last}; {remedy}")
        monitor.log_step(record)
        monitor.event("diverged", step, message, error=message, nonfinite_keys=record["nonfinite"],
                      last_checkpoint=str(info.path) if info else None)
        raise DivergenceError(message)

    def _train_step(self, samples: Iterator[Any], accum: int) -> dict[str, Any]:
        from .build import learning_rate

        lr = learning_rate(self.config, self.step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        wait = 0.0
        voxels = 0
        total = 0.0
        parts: dict[str, float] = {}
        grad_norm: torch.Tensor | float | None = None
        for i in range(accum):
            tw = time.perf_counter()
            sample = next(samples)
            wait += time.perf_counter() - tw
            y = sample.y.unsqueeze(0).to(self.ctx.device)
            op = sample.op.to(self.ctx.device) if sample.op is not None else None
            with intensity_scale(self.engine.module, self._scale_for(sample.meta.get("scan"))):
                x_hat = self.engine(y, op)
                out = self.loss(x_hat, y, op, self.engine, **self._reference(sample.meta))
                self.engine.backward(out.total)
            if i == accum - 1 and self._own_grad_norm():
                grad_norm = self._local_grad_norm()  # before step() clips or zeroes the grads
            self.engine.step()
            voxels += x_hat.numel()
            total += float(out.total.detach()) / accum
            for k, v in out.parts.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach()) / accum
        if grad_norm is None and self.config.deepspeed.precision != "fp16":
            grad_norm = self.engine.get_global_grad_norm()  # None where DeepSpeed computed none
        seconds = time.perf_counter() - t0
        names = sorted(parts)
        # This rank's finiteness rides in the all-reduce the step does anyway: no extra sync.
        bad = 0.0 if all(math.isfinite(v) for v in [total, *parts.values()]) else 1.0
        values: list[float | torch.Tensor] = [total, wait / seconds, voxels / seconds, bad]
        if grad_norm is not None:
            g = torch.as_tensor(grad_norm, dtype=torch.float64)
            values[3] = (~torch.isfinite(g)).to(torch.float64) + bad  # stays on g's device
            values.append(g)
        reduced = self._reduce_mean(values + [parts[k] for k in names])
        first = 5 if grad_norm is not None else 4
        record: dict[str, Any] = {
            "step": self.step + 1,
            "loss": reduced[0],
            "loss_rank0": total,
            "parts": dict(zip(names, reduced[first:])),
            "lr": lr,
            "step_s": seconds,
            "data_wait_fraction": reduced[1],
            "voxels_per_s": reduced[2] * self.ctx.world_size,
        }
        if grad_norm is not None:
            record["grad_norm"] = reduced[4]
        if reduced[3] > 0 or not math.isfinite(reduced[0]):
            nonfinite = [k for k in ("loss", "grad_norm") if k in record and not math.isfinite(record[k])]
            nonfinite += [f"parts.{k}" for k, v in record["parts"].items() if not math.isfinite(v)]
            record["nonfinite"] = nonfinite or ["on another rank"]
        return record

    def _own_grad_norm(self) -> bool:
        """Whether DeepSpeed computes no gradient norm, so the loop must (ZeRO 0 in fp32).

        ZeRO 1–3 norm their gradient partitions in ``step()`` (globally, all-reduced), as do the
        bf16/fp16 optimizers; a plain torch optimizer under ZeRO 0 does not, but there ``p.grad``
        holds the full gradient, already averaged over the ranks by ``backward()``. (Under ZeRO-3
        ``p.grad`` is not the full gradient, so it must never be normed here.)
        """
        if self._grad_norm_here is None:
            self._grad_norm_here = (self.config.deepspeed.zero_stage == 0
                                    and not hasattr(self.engine.optimizer, "_global_grad_norm"))
        return self._grad_norm_here

    def _local_grad_norm(self) -> torch.Tensor:
        """The 2-norm of the model's gradients as a 0-d tensor on the device (no host sync)."""
        grads = [p.grad.detach() for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float64)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))

    def _reference(self, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"reference": the sample's reference}`` (a batch of one) for a supervised term, else
        ``{}``: self-supervised losses are called without it."""
        if not self.loss.needs_reference:
            return {}
        return {"reference": meta["reference"].unsqueeze(0).to(self.ctx.device)}

    def _scale_for(self, path: str | None) -> float | None:
        if path is None:
            return None
        key = str(path)
        if key not in self.scales:
            self.scales[key] = build.scan_scale(self.engine.module, key, thickness=self.config.data.slab_thickness)
        return self.scales[key]

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self, monitor: Monitor) -> dict[str, float]:
        """PSNR/SSIM (or the held-out loss) over a few slabs of each validation scan; all ranks join."""
        from pipeline.data import open_scan
        from pipeline.reconstruct.metrics import psnr, ssim

        cfg = self.config
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
        loss_state = self.loss.state_dict()  # validation must not move the training draws
        self.engine.eval()
        try:
            for index, (scan, d_slice) in enumerate(jobs):
                y, op = scan.slab(d_slice)
                y, op = y.unsqueeze(0).to(self.ctx.device), op.to(self.ctx.device)
                with intensity_scale(self.engine.module, self._scale_for(scan.path)):
                    x_hat = self.engine(y, op)
                    ref = {}
                    if self.loss.needs_reference:
                        ref = {"reference": scan.reference.read_torch(d_slice).unsqueeze(0).to(self.ctx.device)}
                    sums[3] += float(self.loss(x_hat, y, op, self.engine, **ref).total)
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
            self.engine.train()
            self.loss.load_state_dict(loss_state)
        n = len(jobs)
        metrics = {"loss": float(sums[3]) / max(n, 1)}
        if sums[2] > 0:
            metrics.update(psnr=float(sums[0] / sums[2]), ssim=float(sums[1] / sums[2]))
        if estimated:
            metrics.update(self._estimate_metrics(jobs, estimated, max(peaks)))
        shown = ("loss", "psnr", "ssim", "estimated_psnr", "baseline_estimated_psnr")
        text = ", ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics)
        monitor.event("validation", self.step, f"validation: {text}", **metrics)
        base = metrics.get("baseline_estimated_mse")
        if base is not None and metrics["estimated_mse"] > base:
            monitor.event("warning", self.step,
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
        from pipeline.reconstruct.estimate import estimate_error, estimate_pilot, pilot_estimate

        cfg = self.config.validation
        noise = scan.metadata.noise()
        x_hat = f(y, op) if x_hat is None else x_hat
        seed = build.derived_seed(self.config.run.seed, "validation-estimate", index)
        est = estimate_error(y, op, noise, f, x_hat=x_hat, draws=cfg.estimate_draws,
                             folds=cfg.estimate_folds, seed=seed, pilot=estimate_pilot(y, op, noise, x_hat))
        key = (str(scan.path), index)
        if key not in self._estimate_peaks:  # it does not change with training: one pilot per slab
            self._estimate_peaks[key] = float(pilot_estimate(y, op).abs().max())
        return est, self._estimate_peaks[key]

    def _estimate(self, scan, y: torch.Tensor, op, x_hat: torch.Tensor, index: int) -> tuple[tuple[float, float, float], float]:
        """The network's estimate on one validation slab: ``((mse, low, high), peak)``."""
        engine = self.engine

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
            from pipeline.reconstruct import ReconstructConfig
            from pipeline.reconstruct.reconstruct import _Classical

            recons: dict[str, Any] = {}  # one calibration per scan
            values, method = [], None
            for index, (scan, d_slice) in enumerate(jobs):
                method = "fbp" if scan.modality == "ct" else "sense"
                if str(scan.path) not in recons:
                    recon = _Classical(scan, ReconstructConfig(scan=str(scan.path), out="unused", method=method,
                                                               progress=False), self.ctx.device)
                    recon.calibrate(lambda _: None)
                    recons[str(scan.path)] = recon
                y, op = scan.slab(d_slice)
                est, _ = self._slab_estimate(scan, y.to(self.ctx.device), op.to(self.ctx.device),
                                             recons[str(scan.path)].apply, index)
                values.append(est.mse)
            self._baselines[key] = {"mse": sum(values) / len(values), "method": f"{method} (auto)"}
        base = self._baselines[key]
        out.update(baseline_estimated_mse=base["mse"], baseline_estimated_psnr=db(base["mse"]),
                   baseline_method=base["method"])
        return out


def checkpoints_in(config: ExperimentConfig, run_dir: str | Path) -> tuple[Path, int | None]:
    """The run's checkpoints directory and its highest saved step (``None``: no save there).

    The highest complete save (with its manifest) counts, as ``--resume auto`` would take it;
    where only interrupted saves exist, the highest of those (they are still a run's work).
    """
    directory = Path(config.checkpoint.dir) if config.checkpoint.dir else Path(run_dir) / "checkpoints"
    complete, partial = [], []
    if directory.is_dir():
        for p in directory.glob("step_*"):
            digits = p.name[len("step_"):]
            if p.is_dir() and digits.isdigit():
                (complete if (p / OWN / MANIFEST).is_file() else partial).append(int(digits))
    found = complete or partial
    return directory, max(found) if found else None


def _move_aside(config: ExperimentConfig, run_dir: Path) -> list[str]:
    """``--restart``: rename the old checkpoints and log out of the way (nothing is deleted)."""
    directory, _ = checkpoints_in(config, run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for old in (directory, run_dir / "metrics.jsonl", run_dir / "tensorboard"):
        if old.exists():
            new = old.with_name(f"{old.stem}.replaced-{stamp}{old.suffix}")
            shutil.move(str(old), str(new))
            moved.append(f"{old} → {new}")
    return moved


def schedule_changes(saved: dict[str, Any] | None, config: ExperimentConfig, step: int) -> list[str]:
    """Lines that say which run/schedule/optimizer settings a resume changes and what the LR does.

    Args:
        saved: the resolved config the checkpoint was trained with (``None``: unknown, no lines).
        config: the config resuming it.
        step: the step it resumes at.
    """
    from .build import learning_rate

    if not saved:
        return []
    new = config.model_dump(mode="json")
    diffs = []
    for section in ("run", "schedule", "optimizer"):
        old_s, new_s = saved.get(section) or {}, new.get(section) or {}
        for key in sorted(set(old_s) | set(new_s)):
            if key in old_s and old_s.get(key) != new_s.get(key):
                diffs.append(f"{section}.{key} {old_s.get(key)} → {new_s.get(key)}")
    if not diffs:
        return []
    try:
        old_cfg = ExperimentConfig.model_validate({**new, **{k: saved[k] for k in ("run", "schedule", "optimizer")
                                                              if isinstance(saved.get(k), dict)}})
    except Exception:  # a config of an older version: say what changed, not the LR effect
        return [f"resumed with changed settings: {'; '.join(diffs)}"]
    lr_old, lr_new = learning_rate(old_cfg, step), learning_rate(config, step)
    effect = f"lr at step {step} is {lr_new:.3g} (was {lr_old:.3g})"
    if config.schedule.name == "cosine":
        effect = (f"the cosine schedule now decays to {config.optimizer.lr * config.schedule.min_lr_ratio:.3g} "
                  f"at step {config.run.max_steps}; " + effect)
    return [f"resumed with changed settings: {'; '.join(diffs)}: {effect}"]


def train(config: ExperimentConfig, run_dir: str | Path, *, resume: str | None = None,
          restart: bool = False) -> TrainResult:
    """Run (or continue) a training job on this rank; every rank of the job calls it.

    Args:
        config: the experiment.
        run_dir: the run directory.
        resume: ``"auto"`` or a checkpoint path (see :meth:`Trainer.find_resume`).
        restart: start over in a run directory that holds checkpoints (at step 0, or from a
            ``resume`` path outside this run); they, ``metrics.jsonl`` and ``tensorboard/`` are
            renamed ``*.replaced-YYYYmmdd-HHMMSS``, not deleted.

    Raises:
        InputError: ``run_dir`` holds checkpoints and neither ``resume`` (of this run) nor
            ``restart`` is given (checked on every rank before any work).
        OutputConflictError: ``run_dir`` is a scan, an output, a file, or inside a scan.
        DivergenceError: a step's loss or gradient norm was NaN/Inf.
    """
    from pipeline.outputs import check_run_dir

    run_dir = Path(run_dir)
    check_run_dir(run_dir, inputs=[*config.data.scans, *config.validation.scans])
    directory, last = checkpoints_in(config, run_dir)
    # A checkpoint given by path that lies outside this run's checkpoints would continue a run
    # from elsewhere on top of this one's saves (its `latest` moving back and forth).
    foreign = resume not in (None, "auto") and directory.resolve() not in Path(resume).resolve().parents \
        and Path(resume).resolve() != directory.resolve()
    if restart and (resume == "auto" or (resume is not None and not foreign)):
        raise InputError(f"--restart starts over and --resume {resume} continues this run: give one of them")
    if last is not None and not restart and (resume is None or foreign):
        also = f" (--resume {resume} is another run's checkpoint)" if foreign else ""
        raise InputError(f"{run_dir} holds checkpoints up to step {last} (in {directory}){also}: use --resume auto "
                         "to continue, --restart to start over (the old checkpoints are kept, renamed), "
                         "or --run-dir elsewhere")
    ctx = init_distributed(config.run.device, timeout_s=config.deepspeed.timeout_s)
    try:
        if restart and last is not None:
            if ctx.is_main:
                for line in _move_aside(config, run_dir):
                    print(f"[recon3d] --restart: moved {line}", file=sys.stderr, flush=True)
            barrier(ctx)  # no rank looks at the run directory before the old run is out of it
        trainer = Trainer(config, run_dir, ctx)
        return trainer.fit(resume)
    finally:
        shutdown_distributed()
