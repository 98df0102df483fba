"""``recon3d train``: config → build → engine → resume → steps → checkpoints.

:func:`train` is the whole job on one rank; under ``torchrun`` every rank runs it. A step is
``gradient_accumulation_steps`` slabs on every rank, each: ``x̂ = engine(y, op)``,
``loss(x̂, y, op, engine)`` (EI and SURE run the engine again inside the loss), backward and
DeepSpeed's step. The learning rate is a function of the step. At each step boundary the ranks
agree on whether a stop was requested (SIGTERM/SIGUSR1); if so they save and return.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from . import build
from .checkpoint import CheckpointError, CheckpointInfo, CheckpointManager, read_checkpoint, rng_state, set_rng_state
from .config import ConfigError, ExperimentConfig, dump_config
from .distributed import DistContext, any_rank, init_distributed, shutdown_distributed
from .monitor import Monitor
from .preemption import StopRequest
from pipeline.models import intensity_scale

__all__ = ["TrainResult", "train", "Trainer"]


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
                                         rank=ctx.rank, world_size=ctx.world_size)
        ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.checkpoints = CheckpointManager(ckpt_dir, ctx, keep_last=cfg.checkpoint.keep_last)
        self.engine = None
        self.step = 0

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

    def _reduce_mean(self, values: list[float]) -> list[float]:
        if self.ctx.world_size == 1:
            return values
        dev = self.ctx.device if self.ctx.backend == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        return (t / self.ctx.world_size).tolist()

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
        result = TrainResult(self.run_dir, self.step, None)
        last_saved = self.step if info is not None else None
        samples = self._samples()
        accum = cfg.deepspeed.gradient_accumulation_steps
        try:
            with StopRequest() as stop:
                while self.step < cfg.run.max_steps:
                    if any_rank(stop.requested, self.ctx):
                        result.stopped_by = stop.signal_name or "signal on another rank"
                        break
                    record = self._train_step(samples, accum)
                    self.step += 1
                    result.losses.append(record["loss"])
                    if self.step % cfg.logging.every == 0 or self.step == cfg.run.max_steps:
                        monitor.log_step(record)
                    if cfg.validation.scans and self.step % cfg.validation.every == 0:
                        self.validate(monitor)
                    if self.step % cfg.checkpoint.every == 0:
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
        for _ in range(accum):
            tw = time.perf_counter()
            sample = next(samples)
            wait += time.perf_counter() - tw
            y = sample.y.unsqueeze(0).to(self.ctx.device)
            op = sample.op.to(self.ctx.device) if sample.op is not None else None
            with intensity_scale(self.engine.module, self._scale_for(sample.meta.get("scan"))):
                x_hat = self.engine(y, op)
                out = self.loss(x_hat, y, op, self.engine)
                self.engine.backward(out.total)
            self.engine.step()
            voxels += x_hat.numel()
            total += float(out.total.detach()) / accum
            for k, v in out.parts.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach()) / accum
        seconds = time.perf_counter() - t0
        names = sorted(parts)
        reduced = self._reduce_mean([total, wait / seconds, voxels / seconds] + [parts[k] for k in names])
        return {
            "step": self.step + 1,
            "loss": reduced[0],
            "loss_rank0": total,
            "parts": dict(zip(names, reduced[3:])),
            "lr": lr,
            "step_s": seconds,
            "data_wait_fraction": reduced[1],
            "voxels_per_s": reduced[2] * self.ctx.world_size,
        }

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
        loss_state = self.loss.state_dict()  # validation must not move the training draws
        self.engine.eval()
        try:
            for scan, d_slice in jobs:
                y, op = scan.slab(d_slice)
                y, op = y.unsqueeze(0).to(self.ctx.device), op.to(self.ctx.device)
                with intensity_scale(self.engine.module, self._scale_for(scan.path)):
                    x_hat = self.engine(y, op)
                    sums[3] += float(self.loss(x_hat, y, op, self.engine).total)
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
        text = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        monitor.event("validation", self.step, f"validation: {text}", **metrics)
        return metrics


def train(config: ExperimentConfig, run_dir: str | Path, *, resume: str | None = None) -> TrainResult:
    """Run (or continue) a training job on this rank; every rank of the job calls it."""
    ctx = init_distributed(config.run.device, timeout_s=config.deepspeed.timeout_s)
    try:
        trainer = Trainer(config, Path(run_dir), ctx)
        return trainer.fit(resume)
    finally:
        shutdown_distributed()
