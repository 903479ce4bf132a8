"""Run by the distributed tests under ``python -m torch.distributed.run --nproc_per_node 2``.

Usage: lightning_dist_run.py {ddp,fsdp} STEPS WORKDIR. Trains STEPS/2 steps, checkpoints, resumes for
the rest and writes the final full state (rank 0) to WORKDIR/result.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning_toy import run_training  # noqa: E402


def main() -> None:
    kind, steps, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.use_deterministic_algorithms(True)
    state = run_training(kind, steps, split=True, workdir=workdir, devices=2)
    if state is not None:
        torch.save(state, Path(workdir) / "result.pt")


if __name__ == "__main__":
    main()
