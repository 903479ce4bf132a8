"""Run by test_distributed.py under ``python -m torch.distributed.run --nproc_per_node 2``.

Usage: eval_dist_run.py WORKDIR. Fits a tiny SiT for ``TRAIN_STEPS`` steps under DDP (gloo, CPU) with
the grid and FID callbacks; rank 0 saves the trained weights, the callbacks' results, the grid's float
latents and the path of the ``sit_lightning`` it imported to WORKDIR/result.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch import Trainer
from torch import Tensor

import sit_lightning
from sit_lightning.callbacks.fid import FIDCallback
from sit_lightning.callbacks.sample_grid import SampleGridCallback
from sit_lightning.data import DigitsDataModule
from sit_lightning.models import SiTConfig
from sit_lightning.module import SiTModule
from sit_lightning.sampling import SamplerSettings

SAMPLER = dict(sampler="ode", steps=2, method="euler")
GRID_LABELS = [3, 1, 4, 1, 5, 9, 2]  # 7 cells: 4 on rank 0, 3 (+1 padding) on rank 1
NUM_FID = 31  # odd: rank 1 pads its share
CFG_SCALES = [1.0, 2.0]
# adaLN-Zero starts every gate and the final linear at zero: after one step only the final linear has
# moved and samples ignore the label and the guidance scale. Three steps at this rate make both matter.
TRAIN_STEPS = 3
LEARNING_RATE = 3e-2


def build_module() -> SiTModule:
    """The tiny SiT, built the same way here and by the test's one-process recomputation."""
    return SiTModule(
        arch=SiTConfig(
            input_size=8, in_channels=1, num_classes=10, learn_sigma=False,
            depth=1, hidden_size=32, num_heads=2, patch_size=4,
        ),
        optimizer=lambda p: torch.optim.AdamW(p, lr=LEARNING_RATE),
    )  # fmt: skip


class RecordingGrid(SampleGridCallback):
    """The grid callback, keeping the gathered float latents that it turns into the PNG."""

    last_latents: Tensor | None = None

    def sample_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        self.last_latents = super().sample_images(trainer, pl_module)
        return self.last_latents


def main() -> None:
    workdir = Path(sys.argv[1])
    module = build_module()
    grid = RecordingGrid(
        every_n_steps=0, labels=GRID_LABELS, seed=3, batch_size=3, settings=SamplerSettings(**SAMPLER)
    )
    fid = FIDCallback(
        num_samples=NUM_FID,
        seed=4,
        cfg_scales=CFG_SCALES,
        batch_size=5,
        cache_dir=str(workdir / "cache"),
        settings=SamplerSettings(**SAMPLER),
    )
    trainer = Trainer(
        max_steps=TRAIN_STEPS, accelerator="cpu", devices=2, strategy="ddp", logger=False,
        callbacks=[grid, fid], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=workdir,
    )  # fmt: skip
    trainer.fit(module, datamodule=DigitsDataModule(global_batch_size=32))
    if trainer.global_rank == 0:
        torch.save(
            {
                "state_dict": module.network.state_dict(),
                "global_step": trainer.global_step,
                "grid_path": str(grid.last_path),
                "grid_latents": grid.last_latents.cpu(),
                "history": [(step, r._asdict()) for step, r in fid.history],
                "floor": fid.floor_fid,
                "sit_lightning_file": sit_lightning.__file__,
            },
            workdir / "result.pt",
        )


if __name__ == "__main__":
    main()
