"""The ``recon3d`` command.

Sub-commands:

* ``recon3d quickstart`` — the main job on its built-in default (simulated 3D multi-coil MRI,
  zero-filled and SENSE baselines, PNG of orthogonal slices and a report).
* ``recon3d simulate | ingest | inspect | preprocess`` — scans as chunked zarr v3
  (:mod:`pipeline.data.cli`).
* ``recon3d train CONFIG`` and ``recon3d export RUN_DIR`` — training with DeepSpeed under
  torchrun, and consolidated weights (:mod:`pipeline.train`).
* ``recon3d reconstruct`` — a whole scan, slab by slab, into an OME-Zarr 0.5 image
  (:mod:`pipeline.reconstruct.cli`); ``recon3d evaluate OUT --reference SCAN`` (PSNR, SSIM,
  NMSE out of core) and ``recon3d report RUN_DIR|OUT`` (figures and a Markdown summary).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recon3d",
        description="Self-supervised training and out-of-core reconstruction of large 3D MRI "
        "and CT scans.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    quick = sub.add_parser(
        "quickstart",
        help="run the main job on a built-in simulated scan and write a report",
        description="Simulate a 3D multi-coil MRI scan, reconstruct it with the classical "
        "baselines and write report.json, report.md and slices.png.",
    )
    quick.add_argument("--out", type=Path, default=Path("outputs/quickstart"),
                       help="output directory (default: outputs/quickstart)")
    quick.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"),
                       default=(24, 128, 128), help="volume shape (default: 24 128 128)")
    quick.add_argument("--coils", type=int, default=8, help="number of coils (default: 8)")
    quick.add_argument("--acceleration", type=float, default=4.0,
                       help="undersampling factor of the (ky, kz) mask (default: 4)")
    quick.add_argument("--calibration", type=int, default=20,
                       help="side of the fully sampled calibration block (default: 20)")
    quick.add_argument("--noise-sigma", type=float, default=0.001,
                       help="noise std relative to the largest k-space value (default: 0.001)")
    quick.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    from pipeline.data.cli import register as register_data

    register_data(sub)
    from pipeline.reconstruct.cli import register as register_reconstruct

    register_reconstruct(sub)
    from pipeline.reconstruct import evaluate as _evaluate, report as _report

    _evaluate.add_parser(sub)
    _report.add_parser(sub)

    tr = sub.add_parser(
        "train",
        help="train a reconstruction network on scans (alone or under torchrun)",
        description="Train the model of an experiment config with DeepSpeed. Run it alone or "
        "under torchrun (--nproc_per_node, --nnodes) unchanged; gloo on CPU, NCCL on GPU. "
        "SIGTERM or SIGUSR1 saves at the next step and exits 0.",
    )
    tr.add_argument("config", type=Path, help="experiment YAML (examples: launch/configs/)")
    tr.add_argument("--run-dir", type=Path, default=None,
                    help="run directory (default: runs/<config name>)")
    tr.add_argument("--resume", default=None, metavar="auto|PATH",
                    help="'auto': continue from the run's latest checkpoint if there is one; "
                    "PATH: a checkpoints directory or a step_* folder")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set optimizer.lr=3e-4 (repeatable)")

    ex = sub.add_parser(
        "export",
        help="write a run's consolidated fp32 weights (loadable without DeepSpeed)",
        description="Merge the latest checkpoint's shards into one weights file with the model "
        "config; torch.load(..., weights_only=True) reads it.",
    )
    ex.add_argument("run_dir", type=Path, help="the run directory")
    ex.add_argument("--out", type=Path, default=None, help="output file (default: RUN_DIR/export/model.pt)")
    ex.add_argument("--checkpoint", type=Path, default=None,
                    help="a step_* folder to export instead of the latest")
    return parser


def _train(args: argparse.Namespace) -> int:
    from pipeline.train import load_config, train

    config = load_config(args.config, args.overrides)
    run_dir = args.run_dir or Path("runs") / args.config.stem
    result = train(config, run_dir, resume=args.resume)
    how = f"stopped by {result.stopped_by}" if result.stopped_by else "done"
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"recon3d train: {how} at step {result.step}; checkpoint {result.checkpoint}", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.train import export_run

    path = export_run(args.run_dir, args.out, checkpoint=args.checkpoint)
    print(path)
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pipeline.quickstart import QuickstartConfig, run_quickstart

    console = Console(stderr=True)
    config = QuickstartConfig(
        out=args.out,
        shape=tuple(args.shape),
        coils=args.coils,
        acceleration=args.acceleration,
        calibration=args.calibration,
        noise_sigma=args.noise_sigma,
        seed=args.seed,
    )
    run_quickstart(config, log=lambda msg: console.print(f"[bold cyan]recon3d[/] {msg}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recon3d`` console script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "quickstart":
            return _quickstart(args)
        if args.command == "train":
            rc = _train(args)
            if argv is None:
                # Run as a program: every file is closed and fsynced by now, and C++ library
                # teardown at interpreter exit takes 3–8 s here, which would count against the
                # preemption bound. Called from Python (argv given), return normally.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
            return rc
        if args.command == "export":
            return _export(args)
        if args.command == "evaluate":
            from pipeline.reconstruct.evaluate import run_cli as run_evaluate

            return run_evaluate(args)
        if args.command == "report":
            from pipeline.reconstruct.report import run_cli as run_report

            return run_report(args)
        from pipeline.data.cli import COMMANDS as DATA_COMMANDS, run as run_data

        if args.command in DATA_COMMANDS:
            return run_data(args)
        from pipeline.reconstruct.cli import COMMANDS as RECONSTRUCT_COMMANDS, run as run_reconstruct

        if args.command in RECONSTRUCT_COMMANDS:
            return run_reconstruct(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"recon3d {args.command}: error: {err}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
