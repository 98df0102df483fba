"""Pretrain once, fine-tune on a new scan (issue 18.1): steps and quality against training from scratch.

    .venv/bin/python benchmarks/finetune.py [--modality mri|ct|all] [--steps N] [--pretrain-steps P]
        [--pretrain-volumes K] [--pretrain-phantoms ellipsoids,foam] [--pretrain-with supervised|self-supervised]
        [--held-out anatomy [--held-out-seed 301] | --tune-on ellipsoids:201]
        [--shape 16 128 128]
        [--threads 1] [--set KEY=VALUE] [--finetune-set KEY=VALUE] [--scratch DIR] [--json FILE] [--quick]

For each modality, with the **shipped recipes** of ``launch/configs`` read as ``recon3d train``
reads them (``--steps``/``--pretrain-steps`` override ``run.max_steps``; ``--set`` any key of
all three; ``--finetune-set`` a key of the fine-tuning recipe only, after ``--set``, so that a
fine-tuning setting such as ``model.freeze=[encoder]`` or ``optimizer.lr=1e-4`` can be compared
against the same pretrained export and the same scratch run):

1. **Pretrain** ``pretrain_{mri,ct}_supervised.yaml`` (supervised) for P steps on K simulated
   scans of the tuning family (``ellipsoids``, seeds 101, 102, …: one phantom each; with
   ``--pretrain-phantoms ellipsoids,foam`` scan ``i`` is of the ``i``-th phantom of the list, cycled:
   any phantom that is not held out), and write
   the weights as ``recon3d export`` does (``pretrained_{modality}_{hash}.pt`` in ``--scratch``,
   reused by a later run with the same recipe, overrides and scans).
   With ``--pretrain-with self-supervised`` the pretraining is the scratch recipe's loss (robust EI,
   no reference) on the same network, as a site would pretrain on its **earlier scans**: then
   ``--pretrain-phantoms`` may name the held-out family too (e.g. ``anatomy``: other seeds than
   the new scan's), because nothing reads those scans' references — they are replaced by NaN
   before training, so a use would show — and no setting is chosen on them.
2. On a **new scan** of a held-out phantom (:data:`pipeline.data.phantoms.HELD_OUT_PHANTOMS`,
   seed 301 as ``benchmarks/quality.py``, or another with ``--held-out-seed``, e.g. 302, which no
   choice has looked at; nothing here was chosen by looking at either), or, with
   ``--tune-on PHANTOM:SEED`` (a tuning-family phantom, :data:`pipeline.data.phantoms.TUNING_PHANTOMS`,
   and a seed that is not one of the pretraining scans', e.g. ``ellipsoids:201``), on a new scan of
   the **tuning** family instead: the scan on which fine-tuning settings are *chosen*. Its tables
   say "TUNING scan, not held out" and its JSON has ``"new_scan_role": "tuning"`` (``"held-out"``
   otherwise), so a tuning figure cannot pass for a held-out one:

   * **scratch** — the modality's robust-EI recipe ``{mri,ct}_rei.yaml`` for N steps from its
     usual initialisation (starting at its input, ``start_at_initial``);
   * **fine-tuned** — ``finetune_{mri,ct}_rei.yaml`` (the same loss, lower learning rate) for N
     steps, started from the export through the functions of ``recon3d train --init``
     (:func:`pipeline.train.finetune.init_payload`, ``check_architecture``, ``load_init``,
     ``apply_freeze``);
   * **zero-shot** — the exported pretrained model itself (``load_exported``) on the new scan;
   * the **classical** per-volume oracle (SENSE: best λ × CG iterations; FBP: best window) and
     the network's own input (SENSE 10 CG / Hann FBP).

   Both self-supervised runs see the same slabs in the same order (the slab generator's seed is
   the config's ``run.seed``) and are scored on the whole new scan at steps 0, N/10, N/5, N/2 and
   N of their N-step schedule (``--points`` changes the fractions).

With ``--scratch DIR`` the from-scratch curve is stored there too (``scratch_{modality}_{hash}.json``,
keyed by the scratch recipe, ``--set``, N, the scored steps and the new scan's file name) and
reused by a later run that only changes ``--finetune-set`` or the fine-tuning recipe: the run is
seeded, so it would repeat the same curve. The table says "reused" in place of its training time.

Training is :func:`benchmarks.quality.train`'s loop (the builders of ``recon3d train``: model,
loss, optimiser, schedule, clipping, seeds; in-memory volumes, no DeepSpeed), with the init and
freeze steps of :class:`pipeline.train.loop.Trainer` added. Metrics: PSNR/SSIM of magnitudes,
data range the reference's maximum (:mod:`pipeline.metrics`), as ``benchmarks/quality.py``.

Targets of issue 18.1, per modality: (a) the fine-tuned run reaches the scratch run's PSNR at N
within N/5 steps (the first scored step at or above it; a step count between scored points is
reported as the next scored point, an upper bound); (b) fine-tuned@N − scratch@N ≥ 0.5 dB;
(c) the fine-tuned run is never below the zero-shot PSNR at any scored step.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quality as Q  # noqa: E402
from _common import machine_line, print_table, scratch_dir as _scratch_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "mri": {"pretrain": "pretrain_mri_supervised.yaml", "scratch": "mri_rei.yaml", "finetune": "finetune_mri_rei.yaml"},
    "ct": {"pretrain": "pretrain_ct_supervised.yaml", "scratch": "ct_rei.yaml", "finetune": "finetune_ct_rei.yaml"},
}
ORACLE = {"mri": "sense", "ct": "fbp"}
PRETRAIN_SEED = Q.TRAIN_SEED  # 101, 102, ...: the tuning family's training volumes
NEW_SCAN_SEED = Q.HELD_OUT_SEED  # 301: the held-out new scan
POINTS = (0.1, 0.2, 0.5, 1.0)
GAIN_DB = 0.5  # target (b)
STEP_FRACTION = 0.2  # target (a): reach scratch@N within N/5 steps


def recipe(modality: str, role: str, steps: int | None, args):
    """The shipped recipe of ``role`` (pretrain, scratch, finetune) with ``run.max_steps=steps``,
    then ``--set`` (every role) and, for ``finetune`` only, ``--finetune-set``."""
    from pipeline.train.config import load_config

    path = Path(args.recipe_dir) / RECIPES[modality][role]
    overrides = ([f"run.max_steps={steps}"] if steps is not None else []) + list(args.set or [])
    if role == "finetune":
        overrides += list(getattr(args, "finetune_set", None) or [])
    return path, load_config(path, overrides)


def export_payload(model: torch.nn.Module, cfg, facts, step: int) -> dict:
    """What ``recon3d export`` writes for ``model`` (format, weights, model and loss configs)."""
    from pipeline.train.export import EXPORT_FORMAT

    return {"format": EXPORT_FORMAT, "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "model_config": cfg.model.model_dump(mode="json"), "loss_config": cfg.loss.model_dump(mode="json"),
            "modality": facts.modality, "channels": int(facts.channels), "step": step,
            "source": "benchmarks/finetune.py"}


def train(cfg, facts, vols: list, device, *, init: str | None = None, eval_vol=None, eval_steps=(),
          label: str = "", verbose: bool = False) -> tuple:
    """Train ``cfg`` on in-memory ``vols`` (the step of :func:`quality.train`), optionally from the
    export ``init``; score ``eval_vol`` at each step count in ``eval_steps`` (0 = before training).

    Returns ``(model, train_seconds, curve)`` with ``curve`` a list of
    ``{"step", "psnr", "ssim"}``.
    """
    from pipeline.train.build import build_loss, build_model, build_optimizer, derived_seed
    from pipeline.train.finetune import apply_freeze, check_architecture, init_payload, load_init

    torch.manual_seed(derived_seed(cfg.run.seed, "init"))
    model = build_model(cfg.model, facts)
    loss = build_loss(cfg.loss, facts, seed=derived_seed(cfg.run.seed, "loss", 0))
    model = loss.adapt_model(model)
    apply_freeze(model, list(cfg.model.freeze))
    if init is not None:  # as Trainer._init_weights: read weights-only, check the network, copy
        payload = init_payload(init)
        check_architecture(payload, cfg.model, modality=facts.modality, channels=facts.channels, source=init)
        load_init(model, payload, init)
    model, loss = model.to(device), loss.to(device)
    Q.set_scales(model, vols)
    opt = build_optimizer(cfg, model)
    steps = cfg.run.max_steps
    gen = torch.Generator().manual_seed(derived_seed(cfg.run.seed, "quality-slabs"))
    curve: list[dict] = []
    want = sorted(set(eval_steps)) if eval_vol is not None else []

    def point(step: int) -> None:
        res = Q.score(Q.reconstruct(model, [eval_vol]), [eval_vol])
        curve.append({"step": step, "psnr": res["psnr"], "ssim": res["ssim"]})
        model.train()
        if verbose:
            print(f"    {label} step {step}: PSNR {res['psnr']:.2f} dB", flush=True)

    model.train()
    t0, eval_s = time.perf_counter(), 0.0
    for step in range(steps + 1):
        if step in want:
            te = time.perf_counter()
            point(step)
            eval_s += time.perf_counter() - te
        if step == steps:
            break
        Q.train_step(model, loss, opt, cfg, vols, gen, step, label)
    return model, time.perf_counter() - t0 - eval_s, curve


def eval_steps(n: int, points=POINTS) -> list[int]:
    """Step 0 and ``round(f·n)`` for each fraction (at least 1), without repeats, ascending."""
    return sorted({0, *(max(1, round(f * n)) for f in points), n})


def targets(scratch: list[dict], fine: list[dict], zero_shot: float, n: int) -> dict:
    """Issue 18.1's three checks from the two curves (same scored steps) and the zero-shot PSNR."""
    s_end = scratch[-1]["psnr"]
    reach = next((c["step"] for c in fine if c["psnr"] >= s_end), None)
    low = min(c["psnr"] for c in fine)
    return {
        "scratch_at_n": s_end, "finetuned_at_n": fine[-1]["psnr"],
        "steps_to_reach_scratch": reach, "reach_within_fifth": reach is not None and reach <= STEP_FRACTION * n,
        "gain_db": fine[-1]["psnr"] - s_end, "gain_met": fine[-1]["psnr"] - s_end >= GAIN_DB,
        "lowest_finetuned": low, "margin_over_zero_shot_db": low - zero_shot, "never_below_zero_shot": low >= zero_shot,
    }


def parse_pretrain_phantoms(text: str, *, self_supervised: bool = False) -> list[str]:
    """``--pretrain-phantoms`` -> the phantoms the pretraining scans cycle through. A held-out
    phantom is refused for supervised pretraining (it would train on the held-out family's
    references); self-supervised pretraining, which reads no reference, may use it."""
    from pipeline.data.phantoms import HELD_OUT_PHANTOMS, PHANTOMS

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SystemExit("finetune.py: --pretrain-phantoms: give at least one phantom, e.g. ellipsoids,foam")
    for name in names:
        if name in HELD_OUT_PHANTOMS and not self_supervised:
            raise SystemExit(f"finetune.py: --pretrain-phantoms: {name!r} is held out {HELD_OUT_PHANTOMS}; "
                             "supervised pretraining would read its references: pretrain on phantoms "
                             "outside it, or with --pretrain-with self-supervised")
        if name not in PHANTOMS:
            raise SystemExit(f"finetune.py: --pretrain-phantoms: unknown phantom {name!r} (one of {PHANTOMS})")
    return names


def pretrain_scans(args) -> list[tuple[str, int]]:
    """``(phantom, seed)`` of each pretraining scan: seeds 101, 102, … and the phantoms cycled."""
    return [(args.pretrain_phantoms[i % len(args.pretrain_phantoms)], PRETRAIN_SEED + i)
            for i in range(args.pretrain_volumes)]


def pretrain_recipe(modality: str, args):
    """The pretraining recipe: the supervised one, or (``--pretrain-with self-supervised``) the
    same file with the scratch recipe's loss (robust EI), which needs no reference."""
    p_path, p_cfg = recipe(modality, "pretrain", args.pretrain_steps, args)
    if args.pretrain_with == "self-supervised":
        s_path, s_cfg = recipe(modality, "scratch", args.pretrain_steps, args)
        p_cfg = p_cfg.model_copy(update={"loss": s_cfg.loss})
        return f"{p_path.name} with the loss of {s_path.name}", p_path, p_cfg
    return p_path.name, p_path, p_cfg


def without_references(vols: list) -> list:
    """The volumes with their references replaced by NaN: a self-supervised pretraining that read
    one would train on NaN (and its figures would show it)."""
    return [dataclasses.replace(v, reference=torch.full_like(v.reference, float("nan"))) for v in vols]


def parse_tune_on(text: str, pretrain_volumes: int) -> tuple[str, int]:
    """``PHANTOM:SEED`` of ``--tune-on`` -> ``(phantom, seed)``: a tuning-family phantom and a seed
    other than the pretraining scans' (``PRETRAIN_SEED`` … ``PRETRAIN_SEED + K - 1``)."""
    from pipeline.data.phantoms import TUNING_PHANTOMS

    phantom, sep, seed_text = text.partition(":")
    if not sep or not seed_text.strip().lstrip("-").isdigit():
        raise SystemExit(f"finetune.py: --tune-on {text!r}: want PHANTOM:SEED, e.g. ellipsoids:201")
    seed = int(seed_text)
    if phantom not in TUNING_PHANTOMS:
        raise SystemExit(f"finetune.py: --tune-on {text}: {phantom!r} is not a tuning-family phantom "
                         f"{TUNING_PHANTOMS} (a held-out phantom goes to --held-out)")
    pre = range(PRETRAIN_SEED, PRETRAIN_SEED + pretrain_volumes)
    if seed in pre:
        raise SystemExit(f"finetune.py: --tune-on {text}: seed {seed} is one of the {pretrain_volumes} pretraining "
                         f"scans (seeds {pre.start}-{pre.stop - 1}); pick another, e.g. 201")
    return phantom, seed


def run_modality(modality: str, args, scratch_dir: Path, device) -> dict:
    t0 = time.perf_counter()
    if (args.new_phantom, args.new_seed) in pretrain_scans(args):
        raise SystemExit(f"finetune.py: the new scan ({args.new_phantom} {args.new_seed}) is one of the pretraining scans")
    pre_paths = [Q.simulate(modality, seed, args, scratch_dir, phantom=ph) for ph, seed in pretrain_scans(args)]
    new_path = Q.simulate(modality, args.new_seed, args, scratch_dir, phantom=args.new_phantom)
    pre_vols = [Q.load(p, modality, device) for p in pre_paths]
    new = Q.load(new_path, modality, device, f"{args.new_phantom} {args.new_seed}")
    print(f"[{modality}] simulated {len(pre_vols)} pretraining scans ({pretrained_on(args)}) and the new scan "
          f"({new.name}, {args.role}) in {time.perf_counter() - t0:.1f} s", flush=True)

    # 1. pretrain (supervised on the tuning family, or self-supervised) and export
    p_label, p_path, p_cfg = pretrain_recipe(modality, args)
    pre_facts = Q.facts_of(pre_paths)
    if args.pretrain_with == "self-supervised":
        from pipeline.train.build import build_loss

        if build_loss(p_cfg.loss, pre_facts, seed=0).needs_reference:
            raise SystemExit(f"finetune.py: {p_label} needs references; it cannot pretrain self-supervised")
        pre_vols = without_references(pre_vols)
    # --scratch reuse: the same recipe, overrides and scans give the same (seeded) pretrained model
    how = ("self-supervised", p_cfg.loss.model_dump_json()) if args.pretrain_with == "self-supervised" else ()
    key = hashlib.sha256(repr((p_path.read_text(), args.set, p_cfg.run.max_steps, [p.name for p in pre_paths]) + how)
                         .encode()).hexdigest()[:12]
    export = scratch_dir / f"pretrained_{modality}_{key}.pt"
    if export.exists():
        pre_s = None
        print(f"[{modality}] reusing {export.name} (the same pretraining, done earlier in --scratch)", flush=True)
    else:
        model, pre_s, _ = train(p_cfg, pre_facts, pre_vols, device, label=f"{modality} pretrain")
        torch.save(export_payload(model, p_cfg, pre_facts, p_cfg.run.max_steps), export)
        del model
        print(f"[{modality}] pretrained {p_label} for {p_cfg.run.max_steps} steps in {pre_s:.0f} s -> "
              f"{export.name}", flush=True)

    # 2. the new scan: zero-shot, classical, scratch, fine-tuned
    from pipeline.train.export import load_exported

    zs = Q.score(Q.reconstruct(load_exported(export).to(device), [new]), [new])
    labels, xs = Q.classical(modality, ORACLE[modality], [new], scratch_dir)
    oracle = Q.score(xs, [new]) | {"label": labels[0]}
    facts = Q.facts_of([new_path])
    s_path, s_cfg = recipe(modality, "scratch", args.steps, args)
    f_path, f_cfg = recipe(modality, "finetune", args.steps, args)
    n = s_cfg.run.max_steps
    if f_cfg.run.max_steps != n:
        raise SystemExit(f"finetune.py: {s_path.name} and {f_path.name} train {n} and {f_cfg.run.max_steps} "
                         "steps; give --steps N to compare at equal steps")
    at = eval_steps(n, args.points)
    # --scratch reuse: the seeded scratch run depends on its recipe, --set, N, the scored steps and the scan
    s_key = hashlib.sha256(repr((s_path.read_text(), args.set, n, at, new_path.name)).encode()).hexdigest()[:12]
    s_cache = scratch_dir / f"scratch_{modality}_{s_key}.json"
    if s_cache.exists():
        cached = json.loads(s_cache.read_text())
        s_s, s_curve, inp = None, cached["curve"], cached["input"]
        print(f"[{modality}] reusing the from-scratch curve {s_cache.name} (the same run, done earlier in "
              f"--scratch)", flush=True)
    else:
        s_model, s_s, s_curve = train(s_cfg, facts, [new], device, eval_vol=new, eval_steps=at,
                                      label=f"{modality} scratch", verbose=args.verbose)
        inp = Q.score(Q.initial_estimates(s_model, [new]), [new])
        del s_model
        s_cache.write_text(json.dumps({"curve": s_curve, "input": {"psnr": inp["psnr"], "ssim": inp["ssim"]},
                                       "train_s": s_s, "recipe": s_path.name, "set": list(args.set),
                                       "new_scan": new.name}))
    _, f_s, f_curve = train(f_cfg, facts, [new], device, init=str(export), eval_vol=new, eval_steps=at,
                            label=f"{modality} fine-tuned", verbose=args.verbose)
    checks = targets(s_curve, f_curve, zs["psnr"], n)
    s_time = "reused" if s_s is None else f"{s_s:.0f} s"
    print(f"[{modality}] scratch {s_curve[-1]['psnr']:.2f} dB ({s_time}), fine-tuned {f_curve[-1]['psnr']:.2f} dB "
          f"({f_s:.0f} s), zero-shot {zs['psnr']:.2f} dB", flush=True)
    return {"new_scan": new.name, "new_scan_role": args.role, "finetune_set": list(args.finetune_set),
            "steps": n, "export": export.name, "pretrain_steps": p_cfg.run.max_steps,
            "pretrain_volumes": len(pre_vols), "pretrain_phantoms": list(args.pretrain_phantoms),
            "pretrain_with": args.pretrain_with,
            "recipes": {"pretrain": p_label, "scratch": s_path.name, "finetune": f_path.name},
            "train_s": {"pretrain": pre_s, "scratch": s_s, "finetune": f_s},
            "zero_shot": {"psnr": zs["psnr"], "ssim": zs["ssim"]}, "input": {"psnr": inp["psnr"], "ssim": inp["ssim"]},
            "classical": {"psnr": oracle["psnr"], "ssim": oracle["ssim"], "label": oracle["label"]},
            "scratch": s_curve, "finetune": f_curve, "targets": checks}


def pretrained_on(args) -> str:
    how = "; self-supervised, references not read" if args.pretrain_with == "self-supervised" else ""
    return ", ".join(args.pretrain_phantoms) + how


def yes(ok: bool) -> str:
    return "MET" if ok else "not met"


def report(modality: str, r: dict, args) -> None:
    title = {"mri": f"MRI, {args.coils} coils, {args.acceleration:g}× Poisson disc, σ={args.noise_sigma:g}",
             "ct": f"CT, parallel beam, {args.angles} angles, I0={args.photons:g}"}[modality]
    zs = r["zero_shot"]
    pre = "reused" if r["train_s"]["pretrain"] is None else f"{r['train_s']['pretrain']:.0f}"
    scr = "reused" if r["train_s"]["scratch"] is None else f"{r['train_s']['scratch']:.0f}"
    role = ("held out" if r["new_scan_role"] == "held-out"
            else "TUNING scan, not held out: for choosing settings")
    if r["finetune_set"]:
        role += "; fine-tune --finetune-set " + " ".join(r["finetune_set"])
    rows = [[c["step"], f"{c['psnr']:.2f} / {c['ssim']:.4f}", f"{f['psnr']:.2f} / {f['ssim']:.4f}",
             f"{zs['psnr']:.2f}", f"{f['psnr'] - c['psnr']:+.2f}"] for c, f in zip(r["scratch"], r["finetune"])]
    print_table(f"{title} — new scan {r['new_scan']} {'x'.join(map(str, args.shape))} ({role}); pretrained "
                f"{r['pretrain_steps']} steps on {r['pretrain_volumes']} scans ({pretrained_on(args)})",
                ["step", "scratch PSNR dB / SSIM", "fine-tuned PSNR dB / SSIM", "zero-shot PSNR dB",
                 "fine-tuned − scratch dB"], rows)
    print(f"\nreferences: classical {r['classical']['label']} {r['classical']['psnr']:.2f} dB / "
          f"{r['classical']['ssim']:.4f}; network input {r['input']['psnr']:.2f} dB; zero-shot (pretrained, "
          f"no adaptation) {zs['psnr']:.2f} dB / {zs['ssim']:.4f}. Train s: pretrain {pre}, "
          f"scratch {scr}, fine-tune {r['train_s']['finetune']:.0f} "
          f"({r['recipes']['pretrain']}, {r['recipes']['scratch']}, {r['recipes']['finetune']}).")
    t, n = r["targets"], r["steps"]
    reach = "never" if t["steps_to_reach_scratch"] is None else f"≤ {t['steps_to_reach_scratch']}"
    print_table(f"{title} — targets of issue 18.1 on {r['new_scan']} ({r['new_scan_role']})", ["target", "measured", "verdict"], [
        [f"steps for fine-tuned to reach scratch@{n} ({t['scratch_at_n']:.2f} dB) ≤ {STEP_FRACTION * n:g}",
         reach, yes(t["reach_within_fifth"])],
        [f"fine-tuned@{n} − scratch@{n} ≥ {GAIN_DB} dB", f"{t['gain_db']:+.2f} dB", yes(t["gain_met"])],
        ["fine-tuned never below zero-shot", f"lowest {t['lowest_finetuned']:.2f} dB "
         f"({t['margin_over_zero_shot_db']:+.2f} dB vs zero-shot)", yes(t["never_below_zero_shot"])],
    ])


QUICK = {"shape": [4, 32, 32], "steps": 10, "pretrain_steps": 6, "pretrain_volumes": 1, "calibration": 8}
QUICK_SET = ["schedule.warmup_steps=0"]  # the recipes' 10-20 warm-up steps would leave 6-10 steps untrained


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modality", choices=("mri", "ct", "all"), default="all")
    p.add_argument("--steps", type=int, default=None,
                   help="N: steps of the scratch and fine-tuned runs (default: the recipes' own, which must agree)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="P (default: the pretraining recipe's)")
    p.add_argument("--pretrain-volumes", type=int, default=4, help="K scans (seeds 101…) to pretrain on")
    p.add_argument("--pretrain-phantoms", default="ellipsoids", metavar="P1,P2",
                   help="phantoms of the pretraining scans, cycled over the K scans (default ellipsoids; "
                        "a held-out one only with --pretrain-with self-supervised)")
    p.add_argument("--pretrain-with", choices=("supervised", "self-supervised"), default="supervised",
                   help="pretraining loss: the supervised recipe's, or the scratch recipe's (robust EI, no "
                        "reference: a site pretraining on its earlier scans)")
    p.add_argument("--held-out", default=None,
                   help=f"the new scan's phantom (a held-out one; seed {NEW_SCAN_SEED}; default anatomy)")
    p.add_argument("--held-out-seed", type=int, default=NEW_SCAN_SEED,
                   help=f"the held-out new scan's seed (default {NEW_SCAN_SEED}); another one gives a "
                        "held-out scan no earlier choice looked at (not one of the pretraining seeds)")
    p.add_argument("--tune-on", default=None, metavar="PHANTOM:SEED",
                   help="use a TUNING-family new scan instead of the held-out one (e.g. ellipsoids:201), to choose "
                        "fine-tuning settings; labelled as tuning in the tables and the JSON")
    p.add_argument("--points", type=float, nargs="+", default=list(POINTS),
                   help="fractions of N at which both runs are scored (0 and N always)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of all three recipes (as recon3d train --set)")
    p.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the fine-tuning recipe only (after --set): e.g. model.freeze=[encoder], "
                        "optimizer.lr=1e-4; the pretrained export and the scratch run stay the same")
    p.add_argument("--recipe-dir", default=str(ROOT / "launch" / "configs"))
    p.add_argument("--shape", type=int, nargs=3, default=[16, 128, 128])
    p.add_argument("--chunk-depth", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--scratch", default=None, help="folder for scans and the export (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 4x32x32 scans, N=10, P=6, one pretraining scan (figures mean nothing)")
    p.add_argument("--verbose", action="store_true")
    Q.add_scan_arguments(p.add_argument_group("data (as benchmarks/quality.py)"))
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if key in ("steps", "pretrain_steps") and getattr(args, key) is not None:
                continue
            setattr(args, key, value)
        args.set = QUICK_SET + list(args.set)
    from pipeline.data.phantoms import HELD_OUT_PHANTOMS

    args.pretrain_phantoms = parse_pretrain_phantoms(args.pretrain_phantoms,
                                                     self_supervised=args.pretrain_with == "self-supervised")
    if args.tune_on is not None:
        if args.held_out is not None:
            raise SystemExit("finetune.py: give --held-out or --tune-on, not both")
        args.new_phantom, args.new_seed = parse_tune_on(args.tune_on, args.pretrain_volumes)
        args.role = "tuning"
    else:
        args.held_out = args.held_out or "anatomy"
        if args.held_out not in HELD_OUT_PHANTOMS:
            raise SystemExit(f"finetune.py: --held-out {args.held_out}: not a held-out phantom {HELD_OUT_PHANTOMS}")
        args.new_phantom, args.new_seed, args.role = args.held_out, args.held_out_seed, "held-out"
    args.phantom = "ellipsoids"  # the tuning family (quality.simulate's default phantom)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    scratch_dir, tmp = _scratch_dir(args.scratch, "recon3d-finetune-")
    modalities = ("mri", "ct") if args.modality == "all" else (args.modality,)
    t0 = time.perf_counter()
    results = {m: run_modality(m, args, scratch_dir, device) for m in modalities}
    print(f"\n{machine_line()}  device {device}, {args.threads} thread(s)")
    for m in modalities:
        report(m, results[m], args)
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s")
    if args.json:
        out = {"machine": machine_line(), "threads": args.threads, "total_s": total, "new_scan_role": args.role,
               "args": vars(args) | {"shape": list(args.shape)}, **results}
        Path(args.json).write_text(json.dumps(out, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
