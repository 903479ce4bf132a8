"""Run by the distributed tests under ``python -m torch.distributed.run --nproc_per_node 2``.

Usage: lightning_dist_run.py KINDS STEPS WORKDIR with KINDS a comma list of ``ddp`` and ``fsdp``. For each
kind (in the same processes, which saves a launch): trains STEPS/2 steps, checkpoints, resumes for the rest
and writes the final full state (rank 0) to WORKDIR/<kind>/result.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_toy import run_training  # noqa: E402


def main() -> None:
    kinds, steps, workdir = sys.argv[1].split(","), int(sys.argv[2]), Path(sys.argv[3])
    torch.use_deterministic_algorithms(True)
    for kind in kinds:
        (workdir / kind).mkdir(parents=True, exist_ok=True)
        state = run_training(kind, steps, split=True, workdir=str(workdir / kind), devices=2)
        if state is not None:
            torch.save(state, workdir / kind / "result.pt")


if __name__ == "__main__":
    main()
