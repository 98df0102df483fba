"""Diagnose a training recipe on one simulated scan: what its loss sees against the truth.

    .venv/bin/python benchmarks/diagnose_recipe.py SCAN.zarr [--recipe launch/configs/ct_rei.yaml]
        [--steps 200] [--every 25] [--set key=value ...] [--threads 1] [--json FILE]

Trains the recipe (built by :mod:`pipeline.train.build`, as ``recon3d train`` and
``benchmarks/quality.py`` do) on the scan itself and, every ``--every`` steps, prints the
whole-volume PSNR/SSIM against the scan's reference next to the means, over the steps since the
last line, of each loss part and of the true errors on the training slab:

* ``true_mse`` — ``‖x̂ − x‖²/n``, what PSNR measures;
* ``true_range`` (parallel-beam CT) — ``‖M^{1/2} A(x̂ − x)‖²/n`` with FBP's ramp metric ``M``,
  the quantity the image-metric SURE estimates: if ``sure`` follows it while ``true_mse``
  grows, the error grows where the measurements do not see it (the null space of ``A``);
* ``true_meas`` — ``‖A(x̂ − x)‖²/m``, what the measurement-domain SURE estimates.

It answers "does the self-supervised loss track the error it claims to estimate, and where does
the remaining error live?" — the experiments of issue 14.1 (BENCHMARKS.md) were run with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quality as Q  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scan")
    p.add_argument("--recipe", default=str(Q.ROOT / "launch" / "configs" / "ct_rei.yaml"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pipeline.models import intensity_scale
    from pipeline.models.physics import ImageMetric
    from pipeline.train.build import build_loss, build_model, build_optimizer, derived_seed, learning_rate
    from pipeline.train.config import load_config

    cfg = load_config(args.recipe, [f"run.max_steps={args.steps}", *args.set])
    modality = "mri" if "mri" in Path(args.recipe).name else "ct"
    v = Q.load(Path(args.scan), modality, torch.device("cpu"))
    modality = v.modality = "mri" if v.y.is_complex() else "ct"
    facts = Q.facts_of([v.path])
    torch.manual_seed(derived_seed(cfg.run.seed, "init"))
    model = build_model(cfg.model, facts)
    loss = build_loss(cfg.loss, facts, seed=derived_seed(cfg.run.seed, "loss", 0))
    model = loss.adapt_model(model)
    Q.set_scales(model, [v])
    opt = build_optimizer(cfg, model)
    gen = torch.Generator().manual_seed(derived_seed(cfg.run.seed, "quality-slabs"))
    parallel = modality == "ct" and v.op.kind == "parallel"

    def evaluate():
        x = Q.reconstruct(model, [v])[0]
        model.train()
        return Q._metrics(x, v)

    log = []
    psnr0, ssim0 = evaluate()
    print(f"step 0: PSNR {psnr0:.2f} SSIM {ssim0:.3f} (the network's input: "
          f"{Q._metrics(Q.initial_estimates(model, [v])[0], v)[0]:.2f} dB)", flush=True)
    log.append({"step": 0, "psnr": psnr0, "ssim": ssim0})
    acc: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for step in range(cfg.run.max_steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        thick = min(cfg.data.slab_thickness, v.depth)
        d0 = int(torch.randint(v.depth - thick + 1, (1,), generator=gen))
        y, op, ref = v.slab(d0, thick)
        y, ref = y.unsqueeze(0), ref.unsqueeze(0)
        kw = {"reference": ref} if loss.needs_reference else {}
        with intensity_scale(model, v.scale):
            x_hat = model(y, op)
            out = loss(x_hat, y, op, model, **kw)
        with torch.no_grad():
            err = x_hat.detach() - ref
            r = op(err)
            acc.setdefault("true_mse", []).append(float(err.abs().pow(2).mean()))
            acc.setdefault("true_meas", []).append(float(r.abs().pow(2).sum() / r.numel()))
            if parallel:
                acc.setdefault("true_range", []).append(float((r * ImageMetric(op)(r)).sum() / err.numel()))
            for k, val in out.parts.items():
                acc.setdefault(k, []).append(float(val))
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        if cfg.deepspeed.gradient_clipping:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.gradient_clipping)
        opt.step()
        if (step + 1) % args.every == 0 or step + 1 == cfg.run.max_steps:
            ps, ss = evaluate()
            means = {k: sum(val) / len(val) for k, val in acc.items()}
            acc = {}
            log.append({"step": step + 1, "psnr": ps, "ssim": ss, **means})
            print(f"step {step + 1}: PSNR {ps:.2f} SSIM {ss:.3f} "
                  + " ".join(f"{k} {val:.3e}" for k, val in means.items())
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"scan": args.scan, "recipe": args.recipe, "set": args.set,
                                               "log": log}, indent=1))


if __name__ == "__main__":
    main()
