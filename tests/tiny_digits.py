"""Test helper: the tiny SiT that the evaluation tests fit on the 8 x 8 digits, and a quiet CPU Trainer.

The callbacks under test (grid, FID, plots) run inside a real ``Trainer.fit``; what they need from it is
a few fast steps on one CPU device with nothing else written (no checkpoints, no progress bar, no model
summary, no validation unless a test asks for it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer

from sit_lightning.models import SiTConfig
from sit_lightning.module import SiTModule

#: One block on the 1 x 8 x 8 digits in 4-px patches; ``SiTConfig(**dict(DIGITS_ARCH, ...))`` changes a field.
DIGITS_ARCH: dict[str, Any] = dict(
    input_size=8, in_channels=1, num_classes=10, learn_sigma=False,
    depth=1, hidden_size=32, num_heads=2, patch_size=4,
)  # fmt: skip
FIT_LR = 1e-2  # large, so that a few steps move the weights (and the samples) visibly


def fit_module(**arch: Any) -> SiTModule:
    """A ``SiTModule`` of ``DIGITS_ARCH`` (with the fields in ``arch`` changed), AdamW at ``FIT_LR``."""
    return SiTModule(
        arch=SiTConfig(**{**DIGITS_ARCH, **arch}),
        optimizer=lambda p: torch.optim.AdamW(p, lr=FIT_LR),
    )


def quiet_trainer(root: Path, **overrides: Any) -> Trainer:
    """A one-device CPU ``Trainer`` under ``root`` with no logger, checkpoints, progress bar, model summary or
    validation batches; ``overrides`` change any of these (and add ``max_steps``, ``callbacks``, ...)."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    return Trainer(**{**kwargs, **overrides})
