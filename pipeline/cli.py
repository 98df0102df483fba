"""The ``recon3d`` command.

Sub-commands available now:

* ``recon3d quickstart`` — the main job on its built-in default (simulated 3D multi-coil MRI,
  zero-filled and SENSE baselines, PNG of orthogonal slices and a report).

``simulate``, ``ingest``, ``inspect``, ``train``, ``export``, ``reconstruct``, ``evaluate`` and
``report`` arrive with the scan-format, training and reconstruction milestones.
"""

from __future__ import annotations

import argparse
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
    return parser


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
        from pipeline.data.cli import COMMANDS as DATA_COMMANDS, run as run_data

        if args.command in DATA_COMMANDS:
            return run_data(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"recon3d {args.command}: error: {err}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
