"""Runs ``recon3d reconstruct`` and SIGKILLs itself when it is about to record slab number
``KILL_AT`` (0-based count of records this process writes): that slab's chunks are written but
not recorded, the slabs recorded before it are complete — the worst moment for a kill.

    python _driver.py KILL_AT -- <recon3d reconstruct arguments>
"""

import os
import signal
import sys


def main() -> None:
    kill_at = int(sys.argv[1])
    assert sys.argv[2] == "--"
    import importlib

    module = importlib.import_module("pipeline.reconstruct.store")

    original = module._Output.record
    count = {"n": 0}

    def record(self, fingerprint, index, info):
        if count["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        count["n"] += 1
        return original(self, fingerprint, index, info)

    module._Output.record = record
    from pipeline.cli import main as cli_main

    sys.exit(cli_main(["reconstruct", *sys.argv[3:]]))


if __name__ == "__main__":
    main()
