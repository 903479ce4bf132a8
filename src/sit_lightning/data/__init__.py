"""Data: latent shards and their writer, the latent and digits datamodules, the global-batch stream,
and ``precompute-latents`` (ImageFolder -> VAE posterior moments -> shards).

Batch contract of both datamodules: ``{"x": (b, C, H, W) float32, "y": (b,) int64, "key": (b,) int64}``
with ``b = global_batch_size / world_size`` and ``key`` the sample's position in the run's sample stream.
"""

from sit_lightning.data.digits import DigitsDataModule, LabelledImages
from sit_lightning.data.latent_datamodule import LatentDataModule
from sit_lightning.data.precompute import precompute_latents, precompute_latents_main
from sit_lightning.data.sampler import GlobalBatchSampler, per_device_batch_size
from sit_lightning.data.shards import SD_VAE_SCALE, LatentShards, LatentShardWriter, validate_shards

__all__ = [
    "SD_VAE_SCALE",
    "DigitsDataModule",
    "GlobalBatchSampler",
    "LabelledImages",
    "LatentDataModule",
    "LatentShardWriter",
    "LatentShards",
    "per_device_batch_size",
    "precompute_latents",
    "precompute_latents_main",
    "validate_shards",
]
