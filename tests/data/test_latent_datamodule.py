"""LatentDataModule: fresh keyed flip and posterior sample per draw, scaling, rank/worker independence, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sit_lightning.data import SD_VAE_SCALE, LatentDataModule, LatentShardWriter
from sit_lightning.data.latent_datamodule import LatentSource
from sit_lightning.data.stream import GlobalBatchSampler, GlobalBatchStream

SHAPE = (4, 4, 4)
N = 40
PLAIN_MEAN, PLAIN_STD, FLIP_MEAN, FLIP_STD = 3.0, 0.5, -3.0, 0.25


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Image i has plain mean 3 + i/100 (std 0.5) and flipped mean -3 - i/100 (std 0.25): the draw shows both."""
    path = tmp_path_factory.mktemp("latents")
    offset = (np.arange(N, dtype=np.float32) / 100).reshape(-1, 1, 1, 1)
    ones = np.ones((N, *SHAPE), np.float32)
    writer = LatentShardWriter(
        path, SHAPE, shard_size=16, vae_id="test", class_names=[f"c{i}" for i in range(5)]
    )
    writer.add(
        PLAIN_MEAN * ones + offset,
        PLAIN_STD * ones,
        FLIP_MEAN * ones - offset,
        FLIP_STD * ones,
        np.arange(N) % 5,
    )
    writer.close()
    return path


def _draws(dm: LatentDataModule, index: int, keys: np.ndarray) -> torch.Tensor:
    """Unscaled latents of image ``index`` drawn with ``keys``."""
    source = dm.train_source()
    return source.load(np.full(len(keys), index), keys)["x"] / SD_VAE_SCALE


def test_flip_and_posterior_are_fresh_per_draw(shard_dir: Path) -> None:
    dm = LatentDataModule(str(shard_dir), num_workers=0, pin_memory=False, global_batch_size=8, seed=11)
    keys = np.arange(4000)
    z = _draws(dm, 0, keys).double()  # (4000, C, H, W)
    flipped = z.mean(dim=(1, 2, 3)) < 0
    assert abs(flipped.double().mean().item() - 0.5) < 0.035  # p = 0.5, 4.4 binomial sigmas
    # given the flip, z = mean + std * n with n standard normal, fresh in every draw
    n_plain = (z[~flipped] - PLAIN_MEAN) / PLAIN_STD
    n_flip = (z[flipped] - FLIP_MEAN) / FLIP_STD
    for n in (n_plain, n_flip):
        assert abs(n.mean().item()) < 4 / n.numel() ** 0.5
        assert abs(n.std().item() - 1) < 4 / (2 * n.numel()) ** 0.5
    # the same key draws the same flip and sample, whatever batch it comes in; another seed draws others
    torch.testing.assert_close(_draws(dm, 0, np.array([17, 3])), torch.stack([z[17], z[3]]).float())
    other = _draws(
        LatentDataModule(str(shard_dir), num_workers=0, pin_memory=False, global_batch_size=8, seed=12),
        0,
        keys[:50],
    ).double()
    assert not torch.allclose(other, z[:50])


def test_without_randomness_the_scaled_mean_is_returned(shard_dir: Path) -> None:
    dm = LatentDataModule(
        str(shard_dir),
        num_workers=0,
        pin_memory=False,
        global_batch_size=8,
        flip=False,
        sample_posterior=False,
    )
    batch = dm.train_source().load(np.array([5, 0, 39]), np.array([0, 1, 2]))
    want = (PLAIN_MEAN + np.array([5, 0, 39]) / 100).astype(np.float32) * SD_VAE_SCALE
    torch.testing.assert_close(batch["x"][:, 0, 0, 0], torch.from_numpy(want))
    torch.testing.assert_close(batch["y"], torch.tensor([0, 0, 4]))
    assert batch["x"].dtype == torch.float32 and batch["y"].dtype == torch.int64


def _rank_batches(dm: LatentDataModule, rank: int, world_size: int, num_workers: int) -> list[dict]:
    source = dm.train_source()
    sampler = GlobalBatchSampler(len(source), 8, rank=rank, world_size=world_size, seed=dm.seed)
    stream = GlobalBatchStream(source, sampler, 3, 9)  # crosses the epoch boundary at step 5
    return list(DataLoader(stream, batch_size=None, num_workers=num_workers))


def test_global_batches_do_not_depend_on_ranks_or_workers(shard_dir: Path) -> None:
    dm = LatentDataModule(str(shard_dir), num_workers=0, pin_memory=False, global_batch_size=8, seed=4)
    single = _rank_batches(dm, 0, 1, 0)
    two_ranks = [_rank_batches(dm, r, 2, 2) for r in range(2)]
    assert len(single) == 6
    for step, want in enumerate(single):
        for name in ("x", "y", "key"):
            got = torch.cat([two_ranks[r][step][name] for r in range(2)])
            torch.testing.assert_close(got, want[name], rtol=0, atol=0)


def test_datamodule_metadata(shard_dir: Path) -> None:
    dm = LatentDataModule(str(shard_dir), num_workers=0, pin_memory=False, global_batch_size=8)
    assert dm.latent_shape == SHAPE and dm.num_classes == 5
    torch.testing.assert_close(dm.denormalize(torch.ones(1, *SHAPE)), torch.ones(1, *SHAPE) / SD_VAE_SCALE)
    loader = dm.train_dataloader()
    assert len(loader) == N // 8
    with pytest.raises(ValueError, match="either val_dir or val_fraction"):
        LatentDataModule(str(shard_dir), val_dir=str(shard_dir), val_fraction=0.1)


def test_validation_split_is_held_out_and_fixed(shard_dir: Path) -> None:
    dm = LatentDataModule(
        str(shard_dir), num_workers=0, pin_memory=False, global_batch_size=8, val_fraction=0.2, seed=1
    )
    dm.setup("fit")
    train, val = dm.train_source(), dm.val_source()
    assert val is not None and len(val) == 8 and len(train) == 32
    assert set(val.subset.tolist()).isdisjoint(train.subset.tolist())
    first = [b["x"] for b in dm.val_dataloader()]
    second = [b["x"] for b in dm.val_dataloader()]
    assert len(first) == 1
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # keyed: the same every validation


def test_missing_shard_is_reported_by_the_datamodule(shard_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in shard_dir.iterdir():
        if f.name != "moments-000001.npy":
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match="moments-000001.npy is missing"):
        LatentDataModule(str(broken)).setup("fit")


def test_source_rejects_nothing_silently(shard_dir: Path) -> None:
    dm = LatentDataModule(str(shard_dir), num_workers=0, pin_memory=False, global_batch_size=8)
    source: LatentSource = dm.train_source()
    with pytest.raises(IndexError, match="out of range"):
        source.load(np.array([N]), np.array([0]))


def test_shards_of_another_latent_shape_stop_the_fit_before_any_step(shard_dir: Path) -> None:
    """The shards' index, read through the data contract, is checked against the network in setup."""
    import lightning.pytorch as pl

    from sit_lightning.models import SiTConfig
    from sit_lightning.module import ShapeMismatchError, SiTModule

    dm = LatentDataModule(str(shard_dir), num_workers=0, pin_memory=False, global_batch_size=8)
    arch = SiTConfig(input_size=8, in_channels=4, num_classes=5, depth=1, hidden_size=32, num_heads=2)
    module = SiTModule(arch=arch)  # expects (4, 8, 8); the shards hold (4, 4, 4)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(ShapeMismatchError, match=r"latent shape \(4, 4, 4\).*\(4, 8, 8\).*input_size"):
        trainer.fit(module, dm)
    assert trainer.global_step == 0
