"""``DigitsDataModule``: the 8x8 handwritten digits that ship inside scikit-learn (no download).

The CPU demo's data: 1797 images of 8x8 pixels with values 0..16, 10 classes, in pixel space
(``x = v / 8 - 1`` in [-1, 1], shape (1, 8, 8)). No flips: a flipped digit is another symbol. A fixed,
stratified train/test split (1500 / 297 by default) keyed by ``split_seed`` is shared by training and
by the FID/accuracy callbacks (:meth:`train_images`, :meth:`test_images`). With ``repa_features=True``
each training batch also carries REPA's targets, the per-patch features of a small conv encoder trained
on the train split (:mod:`sit_lightning.evaluation.digits_encoder`; docs/repa_digits.md).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from sit_lightning.data.contract import LabelledImages
from sit_lightning.data.stream import SampleStreamDataModule

__all__ = ["DigitsDataModule", "DigitsSource", "LabelledImages", "DIGITS_MAX_VALUE", "digits_to_unit_range"]

DIGITS_MAX_VALUE = 16.0  # pixel values of load_digits are integers 0..16
DIGITS_SHAPE = (1, 8, 8)
DIGITS_NUM_CLASSES = 10
DIGITS_TEST_SIZE = 297  # 1797 = 1500 train + 297 test


def digits_to_unit_range(values: np.ndarray) -> np.ndarray:
    """Pixel values 0..16 -> [-1, 1] (``v / 8 - 1``), float32."""
    return (values.astype(np.float32) / (DIGITS_MAX_VALUE / 2) - 1.0).astype(np.float32)


class DigitsSource:
    """The stream's ``SampleSource`` over an in-memory image array (no randomness: nothing to draw).

    ``repa_features``: ``(n, T, C)`` per-image REPA targets, returned as ``batch["repa_features"]``.
    """

    def __init__(self, images: LabelledImages, repa_features: Tensor | None = None) -> None:
        if repa_features is not None and len(repa_features) != len(images.y):
            raise ValueError(f"{len(repa_features)} REPA feature rows for {len(images.y)} images")
        self.images = images
        self.repa_features = repa_features

    def __len__(self) -> int:
        return len(self.images.y)

    def load(self, indices: np.ndarray, keys: np.ndarray) -> dict[str, Tensor]:
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        batch = {"x": self.images.x[idx].clone(), "y": self.images.y[idx].clone()}
        if self.repa_features is not None:
            batch["repa_features"] = self.repa_features[idx].clone()
        return batch


class DigitsDataModule(SampleStreamDataModule):
    """8x8 digits -> batches ``{"x": (b, 1, 8, 8) float32 in [-1, 1], "y": (b,) int64, "key": (b,) int64}``.

    Same global-batch stream, key contract and exact resume as
    :class:`~sit_lightning.data.LatentDataModule`.

    Args:
        global_batch_size: samples per step over all devices; must divide by the world size.
        num_workers: data-loader workers per device (0 is fastest for this in-memory data).
        seed: seed of the epoch shuffles.
        split_seed: seed of the stratified train/test split (fixed separately so that changing
            ``seed`` keeps the test set).
        test_size: images held out for validation and evaluation.
        val_global_batch_size: validation batch over all devices (default: ``global_batch_size``;
            a test split smaller than one batch is evaluated as one batch of what divides by the ranks).
        pin_memory: pin host memory.
        repa_features: also put ``"repa_features"``, ``(b, 16, 64)`` float32, in every training batch:
            the 4x4 x 64 penultimate feature map of the digits encoder (a small conv net trained on the
            train split, :mod:`sit_lightning.evaluation.digits_encoder`), one token per 2x2 patch in the
            order of SiT/2's tokens. For ``model.repa: {encoder: null, feature_dim: 64, ...}``.
        repa_cache_dir: where the encoder's weights are cached (None: trained again, about a second).
    """

    def __init__(
        self,
        global_batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        split_seed: int = 0,
        test_size: int = DIGITS_TEST_SIZE,
        val_global_batch_size: int | None = None,
        pin_memory: bool = False,
        repa_features: bool = False,
        repa_cache_dir: str | None = None,
    ) -> None:
        super().__init__(global_batch_size, num_workers, seed, pin_memory, val_global_batch_size)
        self.save_hyperparameters()
        self.split_seed = split_seed
        self.test_size = test_size
        self.repa_features = bool(repa_features)
        self.repa_cache_dir = repa_cache_dir

    latent_shape = DIGITS_SHAPE  # (C, H, W) the model sees
    num_classes = DIGITS_NUM_CLASSES

    @property
    def repa_inputs(self) -> str:
        """What the batches carry for REPA (as ``LatentDataModule.repa_inputs``): ``features`` or ``none``.

        ``SiTModule`` checks it against ``model.repa`` before the first step.
        """
        return "features" if self.repa_features else "none"

    @cached_property
    def _split(self) -> tuple[LabelledImages, LabelledImages]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = digits_to_unit_range(digits.images).reshape(-1, *DIGITS_SHAPE)
        y = digits.target.astype(np.int64)
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=self.test_size, stratify=y, random_state=self.split_seed
        )
        as_images = lambda a, b: LabelledImages(torch.from_numpy(a), torch.from_numpy(b))
        return as_images(x_tr, y_tr), as_images(x_te, y_te)

    def train_images(self) -> LabelledImages:
        """The training split, ``(n, 1, 8, 8)`` in [-1, 1] (for the FID feature classifier)."""
        return self._split[0]

    def test_images(self) -> LabelledImages:
        """The held-out split, ``(n, 1, 8, 8)`` in [-1, 1] (the FID reference set)."""
        return self._split[1]

    @cached_property
    def train_repa_features(self) -> Tensor:
        """``(n, 16, 64)`` float32 REPA targets of the training split (the digits encoder's tokens)."""
        from sit_lightning.evaluation.digits_encoder import load_or_train_digits_encoder

        train = self.train_images()
        encoder = load_or_train_digits_encoder(train.x, train.y, cache_dir=self.repa_cache_dir)
        with torch.no_grad():
            return encoder.tokens(train.x).contiguous()

    def train_source(self) -> DigitsSource:
        features = self.train_repa_features if self.repa_features else None
        return DigitsSource(self.train_images(), features)

    def val_source(self) -> DigitsSource:
        return DigitsSource(self.test_images())
