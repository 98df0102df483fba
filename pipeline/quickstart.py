"""The main job on its built-in default: simulate → train (2 processes) → reconstruct →
evaluate → report, on a simulated scan, with the classical baseline beside it.

Every step is one of recon3d's own commands, run in order on files under ``--out``:

1. ``simulate`` a scan with a reference (low-dose parallel-beam CT, Poisson noise, by default;
   ``--modality mri``: 3D multi-coil MRI, 2D Poisson-disc mask, Gaussian noise);
2. ``reconstruct --method fbp|sense`` — the classical baseline, and ``--method tv`` (total
   variation, PDHG; skipped with ``--no-tv``) — the strongest classical method on piecewise
   smooth objects like this phantom; both choose their parameters from the scan's noise model;
3. ``train`` the self-supervised recipe of :func:`train_config` on ``--nproc`` processes
   (``torchrun``), checkpointing as it goes (written to ``OUT/train.yaml``);
4. ``reconstruct --model`` — the whole scan with the trained network, slab by slab;
5. ``evaluate`` both against the reference and ``report`` (slices, errors, training curves).

The job resumes where it stopped when rerun with the same ``--out``: the scan, the finished
reconstructions and the training checkpoints are reused. ``OUT/summary.json`` and
``OUT/README.md`` hold the result, with the network's PSNR and SSIM against each classical
method. "Beats" means a higher PSNR **and** a higher SSIM against the reference (whole volume,
``recon3d evaluate``): the exit status is 0 when the network beats the FBP/SENSE baseline, 3 when
it does not. Its place against TV is reported (``beats_best_classical`` in the summary), not in
the exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal

import yaml
from pydantic import Field, model_validator

from pipeline.config_base import Settings
from pipeline.errors import Recon3dError
from pipeline.log import say

MODALITIES = ("ct", "mri")
#: A side of the quickstart volume: at least 4 voxels.
_Size = Annotated[int, Field(ge=4)]


class QuickstartConfig(Settings):
    """Settings of the built-in default job (``recon3d quickstart --help``)."""

    _where: ClassVar[str] = "quickstart"
    _flags: ClassVar[bool] = True
    out: Path = Path("outputs/quickstart")
    modality: Literal[MODALITIES] = "ct"
    shape: tuple[_Size, _Size, _Size] = (32, 128, 128)
    # CT
    angles: int = Field(180, ge=4)
    photons: float = Field(2000.0, gt=0)
    # MRI
    coils: int = Field(8, ge=1)
    acceleration: float = Field(6.0, ge=1)
    calibration: int = 20
    noise_sigma: float = Field(0.01, ge=0)
    # training
    steps: int = Field(500, ge=1)
    nproc: int = Field(2, ge=1)
    seed: int = 0
    overrides: tuple[str, ...] = ()
    progress: bool = True
    tv: bool = True  # also reconstruct with TV (auto parameters), the strongest classical method here
    # the reference-free error estimates of the network and the baseline (evaluate --estimate),
    # beside the true PSNRs: what a user without a reference would be told, and how far off it is
    estimate: bool = True

    @model_validator(mode="after")
    def _two_slabs(self) -> "QuickstartConfig":
        if self.shape[0] < 2 * self.slab_thickness:
            raise ValueError(f"--shape: D must be >= {2 * self.slab_thickness} (two training slabs)")
        return self

    @property
    def slab_thickness(self) -> int:
        """Training slab (and scan chunk) depth; ``--set data.slab_thickness`` takes multiples."""
        return 4

    @property
    def baseline_method(self) -> str:
        return "fbp" if self.modality == "ct" else "sense"


@dataclass
class QuickstartResult:
    """What the job measured; also written as ``summary.json``."""

    config: dict[str, Any]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    beats_baseline: bool = False
    #: whether the network beats every classical method run (the baseline and TV), and which of
    #: them is best
    beats_best_classical: bool = False
    best_classical: str = ""
    #: reconstruction name → estimated_psnr (and its interval) without the reference, with the
    #: same data range as its true PSNR
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)


RECIPES = Path(__file__).resolve().parent.parent / "launch" / "configs"
RECIPE_FILES = {"ct": "ct_n2i.yaml", "mri": "mri_rei.yaml"}


def train_config(config: QuickstartConfig, scan: str) -> dict[str, Any]:
    """The self-supervised recipe trained by the quickstart (written to ``OUT/train.yaml``).

    The shipped recipe file (``launch/configs``, :data:`RECIPE_FILES`) — the same file
    ``recon3d train`` and ``benchmarks/quality.py`` read — with the job's own scan, steps,
    threads, checkpointing and logging. CT: Noise2Inverse (Hendriksen, Pelt & Batenburg 2020)
    with K = 2 angle subsets: a residual 3D U-Net maps the FBP of every other angle to the FBP
    of the remaining ones; the noise of the two halves is independent, so the network learns
    the noise-free image; inference averages the two (``ct_n2i.yaml``). MRI: robust EI (SURE
    with the scan's noise σ + EI with fresh noise, Chen et al. 2022), the U-Net followed by one
    CG data-consistency step on a SENSE initial estimate (``mri_rei.yaml``).
    """
    path = RECIPES / RECIPE_FILES[config.modality]
    if not path.is_file():
        raise Recon3dError(f"quickstart: the recipe {path} is missing (run from a clone of the repository)")
    recipe = yaml.safe_load(path.read_text())
    threads = _threads(config)
    schedule = dict(recipe.get("schedule", {}))
    if "warmup_steps" in schedule:
        schedule["warmup_steps"] = min(int(schedule["warmup_steps"]), config.steps // 10)
    return {
        "run": {"max_steps": config.steps, "seed": config.seed, "threads": threads},
        "data": {"scans": [scan], "slab_thickness": config.slab_thickness, "num_workers": 1},
        "model": recipe["model"],
        "loss": recipe["loss"],
        "optimizer": recipe["optimizer"],
        "schedule": schedule,
        "deepspeed": recipe["deepspeed"],
        "checkpoint": {"every": max(1, min(50, config.steps // 4)), "keep_last": 2},
        "logging": {"progress": config.progress, "tensorboard": False},
    }


def _say(message: str) -> None:
    say(f"[quickstart] {message}", "quickstart")


def _simulate(config: QuickstartConfig, scan: Path) -> None:
    from pipeline.data import SimulateCTConfig, SimulateMRIConfig, simulate_ct, simulate_mri

    if config.modality == "ct":
        simulate_ct(SimulateCTConfig(out=str(scan), shape=tuple(config.shape), angles=config.angles,
                                     phantom="shepp-logan", photons=config.photons, seed=config.seed,
                                     chunk_depth=config.slab_thickness, progress=config.progress))
    else:
        simulate_mri(SimulateMRIConfig(out=str(scan), shape=tuple(config.shape), coils=config.coils,
                                       acceleration=config.acceleration, calibration=config.calibration,
                                       noise_sigma=config.noise_sigma, seed=config.seed,
                                       chunk_depth=config.slab_thickness, progress=config.progress))


def _threads(config: QuickstartConfig) -> int:
    """Torch threads per training process: the CPUs this process may use (affinity, cgroup
    quota; :mod:`pipeline.threads`) shared by the ``--nproc`` processes."""
    from pipeline.threads import threads_per_rank

    return threads_per_rank(config.nproc, env={})


def _train(config: QuickstartConfig, cfg_path: Path, run_dir: Path) -> None:
    """``recon3d train`` on ``nproc`` processes (torchrun), resuming a checkpoint if any."""
    args = ["-m", "pipeline.cli", "train", str(cfg_path), "--run-dir", str(run_dir), "--resume", "auto"]
    for item in config.overrides:
        args += ["--set", item]
    if config.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={config.nproc}", "--max-restarts=0", *args]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(_threads(config))
    _say(" ".join(["recon3d train", str(cfg_path), "--run-dir", str(run_dir), "--resume auto",
                   f"({config.nproc} process{'es' if config.nproc > 1 else ''})"]))
    proc = subprocess.Popen(cmd, env=env)
    interrupted = False
    while True:
        try:
            returncode = proc.wait()
            break
        except KeyboardInterrupt:  # Ctrl-C reached training too: it saves; wait for that, not kill it
            if not interrupted:
                _say("interrupted: training saves at its next step, then stops (Ctrl-C again after 5 s kills it)")
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt(f"training was interrupted and saved; rerun the quickstart with the same "
                                f"--out to resume it ({run_dir})")
    if returncode != 0:
        raise RuntimeError(f"training exited with status {returncode}; rerun the quickstart with "
                           f"the same --out to resume from its last checkpoint ({run_dir}); if it "
                           "diverged (the line above says so), add e.g. --set optimizer.lr=1e-4 first")


def _timed(result: QuickstartResult, name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    value = fn()
    result.seconds[name] = round(time.perf_counter() - t0, 2)
    _say(f"{name}: {result.seconds[name]:.1f} s")
    return value


def run_quickstart(config: QuickstartConfig) -> QuickstartResult:
    """Run the default job end to end; returns (and writes) what it measured."""
    from pipeline.reconstruct import ReconstructConfig, reconstruct
    from pipeline.reconstruct.report import report

    from pipeline.errors import require_extra

    # Checked before hours of work, not after: training and the report's pictures are extras.
    require_extra("deepspeed", "train", "the quickstart's training", load=False)
    require_extra("matplotlib", "report", "the quickstart's report", load=False)
    out = Path(config.out)
    from pipeline.outputs import check_job_folder

    # It writes README.md etc. straight into --out: only a folder of its own may be reused.
    check_job_folder(out, "quickstart", ("scan.zarr", "run", "network.ome.zarr", "train.yaml", "report",
                                         "summary.json", "README.md", "fbp.ome.zarr", "sense.ome.zarr", "tv.ome.zarr"))
    out.mkdir(parents=True, exist_ok=True)
    result = QuickstartResult(config={k: (str(v) if isinstance(v, Path) else v)
                                      for k, v in config.model_dump().items()})
    scan, run_dir = out / "scan.zarr", out / "run"
    baseline, recon = out / f"{config.baseline_method}.ome.zarr", out / "network.ome.zarr"
    tv = out / "tv.ome.zarr"
    t_start = time.perf_counter()

    _timed(result, "simulate", lambda: _simulate(config, scan))
    _timed(result, "baseline", lambda: reconstruct(ReconstructConfig(
        scan=str(scan), out=str(baseline), method=config.baseline_method, progress=config.progress)))
    if config.tv:
        _timed(result, "tv", lambda: reconstruct(ReconstructConfig(
            scan=str(scan), out=str(tv), method="tv", progress=config.progress)))
    cfg_path = out / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(train_config(config, str(scan)), sort_keys=False))
    _timed(result, "train", lambda: _train(config, cfg_path, run_dir))
    _timed(result, "reconstruct", lambda: reconstruct(ReconstructConfig(
        scan=str(scan), out=str(recon), model=str(run_dir), progress=config.progress)))
    image = _timed(result, "evaluate+report", lambda: report(recon, out / "report",
                                                               baselines=[baseline, *([tv] if config.tv else [])]))
    report(run_dir, out / "report" / "training")

    net_name, base_name = "network (self-supervised)", f"{config.baseline_method} (baseline)"
    names = {str(recon): net_name, str(baseline): base_name}
    if config.tv:
        names[str(tv)] = "tv (baseline)"
    for m in image.metrics:
        key = names.get(str(m["out"]), str(m["out"]))
        result.metrics[key] = {k: m[k] for k in ("psnr", "ssim", "nmse") if k in m}
    if config.estimate:
        _timed(result, "estimate", lambda: _estimates(result, image.metrics, {str(recon): net_name,
                                                                             str(baseline): base_name}, scan))
    result.seconds["total"] = round(time.perf_counter() - t_start, 1)
    result.beats_baseline = _beats(result.metrics.get(net_name), result.metrics.get(base_name))
    psnr = {name: result.metrics.get(name, {}).get("psnr") for name in names.values()}
    classical = {k: v for k, v in psnr.items() if k != net_name and v is not None}
    if classical:
        result.best_classical = max(classical, key=classical.get)  # by PSNR; beating it takes both
        result.beats_best_classical = all(_beats(result.metrics.get(net_name), result.metrics[k]) for k in classical)
    result.files = {"scan": str(scan), "run": str(run_dir), "network": str(recon),
                    "baseline": str(baseline), "report": str(image.markdown),
                    "training_report": str(out / "report" / "training" / "report.md")}
    (out / "summary.json").write_text(json.dumps(asdict(result), indent=2))
    (out / "README.md").write_text(_markdown(config, result))
    return result


def _beats(a: dict[str, float] | None, b: dict[str, float] | None) -> bool:
    """Whether reconstruction ``a`` beats ``b``: a higher PSNR and a higher SSIM, both."""
    return bool(a and b) and all(a.get(k) is not None and b.get(k) is not None and a[k] > b[k]
                                 for k in ("psnr", "ssim"))


def _estimates(result: QuickstartResult, metrics: list[dict[str, Any]], names: dict[str, str], scan: Path) -> None:
    """``recon3d evaluate --estimate`` of the network and the baseline, with the reference's
    data range so each estimate compares with its true PSNR."""
    from pipeline.reconstruct.estimate_output import estimate_output

    for m in metrics:
        name = names.get(str(m["out"]))
        if name is None:
            continue
        est = estimate_output(m["out"], str(scan), data_range=m["data_range"])
        result.estimates[name] = {k: est[k] for k in ("estimated_psnr", "estimated_psnr_low", "estimated_psnr_high")}
        result.estimates[name]["of"] = est["of"]


def _markdown(config: QuickstartConfig, result: QuickstartResult) -> str:
    what = (f"low-dose parallel-beam CT, {config.angles} angles, Poisson noise ({config.photons:g} "
            f"photons per ray)" if config.modality == "ct" else
            f"3D {config.coils}-coil MRI, {config.acceleration:g}× Poisson-disc undersampling, "
            f"noise σ {config.noise_sigma:g}")
    lines = [
        "# recon3d quickstart",
        "",
        f"Simulated {what}, volume {tuple(config.shape)}; a 3D U-Net trained without ground truth "
        f"({'Noise2Inverse' if config.modality == 'ct' else 'robust EI'}, recipe in train.yaml) for {config.steps} steps on "
        f"{config.nproc} process(es), then the whole scan reconstructed slab by slab.",
        "",
        "| reconstruction | PSNR (dB) | SSIM | NMSE | estimated PSNR without the reference (dB) |",
        "|---|---|---|---|---|",
    ]
    for name, m in result.metrics.items():
        e = result.estimates.get(name)
        guess = (f"{e['estimated_psnr']:.2f} [{e['estimated_psnr_low']:.2f}, {e['estimated_psnr_high']:.2f}]"
                 if e else "—")
        lines.append(f"| {name} | {m.get('psnr', float('nan')):.2f} | {m.get('ssim', float('nan')):.4f} "
                     f"| {m.get('nmse', float('nan')):.4g} | {guess} |")
    net = result.metrics.get("network (self-supervised)", {})
    verdicts = []
    for name, m in result.metrics.items():
        if name.endswith("(baseline)") and net.get("psnr") is not None and m.get("psnr") is not None:
            d_psnr, d_ssim = net["psnr"] - m["psnr"], net.get("ssim", float("nan")) - m.get("ssim", float("nan"))
            verdict = "beats" if _beats(net, m) else "does NOT beat"
            verdicts.append(f"{verdict} {name.split(' ')[0].upper()} ({d_psnr:+.2f} dB PSNR, {d_ssim:+.3f} SSIM)")
    lines += ["", f"The self-supervised network {' and '.join(verdicts)}. Beating a method means a higher "
              "PSNR and a higher SSIM against the reference (whole volume, `recon3d evaluate`)."]
    if result.estimates:
        of = next(iter(result.estimates.values()))["of"]
        lines += ["", f"The estimated PSNRs are what `recon3d evaluate OUT --estimate` tells a user who has no "
                  f"reference (of {of}; method and accuracy in docs/estimate.md); TV is not estimated here "
                  "(about 45 TV reconstructions per block)."]
    if result.best_classical and not result.beats_best_classical:
        best = result.best_classical.split(" ")[0].upper()
        lines += ["", f"{best} is the best reconstruction of this scan: this recipe at this budget does not "
                  f"beat it (TV suits piecewise-smooth phantoms like this one; see BENCHMARKS.md)."]
    lines += ["",
              "Times (s): " + ", ".join(f"{k} {v}" for k, v in result.seconds.items()), "",
              "Figures: [reconstruction vs baseline](report/report.md), "
              "[training curves](report/training/report.md).", ""]
    return "\n".join(lines)
