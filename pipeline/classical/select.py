"""Reference-free parameters of the classical reconstructions (``--method fbp | sense | tv``).

A short calibration before the slab loop: the measurements of a few evenly spaced D-blocks of
the scan (:func:`calibration_blocks`) are reconstructed with every candidate setting, each
candidate is scored by an unbiased estimate of its error that needs only the data and the
scan's recorded noise model, and the setting of least estimated error is then used for every
slab (so the output is one consistent reconstruction; a resumed job reuses the recorded
choice). The criteria, their papers and the validation are in ``docs/classical.md``:

* FBP (window × cutoff) and TV (weight × iterations): Stein's unbiased risk estimate of the
  error of ``A x̂`` in measurement space (Stein 1981), per-ray variances for transmission CT,
  with a Monte-Carlo divergence (Ramani, Blu & Unser 2008) that is exact here: FBP is linear
  and the TV solver carries the derivative of its iterates (:func:`operators3d.tv.tv_pdhg`).
* SENSE (Tikhonov weight × CG iterations): the generalised SURE (Eldar 2009) of the image
  error in the metric ``W = N (N + μ I)⁻¹``, ``N = AᴴA``, ``μ = σ²/P`` (``P`` the mean signal
  power per voxel): the error of every direction the data determine, where the measurement
  SURE sees only ``A``'s image of it and picks too little regularisation (about 2 dB worse in
  tests). Its cross term uses ``W x_ML = (N + μ)⁻¹ Aᴴy`` (no pseudo-inverse), its quadratic
  terms come from one Lanczos run (:mod:`operators3d.krylov`), its divergence from the exact
  derivative of CG.

Everything here runs on the calibration blocks only; each ``select_*`` returns the record that
``recon3d reconstruct`` stores in the output's attributes (``calibration``). The TV problem
itself (weights, first estimate, one slab's solve) is :mod:`pipeline.classical.tv`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .tv import TVProblem

__all__ = [
    "CALIBRATION_VERSION",
    "FBP_WINDOWS",
    "FBP_CUTOFFS",
    "SENSE_WEIGHTS",
    "SENSE_ITERATIONS",
    "TV_ITERATIONS",
    "calibration_blocks",
    "CalibrationData",
    "calibration_data",
    "measurement_variance",
    "select_fbp",
    "select_sense",
    "select_tv",
]

#: Bumped when a criterion or a grid changes: part of the job's fingerprint.
CALIBRATION_VERSION = 2
FBP_WINDOWS = ("ram-lak", "shepp-logan", "cosine", "hann")
FBP_CUTOFFS = (1.0, 0.8, 0.6, 0.5, 0.4)
#: Tikhonov weights of SENSE relative to ‖AᴴA‖ (1-2-5 steps from 1e-4 to 1).
SENSE_WEIGHTS = tuple(round(m * 10.0**e, 10) for e in range(-4, 0) for m in (1, 2, 5)) + (1.0,)
SENSE_ITERATIONS = (5, 10, 20, 40)
TV_ITERATIONS = (25, 50, 100)
#: The first TV weights tried, as powers of 2 times the noise scale μ₀ (the best was μ₀ on
#: simulated MRI, μ₀/2.8 on simulated CT, whose high frequencies, where TV acts, have less than
#: the mean gain); then extended at an edge (twice at most) and refined by √2 around the best.
_TV_STEPS = (-3, -2, -1, 0, 1)
#: TV weights whose one-probe SURE is within this fraction of the best are compared again with
#: ``TV_CONFIRM_PROBES`` probes in all: neighbouring weights differ by ~1 % in SURE, about one
#: probe's standard deviation, and the single probe picked a neighbour of the truly best weight.
TV_CONFIRM_MARGIN = 0.03
TV_CONFIRM_PROBES = 4
_SEED = 20240614


def calibration_blocks(depth: int, count: int, thickness: int) -> list[tuple[int, int]]:
    """``count`` D-blocks of ``thickness`` slices centred at ``(k + ½) · depth / count``.

    Evenly spaced and deterministic (the same for every rank and every rerun). A volume too
    thin for ``count`` disjoint blocks is calibrated on as a whole (one block ``(0, depth)``):
    overlapping blocks would count slices twice, and their stack would be deeper than the
    scan, which the scan's operator does not describe.
    """
    depth, count = int(depth), max(1, int(count))
    thickness = max(1, min(int(thickness), depth))
    if count * thickness > depth:
        return [(0, depth)]
    out: list[tuple[int, int]] = []
    for k in range(count):
        centre = (k + 0.5) * depth / count
        a = int(round(centre - thickness / 2))
        a = max(0, min(depth - thickness, a))
        if (a, a + thickness) not in out:
            out.append((a, a + thickness))
    return out


@dataclass
class CalibrationData:
    """The calibration blocks stacked along D: measurements, their operator, and the D
    indices where one block ends and the next begins (no TV coupling across them)."""

    y: torch.Tensor
    op: Any
    blocks: list[tuple[int, int]]
    cuts: tuple[int, ...]


def calibration_data(scan, read: Callable[[int, int], tuple[torch.Tensor, Any]],
                     blocks: list[tuple[int, int]], device: torch.device) -> CalibrationData:
    """Read the blocks and stack them into one D-separable problem.

    Parallel-beam CT: the slab operator depends only on the thickness; Cartesian MRI (hybrid
    space): the blocks' coil maps are stacked. Each D-slice is its own problem in both, so
    the stack is exactly the blocks side by side.
    """
    ys, ops = [], []
    for a, b in blocks:
        y, op = read(a, b)
        ys.append(y)
        ops.append(op)
    cuts, total = [], 0
    for a, b in blocks:
        if total:
            cuts.append(total)
        total += b - a
    if scan.modality == "mri":
        from operators3d import MultiCoilMRI

        y = torch.cat(ys, dim=-3)
        op = MultiCoilMRI(mask=ops[0].mask, coil_maps=torch.cat([o.coil_maps for o in ops], dim=-3))
    else:
        y = torch.cat(ys, dim=0)
        op = scan.operator(slice(0, total))
    return CalibrationData(y.to(device), op.to(device), list(blocks), tuple(cuts))


def measurement_variance(noise, y: torch.Tensor) -> torch.Tensor | float | None:
    """The noise variance of each measurement (of each part, for complex data), from the
    scan's noise model: ``σ²`` (Gaussian) or ``e^{y}/I₀`` (CT photon counting, the delta
    method at the measurement); ``None`` for a model without a Gaussian approximation here."""
    from operators3d import GaussianNoise, TransmissionNoise

    if isinstance(noise, GaussianNoise):
        return float(noise.sigma) ** 2
    if isinstance(noise, TransmissionNoise):
        return torch.exp(y.to(torch.float64)).to(y.dtype) / float(noise.photons)
    return None


def _probe(shape, dtype, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        real = torch.empty((), dtype=dtype).real.dtype
        return torch.view_as_complex(torch.randn(tuple(shape) + (2,), generator=g, dtype=real)).to(device)
    return torch.randn(tuple(shape), generator=g, dtype=dtype).to(device)


def _rdot(a: torch.Tensor, b: torch.Tensor) -> float:
    """``Re⟨a, b⟩`` over all entries."""
    if a.is_complex() or b.is_complex():
        return float((a.conj() * b).real.sum()) if a.is_complex() else float((a * b.real).sum())
    return float((a.double() * b.double()).sum())


def _measured(op, y: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    mask = op.measurement_mask()
    if mask is None:
        return None, y.numel()
    return mask.to(y.device), int(torch.broadcast_to(mask, y.shape).sum())


class _SureMeasurement:
    """Stein's unbiased estimate of ``‖A x̂ − A x‖²/m`` (``m`` real measured entries).

    Math:
        ``SURE = (‖A x̂ − y‖² − Σ_i q v_i + 2 Re⟨v ⊙ b, A J_x̂(y) b⟩)/m``, ``b`` a standard normal
        probe on the measured entries (complex: both parts), ``q`` = 2 for complex data, 1 for
        real; ``J_x̂(y) b`` the derivative of the reconstruction along ``b`` (exact here).
    """

    def __init__(self, op, y: torch.Tensor, variance, seed: int) -> None:
        self.op, self.y = op, y
        mask, count = _measured(op, y)
        self.parts = 2 if y.is_complex() else 1
        self.m = count * self.parts
        self.probe = _probe(y.shape, y.dtype, y.device, seed)
        if mask is not None:
            self.probe = self.probe * mask
        v = variance if torch.is_tensor(variance) else torch.full((), float(variance), dtype=y.real.dtype,
                                                                   device=y.device)
        self.weighted = v * self.probe
        full = torch.broadcast_to(v, y.shape)
        self.noise_energy = float((full if mask is None else full * mask).double().sum()) * self.parts

    def __call__(self, x: torch.Tensor, dx: torch.Tensor) -> tuple[float, float, float]:
        """``(sure, residual, divergence)`` per measured entry, for ``x̂`` and ``J b``."""
        r = self.op(x) - self.y
        residual = _rdot(r, r)
        divergence = 2.0 * _rdot(self.weighted, self.op(dx))
        return (residual - self.noise_energy + divergence) / self.m, residual / self.m, divergence / self.m


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return min(rows, key=lambda r: (r["value"], r.get("iterations", 0)))


def _record(method: str, criterion: str, data: CalibrationData, chosen: dict[str, Any],
            rows: list[dict[str, Any]], start: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "version": CALIBRATION_VERSION,
        "method": method,
        "criterion": criterion,
        "slabs": [list(b) for b in data.blocks],
        "seed": _SEED,
        "chosen": chosen,
        "candidates": rows,
        "seconds": round(time.monotonic() - start, 2),
        **(extra or {}),
    }


# ----------------------------------------------------------------------------- FBP
def select_fbp(data: CalibrationData, noise, *, windows: Sequence[str] = FBP_WINDOWS,
               cutoffs: Sequence[float] = FBP_CUTOFFS,
               say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The FBP window and cutoff of least measurement SURE on the calibration blocks.

    FBP is linear, so the divergence is ``⟨v ⊙ b, A FBP_w(b)⟩`` exactly (one probe ``b``).
    Returns the calibration record (``chosen``: ``filter``, ``cutoff``).
    """
    from operators3d.ct import fbp

    start = time.monotonic()
    variance = measurement_variance(noise, data.y)
    sure = _SureMeasurement(data.op, data.y, variance, _SEED)
    rows = []
    say(f"calibrating FBP on D-blocks {data.blocks}: {len(windows) * len(cutoffs)} windows x cutoffs, "
        "criterion SURE of the measurement error")
    for window in windows:
        for cutoff in cutoffs:
            both = fbp(torch.stack([data.y, sure.probe]), data.op, filter=window, cutoff=float(cutoff))
            value, residual, divergence = sure(both[0], both[1])
            rows.append({"filter": window, "cutoff": float(cutoff), "value": value, "residual": residual,
                         "divergence": divergence})
    best = _best(rows)
    return _record("fbp", "sure-measurement", data, {"filter": best["filter"], "cutoff": best["cutoff"]},
                   rows, start, {"units": "estimated mean squared error of A x per measurement"})


# ----------------------------------------------------------------------------- SENSE
def select_sense(data: CalibrationData, noise, *, weights: Sequence[float] = SENSE_WEIGHTS,
                 relative: bool = True, iterations: Sequence[int] = SENSE_ITERATIONS,
                 max_lanczos: int = 1000, say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The SENSE Tikhonov weight and CG iterations of least image-domain GSURE.

    Math:
        For CG's ``k``-th iterate ``h`` on ``(N + λ) x = z`` (``z = Aᴴy``, ``N = AᴴA``), with
        ``G = (N + μ)⁻¹`` and ``W = N G``:
        ``GSURE = ‖h‖² − μ⟨h, G h⟩ − 2⟨h, G z⟩ + 2σ² Re⟨W b, J_h(z) b⟩`` (+ ``‖x‖²_W``, the
        same for every candidate), an unbiased estimate of ``‖h − x‖²_W``: ``G z`` is
        ``W x_ML``, and Stein's lemma on ``z``, whose noise has covariance ``σ²N``, turns
        ``E⟨h, G Aᴴn⟩`` into ``σ² E tr(J W)``. ``h = V c`` in the Lanczos basis of ``(N, z)``
        (CG's iterates for every ``λ``), so ``‖h‖² = ‖c‖²``, ``⟨h, Gh⟩ = cᵀ(T + μ)⁻¹c``,
        ``⟨h, Gz⟩ = ‖z‖ cᵀ(T + μ)⁻¹e₁`` (Gauss quadrature); ``J b`` from
        :func:`~operators3d.krylov.conjugate_gradient_tangent`; ``μ = σ²/P``, ``P`` the mean
        ``|h|²`` of the least-regularised 5-iteration candidate.

    ``weights`` are relative to ``‖N‖`` (the largest Ritz value), or absolute with
    ``relative=False`` (an explicit ``--l2-weight``); the record gives them absolute.
    """
    from operators3d import conjugate_gradient
    from operators3d.krylov import Lanczos, conjugate_gradient_tangent, galerkin_coefficients, tridiagonal

    start = time.monotonic()
    sigma2 = measurement_variance(noise, data.y)
    if sigma2 is None or torch.is_tensor(sigma2):
        raise ValueError("select_sense: needs Gaussian measurement noise with one sigma")
    op = data.op
    normal = op.normal_operator()
    z = op.adjoint(data.y)
    n = z.numel()
    iterations = sorted({int(k) for k in iterations})
    say(f"calibrating SENSE on D-blocks {data.blocks}: {len(weights)} weights x {len(iterations)} "
        "iteration counts, criterion GSURE of the image error")
    # Lanczos from z (double precision), in chunks until the criterion settles.
    krylov = Lanczos(normal, z).extend(min(100, max_lanczos))
    alpha, beta, znorm = krylov.alpha, krylov.beta, krylov.norm
    scale = float(torch.linalg.eigvalsh(tridiagonal(alpha, beta)).max()) if alpha.numel() else 1.0
    if relative:
        lams = [float(f"{float(w) * scale:.3g}") for w in weights]  # absolute, 3 significant digits
    else:
        lams = [float(w) for w in weights]
    probe = _probe(z.shape, z.dtype, z.device, _SEED)
    runs = conjugate_gradient_tangent(normal, z, torch.tensor(lams), num_dims=z.ndim,
                                      checkpoints=iterations, tangent=probe)
    power = float(runs[iterations[0]][0][0].abs().square().mean())
    noise_free = sigma2 == 0.0
    mu = sigma2 / max(power, 1e-30)
    if not noise_free:
        gb = conjugate_gradient(normal, probe, num_dims=z.ndim, num_iters=4000, tol=1e-5, damping=mu)
        wb = probe - mu * gb
        divs = {k: [_rdot(wb, runs[k][1][i]) for i in range(len(lams))] for k in iterations}
        del gb, wb

    def values(a: torch.Tensor, b: torch.Tensor) -> dict[tuple[int, int], float]:
        m = a.shape[0]
        out = {}
        if noise_free:  # no noise: the residual alone, ‖A h − y‖² = ‖y‖² − 2⟨h,z⟩ + ⟨h,Nh⟩
            t = tridiagonal(a, b)
            for k in iterations:
                for i, lam in enumerate(lams):
                    c = galerkin_coefficients(a, b, znorm, k, lam, m)
                    out[(i, k)] = float(c @ t @ c - 2 * znorm * c[0]) / n
            return out
        inv = torch.linalg.inv(tridiagonal(a, b) + mu * torch.eye(m, dtype=torch.float64))
        for k in iterations:
            for i, lam in enumerate(lams):
                c = galerkin_coefficients(a, b, znorm, k, lam, m)
                quad = float(c @ c) - mu * float(c @ inv @ c) - 2 * znorm * float(c @ inv[:, 0])
                out[(i, k)] = (quad + 2 * sigma2 * divs[k][i]) / n
        return out

    current = values(alpha, beta)
    while krylov.steps < max_lanczos and not krylov.exhausted:
        krylov.extend(min(max_lanczos, krylov.steps + 100))
        alpha, beta = krylov.alpha, krylov.beta
        new = values(alpha, beta)
        spread = max(new.values()) - min(new.values())
        change = max(abs(new[key] - current[key]) for key in new)
        current = new
        if change <= 1e-3 * spread:
            break
    rows = [{"l2_weight": lams[i], "l2_weight_relative": lams[i] / scale, "iterations": k, "value": v}
            for (i, k), v in sorted(current.items())]
    best = _best(rows)
    return _record("sense", "noise-free residual" if noise_free else "gsure-image", data,
                   {"l2_weight": best["l2_weight"], "iterations": best["iterations"]}, rows, start,
                   {"units": "estimated squared image error per voxel in the metric W, up to a constant",
                    "metric_mu": mu, "signal_power": power, "normal_norm": scale,
                    "lanczos_steps": krylov.steps})


# ----------------------------------------------------------------------------- TV
def _confirm_tv(rows: list[dict[str, Any]], sure_rows: Callable[[Sequence[float], int], dict[tuple[float, int], float]],
                say: Callable[[str], None], *, margin: float = TV_CONFIRM_MARGIN,
                probes: int = TV_CONFIRM_PROBES) -> dict[str, Any]:
    """The best row after the close candidates are compared with ``probes`` probes in all.

    Weights whose best one-probe SURE is within ``margin`` (relative) of the best are run again
    with ``probes − 1`` further probes; their rows' ``value`` becomes the mean over the probes
    (``value_one_probe`` keeps the first) and the choice is made among them alone (every one
    then has the same number of probes). With a single close weight nothing is rerun.
    """
    best = _best(rows)
    scale = max(abs(best["value"]), 1e-30)
    lowest: dict[float, float] = {}
    for r in rows:
        lowest[r["tv_weight"]] = min(lowest.get(r["tv_weight"], math.inf), r["value"])
    close = sorted(mu for mu, v in lowest.items() if v - best["value"] <= margin * scale)
    if len(close) < 2 or probes < 2:
        return best
    t0 = time.monotonic()
    extra = [sure_rows(close, _SEED + 100 + s) for s in range(1, probes)]
    chosen = []
    for r in rows:
        if r["tv_weight"] in close:
            values = [r["value"]] + [e[(r["tv_weight"], r["iterations"])] for e in extra]
            r["value_one_probe"] = r["value"]
            r["value"] = sum(values) / len(values)
            r["probes"] = len(values)
            chosen.append(r)
    say(f"  TV weights {', '.join(f'{mu:.3g}' for mu in close)} within {margin:.0%} of the best: "
        f"{probes} probes each ({time.monotonic() - t0:.0f} s)")
    return _best(chosen)


def select_tv(data: CalibrationData, noise, problem: TVProblem, *,
              iterations: Sequence[int] = TV_ITERATIONS, weight: float | None = None,
              say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The TV weight and iteration count of least measurement SURE.

    Weights: ``μ₀ 2^j`` for ``j = −3..1``, extended by two more steps past an edge that wins
    (twice at most), then ``μ* 2^{±½}`` around the best; ``μ₀ = σ_w √(tr(AᴴwA)/n)``, the TV
    weight of a denoising problem with the noise of the (whitened) least-squares image
    (``σ_w² = w v``; ``tr`` by one Hutchinson probe). Every weight runs to the largest
    iteration count with the derivative along the probe; the SURE of each checkpoint is a
    candidate. A given ``weight`` (an explicit ``--tv-weight``) is the only one tried.
    """
    from operators3d.tv import FiniteDifference, tv_pdhg, tv_steps

    start = time.monotonic()
    y, op = data.y, data.op
    variance = measurement_variance(noise, y)
    if variance is None:
        raise ValueError("select_tv: needs a Gaussian or photon-counting noise model")
    w = problem.weights(noise, y)
    sigma_w2 = float(variance) if not torch.is_tensor(variance) else float((variance * w).double().mean())
    probe_x = _probe(op.domain_shape, op.domain_dtype(y.real.dtype), y.device, _SEED + 1)
    ab = op(probe_x)
    energy = _rdot(ab, ab if w is None else w * ab)
    trace = energy / max(_rdot(probe_x, probe_x), 1e-30)
    mu0 = math.sqrt(max(sigma_w2, 0.0) * max(trace, 0.0)) or 1e-6
    grad = FiniteDifference(op.domain_shape, problem.grad_weights, data.cuts)
    dtype = op.domain_dtype(y.real.dtype)
    steps = tv_steps(op, grad, dtype=dtype, device=y.device)
    sure = _SureMeasurement(op, y, variance, _SEED)
    initial = problem.initial(op)
    iterations = sorted({int(k) for k in iterations})
    rows: list[dict[str, Any]] = []
    tried: set[float] = set()

    def _round(value: float) -> float:  # grid weights to 3 significant digits; a given one as is
        return float(value) if weight is not None else float(f"{value:.3g}")

    def solve(mus: torch.Tensor, tangent: torch.Tensor):
        """Every weight of ``mus`` to the last iteration count, with the derivative along ``tangent``."""
        return tv_pdhg(y, op, mus, num_iters=iterations[-1], grad=grad, data_weights=w, initial=initial,
                       nonnegative=problem.nonnegative, steps=steps, checkpoints=iterations, tangent=tangent)

    def run(exponents: Sequence[float]) -> None:
        new = [e for e in exponents if e not in tried]
        if not new:
            return
        tried.update(new)
        mus = torch.tensor([_round(mu0 * 2.0**e) for e in new], dtype=torch.float64)
        mus = mus.to(device=y.device, dtype=y.real.dtype)
        t0 = time.monotonic()
        out = solve(mus, sure.probe)
        for k in iterations:
            x, dx = out[k]
            for i, e in enumerate(new):
                value, residual, divergence = sure(x[i], dx[i])
                rows.append({"tv_weight": _round(mu0 * 2.0**e), "tv_weight_relative": 2.0**e, "iterations": k,
                             "value": value, "residual": residual, "divergence": divergence})
        say(f"  TV weights {', '.join(f'{float(m):.3g}' for m in mus)}: {time.monotonic() - t0:.0f} s")

    def _tv_sure_rows(mus: Sequence[float], seed: int) -> dict[tuple[float, int], float]:
        """SURE of every (weight, checkpoint) with another probe (seeded ``seed``)."""
        other = _SureMeasurement(op, y, variance, seed)
        batch = torch.tensor(list(mus), dtype=torch.float64).to(device=y.device, dtype=y.real.dtype)
        out = solve(batch, other.probe)
        return {(mu, k): other(out[k][0][i], out[k][1][i])[0] for k in iterations for i, mu in enumerate(mus)}

    if weight is not None:
        mu0 = float(weight)
        say(f"calibrating TV on D-blocks {data.blocks}: weight {mu0:.3g}, iterations {iterations}, "
            "criterion SURE of the measurement error")
        run([0.0])
        best = _best(rows)
        return _record("tv", "sure-measurement", data, {"tv_weight": float(weight),
                                                        "iterations": best["iterations"]}, rows, start,
                       {"units": "estimated mean squared error of A x per measurement", "steps": steps.kind})
    say(f"calibrating TV on D-blocks {data.blocks}: weights {mu0:.3g} x 2^(-3..1) "
        f"(then refined), iterations {iterations}, criterion SURE of the measurement error")
    run(_TV_STEPS)
    for _ in range(2):  # a winner at an edge: look further that way
        best_e = math.log2(_best(rows)["tv_weight_relative"])
        if best_e <= min(tried):
            run([best_e - 1, best_e - 2])
        elif best_e >= max(tried):
            run([best_e + 1, best_e + 2])
        else:
            break
    best_e = math.log2(_best(rows)["tv_weight_relative"])
    run([best_e - 0.5, best_e + 0.5])
    best = _confirm_tv(rows, _tv_sure_rows, say)
    rows.sort(key=lambda r: (r["tv_weight"], r["iterations"]))
    return _record("tv", "sure-measurement", data, {"tv_weight": best["tv_weight"],
                                                    "iterations": best["iterations"]}, rows, start,
                   {"units": "estimated mean squared error of A x per measurement", "weight_scale": mu0,
                    "steps": steps.kind})
