"""A small conv encoder of the 8x8 digits whose penultimate layer is a 4x4 feature map: REPA's target.

REPA (Yu et al., ICLR 2025, Sec. 3.2) aligns each hidden token of the network with a frozen encoder's
feature of the same patch of the clean image. For the digits demo (SiT/2 on 1x8x8 pixels: a 4x4 grid,
16 tokens) DINOv2 is out of reach and meaningless, and the digits judge
(:mod:`~sit_lightning.evaluation.digits_classifier`) has no per-token features (and aligning with the
judge would make its scores circular). This encoder is a separate network trained on the TRAIN split
only:

    conv 3x3 (1 -> width), ReLU     8x8
    conv 2x2 stride 2 (-> C), ReLU  4x4: one cell per 2x2 patch, the cells of SiT's PatchEmbed
    conv 3x3 (C -> C), ReLU         4x4 x C: the feature map (penultimate layer)
    mean over the 16 cells, linear C -> 10 classes (the head that trains it)

:meth:`DigitsEncoder.tokens` flattens the map row-major over the ``(row, column)`` cell grid, the token
order of SiT's PatchEmbed (``proj(x).flatten(2).transpose(1, 2)``), so token ``n`` describes the patch
of rows ``2 (n // 4) ..`` and columns ``2 (n % 4) ..``. Training is deterministic (fixed seed,
minibatch AdamW with pixel noise, CPU, about a second); the weights are cached in a file keyed by a
hash of the training data and the recipe, like the judge's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .digits_classifier import load_or_train_cached, train_on_noisy_pixels

__all__ = [
    "DIGITS_ENCODER_FEATURES",
    "DigitsEncoder",
    "DigitsEncoderRecipe",
    "load_or_train_digits_encoder",
    "train_digits_encoder",
]

#: channels of the 4x4 feature map (``model.repa.feature_dim`` of a digits REPA run)
DIGITS_ENCODER_FEATURES = 64
DIGITS_CLASSES = 10


class DigitsEncoder(nn.Module):
    """Conv net on ``(N, 1, 8, 8)`` digits in [-1, 1] with a ``(N, C, 4, 4)`` penultimate feature map.

    Args:
        width: channels of the first (8x8) convolution.
        num_features: channels ``C`` of the 4x4 feature map.
        num_classes: classes of the training head.
    """

    def __init__(
        self, width: int = 32, num_features: int = DIGITS_ENCODER_FEATURES, num_classes: int = DIGITS_CLASSES
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(1, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, num_features, kernel_size=2, stride=2),
            nn.ReLU(),
            nn.Conv2d(num_features, num_features, kernel_size=3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def feature_map(self, x: Tensor) -> Tensor:
        """``(N, C, H/2, W/2)`` penultimate activations."""
        return self.body(x.float())

    def tokens(self, x: Tensor) -> Tensor:
        """``(N, (H/2) (W/2), C)`` per-patch features, row-major over the cells (SiT's token order)."""
        return self.feature_map(x).flatten(2).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, num_classes)`` logits (mean over the cells, then linear)."""
        return self.head(self.feature_map(x).mean(dim=(2, 3)))


@dataclass(frozen=True)
class DigitsEncoderRecipe:
    """How the encoder is trained (part of the cache key).

    Attributes:
        width: channels of the first convolution.
        num_features: channels of the 4x4 feature map.
        epochs: passes over the training images, in shuffled minibatches.
        batch_size: images per AdamW step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        noise_std: std of the Gaussian pixel noise added to training inputs.
        seed: seed of the initialisation and the noise.
    """

    width: int = 32
    num_features: int = DIGITS_ENCODER_FEATURES
    epochs: int = 15
    batch_size: int = 50
    lr: float = 1e-2
    weight_decay: float = 1e-3
    noise_std: float = 0.1
    seed: int = 0


def train_digits_encoder(
    images: Tensor, labels: Tensor, recipe: DigitsEncoderRecipe | None = None
) -> DigitsEncoder:
    """Train a :class:`DigitsEncoder` on ``(N, 1, 8, 8)`` images in [-1, 1] with ``(N,)`` labels.

    Deterministic: the same data and recipe give the same weights (CPU).
    """
    recipe = recipe or DigitsEncoderRecipe()
    return train_on_noisy_pixels(
        lambda: _untrained_encoder(recipe, labels),
        images,
        labels,
        recipe,
        batches=lambda n, generator: _shuffled_minibatches(n, generator, recipe.epochs, recipe.batch_size),
    )


def _untrained_encoder(recipe: DigitsEncoderRecipe, labels: Tensor) -> DigitsEncoder:
    return DigitsEncoder(recipe.width, recipe.num_features, int(labels.max()) + 1)


def _shuffled_minibatches(
    n: int, generator: torch.Generator, epochs: int, batch_size: int
) -> Iterator[Tensor]:
    """The indices of each minibatch: per epoch a fresh permutation of ``range(n)``, cut in ``batch_size``."""
    for _ in range(epochs):
        yield from torch.randperm(n, generator=generator).split(batch_size)


def load_or_train_digits_encoder(
    images: Tensor,
    labels: Tensor,
    cache_dir: str | Path | None = None,
    recipe: DigitsEncoderRecipe | None = None,
) -> DigitsEncoder:
    """The encoder for this training data and recipe, from ``cache_dir`` if trained before.

    The file name holds a hash of the images, the labels and the recipe, so a different split or
    recipe never reuses stale weights. ``cache_dir=None`` trains without caching.
    """
    recipe = recipe or DigitsEncoderRecipe()
    return load_or_train_cached(
        "digits_encoder",
        images,
        labels,
        recipe,
        cache_dir,
        build=lambda: _untrained_encoder(recipe, labels),
        train=lambda: train_digits_encoder(images, labels, recipe),
    )
