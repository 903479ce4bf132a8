"""FID through torchmetrics' ``FrechetInceptionDistance``, with cached reference statistics.

    FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))

over the Gaussians (mean, covariance) of a feature extractor's activations on real (r) and generated
(g) images. torchmetrics accumulates, per set, the feature sum, the sum of outer products and the
count; those three are the :class:`FeatureStatistics` we cache, so the reference set is run through
the extractor once per (data set, extractor) and its statistics are loaded into every later metric.

Feature extractors:

- ``"inception"``: torchmetrics' InceptionV3 (2048 pool features; the standard ImageNet FID). Needs
  the optional extra ``pip install "sit-lightning[fid]"`` (torch-fidelity) and its weights file.
  Images go in as floats in [-1, 1] and are converted to uint8 0..255 here.
- any ``nn.Module`` mapping the images to ``(N, D)`` features and carrying ``num_features = D``
  (e.g. :class:`~sit_lightning.evaluation.digits_classifier.DigitsFeatures`); it receives the images
  exactly as given to :meth:`FIDScorer.update`.

Distributed: every rank updates the metric with its own generated images; torchmetrics sums the
states over ranks in ``compute``. The reference statistics are loaded on rank 0 only (zeros on the
other ranks), so that the summed reference equals the reference, not ``world`` copies of it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .images import PIXEL_RANGE, to_uint8

__all__ = [
    "feature_statistics",
    "FeatureStatistics",
    "FIDScorer",
    "frechet_distance",
    "INCEPTION_FEATURES",
    "load_statistics",
    "make_fid_metric",
    "module_device",
    "save_statistics",
]

#: Pool features of torchmetrics' InceptionV3 (the standard FID layer).
INCEPTION_FEATURES = 2048
#: Sample count assumed for reference files that store only mean and covariance (ADM's ``.npz``).
ADM_REFERENCE_COUNT = 50_000


class FeatureStatistics(NamedTuple):
    """Sufficient statistics of a feature set (torchmetrics' FID state), float64.

    Attributes:
        feature_sum: ``(D,)`` sum of the features.
        cov_sum: ``(D, D)`` sum of the outer products ``f f^T``.
        num_samples: number of feature vectors.
    """

    feature_sum: Tensor
    cov_sum: Tensor
    num_samples: int

    @property
    def mean(self) -> Tensor:
        """``(D,)`` feature mean."""
        return self.feature_sum / self.num_samples

    @property
    def covariance(self) -> Tensor:
        """``(D, D)`` unbiased feature covariance (divides by ``n - 1``, as torchmetrics does)."""
        mu = self.mean
        return (self.cov_sum - self.num_samples * torch.outer(mu, mu)) / (self.num_samples - 1)

    @classmethod
    def from_mean_cov(cls, mean: Tensor, cov: Tensor, num_samples: int) -> FeatureStatistics:
        """The sums that reproduce a given mean and unbiased covariance of ``num_samples`` vectors."""
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        n = int(num_samples)
        return cls(mean * n, cov * (n - 1) + n * torch.outer(mean, mean), n)


def module_device(module: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of ``module``'s first parameter or buffer (``default`` for a module without any)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device(default)


def feature_statistics(features: Tensor) -> FeatureStatistics:
    """The statistics of ``(N, D)`` features."""
    f = features.detach().double()
    return FeatureStatistics(f.sum(dim=0), f.T @ f, int(f.shape[0]))


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """FID between two cached statistics, with torchmetrics' formula (float64).

    ``|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 sum_i sqrt(lambda_i(S_a S_b))``: the trace of the
    matrix square root is the sum of the square roots of the eigenvalues of ``S_a S_b``.
    """
    mu_a, mu_b = a.mean.double(), b.mean.double()
    cov_a, cov_b = a.covariance.double(), b.covariance.double()
    root_trace = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * root_trace)


def save_statistics(stats: FeatureStatistics, path: str | Path) -> Path:
    """Write statistics to ``.pt`` (the sums) or ``.npz`` (``mu``, ``sigma``, ``num_samples``; ADM-like)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a per-process temporary name: under DDP every rank may write the same cache file at once, and a
    # shared temporary would be renamed away under another rank's feet
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".npz":
        with open(tmp, "wb") as fh:
            np.savez(fh, mu=stats.mean.numpy(), sigma=stats.covariance.numpy(), num_samples=stats.num_samples)
    else:
        torch.save(
            {"feature_sum": stats.feature_sum, "cov_sum": stats.cov_sum, "num_samples": stats.num_samples},
            tmp,
        )
    tmp.replace(path)
    return path


def load_statistics(path: str | Path) -> FeatureStatistics:
    """Read :func:`save_statistics` output, or an ADM reference ``.npz`` (``mu``, ``sigma``)."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            n = int(data["num_samples"]) if "num_samples" in data else ADM_REFERENCE_COUNT
            return FeatureStatistics.from_mean_cov(
                torch.from_numpy(data["mu"]), torch.from_numpy(data["sigma"]), n
            )
    stored = torch.load(path, map_location="cpu", weights_only=True)
    return FeatureStatistics(
        stored["feature_sum"].double(), stored["cov_sum"].double(), int(stored["num_samples"])
    )


class _UInt8Inception(nn.Module):
    """torchmetrics' InceptionV3 fed with our [-1, 1] float images (it wants uint8 RGB)."""

    def __init__(self) -> None:
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
        except ImportError as err:  # pragma: no cover - torchmetrics is a core dependency
            raise ImportError("FID with the Inception extractor needs torchmetrics") from err
        if not _TORCH_FIDELITY_AVAILABLE:
            raise ImportError(
                "feature='inception' needs torch-fidelity (torchmetrics' InceptionV3): "
                'pip install "sit-lightning[fid]"; or pass your own nn.Module feature extractor'
            )
        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)]
        )
        self.num_features = INCEPTION_FEATURES

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.inception(to_uint8(x, PIXEL_RANGE)).reshape(x.shape[0], -1)


def make_fid_metric(feature: Literal["inception"] | nn.Module) -> Any:
    """torchmetrics ``FrechetInceptionDistance`` over ``feature`` that keeps its reference between resets.

    Args:
        feature: ``"inception"`` (needs ``.[fid]``) or an ``nn.Module`` with ``num_features``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature, str):
        if feature != "inception":
            raise ValueError(f"feature must be 'inception' or an nn.Module; got {feature!r}")
        feature = _UInt8Inception()
    if not isinstance(feature, nn.Module):
        raise TypeError(f"feature must be 'inception' or an nn.Module; got {type(feature).__name__}")
    if not isinstance(getattr(feature, "num_features", None), int):
        raise ValueError(
            "a custom FID feature module needs an int attribute `num_features` (its output width)"
        )
    # normalize=True: torchmetrics then passes float images through to a custom module unchanged
    return FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True)


def statistics_cache_key(dataset: str, feature: nn.Module | str) -> str:
    """A file-name-safe key of a (data set, extractor) pair; the extractor part hashes its weights."""
    h = hashlib.sha256(dataset.encode())
    if isinstance(feature, nn.Module):
        h.update(type(feature).__qualname__.encode())
        for name, tensor in sorted(feature.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    else:
        h.update(feature.encode())
    return h.hexdigest()[:16]


class FIDScorer:
    """FID of generated images against fixed reference statistics (torchmetrics underneath).

    Args:
        feature: the extractor (see module docs).
        reference: statistics of the real set; load them with :func:`load_statistics` or compute
            them with :meth:`reference_from_images`.
        rank: global rank; the reference goes into rank 0's state only (see module docs).
    """

    def __init__(
        self, feature: Literal["inception"] | nn.Module, reference: FeatureStatistics, rank: int = 0
    ):
        self.metric = make_fid_metric(feature)
        self.reference = reference
        self._load_reference(rank)

    def _load_reference(self, rank: int) -> None:
        m = self.metric
        if rank == 0:
            m.real_features_sum = self.reference.feature_sum.to(m.real_features_sum)
            m.real_features_cov_sum = self.reference.cov_sum.to(m.real_features_cov_sum)
            m.real_features_num_samples = torch.tensor(self.reference.num_samples, dtype=torch.long).to(
                m.real_features_num_samples.device
            )

    def to(self, device: torch.device | str) -> FIDScorer:
        self.metric = self.metric.to(device)
        return self

    def reset(self) -> None:
        """Forget the generated images (the reference stays)."""
        self.metric.reset()

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """Add generated images ``(N, C, H, W)`` in [-1, 1]."""
        self.metric.update(images, real=False)

    def compute(self) -> float:
        """FID of the images added since the last reset (all ranks must call it under DDP)."""
        return float(self.metric.compute())

    @staticmethod
    @torch.no_grad()
    def statistics_of(
        feature: Literal["inception"] | nn.Module, images: Tensor, batch_size: int = 500
    ) -> FeatureStatistics:
        """The feature statistics of a set of images ``(N, C, H, W)`` in [-1, 1]."""
        metric = make_fid_metric(feature)
        extractor = metric.inception
        # chunks go to the extractor's device (the real images stay on the CPU while the extractor
        # may already sit on the training GPU); the statistics are accumulated on the CPU in float64
        device = module_device(extractor, default=images.device)
        feats = [extractor(chunk.to(device)).double().cpu() for chunk in images.split(batch_size)]
        return feature_statistics(torch.cat(feats))

    @classmethod
    def cached_statistics(
        cls,
        feature: Literal["inception"] | nn.Module,
        images: Tensor,
        cache_dir: str | Path | None,
        dataset: str,
    ) -> FeatureStatistics:
        """:meth:`statistics_of`, read from / written to ``cache_dir/fid_stats-<dataset>-<key>.pt``."""
        if cache_dir is None:
            return cls.statistics_of(feature, images)
        # the images' bytes are part of the key: another split or preprocessing never reuses stale numbers
        digest = hashlib.sha256(images.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        key = statistics_cache_key(f"{dataset}:{digest}", feature)
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in dataset)
        path = Path(cache_dir) / f"fid_stats-{safe}-{key}.pt"
        if path.is_file():
            return load_statistics(path)
        stats = cls.statistics_of(feature, images)
        save_statistics(stats, path)
        return stats
