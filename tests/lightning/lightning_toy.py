"""Test helpers: a random-latent DataModule that splits one global batch across ranks, and a tiny SiT.

Random 4x8x8 "latents" stand in for real data; what matters is that the global batch of step s is the
same set of samples for any world size (DistributedSampler over one seeded permutation), so runs on
1 and 2 processes can be compared tensor by tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

TINY_MODEL: dict[str, Any] = dict(
    arch="SiT-S/2", input_size=8, in_channels=4, num_classes=3, depth=2, hidden_size=32, num_heads=2
)


class _Latents(Dataset):
    def __init__(self, n: int, shape: tuple[int, ...], num_classes: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn((n, *shape), generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "key": torch.tensor(i, dtype=torch.long)}


class RandomLatentsDataModule(LightningDataModule):
    """``num_samples`` random latents; ``global_batch_size`` split evenly over the ranks."""

    def __init__(
        self,
        global_batch_size: int = 8,
        num_samples: int = 16,
        latent_shape: tuple[int, int, int] = (4, 8, 8),
        num_classes: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.global_batch_size = global_batch_size
        self.num_samples = num_samples
        self.latent_shape = tuple(latent_shape)
        self.num_classes = num_classes
        self.seed = seed

    def _loader(self, shuffle: bool) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        data = _Latents(self.num_samples, self.latent_shape, self.num_classes, self.seed)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)
        return DataLoader(data, batch_size=self.global_batch_size // world, sampler=sampler, drop_last=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader(shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(shuffle=False)


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Quiet, deterministic CPU Trainer settings for tests."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs
