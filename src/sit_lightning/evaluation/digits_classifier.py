"""A small classifier of the 8x8 digits: the feature extractor of the demo's FID and its accuracy judge.

Inception features mean nothing on 8x8 grey digits, so the demo measures its samples with a network
trained on the digits themselves (the usual practice for MNIST-like data): an MLP
``64 -> 256 -> 64 -> 10`` trained on the TRAIN split only (the FID reference is the test split).

- its 64 penultimate features (after the ReLU) feed torchmetrics' ``FrechetInceptionDistance``
  through :class:`DigitsFeatures` (which carries the ``num_features`` attribute torchmetrics reads);
- its predictions give the **conditional accuracy** of class-conditional samples: the share of
  samples that the classifier assigns to the class they were generated for.

Training is deterministic (fixed seed, full-batch Adam, CPU) and takes about a second; the weights
are cached in a file keyed by a hash of the training data and the recipe.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "DigitsClassifier",
    "DigitsClassifierRecipe",
    "DigitsFeatures",
    "load_or_train_digits_classifier",
    "train_digits_classifier",
]

DIGITS_PIXELS = 64  # 1 x 8 x 8
DIGITS_CLASSES = 10

M = TypeVar("M", bound=nn.Module)


class DigitsClassifier(nn.Module):
    """MLP on ``(N, 1, 8, 8)`` digits in [-1, 1]: ``64 -> hidden -> features -> classes``.

    Args:
        hidden: width of the first hidden layer.
        num_features: width of the penultimate layer (the FID feature dimension).
        num_classes: number of classes.
    """

    def __init__(self, hidden: int = 256, num_features: int = 64, num_classes: int = DIGITS_CLASSES) -> None:
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(DIGITS_PIXELS, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """``(N, num_features)`` penultimate activations."""
        return self.body(x.float())

    def forward(self, x: Tensor) -> Tensor:
        """``(N, num_classes)`` logits."""
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """``(N,)`` predicted classes."""
        return self(x).argmax(dim=1)


class DigitsFeatures(nn.Module):
    """The classifier's penultimate features as a torchmetrics FID feature extractor.

    torchmetrics calls ``feature(images)`` on exactly what ``update`` receives and reads the
    dimension from ``num_features``, so inputs are the ``(N, 1, 8, 8)`` float images in [-1, 1].
    """

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


@dataclass(frozen=True)
class DigitsClassifierRecipe:
    """How the classifier is trained (part of the cache key).

    Attributes:
        hidden: first hidden width.
        num_features: penultimate width (FID feature dimension).
        steps: full-batch Adam steps.
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.
        noise_std: std of Gaussian pixel noise added to training inputs (robustness to samples that
            are close to, but not exactly, dataset images).
        seed: seed of the initialisation and the noise.
    """

    hidden: int = 256
    num_features: int = 64
    steps: int = 200
    lr: float = 3e-3
    weight_decay: float = 1e-3
    noise_std: float = 0.1
    seed: int = 0


def train_digits_classifier(
    images: Tensor, labels: Tensor, recipe: DigitsClassifierRecipe | None = None
) -> DigitsClassifier:
    """Train a :class:`DigitsClassifier` on ``(N, 1, 8, 8)`` images in [-1, 1] with ``(N,)`` labels.

    Deterministic: the same data and recipe give the same weights.
    """
    recipe = recipe or DigitsClassifierRecipe()
    return train_on_noisy_pixels(
        lambda: _untrained_classifier(recipe, labels),
        images,
        labels,
        recipe,
        batches=lambda n, generator: itertools.repeat(slice(None), recipe.steps),  # full batch
    )


def _untrained_classifier(recipe: DigitsClassifierRecipe, labels: Tensor) -> DigitsClassifier:
    return DigitsClassifier(recipe.hidden, recipe.num_features, int(labels.max()) + 1)


def train_on_noisy_pixels(
    build: Callable[[], M],
    images: Tensor,
    labels: Tensor,
    recipe: Any,
    batches: Callable[[int, torch.Generator], Iterable[Tensor | slice]],
) -> M:
    """``build()``'s classifier trained with AdamW on the cross-entropy of pixel-noised images (CPU).

    Deterministic: ``recipe.seed`` seeds the initialisation (in a forked global RNG, which is left as it
    was) and a generator that draws the batches and the noise, in that order per batch.
    ``batches(N, generator)`` yields the indices of each AdamW step's images (``slice(None)``: all);
    ``recipe`` gives ``seed``, ``lr``, ``weight_decay`` and ``noise_std``. The model comes back in eval
    mode, frozen.
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = build()
    x = images.detach().float().cpu()
    y = labels.detach().long().cpu()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    model.train()
    with torch.enable_grad():  # callers (evaluation hooks, data setup) often run under no_grad
        for batch in batches(len(y), generator):
            noisy = x[batch] + recipe.noise_std * torch.randn(x[batch].shape, generator=generator)
            loss = nn.functional.cross_entropy(model(noisy), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


def _cache_key(images: Tensor, labels: Tensor, recipe: Any) -> str:
    """16 hex digits of a hash of the training images, labels and the recipe (a dataclass)."""
    h = hashlib.sha256()
    h.update(images.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(labels.detach().long().cpu().contiguous().numpy().tobytes())
    h.update(repr(sorted(asdict(recipe).items())).encode())
    return h.hexdigest()[:16]


def load_or_train_cached(
    name: str,
    images: Tensor,
    labels: Tensor,
    recipe: Any,
    cache_dir: str | Path | None,
    build: Callable[[], M],
    train: Callable[[], M],
) -> M:
    """``train()``'s model, or the one cached as ``<cache_dir>/<name>-<hash>.pt`` by an earlier call.

    The hash covers the images, the labels and the recipe, so a different split or recipe never reuses
    stale weights; ``cache_dir=None`` trains without caching. ``build()`` makes the untrained model the
    cached weights load into. The file is written atomically per process (parallel runs or DDP ranks may
    write at once; a reader never sees half a file). The model comes back in eval mode, frozen.
    """
    if cache_dir is None:
        return train().eval().requires_grad_(False)
    path = Path(cache_dir) / f"{name}-{_cache_key(images, labels, recipe)}.pt"
    if path.is_file():
        model = build()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval().requires_grad_(False)
    model = train()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.eval().requires_grad_(False)


def load_or_train_digits_classifier(
    images: Tensor,
    labels: Tensor,
    cache_dir: str | Path | None = None,
    recipe: DigitsClassifierRecipe | None = None,
) -> DigitsClassifier:
    """The classifier for this training data and recipe, from ``cache_dir`` if trained before.

    The file name holds a hash of the images, the labels and the recipe, so a different split or
    recipe never reuses stale weights. ``cache_dir=None`` trains without caching.
    """
    recipe = recipe or DigitsClassifierRecipe()
    return load_or_train_cached(
        "digits_classifier",
        images,
        labels,
        recipe,
        cache_dir,
        build=lambda: _untrained_classifier(recipe, labels),
        train=lambda: train_digits_classifier(images, labels, recipe),
    )
