"""Data: latent shards and their writer, the latent and digits datamodules, the global-batch stream,
and ``precompute-latents`` (ImageFolder -> VAE posterior moments -> shards).

Batch contract of both datamodules: ``{"x": (b, C, H, W) float32, "y": (b,) int64, "key": (b,) int64}``
with ``b = global_batch_size / world_size`` and ``key`` the sample's position in the run's sample stream.

What the module and the callbacks read from a data module besides its batches is written down as
protocols in :mod:`sit_lightning.data.contract` (``TrainingData``, ``RealTrainImages``,
``RealTestImages``), checked with ``require``.

Names are imported on first access, so ``sit_lightning.data.shards`` and the encoding processes of
``precompute-latents`` do not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SD_VAE_SCALE": "sit_lightning.data.shards",
    "LatentShards": "sit_lightning.data.shards",
    "LatentShardWriter": "sit_lightning.data.shards",
    "validate_shards": "sit_lightning.data.shards",
    "GlobalBatchSampler": "sit_lightning.data.stream",
    "per_device_batch_size": "sit_lightning.data.stream",
    "LatentDataModule": "sit_lightning.data.latent_datamodule",
    "DigitsDataModule": "sit_lightning.data.digits",
    "LabelledImages": "sit_lightning.data.contract",
    "TrainingData": "sit_lightning.data.contract",
    "RealTrainImages": "sit_lightning.data.contract",
    "RealTestImages": "sit_lightning.data.contract",
    "EvaluationImages": "sit_lightning.data.contract",
    "require": "sit_lightning.data.contract",
    "precompute_latents": "sit_lightning.data.precompute",
    "precompute_latents_main": "sit_lightning.data.precompute",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sit_lightning.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
