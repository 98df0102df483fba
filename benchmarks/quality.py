"""Reconstruction quality on simulated data the tests do not use (issue 7).

    .venv/bin/python benchmarks/quality.py [--modality mri|ct|all] [--steps N] [--volumes 3]
        [--train-volumes 4] [--shape 16 128 128] [--slab 4] [--threads 1] [--scratch DIR]
        [--methods ...] [--json FILE] [--device cpu|cuda]

Data (made here with ``recon3d simulate`` into ``--scratch``, a temporary folder by default):
ellipsoid phantoms (a body ellipsoid with seeded random inner ellipsoids), training volumes of
seeds 101, 102, … and held-out test volumes of seeds 201, 202, … (the tests use other seeds).

* **MRI**: 8 coils, 6× variable-density 2D Poisson-disc mask over ``(ky, kz) = (H, W)`` with a
  20×20 calibration block (D is the fully sampled readout), complex Gaussian noise σ = 0.01 per
  part (absolute; the image maximum is 1.3–1.7), a smooth phase. Each seed draws its own
  phantom, mask and coil maps.
* **CT**: parallel beam, 60 angles over ``[0, π)``, transmission Poisson noise with
  ``I0 = 10⁴`` photons before ``−log``; attenuation 4 through the full width.

Methods (the learned ones share one network, initialisation, optimiser, step count, slab
size and schedule; only the loss differs):

* classical baselines — MRI: zero-filled ``Aᴴy`` and SENSE by CG (a small grid of Tikhonov
  weights λ and iteration counts, the best on the test volumes reported: an oracle-tuned
  baseline); CT: FBP with the best of four ramp windows (also oracle-tuned);
* ``ei`` — equivariant imaging (MC + α·EI, random in-plane rotations by any angle; α = 1 for
  MRI, 10⁴ for CT, see :func:`ei_weight`);
* ``rei`` — robust EI (SURE + α·EI with fresh noise in the second pass). MRI: Gaussian SURE
  with the known σ. CT: the scan's transmission noise (:class:`operators3d.TransmissionNoise`,
  variance ``e^{p}/I₀`` per ray) and SURE of the image-domain error (``metric="image"``, GSURE
  through FBP's ramp metric), α = 1;
* ``ssdu`` — SSDU (MRI; ρ = 0.4, normalised ℓ₂+ℓ₁, calibration block kept in the input),
  ``n2i`` — Noise2Inverse (CT, 2 angle subsets; evaluation averages over the subsets);
* ``supervised`` — MSE against the reference.

Network (the recipe; ``--mri-arch``/``--ct-arch`` and the options of the "recipe" group change
it): a residual 2-level :class:`UNet3D` (widths 16, 32) whose last convolution starts at zero,
so every method starts from the initial estimate. MRI: :class:`~pipeline.models.UnrolledNetwork`
with one iteration of CG data consistency (MoDL-style, learned weight λ, 5 CG iterations) on a
SENSE initial estimate (10 CG iterations); CT: :class:`~pipeline.models.ArtifactRemoval` on a
differentiable FBP with a Hann window (``fbp_filter="hann"``; Noise2Inverse's targets use
the same FBP, with 2 angle subsets). Each volume has one intensity scale (:func:`~pipeline.models.scan_intensity_scale`),
so a slab sees the same scaling as the whole volume. Training draws one random D-slab of
``--slab`` slices from a random training volume per step (Adam, learning rate 1e-3
cosine-decayed to 0); evaluation reconstructs each whole test volume.

Metrics: PSNR and SSIM of magnitudes (:mod:`pipeline.reconstruct.metrics`), data range the
maximum of each reference, averaged over the test volumes. The table gives the difference of
each method's PSNR to the best classical baseline and to the supervised network, and the train
seconds; then the two targets of issue 7: the best self-supervised method within 1.5 dB of
supervised, and ≥ 3 dB above the best classical baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine_line, print_table  # noqa: E402

CLASSICAL = {"mri": ("zero-filled", "sense"), "ct": ("fbp",)}
LEARNED = {"mri": ("ei", "rei", "ssdu", "supervised"), "ct": ("ei", "rei", "n2i", "supervised")}
DEFAULT_METHODS = {"mri": ("zero-filled", "sense", "ei", "rei", "ssdu", "supervised"),
                   "ct": ("fbp", "ei", "rei", "n2i", "supervised")}
SELF_SUPERVISED = ("ei", "rei", "ssdu", "n2i")
TRAIN_SEED, TEST_SEED = 101, 201
DEFAULT_STEPS = {"mri": 600, "ct": 800}  # where both targets of issue 7 hold (BENCHMARKS.md)
CT_EI_WEIGHT = 1e4  # see ei_weight()


# ----------------------------------------------------------------------------- data
@dataclass
class Volume:
    """One simulated scan in memory: measurements, its operator and the reference."""

    name: str
    y: torch.Tensor
    op: object
    reference: torch.Tensor
    modality: str
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


def simulate(modality: str, seed: int, args, scratch: Path) -> Path:
    from pipeline.data import SimulateCTConfig, SimulateMRIConfig, simulate_ct, simulate_mri

    shape = tuple(args.shape)
    out = scratch / f"{modality}_{'x'.join(map(str, shape))}_{seed}.zarr"
    if modality == "mri":
        simulate_mri(SimulateMRIConfig(
            out=str(out), shape=shape, coils=args.coils, acceleration=args.acceleration,
            calibration=args.calibration, phantom=args.phantom, noise_sigma=args.noise_sigma,
            seed=seed, progress=False,
        ))
    else:
        simulate_ct(SimulateCTConfig(
            out=str(out), shape=shape, angles=args.angles, geometry="parallel",
            phantom=args.phantom, photons=args.photons, seed=seed, progress=False,
        ))
    return out


def load(path: Path, modality: str, device: torch.device) -> Volume:
    from pipeline.data import open_scan

    scan = open_scan(str(path))
    depth = scan.metadata.volume_shape[0]
    y, op = scan.slab(slice(0, depth))
    ref = scan.reference.read_torch()
    return Volume(path.stem, y.to(device), op.to(device), ref.to(device), modality)


# ----------------------------------------------------------------------------- baselines
@torch.no_grad()
def classical(modality: str, method: str, test: list[Volume], args) -> tuple[str, list]:
    """The baseline's label and its reconstructions (the best setting on the test volumes)."""
    from operators3d import sense_cg
    from operators3d.ct import fbp

    if method == "zero-filled":
        return "zero-filled Aᴴy", [v.op.adjoint(v.y) for v in test]
    if method == "sense":
        candidates = [(f"SENSE λ={lam:g}, {it} CG", lambda v, lam=lam, it=it: sense_cg(
            v.y, v.op, l2_weight=lam, num_iters=it, tol=0.0))
            for lam in (3e-3, 1e-2, 3e-2) for it in (10, 30)]
    elif method == "fbp":
        candidates = [(f"FBP {f}", lambda v, f=f: fbp(v.y, v.op, filter=f))
                      for f in ("ram-lak", "shepp-logan", "cosine", "hann")]
    else:
        raise ValueError(method)
    best = None
    for label, fn in candidates:
        xs = [fn(v) for v in test]
        score = sum(_metrics(x, v)[0] for x, v in zip(xs, test)) / len(test)
        if best is None or score > best[0]:
            best = (score, label, xs)
    return best[1], best[2]


# ----------------------------------------------------------------------------- models
def build_model(modality: str, args) -> torch.nn.Module:
    from pipeline.models import ArtifactRemoval, UNet3D, UnrolledNetwork

    channels = 2 if modality == "mri" else 1
    backbone = UNet3D(channels, channels, widths=list(args.widths))
    if not args.no_zero_init:  # start at the initial estimate: the residual U-Net's last convolution is 0
        last = backbone.head
        torch.nn.init.zeros_(last.weight)
        if last.bias is not None:
            torch.nn.init.zeros_(last.bias)
    initial = args.mri_initial if modality == "mri" else args.ct_initial
    window = {"fbp_filter": args.ct_filter} if modality == "ct" else {}
    arch = args.mri_arch if modality == "mri" else args.ct_arch
    if arch == "unrolled":
        return UnrolledNetwork(backbone, num_iters=args.unroll, data_consistency="cg",
                               initial=initial, cg_iters=args.cg_iters, **window)
    kw = {"sense_iters": args.sense_iters, "sense_l2": args.sense_l2} if modality == "mri" else window
    return ArtifactRemoval(backbone, initial=initial, **kw)


def _fbp_with(window: str):
    """The differentiable FBP initial estimate with another ramp window."""
    from pipeline.models import filtered_backprojection

    def fbp_window(y, op):
        return filtered_backprojection(y, op, filter=window)

    fbp_window.__name__ = f"fbp_{window}"
    return fbp_window


def ei_weight(modality: str, method: str, args) -> float:
    """The EI weight α: ``--ei-weight``, else 1, except ``CT_EI_WEIGHT`` for CT's plain EI.

    The MC term is a mean over measurements and the EI term a mean over voxels, so their
    balance depends on the operator's scale: MRI's operator is near-unitary (``‖A‖² ≈ 1``), the
    CT projector sums a ray's voxels (here the MC term's curvature is ``‖A‖²·n/m ≈ 1.7·10⁴``
    times the EI term's), and α = 1 leaves EI without effect there. CT's robust EI measures
    its SURE term in the image metric (``metric="image"``), which has the image's scale: α = 1.
    """
    if args.ei_weight is not None:
        return args.ei_weight
    if modality == "ct" and (method == "ei" or args.ct_sure_metric == "measurement"):
        return CT_EI_WEIGHT
    return 1.0


def build_loss(modality: str, method: str, args):
    import operators3d
    from operators3d import GaussianNoise, TransmissionNoise
    from pipeline.losses import (
        EquivariantImagingLoss,
        MeasurementConsistencyLoss,
        Noise2InverseLoss,
        SSDULoss,
        SupervisedLoss,
        SureGaussianLoss,
    )

    seed = args.seed + 1000
    transform = {"rotate": operators3d.Rotate, "rotate90": operators3d.Rotate90}[args.ei_transform]
    if method == "supervised":
        return SupervisedLoss()
    if method == "ei":
        ei = EquivariantImagingLoss(transform=transform, seed=seed)
        return MeasurementConsistencyLoss() + ei_weight(modality, method, args) * ei
    if method == "rei":
        noise = GaussianNoise(args.noise_sigma) if modality == "mri" else TransmissionNoise(args.photons)
        ei = EquivariantImagingLoss(transform=transform, noise_model=noise, seed=seed + 1)
        metric = "measurement" if modality == "mri" else args.ct_sure_metric
        return SureGaussianLoss(noise_model=noise, metric=metric, seed=seed) + ei_weight(modality, method, args) * ei
    if method == "ssdu":
        return SSDULoss(rho=args.ssdu_rho, weighted=args.ssdu_weighted, metric=args.ssdu_metric,
                        calibration=args.ssdu_calibration, seed=seed)
    if method == "n2i":
        target = None if args.ct_filter == "ram-lak" else _fbp_with(args.ct_filter)
        return Noise2InverseLoss(num_splits=args.n2i_splits, reconstruct=target, seed=seed)
    raise ValueError(method)


def num_steps(modality: str, args) -> int:
    """``--steps``, else the modality's default (``DEFAULT_STEPS``)."""
    return args.steps if args.steps is not None else DEFAULT_STEPS[modality]


def set_scales(model: torch.nn.Module, volumes: list[Volume]) -> None:
    """One intensity scale per volume (the RMS of the initial estimate over the whole volume)."""
    from pipeline.models import scan_intensity_scale

    for v in volumes:
        v.scale = scan_intensity_scale(model, [(v.y, v.op)])


def train(modality: str, method: str, train_vols: list[Volume], args, device) -> tuple:
    from pipeline.models import intensity_scale

    torch.manual_seed(args.seed)  # the same initial weights for every method
    model = build_model(modality, args).to(device)
    set_scales(model, train_vols)
    loss = build_loss(modality, method, args).to(device)
    model = loss.adapt_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = num_steps(modality, args)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(args.seed)
    supervised = method == "supervised"
    model.train()
    t0 = time.perf_counter()
    history = []
    for step in range(steps):
        v = train_vols[int(torch.randint(len(train_vols), (1,), generator=gen))]
        d0 = int(torch.randint(v.depth - args.slab + 1, (1,), generator=gen))
        y, op, ref = v.slab(d0, args.slab)
        with intensity_scale(model, v.scale):
            x_hat = model(y, op)
            out = loss(x_hat, y, op, model, reference=ref) if supervised else loss(x_hat, y, op, model)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sched.step()
        history.append(float(out.total.detach()))
        if args.verbose and (step + 1) % max(1, steps // 10) == 0:
            print(f"    {modality} {method} step {step + 1}: loss {sum(history[-10:]) / len(history[-10:]):.4g}",
                  flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model, time.perf_counter() - t0


@torch.no_grad()
def reconstruct(model: torch.nn.Module, test: list[Volume]) -> list[torch.Tensor]:
    from pipeline.models import intensity_scale

    model.eval()
    set_scales(model, test)
    xs = []
    for v in test:
        with intensity_scale(model, v.scale):
            xs.append(model(v.y, v.op))
    return xs


# ----------------------------------------------------------------------------- metrics
def _metrics(x: torch.Tensor, v: Volume) -> tuple[float, float]:
    from pipeline.reconstruct.metrics import psnr, ssim

    x, ref = x.detach().cpu(), v.reference.cpu()
    peak = float(ref.abs().max())
    return psnr(x, ref, data_range=peak), ssim(x, ref, data_range=peak)


def score(xs: list[torch.Tensor], test: list[Volume]) -> dict:
    per = [_metrics(x, v) for x, v in zip(xs, test)]
    return {"psnr": sum(p for p, _ in per) / len(per), "ssim": sum(s for _, s in per) / len(per),
            "psnr_per_volume": [p for p, _ in per], "ssim_per_volume": [s for _, s in per]}


# ----------------------------------------------------------------------------- driver
def run_modality(modality: str, args, scratch: Path, device: torch.device) -> dict:
    methods = [m for m in args.methods if m in CLASSICAL[modality] + LEARNED[modality]] \
        if args.methods else list(DEFAULT_METHODS[modality])
    t0 = time.perf_counter()
    train_paths = [simulate(modality, TRAIN_SEED + i, args, scratch) for i in range(args.train_volumes)]
    test_paths = [simulate(modality, TEST_SEED + i, args, scratch) for i in range(args.volumes)]
    train_vols = [load(p, modality, device) for p in train_paths]
    test_vols = [load(p, modality, device) for p in test_paths]
    print(f"[{modality}] simulated {len(train_vols)} training + {len(test_vols)} test volumes of "
          f"{tuple(args.shape)} in {time.perf_counter() - t0:.1f} s", flush=True)
    results = {}
    for method in methods:
        t = time.perf_counter()
        if method in CLASSICAL[modality]:
            label, xs = classical(modality, method, test_vols, args)
            train_s = None
        else:
            model, train_s = train(modality, method, train_vols, args, device)
            xs = reconstruct(model, test_vols)
            label = method
        res = score(xs, test_vols)
        res.update(label=label, train_s=train_s, total_s=time.perf_counter() - t)
        results[method] = res
        print(f"[{modality}] {method:12s} {label:28s} PSNR {res['psnr']:.2f} dB  SSIM "
              f"{res['ssim']:.4f}  ({res['total_s']:.0f} s)", flush=True)
    return results


def report(modality: str, results: dict, args) -> dict:
    classical_m = [m for m in CLASSICAL[modality] if m in results]
    best_classical = max((results[m]["psnr"] for m in classical_m), default=None)
    sup = results.get("supervised", {}).get("psnr")
    rows = []
    for m, r in results.items():
        d_base = "" if best_classical is None else f"{r['psnr'] - best_classical:+.2f}"
        d_sup = "" if sup is None else f"{r['psnr'] - sup:+.2f}"
        rows.append([m, r["label"], f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", d_base, d_sup,
                     "" if r["train_s"] is None else f"{r['train_s']:.0f}"])
    title = {"mri": f"MRI, {args.coils} coils, {args.acceleration:g}× Poisson disc, σ={args.noise_sigma:g}",
             "ct": f"CT, parallel beam, {args.angles} angles, I0={args.photons:g}"}[modality]
    print_table(
        f"{title}; {args.volumes} test volumes {tuple(args.shape)}, {num_steps(modality, args)} steps",
        ["method", "setting", "PSNR dB", "SSIM", "Δ best classical", "Δ supervised", "train s"],
        rows,
    )
    checks = {}
    ssl = [m for m in SELF_SUPERVISED if m in results]
    if ssl:
        best = max(ssl, key=lambda m: results[m]["psnr"])
        p = results[best]["psnr"]
        if sup is not None:
            ok = p >= sup - 1.5
            checks["within_1.5dB_of_supervised"] = {"method": best, "gap_db": p - sup, "met": ok}
            print(f"target: best self-supervised ({best}) within 1.5 dB of supervised: "
                  f"{p - sup:+.2f} dB -> {'MET' if ok else 'NOT MET'}")
        if best_classical is not None:
            ok = p >= best_classical + 3.0
            checks["3dB_above_classical"] = {"method": best, "gain_db": p - best_classical, "met": ok}
            print(f"target: best self-supervised ({best}) >= 3 dB above the best classical baseline: "
                  f"{p - best_classical:+.2f} dB -> {'MET' if ok else 'NOT MET'}")
    return checks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modality", choices=("mri", "ct", "all"), default="all")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every learned method (default: 600 for MRI, 800 for CT)")
    p.add_argument("--volumes", type=int, default=3, help="held-out test volumes per modality")
    p.add_argument("--train-volumes", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3, default=(16, 128, 128))
    p.add_argument("--slab", type=int, default=4, help="D-slices per training step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scratch", default=None, help="folder for the simulated scans (default: a temp dir)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of zero-filled sense fbp ei rei ssdu n2i supervised")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print the training loss")
    g = p.add_argument_group("data")
    g.add_argument("--phantom", default="ellipsoids")
    g.add_argument("--coils", type=int, default=8)
    g.add_argument("--acceleration", type=float, default=6.0)
    g.add_argument("--calibration", type=int, default=20)
    g.add_argument("--noise-sigma", type=float, default=0.01)
    g.add_argument("--angles", type=int, default=60)
    g.add_argument("--photons", type=float, default=1e4)
    g = p.add_argument_group("recipe (the same for every learned method)")
    g.add_argument("--mri-arch", choices=("artifact", "unrolled"), default="unrolled",
                   help="artifact: U-Net on the initial estimate; unrolled: U-Net + CG data consistency")
    g.add_argument("--ct-arch", choices=("artifact", "unrolled"), default="artifact")
    g.add_argument("--widths", type=int, nargs="+", default=(16, 32))
    g.add_argument("--mri-initial", default="sense")
    g.add_argument("--ct-initial", default="fbp")
    g.add_argument("--ct-filter", default="hann", help="ramp window of the FBP initial estimate (and N2I target)")
    g.add_argument("--no-zero-init", action="store_true",
                   help="keep the U-Net's random last convolution (default: zeroed, so training starts at the initial estimate)")
    g.add_argument("--sense-iters", type=int, default=10,
                   help="SENSE initial estimate of --mri-arch artifact (the unrolled network's is 10 CG, λ = 0)")
    g.add_argument("--sense-l2", type=float, default=1e-2, help="its Tikhonov weight")
    g.add_argument("--unroll", type=int, default=1, help="iterations of --*-arch unrolled")
    g.add_argument("--cg-iters", type=int, default=5, help="CG iterations of each data-consistency step")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--clip", type=float, default=0.0)
    g.add_argument("--ei-weight", type=float, default=None,
                   help=f"EI weight α (default: 1, but {CT_EI_WEIGHT:g} for CT's MC + EI, see ei_weight())")
    g.add_argument("--ei-transform", choices=("rotate", "rotate90"), default="rotate")
    g.add_argument("--ct-sure-metric", choices=("measurement", "image"), default="image",
                   help="CT robust EI: SURE of the measurement MSE or of the image-domain MSE (GSURE)")
    g.add_argument("--ssdu-rho", type=float, default=0.4)
    g.add_argument("--ssdu-metric", choices=("l1l2", "mse"), default="l1l2")
    g.add_argument("--ssdu-weighted", action="store_true")
    g.add_argument("--ssdu-calibration", type=int, default=None,
                   help="centre block kept out of the loss set (default: the mask's calibration)")
    g.add_argument("--n2i-splits", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tmp = None
    if args.scratch is None:
        tmp = tempfile.TemporaryDirectory(prefix="recon3d-quality-")
        scratch = Path(tmp.name)
    else:
        scratch = Path(args.scratch)
        scratch.mkdir(parents=True, exist_ok=True)
    modalities = ("mri", "ct") if args.modality == "all" else (args.modality,)
    out = {"machine": machine_line(), "device": str(device), "args": vars(args) | {"shape": list(args.shape)}}
    t0 = time.perf_counter()
    all_results = {}
    for modality in modalities:
        all_results[modality] = run_modality(modality, args, scratch, device)
    print(f"\n{machine_line()}  device {device}")
    for modality in modalities:
        checks = report(modality, all_results[modality], args)
        out[modality] = {"results": all_results[modality], "targets": checks}
    out["total_s"] = time.perf_counter() - t0
    print(f"\ntotal {out['total_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
