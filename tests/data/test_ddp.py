"""DigitsDataModule under a real 2-process DDP fit (CPU, gloo): ranks split each global batch exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sit_lightning.data import DigitsDataModule

SCRIPT = Path(__file__).with_name("ddp_keys_run.py")
GLOBAL_BATCH, STEPS = 256, 7


def test_two_ranks_split_every_global_batch_of_the_single_process_stream(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "2"], check=True, env=env, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}-of-2.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # the single-process stream without a trainer: two passes over the loader cover epochs 0 and 1
    loader = DigitsDataModule(global_batch_size=GLOBAL_BATCH).train_dataloader()
    reference = (list(loader) + list(loader))[:STEPS]
    for step, want in enumerate(reference):
        half = GLOBAL_BATCH // 2
        assert ranks[0]["keys"][step] == want["key"][:half].tolist()  # rank 0: first half of the batch
        assert ranks[1]["keys"][step] == want["key"][half:].tolist()
        x_sum = ranks[0]["x_sums"][step] + ranks[1]["x_sums"][step]
        np.testing.assert_allclose(x_sum, float(want["x"].double().sum()), rtol=1e-12)
