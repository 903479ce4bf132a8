"""DigitsDataModule: the scikit-learn 8x8 digits, pixel scaling, a fixed stratified split, the batch contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from sit_lightning.data import DigitsDataModule, GlobalBatchSampler


@pytest.fixture(scope="module")
def datamodule() -> DigitsDataModule:
    return DigitsDataModule(global_batch_size=100, seed=7)


def test_split_is_stratified_disjoint_and_complete(datamodule: DigitsDataModule) -> None:
    train, test = datamodule.train_images(), datamodule.test_images()
    assert len(train.y) == 1500 and len(test.y) == 297
    digits = load_digits()
    # every image appears exactly once over both splits (compare pixel rows as bytes)
    all_rows = sorted(r.tobytes() for r in (digits.images / 8 - 1).astype(np.float32).reshape(1797, -1))
    split_rows = sorted(r.tobytes() for r in torch.cat([train.x, test.x]).reshape(1797, -1).numpy())
    assert all_rows == split_rows
    # stratified: each class's share of the test set matches its share of the data within one image
    counts = np.bincount(digits.target, minlength=10)
    np.testing.assert_allclose(np.bincount(test.y.numpy(), minlength=10), counts * 297 / 1797, atol=1)
    # the split depends on split_seed only
    other = DigitsDataModule(seed=123, split_seed=0).test_images()
    torch.testing.assert_close(other.x, test.x, rtol=0, atol=0)
    assert not torch.equal(DigitsDataModule(split_seed=1).test_images().x, test.x)


def test_pixels_are_scaled_to_unit_range(datamodule: DigitsDataModule) -> None:
    digits = load_digits()
    x = datamodule.train_images().x
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
    assert x.min() == -1.0 and x.max() == 1.0  # 0 -> -1, 16 -> 1
    # the grid of values is v/8 - 1 for integer v in 0..16
    np.testing.assert_allclose(np.unique(x.numpy()), np.unique(digits.images) / 8 - 1, atol=0)
    assert datamodule.latent_shape == (1, 8, 8) and datamodule.num_classes == 10


def test_batches_follow_the_contract_without_flips(datamodule: DigitsDataModule) -> None:
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 15  # 1500 / 100
    sampler = GlobalBatchSampler(1500, 100, seed=7)
    train = datamodule.train_images()
    for step, batch in enumerate(batches[:3]):
        assert batch["x"].dtype == torch.float32 and batch["y"].dtype == torch.int64
        assert batch["key"].dtype == torch.int64
        np.testing.assert_array_equal(batch["key"].numpy(), np.arange(step * 100, (step + 1) * 100))
        idx = torch.from_numpy(sampler.batch(step).indices)
        # the image itself, never mirrored
        torch.testing.assert_close(batch["x"], train.x[idx], rtol=0, atol=0)
        torch.testing.assert_close(batch["y"], train.y[idx], rtol=0, atol=0)


def test_validation_covers_the_test_split_in_order(datamodule: DigitsDataModule) -> None:
    val = list(datamodule.val_dataloader())
    test = datamodule.test_images()
    x = torch.cat([b["x"] for b in val])
    assert len(x) == 200  # two whole batches of 100 from 297
    torch.testing.assert_close(x, test.x[:200], rtol=0, atol=0)
    np.testing.assert_array_equal(torch.cat([b["key"] for b in val]).numpy(), np.arange(200))
    # a validation batch larger than the test split is capped to one whole batch
    big = DigitsDataModule(global_batch_size=512)
    assert sum(len(b["y"]) for b in big.val_dataloader()) == 297
