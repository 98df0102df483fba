"""Non-linear detectors (issue 18.2): a network trained through the detector against the same
network trained with the linear model, FBP, and a classical one-bit method.

    .venv/bin/python benchmarks/nonlinear.py [--cases clip-tuning clip-held-out one-bit]
        [--steps N] [--clip-fraction 0.12] [--one-bit-quantile 0.75] [--shape 16 96 96]
        [--held-out-seed 301] [--pretrain-volumes K [--pretrain-steps P] [--finetune-lr 1e-4]]
        [--threads 1] [--scratch DIR] [--json FILE] [--quick]

Each case is one parallel-beam CT scan (``--angles`` views, ``--photons`` transmission noise,
as ``benchmarks/quality.py``), simulated twice with the same seed: **linear** (an ideal detector)
and through a **non-linear detector** recorded in the scan (``recon3d simulate ct --floor`` or
``--one-bit``). The detector's level is set from the linear scan *before* anything is trained:

* ``clip-*`` — a count floor ``F`` (``--floor``) at the ``1 − f`` quantile of the linear scan's
  line integrals, so the fraction ``f`` (``--clip-fraction``, default 12 %) of all rays — the
  ones through the densest parts — read the floor (photon starvation); with ``--clip-side
  saturation`` instead a maximum count ``S`` (``--saturation``) at the ``f`` quantile, so the
  fraction ``f`` of rays — the least attenuated ones — read the detector's maximum (the issue's
  ``y = clip(A x)`` at the maximum count); ``clip-tuning`` is the
  tuning family (``ellipsoids``, seed 101), ``clip-held-out`` the held-out ``anatomy`` (seed 301,
  never looked at while choosing anything here; ``--held-out-seed`` picks another held-out scan,
  e.g. 303, for every held-out case);
* ``one-bit`` — one bit per ray (``--one-bit T``), ``T`` the ``--one-bit-quantile`` of the linear
  scan's line integrals (held-out ``anatomy``, seed 301);
* ``one-bit-mri`` (and ``one-bit-mri-tuning``: ``ellipsoids`` seed 101, for choosing settings) — multi-coil Cartesian MRI (``--coils``, ``--acceleration``, ``--noise-sigma``),
  the sign of the real and imaginary part of every sampled value (``simulate mri --one-bit``:
  threshold 0, so the image's scale is lost), held-out ``anatomy``, seed 301, trained with
  ``--mri-recipe`` (``mri_ei.yaml``: MC + EI with 90° rotations on ``Aᴴy``); its classical
  one-bit estimate is ``Aᴴy`` of the bits, and its reference point ``Aᴴy`` of the linear data;
* ``one-bit-mri-dither`` (held-out ``anatomy``, seed 301) and ``one-bit-mri-dither-tuning``
  (``ellipsoids``, seed 101) — the same, each part compared with its own threshold
  ``τ ~ U[−Δ, Δ)`` (``simulate mri --one-bit --one-bit-dither Δ``; ``Δ`` the
  ``--dither-quantile``, default 99 %, of ``|parts|`` of the linear scan's sampled values):
  the dither makes the mean bit proportional to the part, so the spectral envelope and the
  scale stay in the data (:class:`operators3d.nonlinear.Sign`).
  Two oracles show what the bits hold (:func:`envelope_check`): ``Aᴴ(W ⊙ y)`` with ``W`` the
  reference's radial k-space profile, and the share of the noiseless bits that stay the same
  when the reference's spectrum is whitened (reweighted by ``|k|²``).

Why one-bit MRI (threshold 0) is not one-bit CT (measured on ``one-bit-mri-tuning``, 16×96×96,
8 coils, 4×, σ 0.01; 2026-12-05). ``sign`` of a Fourier coefficient's real and imaginary parts
does not change when the image's spectrum is reweighted by any smooth positive radial factor
``H(|k|)`` (the coil maps are smooth, so ``A (h ∗ x) ≈ H ⊙ A x``): whitening the reference by
``|k|²`` keeps 99.5 % of its noiseless bits, yet scores 8.69 dB at the best scale. The spectral
envelope, most of the PSNR, is therefore not in the noiseless bits; ``Aᴴy`` of the bits is one
such whitened image (9.82 dB), and ``Aᴴ(W ⊙ y)`` with the true envelope reaches 16.06 dB. EI
cannot restore it: a radial filter commutes with rotations and shifts, so ``T (h ∗ x) = h ∗ T x``
is as equivariant as ``x``. Only the noise (σ 0.01 flips 17.7 % of the bits here: the median part
is 0.016) carries the envelope, through the flip rates, and the logistic MC fits the flips
instead: its value is lower at ``Aᴴy`` of the bits (0.276, best scale) than at the reference
(0.328), at widths 0.006, 0.05 and 1. The CT case works because its threshold is the 75 %
quantile of the line integrals, not 0.

On the non-linear scan, with the shipped recipe ``launch/configs/ct_ei.yaml`` (MC + EI with
rotations; ``--recipe`` picks another file of ``--recipe-dir``) trained on the scan itself for ``--steps`` steps (the loop of ``benchmarks/quality.py``: the
builders of ``recon3d train``, no DeepSpeed):

* **aware** — ``loss.detector: auto``: MC in the detector's measurement space and EI
  re-measuring through it (:mod:`pipeline.losses.detector`);
* **linear model** — the same network, loss, seed and slabs with ``loss.detector: ignore``;
* with ``--pretrain-volumes K`` (count-floor cases; issue 18.1's path applied to 18.2) each of the
  two networks is instead **pretrained** self-supervised with its own loss for ``--pretrain-steps``
  on K earlier scans of the case's phantom (seeds 401, 402, …; references replaced by NaN, never
  read) measured through the **same detector** (the new scan's count floor: a property of the
  detector, not of the scan), then fine-tuned on the new scan for ``--steps`` at
  ``--finetune-lr`` through the functions of ``recon3d train --init``; the pretrained network as
  is appears as its own row ("pretrained (zero-shot)") and its curve is in the JSON. The exports
  stay in ``--scratch`` and a later run with the same recipe, overrides and scans reuses them;
* **FBP** — the best of four windows on the measured (clipped) sinogram (an oracle: it needs
  the reference), and the same on the linear scan (what the detector took away);
* one-bit only: **normalised back-projection** ``Aᵀy`` and **FBP of the bits**, each at the
  scale that fits the reference best (the classical one-bit estimate is known up to scale).

Metrics: PSNR/SSIM against the reference (:mod:`pipeline.metrics`), data range its maximum; for
one-bit also after the least-squares scale ``α = ⟨x̂, x⟩/⟨x̂, x̂⟩`` (the scale ambiguity of one-bit
data; with a threshold ``T ≠ 0`` the scale is identifiable in principle, so both are shown).

Targets of issue 18.2 (clipping, 5–20 % of rays): aware ≥ linear model + 3 dB, and aware above
FBP on the clipped sinogram. One-bit: the network against the classical one-bit methods.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quality as Q  # noqa: E402
from _common import machine_line, print_table, scratch_dir as _scratch_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "ct_ei.yaml"
CASES = {  # name: (phantom, seed, detector kind, modality)
    "clip-tuning": ("ellipsoids", Q.TRAIN_SEED, "clip", "ct"),
    "clip-held-out": ("anatomy", Q.HELD_OUT_SEED, "clip", "ct"),
    "one-bit": ("anatomy", Q.HELD_OUT_SEED, "one-bit", "ct"),
    "one-bit-mri-tuning": ("ellipsoids", Q.TRAIN_SEED, "one-bit", "mri"),
    "one-bit-mri": ("anatomy", Q.HELD_OUT_SEED, "one-bit", "mri"),
    "one-bit-mri-dither-tuning": ("ellipsoids", Q.TRAIN_SEED, "one-bit-dither", "mri"),
    "one-bit-mri-dither": ("anatomy", Q.HELD_OUT_SEED, "one-bit-dither", "mri"),
}
DEFAULT_CASES = ("clip-tuning", "clip-held-out", "one-bit", "one-bit-mri")
MRI_RECIPE = "mri_ei.yaml"
GAIN_DB = 3.0
PRETRAIN_SEED = 401  # the earlier scans of --pretrain-volumes: 401, 402, ...
QUICK = {"shape": [4, 32, 32], "steps": 6, "angles": 24, "coils": 3, "calibration": 8}


def scan_of(case: str, args) -> tuple[str, int]:
    """``(phantom, seed)`` of the case's new scan: a held-out phantom's seed is ``--held-out-seed``."""
    from pipeline.data.phantoms import HELD_OUT_PHANTOMS

    phantom, seed, _, _ = CASES[case]
    if phantom in HELD_OUT_PHANTOMS:
        seed = getattr(args, "held_out_seed", seed)
    return phantom, seed


def pretrain_seeds(args) -> list[int]:
    """Seeds of the ``--pretrain-volumes`` earlier scans: 401, 402, … (neither a tuning scan's 101
    nor a held-out one's 301–303)."""
    return [PRETRAIN_SEED + i for i in range(args.pretrain_volumes)]


def simulate(case: str, args, scratch: Path, detector: dict | None, *, seed_override: int | None = None) -> Path:
    """The case's scan, linear (``detector=None``) or through ``detector`` (simulate's options);
    ``seed_override``: another scan of the case's phantom (an earlier scan, for pretraining)."""
    from pipeline.data import SimulateCTConfig, SimulateMRIConfig, simulate_ct, simulate_mri

    phantom, seed = scan_of(case, args)
    if seed_override is not None:
        seed = seed_override
    tag = "linear" if detector is None else "_".join(f"{k}{float(v):.6g}" for k, v in sorted(detector.items()))
    if modality(case) == "mri":
        out = scratch / f"mri_{phantom}_{'x'.join(map(str, args.shape))}_{args.coils}c_{seed}_{tag}.zarr"
        if not out.exists():
            simulate_mri(SimulateMRIConfig(out=str(out), shape=tuple(args.shape), coils=args.coils,
                                           acceleration=args.acceleration, calibration=args.calibration,
                                           phantom=phantom, noise_sigma=args.noise_sigma, seed=seed,
                                           chunk_depth=args.chunk_depth, progress=False, **(detector or {})))
        return out
    out = scratch / f"{phantom}_{'x'.join(map(str, args.shape))}_{args.angles}a_{seed}_{tag}.zarr"
    if not out.exists():
        simulate_ct(SimulateCTConfig(out=str(out), shape=tuple(args.shape), angles=args.angles, geometry="parallel",
                                     phantom=phantom, photons=args.photons, seed=seed, chunk_depth=args.chunk_depth,
                                     progress=False, **(detector or {})))
    return out


def dither_amplitude(linear: "Q.Volume", quantile: float) -> float:
    """``Δ``: the ``quantile`` of ``|parts|`` (real and imaginary) of the linear scan's sampled
    measurements."""
    import numpy as np

    y = linear.y
    mask = linear.op.measurement_mask()
    if mask is not None:
        y = y[..., mask.to(y.device).bool()]
    parts = torch.view_as_real(y).abs().flatten().double().cpu().numpy()
    return float(np.quantile(parts, quantile))


def detector_for(case: str, linear: "Q.Volume", args) -> dict:
    """The detector settings of ``case`` from the linear scan's line integrals (MRI: the sign
    of each part, threshold 0; ``*-dither``: about a dither ``U[−Δ, Δ)``, ``Δ`` the
    ``--dither-quantile`` of the linear scan's ``|parts|``)."""
    if modality(case) == "mri":
        out = {"one_bit": True, "one_bit_width": args.mri_one_bit_width}
        if CASES[case][2] == "one-bit-dither":
            out["one_bit_dither"] = dither_amplitude(linear, args.dither_quantile)
        return out
    y = linear.y.flatten().double()
    if CASES[case][2] == "clip":
        if getattr(args, "clip_side", "floor") == "saturation":  # the least attenuated rays read the maximum count
            return {"saturation": math.exp(-float(torch.quantile(y, args.clip_fraction)))}
        level = float(torch.quantile(y, 1.0 - args.clip_fraction))
        return {"floor": math.exp(-level)}
    return {"one_bit": float(torch.quantile(y, args.one_bit_quantile)), "one_bit_width": args.one_bit_width}


def modality(case: str) -> str:
    return CASES[case][3]


def recipe_name(case: str, args) -> str:
    if modality(case) == "mri":
        return args.mri_recipe
    return args.recipe or RECIPE


def recipe(case: str, detector: str, args, *, steps: int | None = None, extra: tuple = ()):
    """The case's recipe for ``detector`` (``auto``: aware, ``ignore``: linear model), ``steps``
    (default ``--steps``), ``--set``, then ``extra`` overrides."""
    from pipeline.train.config import load_config

    # The linear-model network ignores the detector everywhere: in its loss and in its input.
    overrides = [f"run.max_steps={args.steps if steps is None else steps}", f"loss.detector={detector}",
                 f"model.initial_detector={detector}"]
    overrides += list(args.set or []) + list(extra)
    return load_config(Path(args.recipe_dir) / recipe_name(case, args), overrides)


def pretrained_network(case: str, mode: str, settings: dict, args, scratch: Path, device, vol, facts) -> dict:
    """``--pretrain-volumes K``: the network of ``mode`` pretrained self-supervised (its own loss,
    aware or linear model) on K earlier scans of the case's phantom through the **same detector**
    (``settings``: the new scan's level, a detector property; seeds :func:`pretrain_seeds`, their
    references replaced by NaN), then fine-tuned on the new scan for ``--steps`` at
    ``--finetune-lr`` (``finetune.py``'s loop: the functions of ``recon3d train --init``).

    Returns ``{"zero_shot", "curve", "pretrain_s", "finetune_s", "export"}``; the curve is scored
    at ``finetune.eval_steps`` (step 0: the pretrained network as is)."""
    import hashlib

    import finetune as F

    paths = [simulate(case, args, scratch, settings, seed_override=s) for s in pretrain_seeds(args)]
    if vol.path.name in {p.name for p in paths}:
        raise SystemExit(f"nonlinear.py: the new scan {vol.path.name} is one of the pretraining scans")
    mod = modality(case)
    cfg = recipe(case, mode, args, steps=args.pretrain_steps)
    key = hashlib.sha256(repr((cfg.model_dump_json(), [p.name for p in paths])).encode()).hexdigest()[:12]
    export = scratch / f"pretrained_{case}_{mode}_{key}.pt"
    pre_s = None
    if export.exists():
        print(f"[{case}] {mode}: reusing {export.name} (the same pretraining, done earlier in --scratch)", flush=True)
    else:
        pre_vols = F.without_references([Q.load(p, mod, device) for p in paths])
        pre_facts = Q.facts_of(paths)
        model, pre_s, _ = F.train(cfg, pre_facts, pre_vols, device, label=f"{case} {mode} pretrain")
        torch.save(F.export_payload(model, cfg, pre_facts, cfg.run.max_steps), export)
        del model
        print(f"[{case}] {mode}: pretrained on {len(paths)} earlier scans for {cfg.run.max_steps} steps in "
              f"{pre_s:.0f} s -> {export.name}", flush=True)
    f_cfg = recipe(case, mode, args, extra=(f"optimizer.lr={args.finetune_lr:g}",))
    at = F.eval_steps(f_cfg.run.max_steps)
    _, f_s, curve = F.train(f_cfg, facts, [vol], device, init=str(export), eval_vol=vol, eval_steps=at,
                            label=f"{case} {mode} fine-tuned", verbose=args.verbose)
    return {"zero_shot": curve[0], "curve": curve, "pretrain_s": pre_s, "finetune_s": f_s, "export": export.name}


def best_scaled(x: torch.Tensor, v: "Q.Volume") -> torch.Tensor:
    """``α x`` with the least-squares ``α > 0`` against the reference (of the magnitudes for a
    complex image: one-bit data lose a positive scale, not a phase)."""
    a, b = x.abs().double(), v.reference.abs().double().to(x.device)
    alpha = float((a * b).sum() / (a * a).sum().clamp_min(1e-300))
    return x * alpha


def _radial_index(shape: tuple[int, int], device) -> torch.Tensor:
    """The integer distance of each k-space point to the centre ``(H//2, W//2)`` (the centred
    k-space layout of :class:`operators3d.MultiCoilMRI`, as ``calibration_region``)."""
    h, w = shape
    ky = torch.arange(h, device=device, dtype=torch.float64).view(-1, 1) - h // 2
    kx = torch.arange(w, device=device, dtype=torch.float64).view(1, -1) - w // 2
    return (ky**2 + kx**2).sqrt().round().long()


def whitened(x: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """``x`` with its in-plane spectrum multiplied by ``max(|k|·n, 1)^power`` (``|k|`` in cycles
    per pixel): a smooth positive radial reweighting, the kind one-bit Fourier data cannot see."""
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h, device=x.device, dtype=torch.float64).view(-1, 1) * h
    fx = torch.fft.fftfreq(w, device=x.device, dtype=torch.float64).view(1, -1) * w
    gain = (fy**2 + fx**2).sqrt().clamp_min(1.0).pow(power)
    return torch.fft.ifft2(torch.fft.fft2(x) * gain.to(x.real.dtype))


@torch.no_grad()
def envelope_check(v: "Q.Volume") -> tuple[torch.Tensor, dict]:
    """What one-bit MRI data hold about the image's spectral envelope (oracles: they read the
    reference).

    Returns:
        ``Aᴴ(W ⊙ y)`` of the bits with ``W`` the radial mean of ``|A x_ref|`` (over coils and
        slices, at the integer distance to the k-space centre), and the facts
        ``whitened_bits_kept`` (share of the reference's noiseless bits ``sign(A x)`` that
        :func:`whitened` keeps), ``whitened_psnr_scaled`` (that whitened reference's PSNR at the
        best scale) and ``bits_flipped_by_noise`` (share of the data's bits that differ from
        ``sign(A x_ref)``).
    """
    op, y = v.op, v.y
    ref = v.reference.to(y.dtype)
    z = op(ref)
    mask = op.measurement_mask()
    sampled = (torch.ones(z.shape[-2:], dtype=torch.bool, device=z.device) if mask is None
               else mask.to(z.device).bool())

    def bits(u: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(u[..., sampled]) >= 0  # sign_values: +1 from the threshold on

    r = _radial_index(tuple(z.shape[-2:]), z.device)
    mag = z.abs().reshape(-1, *z.shape[-2:]).double().mean(0)
    profile = torch.zeros(int(r.max()) + 1, dtype=torch.float64, device=z.device).index_add_(0, r.flatten(), mag.flatten())
    profile = profile / torch.bincount(r.flatten()).clamp_min(1).double()
    x = op.adjoint(y * profile[r].to(y.real.dtype))
    xw = whitened(ref)
    truth = bits(z)
    facts = {"whitened_bits_kept": float((bits(op(xw)) == truth).double().mean()),
             "whitened_psnr_scaled": row(xw, v, scaled=True)["psnr_scaled"],
             "bits_flipped_by_noise": float((bits(y) != truth).double().mean())}
    return x, facts


@torch.no_grad()
def fbp_oracle(v: "Q.Volume", *, scale: bool = False) -> tuple[str, torch.Tensor]:
    """The best FBP window on ``v`` (best-scaled first with ``scale``)."""
    from pipeline.classical import fbp_slab

    best = None
    for f in ("ram-lak", "shepp-logan", "cosine", "hann"):
        x = fbp_slab(v.y, v.op, filter=f)
        if scale:
            x = best_scaled(x, v)
        p = Q._metrics(x, v)[0]
        if best is None or p > best[0]:
            best = (p, f, x)
    return f"FBP {best[1]} (oracle)", best[2]


def aware_classical(v: "Q.Volume", record: dict) -> torch.Tensor:
    """The classical reconstruction that knows the count floor:
    :func:`pipeline.classical.clipped_fbp` (FBP-preconditioned projected steps on the
    detector-aware data consistency, Hann windows, its default iterations and step, chosen on
    ``clip-tuning`` only). The baseline a detector-aware network has to beat; also the input of
    a network with ``model.initial_detector: auto`` (the recipes' default)."""
    from pipeline.classical import clip_levels_of, clipped_fbp

    low, high = clip_levels_of(record)
    return clipped_fbp(v.y, v.op, low=low, high=high, filter="hann")


def linear_classical(v: "Q.Volume") -> torch.Tensor:
    """:func:`aware_classical`'s iterations with the detector ignored: a level above every ray, so
    each ray is an equality ``A x = y``; the non-negativity clamp and the FBP-preconditioned steps
    stay. The clipped FBP minus this is what knowing the detector adds to the input; this minus
    plain FBP is what the iterations add on their own."""
    from pipeline.classical import clipped_fbp

    return clipped_fbp(v.y, v.op, high=float(v.y.max()) + 1.0, filter="hann")


def row(x: torch.Tensor, v: "Q.Volume", *, scaled: bool) -> dict:
    p, s = Q._metrics(x, v)
    out = {"psnr": p, "ssim": s}
    if scaled:
        out["psnr_scaled"], out["ssim_scaled"] = Q._metrics(best_scaled(x, v), v)
    return out


def run_case(case: str, args, scratch: Path, device) -> dict:
    t0 = time.perf_counter()
    linear_path = simulate(case, args, scratch, None)
    mod = modality(case)
    linear = Q.load(linear_path, mod, device, f"{case} linear")
    settings = detector_for(case, linear, args)
    path = simulate(case, args, scratch, settings)
    vol = Q.load(path, mod, device, case)
    from pipeline.data import open_scan

    record = open_scan(str(path)).metadata.detector
    one_bit = record["model"] == "sign"
    clipped = (record["fraction_at_high"] or 0) + (record["fraction_at_low"] or 0) if not one_bit else None
    phantom, seed = scan_of(case, args)
    print(f"[{case}] {phantom} seed {seed}: detector {record['model']} "
          f"{json.dumps({k: record[k] for k in ('low', 'high', 'threshold', 'dither') if record.get(k) is not None})}, "
          + (f"{100 * clipped:.1f}% of rays clipped" if clipped is not None
             else f"{100 * record['fraction_at_high']:.1f}% of the bits read +1")
          + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    facts = Q.facts_of([path])
    results: dict = {"scan": {"phantom": phantom, "seed": seed}, "detector": record, "settings": settings,
                     "methods": {}}
    methods = results["methods"]
    if mod == "ct":
        label, x = fbp_oracle(linear)
        methods["fbp (linear scan)"] = {**row(x, linear, scaled=False), "label": label}
        label, x = fbp_oracle(vol, scale=one_bit)
        methods["fbp"] = {**row(x, vol, scaled=one_bit), "label": label + (", best-scaled" if one_bit else "")}
        if not one_bit:
            from pipeline.classical import CLIPPED_FBP_ITERATIONS, CLIPPED_FBP_STEP

            x = aware_classical(vol, record)
            methods["aware classical iteration"] = {
                **row(x, vol, scaled=False),
                "label": f"clipped FBP (Hann, step {CLIPPED_FBP_STEP:g}, {CLIPPED_FBP_ITERATIONS} iterations)"}
            x = linear_classical(vol)
            methods["classical iteration, linear model"] = {
                **row(x, vol, scaled=False),
                "label": "the same iterations with every ray an equality (what the detector adds is the row above minus this)"}
    else:
        x = linear.op.adjoint(linear.y)
        methods["zero-filled Aᴴy (linear scan)"] = {**row(x, linear, scaled=False), "label": "Aᴴy of the linear data"}
    if one_bit:
        x = vol.op.adjoint(vol.y)
        methods["normalised back-projection"] = {**row(x, vol, scaled=True),
                                                 "label": ("Aᵀy" if mod == "ct" else "Aᴴy") + ", best-scaled"}
    if one_bit and mod == "mri" and record.get("dither") is None:  # the check assumes threshold 0
        x, results["envelope"] = envelope_check(vol)
        methods["Aᴴ(W y), reference envelope (oracle)"] = {
            **row(x, vol, scaled=True), "label": "W: radial mean of |A x_ref|, best-scaled (reads the reference)"}
    if args.pretrain_volumes and one_bit:
        raise SystemExit(f"nonlinear.py: --pretrain-volumes is for the count-floor cases, not {case}")
    for name, mode in (("network, aware", "auto"), ("network, linear model", "ignore")):
        if mode not in args.networks:
            continue
        t = time.perf_counter()
        if args.pretrain_volumes:
            p = pretrained_network(case, mode, settings, args, scratch, device, vol, facts)
            seeds = pretrain_seeds(args)
            how = (f"{recipe_name(case, args)}, loss.detector: {mode}, pretrained self-supervised "
                   f"{args.pretrain_steps} steps on {len(seeds)} earlier {phantom} scans (seeds {seeds[0]}–{seeds[-1]}, "
                   "the same detector, references not read)")
            zs = p["zero_shot"]
            methods[name + ", pretrained (zero-shot)"] = {"psnr": zs["psnr"], "ssim": zs["ssim"], "label": how,
                                                          "train_s": p["pretrain_s"]}
            end = p["curve"][-1]
            methods[name] = {"psnr": end["psnr"], "ssim": end["ssim"], "curve": p["curve"], "train_s": p["finetune_s"],
                             "label": how + f", then fine-tuned {end['step']} steps at lr {args.finetune_lr:g}"}
        else:
            cfg = recipe(case, mode, args)
            model, train_s, _ = Q.train(cfg, facts, [vol], device, label=f"{case} {name}", verbose=args.verbose)
            (x,) = Q.reconstruct(model, [vol])
            methods[name] = {**row(x, vol, scaled=one_bit), "label": f"{recipe_name(case, args)}, loss.detector: {mode}, "
                             f"model.initial_detector: {cfg.model.initial_detector}, {cfg.run.max_steps} steps",
                             "train_s": train_s}
        print(f"[{case}] {name}: PSNR {methods[name]['psnr']:.2f} dB ({time.perf_counter() - t:.0f} s)", flush=True)
    if len(args.networks) == 2:
        results["targets"] = targets(methods, one_bit=one_bit)
    return results


def targets(methods: dict, *, one_bit: bool) -> dict:
    """The issue's targets from the methods' scores (one bit: at the best scale)."""
    key = "psnr_scaled" if one_bit else "psnr"
    aware, lin = methods["network, aware"], methods["network, linear model"]
    out = {"gain_db": aware[key] - lin[key], "gain_met": aware[key] - lin[key] >= GAIN_DB}
    if "fbp" in methods:
        out["above_fbp"] = aware[key] > methods["fbp"][key]
    if "aware classical iteration" in methods:
        out["above_aware_classical"] = aware[key] > methods["aware classical iteration"][key]
    if one_bit:
        out["above_back_projection"] = aware[key] > methods["normalised back-projection"][key]
    return out


def report(case: str, r: dict) -> None:
    one_bit = r["detector"]["model"] == "sign"
    header = ["method", "PSNR dB", "SSIM"] + (["PSNR dB, best scale", "SSIM, best scale"] if one_bit else []) + ["setting"]
    rows = []
    for name, m in r["methods"].items():
        cells = [name, f"{m['psnr']:.2f}", f"{m['ssim']:.4f}"]
        if one_bit:
            cells += [f"{m['psnr_scaled']:.2f}" if "psnr_scaled" in m else "—",
                      f"{m['ssim_scaled']:.4f}" if "ssim_scaled" in m else "—"]
        rows.append(cells + [m["label"]])
    d = r["detector"]
    dither = f", dither ±{d['dither']['amplitude']:.4g}" if one_bit and d.get("dither") is not None else ""
    what = (f"one bit, threshold {d['threshold']:.4g}{dither}, {100 * d['fraction_at_high']:.1f}% of the bits +1" if one_bit
            else f"count floor, line integrals clipped at {d['high']:.4g}, {100 * d['fraction_at_high']:.1f}% of rays"
            if (d.get("fraction_at_low") or 0) <= (d["fraction_at_high"] or 0) else
            f"saturation, line integrals clipped at {d['low']:.4g}, {100 * d['fraction_at_low']:.1f}% of rays")
    scan = r.get("scan") or dict(zip(("phantom", "seed"), CASES[case][:2]))
    print_table(f"{case}: {scan['phantom']} seed {scan['seed']} ({what})", header, rows)
    e = r.get("envelope")
    if e is not None:
        print(f"spectral envelope: whitening the reference by |k|² keeps {100 * e['whitened_bits_kept']:.1f}% of its "
              f"noiseless bits at {e['whitened_psnr_scaled']:.2f} dB (best scale); the noise flips "
              f"{100 * e['bits_flipped_by_noise']:.1f}% of the data's bits")
    t = r.get("targets")
    if t is None:
        return
    print(f"aware − linear model: {t['gain_db']:+.2f} dB (target ≥ {GAIN_DB:g}: {'met' if t['gain_met'] else 'MISSED'})"
          + (f"; aware above FBP: {'yes' if t['above_fbp'] else 'NO'}" if "above_fbp" in t else "")
          + (f"; above normalised back-projection: {'yes' if t['above_back_projection'] else 'NO'}" if one_bit else ""))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(DEFAULT_CASES))
    p.add_argument("--steps", type=int, default=300, help="training steps of each network (the recipe's schedule)")
    p.add_argument("--clip-fraction", type=float, default=0.12, help="share of all rays at the clip level")
    p.add_argument("--clip-side", choices=("floor", "saturation"), default="floor",
                   help="clip-* cases: a count floor (the most attenuated rays, photon starvation) or a saturation "
                        "(the least attenuated rays read the detector's maximum count)")
    p.add_argument("--one-bit-quantile", type=float, default=0.75,
                   help="the one-bit threshold: this quantile of the linear scan's line integrals")
    p.add_argument("--one-bit-width", type=float, default=0.1, help="the recorded one-bit width (logistic temperature)")
    p.add_argument("--recipe", default=None, help=f"the recipe file in --recipe-dir (default {RECIPE})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--networks", nargs="+", choices=("auto", "ignore", "none"), default=["auto", "ignore"],
                   help="train the aware network (auto), the linear-model one (ignore), both, or none (classical rows only)")
    p.add_argument("--recipe-dir", default=str(ROOT / "launch" / "configs"))
    p.add_argument("--held-out-seed", type=int, default=Q.HELD_OUT_SEED,
                   help="seed of the held-out cases' scan (default 301; 302, 303, ... are fresh held-out scans)")
    pre = p.add_argument_group("pretraining (count-floor cases): pretrain each network on earlier scans, then fine-tune")
    pre.add_argument("--pretrain-volumes", type=int, default=0,
                     help="K > 0: pretrain each network self-supervised on K earlier scans of the case's phantom "
                          f"(seeds {PRETRAIN_SEED}, ...) through the same detector, then fine-tune --steps on the scan")
    pre.add_argument("--pretrain-steps", type=int, default=2000)
    pre.add_argument("--finetune-lr", type=float, default=1e-4, help="the fine-tuning learning rate (finetune_ct_rei.yaml's)")
    p.add_argument("--shape", type=int, nargs=3, default=[16, 96, 96])
    p.add_argument("--angles", type=int, default=60)
    p.add_argument("--photons", type=float, default=1e4)
    p.add_argument("--chunk-depth", type=int, default=4)
    mri = p.add_argument_group("MRI (one-bit-mri: multi-coil Cartesian, as benchmarks/quality.py)")
    mri.add_argument("--coils", type=int, default=8)
    mri.add_argument("--acceleration", type=float, default=4.0)
    mri.add_argument("--calibration", type=int, default=20)
    mri.add_argument("--noise-sigma", type=float, default=0.01)
    mri.add_argument("--dither-quantile", type=float, default=0.99,
                     help="*-dither cases: the dither amplitude Δ is this quantile of |parts| of the linear scan")
    mri.add_argument("--mri-one-bit-width", type=float, default=0.05, help="the recorded one-bit width (k-space units)")
    mri.add_argument("--mri-recipe", default=MRI_RECIPE, help=f"the MRI recipe in --recipe-dir (default {MRI_RECIPE})")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--scratch", default=None, help="folder for the scans (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="smoke test: 4x32x32 scans, 6 steps (figures mean nothing)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.set = ["model.widths=[4, 8]", "data.slab_thickness=4"] + list(args.set)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    scratch, tmp = _scratch_dir(args.scratch, "recon3d-nonlinear-")
    t0 = time.perf_counter()
    results = {case: run_case(case, args, scratch, device) for case in args.cases}
    print(f"\n{machine_line()}  device {device}, {args.threads} thread(s)")
    for case in args.cases:
        report(case, results[case])
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "threads": args.threads, "total_s": total,
                                               "args": vars(args), "cases": results}, indent=2, default=str))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
