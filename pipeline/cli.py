"""The ``recon3d`` command.

Sub-commands:

* ``recon3d quickstart`` — the main job on its built-in default: a simulated scan, its classical
  baseline, self-supervised training on 2 processes, the whole-scan reconstruction, evaluation
  and a report (:mod:`pipeline.quickstart`).
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

from pipeline.log import say
from pipeline.paths import STORAGE_OPTIONS_ENV, local_arg, parse_storage_options, storage_options_applied

#: Why a training run directory (and its checkpoints) must be a local (or mounted) path.
_RUN_DIR_WHY = ("DeepSpeed writes and reads its sharded checkpoints with filesystem calls; use a local "
                "or mounted (NFS, Lustre, s3fs...) folder")

def _leaf_parsers(sub: argparse._SubParsersAction):
    for p in dict.fromkeys(sub.choices.values()):  # aliases map to the same parser
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            for n in nested:
                yield from _leaf_parsers(n)
        else:
            yield p


def _add_storage_options(sub: argparse._SubParsersAction) -> None:
    """``--storage-options JSON`` on every command: fsspec options of the URLs it is given."""
    for p in _leaf_parsers(sub):
        if any("--storage-options" in a.option_strings for a in p._actions):
            continue
        p.add_argument("--storage-options", default=None, metavar="JSON",
                       help="fsspec options of the URLs given to this command (s3://, gs://...), a JSON object, "
                       f"e.g. '{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}' (default: ${STORAGE_OPTIONS_ENV})")


def _strings(value) -> list[str]:
    """Every string inside nested dicts and lists (a config's URLs are among them)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _url_arguments(args: argparse.Namespace) -> list[str]:
    """The command's arguments that are URLs."""
    return [s for s in _strings(vars(args)) if "://" in s]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recon3d",
        description="Self-supervised training and out-of-core reconstruction of large 3D MRI "
        "and CT scans.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also RECON3D_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    quick = sub.add_parser(
        "quickstart",
        help="the main job on a built-in simulated scan: simulate, train, reconstruct, report",
        description="Simulate a scan with a reference, reconstruct it with the classical baseline, "
        "train a 3D U-Net without ground truth on --nproc processes, reconstruct the whole scan "
        "with it, evaluate both and write figures and a summary into --out. Rerun with the same "
        "--out to resume. TV (total variation) is shown beside the baseline (--no-tv skips it). Exit status 3 "
        "when the network does not beat the FBP/SENSE baseline.",
    )
    quick.add_argument("--out", type=local_arg("quickstart --out", "the main job keeps its scan, outputs, run "
                                               "and report in one local folder"),
                       default=Path("outputs/quickstart"),
                       help="output directory: new, empty, or one an earlier quickstart wrote (resumed) "
                       "(default: outputs/quickstart)")
    quick.add_argument("--modality", choices=("ct", "mri"), default="ct",
                       help="ct: low-dose parallel beam, FBP baseline; mri: multi-coil, SENSE "
                       "baseline (default: ct)")
    quick.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"),
                       default=(32, 128, 128), help="volume shape (default: 32 128 128)")
    quick.add_argument("--angles", type=int, default=180, help="CT: projection angles (default: 180)")
    quick.add_argument("--photons", type=float, default=2000,
                       help="CT: incident photons per ray, Poisson noise (default: 2000)")
    quick.add_argument("--coils", type=int, default=8, help="MRI: number of coils (default: 8)")
    quick.add_argument("--acceleration", type=float, default=6.0,
                       help="MRI: undersampling factor of the (ky, kz) mask (default: 6)")
    quick.add_argument("--calibration", type=int, default=20,
                       help="MRI: side of the fully sampled calibration block (default: 20)")
    quick.add_argument("--noise-sigma", type=float, default=0.01,
                       help="MRI: noise std per real and imaginary part, k-space units (image max is 1; default: 0.01)")
    quick.add_argument("--steps", type=int, default=500, help="training steps (default: 500)")
    quick.add_argument("--nproc", type=int, default=2, help="training processes (default: 2)")
    quick.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    quick.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override the training config (OUT/train.yaml), e.g. --set optimizer.lr=3e-4")
    quick.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bars")
    quick.add_argument("--no-tv", dest="tv", action="store_false",
                       help="skip the TV reconstruction shown beside the FBP/SENSE baseline (it takes "
                       "about as long as the training at the default size)")
    quick.add_argument("--no-estimate", dest="estimate", action="store_false",
                       help="skip the reference-free error estimates shown beside the true PSNRs "
                       "(recon3d evaluate --estimate of the network and the baseline)")
    from pipeline.data.cli import register as register_data

    register_data(sub)
    from pipeline.reconstruct.cli import register as register_reconstruct

    register_reconstruct(sub)
    from pipeline.reconstruct import evaluate_cli as _evaluate, report as _report

    _evaluate.add_parser(sub)
    _report.add_parser(sub)

    tr = sub.add_parser(
        "train",
        help="train a reconstruction network on scans (alone or under torchrun)",
        description="Train the model of an experiment config with DeepSpeed. Run it alone or "
        "under torchrun (--nproc_per_node, --nnodes) unchanged; gloo on CPU, NCCL on GPU. "
        "SIGTERM, SIGUSR1 or Ctrl-C (SIGINT) (or the death of the torchrun agent) saves at the next step and exits 0. "
        "A step with a NaN/Inf loss or gradient norm stops the run without saving it (exit 1). "
        "A run directory that holds checkpoints needs --resume auto (continue) or --restart.",
    )
    tr.add_argument("config", type=local_arg("the experiment file", "it is read from the local filesystem"),
                    help="experiment YAML (examples: launch/configs/)")
    tr.add_argument("--run-dir", type=local_arg("train --run-dir", _RUN_DIR_WHY), default=None,
                    help="run directory (default: runs/<config name>)")
    tr.add_argument("--resume", type=local_arg("train --resume", _RUN_DIR_WHY, allow=("auto",), as_path=False),
                    default=None, metavar="auto|PATH",
                    help="'auto': continue from the run's latest checkpoint if there is one; "
                    "PATH: a checkpoints directory or a step_* folder")
    tr.add_argument("--restart", action="store_true",
                    help="start over at step 0 in a run directory that holds checkpoints; its "
                    "checkpoints/, metrics.jsonl and tensorboard/ are renamed *.replaced-DATE-TIME "
                    "(kept, not deleted)")
    tr.add_argument("--init", type=local_arg("train --init", "the pretrained weights are read from the local "
                                             "filesystem"), default=None, metavar="RUN_DIR|WEIGHTS",
                    help="start from trained weights (model.init): an exported file or a run directory; the "
                    "config's network must match it (pipeline/train/finetune.py)")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set optimizer.lr=3e-4 (repeatable)")

    ex = sub.add_parser(
        "export",
        help="write a run's consolidated fp32 weights (loadable without DeepSpeed)",
        description="Merge the latest checkpoint's shards into one weights file with the model "
        "config; torch.load(..., weights_only=True) reads it.",
    )
    ex.add_argument("run_dir", type=local_arg("export RUN_DIR", _RUN_DIR_WHY), help="the run directory")
    ex.add_argument("--out", type=local_arg("export --out", "the weights file is written on the local "
                                            "filesystem (copy it to a store afterwards)"), default=None, help="output file (default: RUN_DIR/export/model.pt); an earlier export there is replaced, "
                    "any other file never")
    ex.add_argument("--checkpoint", type=local_arg("export --checkpoint", _RUN_DIR_WHY), default=None,
                    help="a step_* folder to export instead of the latest")
    _add_storage_options(sub)
    return parser


def _train(args: argparse.Namespace) -> int:
    from pipeline.allocator import keep_freed_memory, return_freed_memory_to_os
    from pipeline.train import load_config, train

    overrides = list(args.overrides) + ([f"model.init={args.init}"] if args.init is not None else [])
    config = load_config(args.config, overrides)
    if config.run.memory == "fast":
        # Every step frees and reallocates the same slab-sized tensors: keep them in the heap
        # instead of a fresh page-faulted mmap each time (pipeline/allocator.py).
        keep_freed_memory()
    else:
        # Blocks of 1 MiB or more are mapped and unmapped on free: RSS follows the live tensors.
        return_freed_memory_to_os()
    run_dir = args.run_dir or Path("runs") / args.config.stem
    # the scans the experiment names (data, validation) may be URLs: --storage-options reaches them
    with storage_options_applied(args.storage_options or {}, _strings(config.model_dump())):
        result = train(config, run_dir, resume=args.resume, restart=args.restart)
    how = f"stopped by {result.stopped_by}" if result.stopped_by else "done"
    if int(os.environ.get("RANK", "0")) == 0:
        say(f"recon3d train: {how} at step {result.step}; checkpoint {result.checkpoint}", "train")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pipeline.train import export_run

    path = export_run(args.run_dir, args.out, checkpoint=args.checkpoint)
    print(path)
    return 0


def _quickstart_config(args: argparse.Namespace):
    """The :class:`~pipeline.quickstart.QuickstartConfig` of ``recon3d quickstart``."""
    from pipeline.quickstart import QuickstartConfig

    return QuickstartConfig(
        out=args.out, modality=args.modality, shape=tuple(args.shape), angles=args.angles,
        photons=args.photons, coils=args.coils, acceleration=args.acceleration,
        calibration=args.calibration, noise_sigma=args.noise_sigma, steps=args.steps,
        nproc=args.nproc, seed=args.seed, overrides=tuple(args.overrides), progress=args.progress,
        tv=args.tv, estimate=args.estimate,
    )


def _quickstart(args: argparse.Namespace) -> int:
    from pipeline.quickstart import run_quickstart

    config = _quickstart_config(args)
    result = run_quickstart(config)
    print((Path(config.out) / "README.md").read_text())
    return 0 if result.beats_baseline else 3


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int:
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
        from pipeline.reconstruct.evaluate_cli import run_cli as run_evaluate

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
    parser.error(f"unknown command {args.command!r}")
    return 2


def _quiet_broken_pipe() -> None:
    # The reader went away (``recon3d inspect | head``): nothing more can be printed, and
    # Python's own flush at exit would complain again. Point stdout at /dev/null.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``recon3d`` console script.

    Every command ends through one mapping of exceptions to exit codes
    (:func:`pipeline.errors.exit_code`: 0 ok, 1 failure, 2 usage or input error) and prints one
    line ``recon3d COMMAND: error: MESSAGE``; ``--debug`` or ``RECON3D_DEBUG=1`` adds the
    traceback. Ctrl-C exits 130; a closed output pipe (``| head``) ends quietly.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    debug = bool(args.debug) or os.environ.get("RECON3D_DEBUG", "") not in ("", "0")
    before = os.environ.get("RECON3D_DEBUG")
    if debug:
        # The sub-commands that report their own errors (and child processes) read it too;
        # restored afterwards, so main() called from Python leaves the environment as it was.
        os.environ["RECON3D_DEBUG"] = "1"
    try:
        return _main(parser, args, argv, debug)
    finally:
        if before is None:
            os.environ.pop("RECON3D_DEBUG", None)
        else:
            os.environ["RECON3D_DEBUG"] = before


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None, debug: bool) -> int:
    from pipeline.errors import report_error

    if args.command is None:
        parser.print_help()
        return 0
    rc = None
    try:
        given = getattr(args, "storage_options", None)
        options = parse_storage_options(given or os.environ.get(STORAGE_OPTIONS_ENV),
                                        "--storage-options" if given else STORAGE_OPTIONS_ENV)
        args.storage_options = options
        with storage_options_applied(options, _url_arguments(args)):
            rc = _dispatch(parser, args, argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return rc
    except BrokenPipeError:
        _quiet_broken_pipe()
        return rc if rc is not None else 128 + 13  # as a shell reports a writer killed by SIGPIPE
    except KeyboardInterrupt as err:
        print(f"recon3d {args.command}: interrupted" + (f": {err}" if str(err) else ""), file=sys.stderr)
        return 130
    except Exception as err:  # the one place that turns errors into exit codes
        return report_error(err, args.command, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
