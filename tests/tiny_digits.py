"""Test helper: the tiny SiT that the evaluation tests fit on the 8 x 8 digits, and a quiet CPU Trainer.

The callbacks under test (grid, FID, plots) run inside a real ``Trainer.fit``; what they need from it is
a few fast steps on one CPU device with nothing else written (no checkpoints, no progress bar, no model
summary, no validation unless a test asks for it): lightning_toy's quiet ``trainer_kwargs``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer

_LIGHTNING_HELPERS = str(Path(__file__).resolve().parent / "lightning")
if _LIGHTNING_HELPERS not in sys.path:  # lightning_toy; appended: never shadows the lightning package
    sys.path.append(_LIGHTNING_HELPERS)
from lightning_toy import trainer_kwargs  # noqa: E402

from sit_lightning.models import SiTConfig  # noqa: E402
from sit_lightning.module import SiTModule  # noqa: E402

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
    """A Trainer of lightning_toy's ``trainer_kwargs`` (one CPU device; no logger, checkpoints, progress bar,
    model summary or validation batches) under ``root``, with Lightning's defaults for the two settings the
    callback fits never asked for (deterministic kernels, the distributed sampler); ``overrides`` change any
    of them (and add ``max_steps``, ``callbacks``, ...)."""
    defaults: dict[str, Any] = dict(default_root_dir=root, deterministic=None, use_distributed_sampler=True)
    return Trainer(**trainer_kwargs(**{**defaults, **overrides}))
