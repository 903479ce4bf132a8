"""FIDCallback checks what it reads from the data module when the fit starts, not at its first evaluation."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader

from sit_lightning.callbacks import FIDCallback
from sit_lightning.data import DigitsDataModule, LabelledImages


class LatentsOnly(LightningDataModule):
    """Training data without pixel images (like ``LatentDataModule``): no train_images, no test_images."""

    latent_shape = (1, 2, 2)
    num_classes = 2

    def train_dataloader(self) -> DataLoader:
        return DataLoader([{"x": torch.zeros(1, 2, 2), "y": torch.tensor(0)}] * 4, batch_size=2)


class WithTestImagesOnly(LatentsOnly):
    def test_images(self) -> LabelledImages:
        return LabelledImages(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))


class StepCounter(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.steps = 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return self.weight * batch["x"].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_digits_judge_without_training_images_fails_before_the_first_step() -> None:
    module = StepCounter()
    trainer = Trainer(
        max_steps=2, accelerator="cpu", logger=False, callbacks=[FIDCallback()], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(
        TypeError,
        match=r"FIDCallback\(feature='digits'\) .*train_images\(\).*LatentsOnly has no train_images",
    ):
        trainer.fit(module, datamodule=LatentsOnly())
    assert module.steps == 0


@pytest.mark.parametrize(
    ("settings", "datamodule", "message"),
    [
        (dict(feature="inception"), WithTestImagesOnly(), None),  # floor=None: left out without train_images
        (dict(feature="inception", floor=True), WithTestImagesOnly(), r"floor=True.*has no train_images"),
        (dict(feature="inception"), LatentsOnly(), r"without reference_stats.*has no test_images"),
        (dict(feature="inception", reference_stats="ref.npz"), LatentsOnly(), None),
        (dict(feature="inception", reference_stats="ref.npz"), None, None),  # bare loaders: nothing to read
        (dict(feature="inception"), None, r"test_images\(\).*the trainer has no data module"),
        (dict(), DigitsDataModule(), None),
    ],
)
def test_each_setting_requires_only_what_it_reads(settings, datamodule, message) -> None:
    callback = FIDCallback(**settings)
    if message is None:
        callback.check_datamodule(datamodule)
    else:
        with pytest.raises(TypeError, match=message):
            callback.check_datamodule(datamodule)


def test_the_floor_is_scored_by_default_exactly_when_training_images_exist() -> None:
    assert FIDCallback()._scores_floor(DigitsDataModule())
    assert not FIDCallback()._scores_floor(WithTestImagesOnly())
    assert not FIDCallback(floor=False)._scores_floor(DigitsDataModule())
