"""Run by test_ddp.py: DigitsDataModule under a real 2-process DDP fit (CPU, gloo); each rank saves its keys.

Usage: python ddp_keys_run.py OUT_DIR NUM_PROCESSES. Lightning's ``ddp`` strategy relaunches this script
for the other ranks.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from sit_lightning.data import DigitsDataModule

GLOBAL_BATCH = 256
STEPS = 7  # crosses the epoch boundary (5 steps per epoch)


class KeyRecorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.keys: list[list[int]] = []
        self.x_sums: list[float] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.keys.append(batch["key"].tolist())
        self.x_sums.append(float(batch["x"].double().sum()))
        return torch.nn.functional.cross_entropy(self.layer(batch["x"].flatten(1)), batch["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out: Path, devices: int) -> None:
    warnings.simplefilter("ignore")
    model = KeyRecorder()
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=DigitsDataModule(global_batch_size=GLOBAL_BATCH, num_workers=0))
    record = {"keys": model.keys, "x_sums": model.x_sums, "world_size": trainer.world_size}
    (out / f"rank{trainer.global_rank}-of-{devices}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
