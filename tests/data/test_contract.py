"""The data contract: which data modules offer what, and the message when one does not."""

from __future__ import annotations

import pytest
import torch

from sit_lightning.data import (
    DigitsDataModule,
    EvaluationImages,
    LabelledImages,
    LatentDataModule,
    RealTestImages,
    RealTrainImages,
    TrainingData,
    require,
)
from sit_lightning.data.contract import missing


class LabelsOnly:
    """A data module that knows its classes but not its sample shape."""

    num_classes = 3


def test_digits_offer_the_whole_contract_and_images_of_the_training_shape() -> None:
    dm = DigitsDataModule()
    for contract in (TrainingData, RealTrainImages, RealTestImages, EvaluationImages):
        assert missing(dm, contract) == [] and isinstance(dm, contract), contract.__name__
    for images in (dm.train_images(), dm.test_images()):
        # FID compares decoded samples, shaped like training samples, with these images
        assert isinstance(images, LabelledImages)
        assert images.x.shape[1:] == dm.latent_shape and images.x.dtype == torch.float32
        assert images.y.dtype == torch.int64 and int(images.y.max()) == dm.num_classes - 1


def test_latent_data_offers_training_data_only_and_checking_opens_no_shards(tmp_path) -> None:
    dm = LatentDataModule(str(tmp_path / "not-written-yet"))
    assert missing(dm, TrainingData) == []  # looked up, not evaluated: the index would not open
    assert require(dm, TrainingData, for_what="a test") is dm
    assert missing(dm, EvaluationImages) == ["train_images", "test_images"]


def test_require_names_the_class_the_missing_member_and_the_reader() -> None:
    with pytest.raises(
        TypeError,
        match=r"^SiTModule \(to check shapes\) needs a data module with latent_shape, num_classes "
        r"\(TrainingData in sit_lightning\.data\.contract\); LabelsOnly has no latent_shape$",
    ):
        require(LabelsOnly(), TrainingData, for_what="SiTModule (to check shapes)")
    with pytest.raises(TypeError, match=r"with test_images\(\) .*but the trainer has no data module"):
        require(None, RealTestImages, for_what="FIDCallback")
