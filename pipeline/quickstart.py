"""The main job on its built-in default: a simulated 3D multi-coil MRI scan and its baselines.

Today's path (later issues grow it into simulate → train → reconstruct → report):

1. simulate a 3D Shepp–Logan volume with a smooth phase, coil maps, a variable-density
   Poisson-disc mask and complex Gaussian noise;
2. apply the hybrid-space multi-coil operator;
3. reconstruct zero-filled (``Aᴴy``), SENSE with the true coil maps, and SENSE with coil maps
   estimated by ESPIRiT from the calibration region;
4. write ``report.json`` (PSNR, NMSE, timings), ``report.md`` and ``slices.png`` (orthogonal
   slices of reference, reconstructions and absolute errors) into the output directory.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from operators3d import (
    GaussianNoise,
    MultiCoilMRI,
    acceleration_of,
    estimate_coil_maps,
    poisson_disc_mask,
    sense_cg,
    shepp_logan_3d,
    simulate_coil_maps,
)
from pipeline.data.phantoms import smooth_phase_slab
from pipeline.reconstruct.metrics import nmse, psnr


@dataclass(frozen=True)
class QuickstartConfig:
    """Settings of the built-in default job."""

    out: Path = Path("outputs/quickstart")
    shape: tuple[int, int, int] = (24, 128, 128)
    coils: int = 8
    acceleration: float = 4.0
    calibration: int = 20
    noise_sigma: float = 0.001
    sense_iters: int = 30
    l2_weight: float = 1e-3
    seed: int = 0

    def validate(self) -> None:
        if len(self.shape) != 3 or any(s < 4 for s in self.shape):
            raise ValueError(f"--shape must be three sizes >= 4, got {self.shape}")
        if self.coils < 1:
            raise ValueError(f"--coils must be >= 1, got {self.coils}")
        if self.acceleration < 1:
            raise ValueError(f"--acceleration must be >= 1, got {self.acceleration}")
        if self.noise_sigma < 0:
            raise ValueError(f"--noise-sigma must be >= 0, got {self.noise_sigma}")


@dataclass
class QuickstartResult:
    """What the job measured; also written as ``report.json``."""

    config: dict
    acceleration: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def _save_slices(volumes: dict[str, torch.Tensor], reference: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = reference.abs()
    vmax = float(ref.max())
    d, h, w = ref.shape
    cuts = {
        "axial (D)": lambda v: v[d // 2],
        "coronal (H)": lambda v: v[:, h // 2, :],
        "sagittal (W)": lambda v: v[:, :, w // 2],
    }
    columns = [("reference", ref, vmax)]
    for name, vol in volumes.items():
        columns.append((name, vol.abs(), vmax))
        columns.append((f"|error| {name}", (vol.abs() - ref).abs(), vmax / 4))
    fig, axes = plt.subplots(len(cuts), len(columns), figsize=(2.2 * len(columns), 2.3 * len(cuts)))
    for row, (cut_name, cut) in enumerate(cuts.items()):
        for col, (name, vol, top) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(cut(vol).numpy(), cmap="gray", vmin=0, vmax=top, aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
            if col == 0:
                ax.set_ylabel(cut_name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_quickstart(config: QuickstartConfig, *, log=print) -> QuickstartResult:
    """Run the default job and write its report; returns what was measured."""
    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(config.seed)
    result = QuickstartResult(config={k: str(v) if isinstance(v, Path) else v
                                      for k, v in asdict(config).items()}, acceleration=0.0)
    d, h, w = config.shape

    t0 = time.perf_counter()
    reference = shepp_logan_3d(config.shape).to(torch.complex64) * smooth_phase_slab(config.shape, 0, d)
    maps = simulate_coil_maps(config.coils, config.shape)
    mask = poisson_disc_mask((h, w), config.acceleration, calibration=config.calibration,
                             generator=gen)
    op = MultiCoilMRI(mask=mask, coil_maps=maps)
    clean = op(reference)
    noise = GaussianNoise(config.noise_sigma * float(clean.abs().max()))
    y = noise.sample(clean, generator=gen, mask=mask)
    result.acceleration = acceleration_of(mask)
    result.seconds["simulate"] = time.perf_counter() - t0
    log(f"simulated {config.coils}-coil scan {tuple(y.shape)}, acceleration "
        f"{result.acceleration:.2f}, noise sigma {noise.sigma:.3g}")

    recons: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    recons["zero-filled"] = op.adjoint(y)
    result.seconds["zero-filled"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    recons["SENSE"] = sense_cg(y, op, l2_weight=config.l2_weight, num_iters=config.sense_iters)
    result.seconds["SENSE"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    est_maps = estimate_coil_maps(y, calibration=config.calibration)
    result.seconds["ESPIRiT"] = time.perf_counter() - t0
    op_est = MultiCoilMRI(mask=mask, coil_maps=est_maps.to(maps.dtype))
    t0 = time.perf_counter()
    recons["SENSE (ESPIRiT maps)"] = sense_cg(y, op_est, l2_weight=config.l2_weight,
                                              num_iters=config.sense_iters)
    result.seconds["SENSE (ESPIRiT maps)"] = time.perf_counter() - t0

    # ESPIRiT maps carry their own phase and vanish outside the object: compare magnitudes
    # inside the object, where every method is defined.
    support = reference.abs() > 0
    for name, vol in recons.items():
        result.metrics[name] = {
            "psnr_db": round(psnr(vol, reference), 3),
            "psnr_db_in_object": round(psnr(vol, reference, mask=support), 3),
            "nmse": round(nmse(vol, reference), 5),
        }
        log(f"{name:>22s}: PSNR {result.metrics[name]['psnr_db']:6.2f} dB  "
            f"(in object {result.metrics[name]['psnr_db_in_object']:6.2f} dB)  "
            f"{result.seconds[name]:.2f} s")

    png = out / "slices.png"
    _save_slices(recons, reference, png)
    torch.save({"reference": reference, **recons}, out / "volumes.pt")
    result.files = {"slices": str(png), "volumes": str(out / "volumes.pt"),
                    "report": str(out / "report.json")}
    (out / "report.json").write_text(json.dumps(asdict(result), indent=2))
    (out / "report.md").write_text(_markdown(result))
    log(f"wrote {out / 'report.md'}, {png}")
    return result


def _markdown(result: QuickstartResult) -> str:
    lines = [
        "# recon3d quickstart report",
        "",
        f"Simulated 3D multi-coil MRI, shape {result.config['shape']}, "
        f"{result.config['coils']} coils, acceleration {result.acceleration:.2f} "
        f"(Poisson disc, calibration {result.config['calibration']}).",
        "",
        "| method | PSNR (dB) | PSNR in object (dB) | NMSE | time (s) |",
        "|---|---|---|---|---|",
    ]
    for name, m in result.metrics.items():
        lines.append(f"| {name} | {m['psnr_db']:.2f} | {m['psnr_db_in_object']:.2f} | "
                     f"{m['nmse']:.4f} | {result.seconds[name]:.2f} |")
    lines += ["", "![orthogonal slices](slices.png)", ""]
    if not all(math.isfinite(m["psnr_db"]) for m in result.metrics.values()):
        lines.append("Some PSNR values are not finite.")
    return "\n".join(lines)
