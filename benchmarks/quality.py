"""Reconstruction quality on volumes the recipes were not tuned on (issues 7 and 14).

    .venv/bin/python benchmarks/quality.py [--modality mri|ct|all] [--steps N] [--volumes 3]
        [--train-volumes 4] [--shape 16 128 128] [--held-out all|none|NAME...] [--per-scan]
        [--curve-every K] [--threads 1] [--scratch DIR] [--methods ...] [--json FILE]

Every learned method is a **shipped recipe** read from ``launch/configs`` (``RECIPES``: robust
EI ``mri_rei.yaml`` / ``ct_rei.yaml``, EI ``mri_ei.yaml`` / ``ct_ei.yaml``, SSDU
``mri_ssdu.yaml``, Noise2Inverse ``ct_n2i.yaml``; supervised is the robust-EI recipe with
``loss.terms=[{name: supervised}]``), built by the same functions as ``recon3d train``
(:mod:`pipeline.train.build`: model, loss, optimiser, learning-rate schedule, gradient
clipping, seeds) and trained by the same step on in-memory volumes (no DeepSpeed, no slab
stream: the data are small). ``--steps`` and ``--set key=value`` override the files for
experiments; the tables in BENCHMARKS.md say when they did.

Data (simulated here with :mod:`pipeline.data.simulate` into ``--scratch``):

* the **tuning set** — what the recipes were tuned on: ``ellipsoids`` phantoms, training
  volumes of seeds 101, 102, … and test volumes of seeds 201, 202, … (the tests use others);
* the **held-out set** — volumes of other kinds, never looked at while tuning
  (:data:`pipeline.data.phantoms.HELD_OUT_PHANTOMS`): anatomy-like heads (tissue classes
  with folded boundaries, vessels, skull), industrial objects (foam, fibres, cracks),
  body sections, a non-square field of view and objects cut by the field of view; seeds
  301, 302, … (``HELD_OUT``).

Protocols, reported separately: **transfer** — each learned method trains on the tuning
training volumes and reconstructs the tuning test volumes and every held-out volume;
**per scan** (``--per-scan``) — as a user without ground truth does, each self-supervised
method trains on the held-out scan itself (supervised trains on that scan's reference: the
upper bound of the network at that budget).

* **MRI**: 8 coils, 6× variable-density 2D Poisson-disc mask over ``(ky, kz) = (H, W)`` with
  a 20×20 calibration block, complex Gaussian noise σ = 0.01 per part, a smooth phase.
* **CT**: parallel beam, 60 angles over ``[0, π)``, transmission Poisson noise with
  ``I0 = 10⁴`` photons before ``−log``; attenuation 4 through the full width.

Classical baselines, each at its best: MRI zero-filled ``Aᴴy`` and SENSE by CG, CT FBP — the
**oracle** setting is the best of a grid on each volume (λ × iterations; the four ramp
windows), and ``*-cli`` rows are what ``recon3d reconstruct --method …`` gives with its
defaults (its reference-free choices, recorded in the output's metadata); ``tv-cli`` is
``recon3d reconstruct --method tv`` (TV-regularised least squares, reference-free weight)
where the installed version has it.

Metrics: PSNR and SSIM of magnitudes (:mod:`pipeline.metrics`), data range the
maximum of each reference, per volume and averaged. For each volume set the table gives every
method's PSNR against the best classical method and against supervised, the training seconds
and, for learned methods, the PSNR of the network's own input (its initial estimate): a
network below its own input is flagged. Then issue 14's targets per held-out volume: the best
self-supervised method ≥ 2 dB above the best classical one and within 1 dB of supervised,
and never below its own input. ``--curve-every K`` records the dB/step curve.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine_line, print_table, scratch_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "mri": {"rei": "mri_rei.yaml", "ei": "mri_ei.yaml", "ssdu": "mri_ssdu.yaml", "supervised": "mri_rei.yaml"},
    "ct": {"rei": "ct_rei.yaml", "ei": "ct_ei.yaml", "n2i": "ct_n2i.yaml", "supervised": "ct_rei.yaml"},
}
CLASSICAL = {"mri": ("zero-filled", "sense", "sense-cli", "tv-cli"), "ct": ("fbp", "fbp-cli", "tv-cli")}
DEFAULT_METHODS = {"mri": ("zero-filled", "sense", "sense-cli", "tv-cli", "rei", "supervised"),
                   "ct": ("fbp", "fbp-cli", "tv-cli", "rei", "supervised")}
SELF_SUPERVISED = ("ei", "rei", "ssdu", "n2i")
TRAIN_SEED, TEST_SEED, HELD_OUT_SEED = 101, 201, 301
# The held-out volumes: (phantom, shape or None for --shape); a non-square field of view and a
# cropped object among them. Never used while tuning a recipe.
HELD_OUT = (
    ("anatomy", None),
    ("anatomy", (16, 112, 96)),
    ("anatomy-crop", None),
    ("industrial", None),
    ("organs", None),
)


# ----------------------------------------------------------------------------- data
@dataclass
class Volume:
    """One simulated scan in memory: measurements, its operator and the reference."""

    name: str
    y: torch.Tensor
    op: object
    reference: torch.Tensor
    modality: str
    path: Path | None = None
    scale: float | None = None
    _ct_ops: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return self.reference.shape[0]

    def slab(self, d0: int, thickness: int):
        """``(y, op, reference)`` of the D-slab ``d0 : d0 + thickness``."""
        d = slice(d0, d0 + thickness)
        if self.modality == "mri":  # y (C, D, kH, kW)
            return self.y[:, d], self.op.slab(d), self.reference[d]
        if thickness not in self._ct_ops:  # a parallel-beam slab operator depends on thickness only
            self._ct_ops[thickness] = self.op.slab(slice(0, thickness))
        return self.y[d], self._ct_ops[thickness], self.reference[d]


def simulate(modality: str, seed: int, args, scratch: Path, *, phantom: str | None = None,
             shape=None) -> Path:
    from pipeline.data import SimulateCTConfig, SimulateMRIConfig, simulate_ct, simulate_mri

    phantom = phantom or args.phantom
    shape = tuple(shape or args.shape)
    out = scratch / f"{modality}_{phantom}_{'x'.join(map(str, shape))}_{seed}.zarr"
    if out.exists():  # --scratch reuse: the same name is the same seeded simulation
        return out
    if modality == "mri":
        simulate_mri(SimulateMRIConfig(
            out=str(out), shape=shape, coils=args.coils, acceleration=args.acceleration,
            calibration=args.calibration, phantom=phantom, noise_sigma=args.noise_sigma,
            seed=seed, chunk_depth=args.chunk_depth, progress=False,
        ))
    else:
        simulate_ct(SimulateCTConfig(
            out=str(out), shape=shape, angles=args.angles, geometry="parallel",
            phantom=phantom, photons=args.photons, seed=seed, chunk_depth=args.chunk_depth,
            progress=False,
        ))
    return out


def load(path: Path, modality: str, device: torch.device, name: str | None = None) -> Volume:
    from pipeline.data import open_scan

    scan = open_scan(str(path))
    depth = scan.metadata.volume_shape[0]
    y, op = scan.slab(slice(0, depth))
    ref = scan.reference.read_torch()
    return Volume(name or path.stem, y.to(device), op.to(device), ref.to(device), modality, path=path)


def held_out_specs(args) -> list[tuple[str, tuple[int, int, int], int]]:
    """The held-out ``(phantom, shape, seed)`` selected by ``--held-out``; the seed is
    ``HELD_OUT_SEED`` plus the volume's place in :data:`HELD_OUT`, so a volume is the same
    whichever others are selected with it."""
    if args.held_out == ["none"]:
        return []
    specs = [(ph, tuple(shape or args.shape), HELD_OUT_SEED + i) for i, (ph, shape) in enumerate(HELD_OUT)]
    if args.held_out != ["all"]:
        want = set(args.held_out)
        unknown = want - {ph for ph, _, _ in specs} - {f"{ph}@{'x'.join(map(str, sh))}" for ph, sh, _ in specs}
        if unknown:
            raise SystemExit(f"quality.py: unknown --held-out {sorted(unknown)}; choose from "
                             f"{[f'{ph}@' + 'x'.join(map(str, sh)) for ph, sh, _ in specs]}")
        specs = [s for s in specs if s[0] in want or f"{s[0]}@{'x'.join(map(str, s[1]))}" in want]
    return specs


# ----------------------------------------------------------------------------- baselines
def _cli_reconstruction(method: str, v: Volume, scratch: Path) -> tuple[torch.Tensor, dict]:
    """``recon3d reconstruct --method METHOD`` with its defaults on the volume's scan, read back."""
    import numpy as np
    import zarr

    from pipeline.reconstruct import ReconstructConfig
    from pipeline.reconstruct import reconstruct as run_reconstruct
    from pipeline.reconstruct.ome import open_ome

    out = scratch / f"{v.path.stem}.{method}.ome.zarr"
    if not out.exists():
        run_reconstruct(ReconstructConfig(scan=str(v.path), out=str(out), method=method, progress=False))
    x = torch.from_numpy(np.asarray(open_ome(str(out))[...]))
    info = dict(zarr.open_group(str(out), mode="r").attrs).get("recon3d", {})
    params = dict(info.get("settings", {}).get("reconstructor", {}))
    params.update((info.get("calibration") or {}).get("chosen", {}))  # what "auto" chose
    return x, params


@torch.no_grad()
def classical(modality: str, method: str, vols: list[Volume], scratch: Path) -> tuple[list[str], list]:
    """Each volume's label (the setting used) and reconstruction.

    ``sense``/``fbp``: the oracle — the best setting of a grid on each volume (it needs the
    reference, so only a benchmark can have it). ``*-cli``: what ``recon3d reconstruct`` gives
    with its defaults (reference-free).
    """
    from pipeline.classical import fbp_slab, sense_slab

    if method == "zero-filled":
        return ["zero-filled Aᴴy"] * len(vols), [v.op.adjoint(v.y) for v in vols]
    if method.endswith("-cli"):
        from pipeline.reconstruct.config import METHODS

        name = method[:-4]
        if name not in METHODS:
            raise LookupError(f"recon3d reconstruct has no --method {name} in this version")
        labels, xs = [], []
        for v in vols:
            x, params = _cli_reconstruction(name, v, scratch)
            shown = {k: val for k, val in params.items() if not isinstance(val, (dict, list))}
            labels.append(f"{name} (CLI default) " + ", ".join(f"{k}={val}" for k, val in shown.items()
                                                               if k != "method"))
            xs.append(x)
        return labels, xs
    if method == "sense":
        candidates = [(f"SENSE λ={lam:g}, {it} CG", lambda v, lam=lam, it=it: sense_slab(
            v.y, v.op, l2_weight=lam, iterations=it, tol=0.0))
            for lam in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1) for it in (10, 30)]
    elif method == "fbp":
        candidates = [(f"FBP {f}", lambda v, f=f: fbp_slab(v.y, v.op, filter=f))
                      for f in ("ram-lak", "shepp-logan", "cosine", "hann")]
    else:
        raise ValueError(method)
    labels, xs = [], []
    for v in vols:  # the oracle: the best setting for this volume
        best = None
        for label, fn in candidates:
            x = fn(v)
            p = _metrics(x, v)[0]
            if best is None or p > best[0]:
                best = (p, label, x)
        labels.append(best[1] + " (oracle)")
        xs.append(best[2])
    return labels, xs


# ----------------------------------------------------------------------------- recipes
def recipe(modality: str, method: str, args):
    """The shipped recipe of ``method`` (``launch/configs``), as ``recon3d train`` reads it.

    ``supervised`` is the modality's robust-EI recipe with its loss replaced by
    ``[{name: supervised}]`` — the same network, data and schedule; ``--steps`` overrides
    ``run.max_steps`` and ``--set`` any key (for experiments; the tables in BENCHMARKS.md use
    the files as shipped unless they say otherwise).
    """
    from pipeline.train.config import load_config

    path = Path(args.recipe_dir) / RECIPES[modality][method]
    overrides = []
    if method == "supervised":
        overrides.append("loss.terms=[{name: supervised}]")
    if args.steps is not None:
        overrides.append(f"run.max_steps={args.steps}")
    overrides += list(args.set or [])
    return path, load_config(path, overrides)


def facts_of(paths: list[Path]):
    """What the model and loss builders need to know about the scans (read from their metadata)."""
    from pipeline.train.build import scan_facts

    return scan_facts([str(p) for p in paths])


def set_scales(model: torch.nn.Module, volumes: list[Volume]) -> None:
    """One intensity scale per volume (the RMS of the initial estimate over the whole volume)."""
    from pipeline.models import scan_intensity_scale

    for v in volumes:
        v.scale = scan_intensity_scale(model, [(v.y, v.op)])




def add_scan_arguments(group) -> None:
    """The simulated scans' settings (MRI coils, mask, noise; CT angles, photons) on ``group``."""
    group.add_argument("--coils", type=int, default=8)
    group.add_argument("--acceleration", type=float, default=6.0)
    group.add_argument("--calibration", type=int, default=20)
    group.add_argument("--noise-sigma", type=float, default=0.01)
    group.add_argument("--angles", type=int, default=60)
    group.add_argument("--photons", type=float, default=1e4)

def train_step(model, loss, opt, cfg, vols, gen: torch.Generator, step: int, label: str) -> float:
    """One optimizer step of ``loss`` on a random D-slab (``data.slab_thickness`` slices, at most
    the volume's depth) of a random volume of ``vols``, at the schedule's rate; the loss value.

    Raises:
        RuntimeError: the loss is not finite.
    """
    from pipeline.models import intensity_scale
    from pipeline.train.build import learning_rate

    for group in opt.param_groups:
        group["lr"] = learning_rate(cfg, step)
    v = vols[int(torch.randint(len(vols), (1,), generator=gen))]
    thick = min(cfg.data.slab_thickness, v.depth)
    d0 = int(torch.randint(v.depth - thick + 1, (1,), generator=gen))
    y, op, ref = v.slab(d0, thick)
    kw = {"reference": ref.unsqueeze(0)} if loss.needs_reference else {}
    with intensity_scale(model, v.scale):
        x_hat = model(y.unsqueeze(0), op)
        out = loss(x_hat, y.unsqueeze(0), op, model, **kw)
    opt.zero_grad(set_to_none=True)
    out.total.backward()
    if cfg.deepspeed.gradient_clipping:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.gradient_clipping)
    opt.step()
    value = float(out.total.detach())
    if not math.isfinite(value):
        raise RuntimeError(f"{label}: the loss is not finite at step {step + 1}")
    return value

def train(cfg, facts, train_vols: list[Volume], device, *, curve_vols=(), curve_every: int = 0,
          label: str = "", verbose: bool = False) -> tuple:
    """Train the model of ``cfg`` with its loss, optimiser and schedule on in-memory volumes.

    The loop is :class:`pipeline.train.loop.Trainer`'s step without DeepSpeed or the slab
    stream: model, loss (``adapt_model`` included), optimiser, learning-rate schedule, gradient
    clipping and seeds come from the same builders and the same config keys. One random
    D-slab of ``data.slab_thickness`` slices (at most the volume's depth) from a random volume
    per step. Every ``curve_every`` steps the whole ``curve_vols`` are reconstructed and scored
    (the dB/step curve).
    """
    from pipeline.train.build import build_loss, build_model, build_optimizer, derived_seed

    torch.manual_seed(derived_seed(cfg.run.seed, "init"))
    model = build_model(cfg.model, facts)
    loss = build_loss(cfg.loss, facts, seed=derived_seed(cfg.run.seed, "loss", 0))
    model = loss.adapt_model(model).to(device)
    loss = loss.to(device)
    set_scales(model, train_vols)
    opt = build_optimizer(cfg, model)
    steps = cfg.run.max_steps
    gen = torch.Generator().manual_seed(derived_seed(cfg.run.seed, "quality-slabs"))
    curve = []

    def point(step: int) -> None:
        xs = reconstruct(model, list(curve_vols))
        per = [_metrics(x, v)[0] for x, v in zip(xs, curve_vols)]
        curve.append({"step": step, "psnr": sum(per) / len(per), "psnr_per_volume": per})
        model.train()
        if verbose:
            print(f"    {label} step {step}: PSNR {curve[-1]['psnr']:.2f} dB", flush=True)

    model.train()
    t0 = time.perf_counter()
    history = []
    eval_s = 0.0
    for step in range(steps):
        if curve_every and curve_vols and step % curve_every == 0:
            te = time.perf_counter()
            point(step)
            eval_s += time.perf_counter() - te
        history.append(train_step(model, loss, opt, cfg, train_vols, gen, step, label))
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0 - eval_s
    if curve_every and curve_vols:
        point(steps)
    return model, train_s, curve


@torch.no_grad()
def reconstruct(model: torch.nn.Module, test: list[Volume]) -> list[torch.Tensor]:
    from pipeline.models import intensity_scale

    model.eval()
    set_scales(model, test)
    xs = []
    for v in test:
        with intensity_scale(model, v.scale):
            xs.append(model(v.y.unsqueeze(0), v.op)[0])
    return xs


@torch.no_grad()
def initial_estimates(model: torch.nn.Module, test: list[Volume]) -> list[torch.Tensor]:
    """The network's own input (its initial estimate: FBP with the recipe's window, SENSE...)."""
    from pipeline.models import ArtifactRemoval, UnrolledNetwork

    rec = next(m for m in model.modules() if isinstance(m, (ArtifactRemoval, UnrolledNetwork)))
    return [rec.initial_image(v.y.unsqueeze(0), v.op)[0] for v in test]


# ----------------------------------------------------------------------------- metrics
def _metrics(x: torch.Tensor, v: Volume) -> tuple[float, float]:
    from pipeline.metrics import psnr, ssim

    x, ref = x.detach().cpu(), v.reference.cpu()
    peak = float(ref.abs().max())
    return psnr(x, ref, data_range=peak), ssim(x, ref, data_range=peak)


def score(xs: list[torch.Tensor], vols: list[Volume]) -> dict:
    per = [_metrics(x, v) for x, v in zip(xs, vols)]
    return {"psnr": sum(p for p, _ in per) / len(per), "ssim": sum(s for _, s in per) / len(per),
            "psnr_per_volume": [p for p, _ in per], "ssim_per_volume": [s for _, s in per],
            "volumes": [v.name for v in vols]}


def _learned_scores(model, vols: list[Volume]) -> dict:
    res = score(reconstruct(model, vols), vols)
    res["input_psnr_per_volume"] = score(initial_estimates(model, vols), vols)["psnr_per_volume"]
    return res


# ----------------------------------------------------------------------------- driver
def run_modality(modality: str, args, scratch: Path, device: torch.device) -> dict:
    learned_all = tuple(RECIPES[modality])
    methods = [m for m in args.methods if m in CLASSICAL[modality] + learned_all] \
        if args.methods else list(DEFAULT_METHODS[modality])
    t0 = time.perf_counter()
    train_paths = [simulate(modality, TRAIN_SEED + i, args, scratch) for i in range(args.train_volumes)]
    test_paths = [simulate(modality, TEST_SEED + i, args, scratch) for i in range(args.volumes)]
    specs = held_out_specs(args)
    held_paths = [simulate(modality, seed, args, scratch, phantom=ph, shape=sh) for ph, sh, seed in specs]
    train_vols = [load(p, modality, device) for p in train_paths]
    sets = {
        "tuning": [load(p, modality, device, f"{args.phantom} {TEST_SEED + i}") for i, p in enumerate(test_paths)],
        "held_out": [load(p, modality, device, f"{ph} {'x'.join(map(str, sh))}")
                     for p, (ph, sh, _) in zip(held_paths, specs)],
    }
    sets = {k: v for k, v in sets.items() if v}
    curve_vols = [v for vols in sets.values() for v in vols]
    print(f"[{modality}] simulated {len(train_vols)} training, {len(sets.get('tuning', []))} tuning-test and "
          f"{len(sets.get('held_out', []))} held-out volumes in {time.perf_counter() - t0:.1f} s", flush=True)
    facts = facts_of(train_paths)
    results: dict = {name: {} for name in sets}
    curves: dict = {}
    for method in methods:
        t = time.perf_counter()
        if method in CLASSICAL[modality]:
            try:
                for name, vols in sets.items():
                    labels, xs = classical(modality, method, vols, scratch)
                    res = score(xs, vols)
                    res.update(labels=labels, train_s=None)
                    results[name][method] = res
            except LookupError as exc:
                print(f"[{modality}] {method}: skipped ({exc})", flush=True)
                continue
        elif args.no_transfer:
            continue
        else:
            path, cfg = recipe(modality, method, args)
            model, train_s, curve = train(cfg, facts, train_vols, device, curve_vols=curve_vols,
                                          curve_every=args.curve_every, label=f"{modality} {method}",
                                          verbose=args.verbose)
            curves[method] = curve
            for name, vols in sets.items():
                res = _learned_scores(model, vols)
                res.update(labels=[f"{path.name}, {cfg.run.max_steps} steps"] * len(vols), train_s=train_s,
                           steps=cfg.run.max_steps)
                results[name][method] = res
        for name in sets:
            r = results[name][method]
            print(f"[{modality}] {name:8s} {method:12s} PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.4f}  "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    out = {"sets": results, "curves": curves}
    if args.per_scan and "held_out" in sets:
        out["per_scan"] = per_scan(modality, methods, sets["held_out"], args, device)
    return out


def per_scan(modality: str, methods: list[str], vols: list[Volume], args, device) -> dict:
    """Each learned method trained on each held-out scan alone (supervised: on its reference)."""
    results: dict = {}
    for v in vols:
        facts = facts_of([v.path])
        for method in [m for m in methods if m in RECIPES[modality]]:
            path, cfg = recipe(modality, method, args)
            model, train_s, curve = train(cfg, facts, [v], device, curve_vols=[v], curve_every=args.curve_every,
                                          label=f"{modality} {method} on {v.name}", verbose=args.verbose)
            res = _learned_scores(model, [v])
            res.update(labels=[f"{path.name}, {cfg.run.max_steps} steps, on this scan"], train_s=train_s,
                       steps=cfg.run.max_steps, curve=curve)
            results.setdefault(method, []).append(res)
            print(f"[{modality}] per scan {v.name:22s} {method:12s} PSNR {res['psnr']:.2f} dB (input "
                  f"{res['input_psnr_per_volume'][0]:.2f})  {train_s:.0f} s", flush=True)
    return {m: _merge(rs) for m, rs in results.items()}


def _merge(rs: list[dict]) -> dict:
    """Single-volume results as one result over the volumes."""
    out = {k: [x for r in rs for x in r[k]] for k in ("psnr_per_volume", "ssim_per_volume", "volumes",
                                                       "input_psnr_per_volume", "labels")}
    out["psnr"] = sum(out["psnr_per_volume"]) / len(rs)
    out["ssim"] = sum(out["ssim_per_volume"]) / len(rs)
    out["train_s"] = sum(r["train_s"] for r in rs)
    out["curves"] = [r["curve"] for r in rs]
    out["steps"] = rs[0]["steps"]
    return out


def report_set(title: str, modality: str, results: dict, classical_results: dict) -> dict:
    """The table of one volume set and issue 14's targets on each of its volumes."""
    classical_m = [m for m in CLASSICAL[modality] if m in classical_results]
    if not results and not classical_m:  # nothing measured on this set (e.g. --no-transfer, learned only)
        return {}
    vols = next(iter({**classical_results, **results}.values()))["volumes"]
    n = len(vols)
    best_classical = [max((classical_results[m]["psnr_per_volume"][i] for m in classical_m), default=None)
                      for i in range(n)]
    merged = {**{m: classical_results[m] for m in classical_m}, **results}
    sup = merged.get("supervised")
    rows = []
    mean = (lambda xs: sum(xs) / len(xs))  # noqa: E731
    for m, r in merged.items():
        d_base = "" if None in best_classical else f"{r['psnr'] - mean(best_classical):+.2f}"
        d_sup = "" if sup is None else f"{r['psnr'] - sup['psnr']:+.2f}"
        inp = r.get("input_psnr_per_volume")
        rows.append([m, r["labels"][0] if len(set(r["labels"])) == 1 else "per volume",
                     f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", d_base, d_sup,
                     "" if inp is None else f"{mean(inp):.2f}",
                     "" if r.get("train_s") is None else f"{r['train_s']:.0f}"])
    print_table(title, ["method", "setting", "PSNR dB", "SSIM", "Δ best classical", "Δ supervised",
                        "input PSNR", "train s"], rows)
    if n > 1:
        print_table(f"{title}: PSNR dB per volume", ["method"] + vols,
                    [[m] + [f"{p:.2f}" for p in r["psnr_per_volume"]] for m, r in merged.items()])
    checks = {}
    ssl = [m for m in SELF_SUPERVISED if m in results]
    if not ssl:
        return checks
    for i, vol in enumerate(vols):
        best = max(ssl, key=lambda m: results[m]["psnr_per_volume"][i])
        p = results[best]["psnr_per_volume"][i]
        c = {"method": best, "psnr": p}
        if best_classical[i] is not None:
            c["gain_over_classical_db"] = p - best_classical[i]
            c["2dB_above_classical"] = p >= best_classical[i] + 2.0
        if sup is not None:
            c["gap_to_supervised_db"] = p - sup["psnr_per_volume"][i]
            c["within_1dB_of_supervised"] = p >= sup["psnr_per_volume"][i] - 1.0
        below = [m for m in ssl if results[m]["psnr_per_volume"][i] < results[m]["input_psnr_per_volume"][i]]
        c["below_own_input"] = below
        checks[vol] = c
    rows = [[vol, c["method"], f"{c['psnr']:.2f}",
             f"{c.get('gain_over_classical_db', float('nan')):+.2f}" + (" MET" if c.get("2dB_above_classical") else " not met"),
             f"{c.get('gap_to_supervised_db', float('nan')):+.2f}" + (" MET" if c.get("within_1dB_of_supervised") else " not met"),
             ", ".join(c["below_own_input"]) or "none"] for vol, c in checks.items()]
    print_table(f"{title}: targets (best self-supervised ≥ +2 dB over the best classical, within 1 dB of "
                "supervised, never below its own input)",
                ["volume", "best self-supervised", "PSNR dB", "Δ best classical", "Δ supervised", "below its input"], rows)
    return checks


def report(modality: str, out: dict, args) -> dict:
    title = {"mri": f"MRI, {args.coils} coils, {args.acceleration:g}× Poisson disc, σ={args.noise_sigma:g}",
             "ct": f"CT, parallel beam, {args.angles} angles, I0={args.photons:g}"}[modality]
    checks = {}
    sets = out["sets"]
    classical_of = {name: {m: r for m, r in res.items() if m in CLASSICAL[modality]} for name, res in sets.items()}
    for name, res in sets.items():
        learned = {m: r for m, r in res.items() if m not in CLASSICAL[modality]}
        label = {"tuning": "tuning set (ellipsoids)", "held_out": "held-out set"}[name]
        checks[name] = report_set(f"{title} — {label}, transfer (trained on the tuning set)", modality,
                                  learned, classical_of[name])
    if "per_scan" in out:
        checks["per_scan"] = report_set(f"{title} — held-out set, per scan (trained on each scan itself)",
                                        modality, out["per_scan"], classical_of["held_out"])
    for method, curve in out["curves"].items():
        if curve:
            print(f"dB/step {modality} {method} (transfer, mean over the evaluated volumes): "
                  + ", ".join(f"{c['step']}: {c['psnr']:.2f}" for c in curve))
    for method, r in out.get("per_scan", {}).items():
        for vol, curve in zip(r["volumes"], r["curves"]):
            if curve:
                print(f"dB/step {modality} {method} per scan on {vol}: "
                      + ", ".join(f"{c['step']}: {c['psnr']:.2f}" for c in curve))
    return checks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modality", choices=("mri", "ct", "all"), default="all")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every learned method (default: each recipe's run.max_steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key for every learned method (as recon3d train --set)")
    p.add_argument("--recipe-dir", default=str(ROOT / "launch" / "configs"),
                   help="where the recipes are read (default: launch/configs)")
    p.add_argument("--volumes", type=int, default=3, help="tuning-set test volumes per modality")
    p.add_argument("--train-volumes", type=int, default=4)
    p.add_argument("--held-out", nargs="+", default=["all"],
                   help="held-out volumes: all, none, or phantom names (NAME or NAME@DxHxW)")
    p.add_argument("--per-scan", action="store_true",
                   help="also train every learned method on each held-out scan itself")
    p.add_argument("--no-transfer", action="store_true",
                   help="skip the transfer protocol's training (with --per-scan: only per-scan figures)")
    p.add_argument("--curve-every", type=int, default=0, help="score the evaluated volumes every K steps")
    p.add_argument("--shape", type=int, nargs=3, default=(16, 128, 128))
    p.add_argument("--chunk-depth", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scratch", default=None, help="folder for the simulated scans (default: a temp dir)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of zero-filled sense sense-cli fbp fbp-cli tv-cli ei rei ssdu n2i supervised")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--verbose", action="store_true", help="print the dB/step points as they are measured")
    g = p.add_argument_group("data")
    g.add_argument("--phantom", default="ellipsoids", help="the tuning set's phantom")
    add_scan_arguments(g)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    scratch, tmp = scratch_dir(args.scratch, "recon3d-quality-")
    modalities = ("mri", "ct") if args.modality == "all" else (args.modality,)
    out = {"machine": machine_line(), "device": str(device), "threads": args.threads,
           "args": vars(args) | {"shape": list(args.shape)}}
    t0 = time.perf_counter()
    all_results = {}
    for modality in modalities:
        all_results[modality] = run_modality(modality, args, scratch, device)
    print(f"\n{machine_line()}  device {device}, {args.threads} thread(s)")
    for modality in modalities:
        checks = report(modality, all_results[modality], args)
        out[modality] = all_results[modality] | {"targets": checks}
    out["total_s"] = time.perf_counter() - t0
    print(f"\ntotal {out['total_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
