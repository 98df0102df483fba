"""Runs a training job through :class:`pipeline.train.Trainer` and dumps every parameter's full
fp32 value and Adam moments after it (rank 0 writes ``DUMP``).

    python _driver.py CONFIG RUN_DIR DUMP [--resume auto|PATH]      (alone or under torchrun)
"""

import sys
from pathlib import Path

import torch


def main() -> None:
    config_path, run_dir, dump = sys.argv[1:4]
    resume = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "--resume" else None
    from pipeline.train import Trainer, load_config
    from pipeline.train.distributed import init_distributed, shutdown_distributed
    from pipeline.train.engine import full_state

    config = load_config(config_path)
    ctx = init_distributed("cpu", timeout_s=120)
    try:
        trainer = Trainer(config, Path(run_dir), ctx)
        result = trainer.fit(resume)
        state = full_state(trainer.engine)
        if ctx.is_main:
            torch.save({"state": state, "step": result.step, "losses": result.losses}, dump)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
