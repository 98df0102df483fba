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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import build
from .checkpoint import (CheckpointError, CheckpointInfo, CheckpointManager, read_checkpoint,
                         rng_state, set_rng_state)
from .config import ConfigError, ExperimentConfig, dump_config
from .distributed import DistContext, any_rank, barrier, init_distributed, mean_over_ranks, shutdown_distributed
from .monitor import LossGrowthWatch, Monitor
from .preemption import ParentWatch, StopRequest, under_torchrun
from .finetune import apply_freeze, check_architecture, frozen_count, init_payload, load_init
from .resume import checkpoints_in, config_diff, move_aside, schedule_changes
from .validation import Validation, check_estimable
from pipeline.errors import InputError, Recon3dError
from pipeline.log import say
from pipeline.threads import choose_threads
from pipeline.models import intensity_scale

__all__ = ["TrainResult", "train", "Trainer", "DivergenceError"]


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






class Trainer:
    """One rank's training run. Use :func:`train`; the pieces are public for tests and tools."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, ctx: DistContext) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.ctx = ctx
        cfg = config
        # Threads per rank from the CPUs this process may use (pipeline/threads.py, issue 17.5).
        self.threads = choose_threads(cfg.run.threads, what="training")
        torch.set_num_threads(self.threads.threads)
        if ctx.is_main:
            say(f"[recon3d] torch threads per rank: {self.threads.reason}", "train")
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
                check_estimable(cfg.validation.scans)
        precision = cfg.deepspeed.precision
        torch.manual_seed(build.derived_seed(cfg.run.seed, "init"))  # identical on every rank
        model = build.build_model(cfg.model, self.facts, precision=precision)
        self.loss = build.build_loss(cfg.loss, self.facts, seed=build.derived_seed(cfg.run.seed, "loss", ctx.rank))
        if ctx.is_main and self.facts.detector is not None:
            d = self.facts.detector
            level = ", ".join(f"{k} {d[k]:.4g}" if isinstance(d[k], (int, float)) else f"{k} per measurement"
                              for k in ("low", "high", "threshold") if d.get(k) is not None)
            if d.get("dither"):
                level += f", dither ±{float(d['dither']['amplitude']):.4g}"
            say(f"[recon3d] the scans were read through a non-linear detector ({d['model']}, {level}): "
                + ("the loss measures through it (loss.detector: auto)" if cfg.loss.detector == "auto"
                   else "the loss treats them as linear (loss.detector: ignore)"), "train")
        self.model = self.loss.adapt_model(model)
        self.frozen = apply_freeze(self.model, list(cfg.model.freeze))  # before the optimizer is built
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
        self.checkpoints = CheckpointManager(ckpt_dir, ctx, keep_last=cfg.checkpoint.keep_last,
                                             mirror=cfg.checkpoint.mirror, storage_options=cfg.data.storage_options)
        self.engine = None
        self.step = 0
        self._grad_norm_here: bool | None = None
        self.validation = Validation(self)

    def _init_weights(self) -> str:
        """Load ``model.init`` into the network (step 0 of a fresh run; every rank reads it)."""
        cfg, source = self.config, str(self.config.model.init)
        payload = init_payload(source)
        check_architecture(payload, cfg.model, modality=self.facts.modality, channels=self.facts.channels,
                           source=source)
        count = load_init(self.model, payload, source)
        frozen, total = frozen_count(self.model)
        return (f"weights from {source} (step {payload.get('step')}, {count} tensors)"
                + (f"; {frozen} of {total} parameters frozen ({', '.join(cfg.model.freeze)})" if frozen else ""))

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
            diffs = config_diff(manifest.get("model_config", {}), self.config.model.model_dump(mode="json"))
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

    def save(self, monitor: Monitor, reason: str) -> Path:
        path, seconds, nbytes = self.checkpoints.save(
            self.engine, self.step, self.rank_state(), self.manifest(),
            warn=lambda m: monitor.event("warning", self.step, m, what="checkpoint_mirror"))
        monitor.event("checkpoint", self.step, f"saved {path} ({nbytes / 2**20:.1f} MiB, {seconds:.2f} s, {reason})",
                      path=str(path), seconds=seconds, bytes=nbytes, reason=reason)
        return path

    def fit(self, resume: str | None = None) -> TrainResult:
        from .engine import create_engine

        cfg = self.config
        info = self.find_resume(resume)
        init_note = self._init_weights() if info is None and cfg.model.init else None
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
                      device=str(self.ctx.device), precision=cfg.deepspeed.precision,
                      threads=self.threads.threads, threads_source=self.threads.source)
        if init_note:
            monitor.event("init", self.step, init_note, source=str(cfg.model.init), frozen=len(self.frozen))
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
                        if cfg.checkpoint.keep_best != "none" and any_rank(self.validation.is_best(metrics), self.ctx):
                            if last_saved != self.step:
                                result.checkpoint = self.save(monitor, f"best {cfg.checkpoint.keep_best}")
                                last_saved = self.step
                            self.validation.mark_best(metrics, monitor)
                    if self.step % cfg.checkpoint.every == 0 and last_saved != self.step:
                        result.checkpoint = self.save(monitor, "every")
                        last_saved = self.step
                if last_saved != self.step:
                    reason = "stop requested" if result.stopped_by else "end"
                    result.checkpoint = self.save(monitor, reason)
                if result.stopped_by:
                    # the time is known where the signal arrived; another rank only heard of it
                    waited = time.monotonic() - stop.time if stop.time is not None else None
                    when = f"{waited:.1f} s after the signal" if waited is not None else \
                        "(the signal reached another rank)"
                    monitor.event("stop", self.step, f"stopped by {result.stopped_by}: saved and exiting {when}",
                                  seconds_after_signal=waited)
        finally:
            samples.close()  # the stream's reader threads stop now, not whenever the generator is collected
            self.checkpoints.finish_mirror(lambda m: monitor.event("warning", self.step, m, what="checkpoint_mirror"))
            monitor.close()
        result.step = self.step
        return result


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
            with intensity_scale(self.engine.module, self.scale_for(sample.meta.get("scan"))):
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
        reduced = mean_over_ranks(values + [parts[k] for k in names], self.ctx)
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

    def scale_for(self, path: str | None) -> float | None:
        """The intensity scale of scan ``path`` (measured once per scan), ``None`` without a path."""
        if path is None:
            return None
        key = str(path)
        if key not in self.scales:
            self.scales[key] = build.scan_scale(self.engine.module, key, thickness=self.config.data.slab_thickness)
        return self.scales[key]

    # ------------------------------------------------------------------ validation
    def validate(self, monitor: Monitor) -> dict[str, float]:
        """PSNR/SSIM (or the held-out loss) over a few slabs of each validation scan; all ranks join."""
        return self.validation.run(monitor)



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
                for line in move_aside(config, run_dir):
                    say(f"[recon3d] --restart: moved {line}", "train")
            barrier(ctx)  # no rank looks at the run directory before the old run is out of it
        trainer = Trainer(config, run_dir, ctx)
        return trainer.fit(resume)
    finally:
        shutdown_distributed()
