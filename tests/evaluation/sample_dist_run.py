"""``sit-lightning sample`` in one process of a torchrun launch (2 processes, gloo on the CPU).

Usage: ``torchrun --nproc_per_node 2 sample_dist_run.py ARGS...``: ARGS are the subcommand's, and
``--accelerator cpu --devices <nproc>`` is added. Run by tests/evaluation/test_sample_command.py.
"""

from __future__ import annotations

import os
import sys

import torch

from sit_lightning.cli import main

if __name__ == "__main__":
    torch.set_num_threads(1)
    devices = os.environ["LOCAL_WORLD_SIZE"]
    sys.exit(main(["sample", *sys.argv[1:], "--accelerator", "cpu", "--devices", devices]))
