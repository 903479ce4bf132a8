"""FID through torchmetrics' ``FrechetInceptionDistance``, with cached reference statistics.

    FID = |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))

over the Gaussians (mean, covariance) of a feature extractor's activations on real (r) and generated
(g) images. torchmetrics accumulates, per set, the feature sum, the sum of outer products and the
count; those three are the :class:`FeatureStatistics` we cache, so the reference set is run through
the extractor once per (data set, extractor) and its statistics are loaded into every later metric.

Feature extractors:

- ``"inception"``: torchmetrics' InceptionV3 (2048 pool features; the standard ImageNet FID). Needs
  the optional extra ``pip install "sit-lightning[fid]"`` (torch-fidelity) and its weights file
  (:class:`InceptionFeatures` takes a local path, for machines without network).
  Images go in as floats in [-1, 1] and are converted to uint8 0..255 here.
- any ``nn.Module`` mapping the images to ``(N, D)`` features and carrying ``num_features = D``
  (e.g. :class:`~sit_lightning.evaluation.digits_classifier.DigitsFeatures`); it receives the images
  exactly as given to :meth:`FIDScorer.update`.

Samples as files: the released ``sample.py`` (and ADM's evaluator ``.npz``) stores a sample ``x`` in
[-1, 1] as ``uint8(clamp(127.5 x + 128, 0, 255))`` (truncation, so round-half-up of ``127.5 (x + 1)``):
:func:`to_adm_uint8`. :func:`through_uint8` is what an extractor sees of a sample: those 256 levels
back in [-1, 1] (``p / 127.5 - 1``). ``FIDCallback`` and ``sit-lightning fid`` both score that, so a
sample file gives the callback's number exactly. :func:`read_images` reads an ``.npz`` or a PNG folder.

Distributed: every rank updates the metric with its own generated images; torchmetrics sums the
states over ranks in ``compute``. The reference statistics are loaded on rank 0 only (zeros on the
other ranks), so that the summed reference equals the reference, not ``world`` copies of it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ADM_SPLIT_SIZE",
    "InceptionFeatures",
    "InceptionScore",
    "LabelledPixels",
    "feature_statistics",
    "FeatureStatistics",
    "FIDScorer",
    "frechet_distance",
    "from_uint8",
    "INCEPTION_FEATURES",
    "inception_score",
    "load_statistics",
    "make_fid_metric",
    "module_device",
    "read_images",
    "npz_keys",
    "save_statistics",
    "through_uint8",
    "to_adm_uint8",
]

#: Pool features of torchmetrics' InceptionV3 (the standard FID layer).
INCEPTION_FEATURES = 2048
#: Sample count assumed for reference files that store only mean and covariance (ADM's ``.npz``).
ADM_REFERENCE_COUNT = 50_000
#: Images per Inception Score split in ADM's evaluator (10 splits of a 50k set).
ADM_SPLIT_SIZE = 5000
#: The released float -> uint8 map ``clamp(127.5 x + 128, 0, 255)``: scale, offset, top level.
ADM_PIXEL_SCALE = 127.5
ADM_PIXEL_OFFSET = 128.0
UINT8_MAX = 255
#: The ``.npz`` keys of ADM's evaluator: images (N, H, W, C) uint8 and labels.
NPZ_IMAGES, NPZ_LABELS = "arr_0", "arr_1"
PNG_SUFFIX = ".png"


def to_adm_uint8(images: Tensor) -> Tensor:
    """Floats in [-1, 1] -> ``uint8`` as the released ``sample.py`` writes its ``.npz``.

    ``uint8(clamp(127.5 x + 128, 0, 255))`` in float32: truncation of ``127.5 x + 128``, i.e. round
    half up of ``127.5 (x + 1)`` (unlike :func:`~sit_lightning.evaluation.images.to_uint8`, which
    rounds half to even; the two differ only on exact ties). ``uint8`` input is returned as is.

    Args:
        images: ``(..., C, H, W)`` floats (any range; clamped) or ``uint8``.
    """
    if images.dtype == torch.uint8:
        return images
    pixels = ADM_PIXEL_SCALE * images.detach().float() + ADM_PIXEL_OFFSET
    return pixels.clamp(0, UINT8_MAX).to(torch.uint8)


def from_uint8(pixels: Tensor) -> Tensor:
    """``uint8`` 0..255 -> float32 in [-1, 1] (``p / 127.5 - 1``; :func:`to_adm_uint8` inverts it exactly)."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"from_uint8 needs uint8 pixels; got {pixels.dtype}")
    return pixels.float() / ADM_PIXEL_SCALE - 1.0


def through_uint8(images: Tensor) -> Tensor:
    """What a feature extractor or judge sees of samples: their ``.npz`` levels, as floats in [-1, 1].

    ``from_uint8(to_adm_uint8(images))``: floats are clamped and quantized to the 256 levels a sample
    file holds, ``uint8`` is only rescaled. Idempotent.
    """
    return from_uint8(to_adm_uint8(images))


class LabelledPixels(NamedTuple):
    """Images read from a file or folder.

    Attributes:
        pixels: ``(N, C, H, W)`` uint8.
        labels: ``(N,)`` int64 class labels, or None where the source has none.
    """

    pixels: Tensor
    labels: Tensor | None


def npz_keys(path: str | Path) -> list[str]:
    """The array names of an ``.npz``, without loading the arrays."""
    with np.load(path, allow_pickle=False) as data:
        return list(data.files)


def _nhwc_to_pixels(array: np.ndarray, source: str) -> Tensor:
    if array.dtype != np.uint8 or array.ndim not in (3, 4):
        raise ValueError(
            f"{source}: images must be uint8 (N, H, W, C) or (N, H, W); got {array.dtype} {array.shape}"
        )
    if array.ndim == 3:
        array = array[..., None]
    if array.shape[-1] not in (1, 3):
        raise ValueError(f"{source}: images need 1 or 3 channels (last axis); got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def _read_png_folder(folder: Path) -> Tensor:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == PNG_SUFFIX)
    if not files:
        raise ValueError(f"{folder}: no {PNG_SUFFIX} files in the folder")
    arrays = []
    for file in files:
        with Image.open(file) as image:
            mode = "L" if image.mode in ("L", "I;16", "1") else "RGB"
            arrays.append(np.asarray(image.convert(mode)))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: the PNG files differ in size or channels: {sorted(shapes)}")
    return _nhwc_to_pixels(np.stack(arrays), str(folder))


def read_images(path: str | Path) -> LabelledPixels:
    """Images of an ADM-style ``.npz`` (``arr_0`` uint8 N x H x W x C, labels ``arr_1`` if present and
    not all -1) or of a folder of PNG files (sorted by name, no labels).

    Raises:
        ValueError: the path is neither, or holds no uint8 images.
    """
    path = Path(path)
    if path.is_dir():
        return LabelledPixels(_read_png_folder(path), None)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: images are read from an .npz (arr_0) or a folder of PNG files")
    with np.load(path, allow_pickle=False) as data:
        if NPZ_IMAGES not in data.files:
            raise ValueError(f"{path}: no images ('{NPZ_IMAGES}'); found {sorted(data.files)}")
        pixels = _nhwc_to_pixels(data[NPZ_IMAGES], str(path))
        labels = data[NPZ_LABELS] if NPZ_LABELS in data.files else None
    if labels is not None:
        if labels.shape != (len(pixels),):
            raise ValueError(
                f"{path}: '{NPZ_LABELS}' must hold one label per image, shape ({len(pixels)},); got {labels.shape}"
            )
        # -1 everywhere: a file without known classes (as ``evaluation.npz`` reads the released ones)
        labels = None if (labels < 0).all() else torch.from_numpy(labels.astype(np.int64))
    return LabelledPixels(pixels, labels)


class InceptionScore(NamedTuple):
    """Inception Score over splits: ``exp(E_x KL(p(y|x) || p(y)))`` per split, then mean and std."""

    mean: float
    std: float
    splits: int


def inception_score(logits: Tensor, split_size: int = ADM_SPLIT_SIZE) -> InceptionScore:
    """Inception Score of ``(N, K)`` logits, as ADM's evaluator computes it.

    Consecutive splits of ``split_size`` (the last may be shorter; no shuffle), per split
    ``exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y)))`` with ``p(y)`` the split's mean prediction.
    Salimans et al. 2016, "Improved Techniques for Training GANs", Sec. 4; the logits are Inception's
    ``logits_unbiased`` (the pool features times the FC weight, no bias), as in ADM and torch-fidelity.
    """
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1; got {split_size}")
    log_p = torch.log_softmax(logits.detach().double(), dim=1)  # (N, K)
    scores = []
    for part in log_p.split(split_size):
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # (K,) log of the mean p
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    values = torch.tensor(scores, dtype=torch.float64)
    std = float(values.std(unbiased=False)) if len(scores) > 1 else 0.0
    return InceptionScore(float(values.mean()), std, len(scores))


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


class InceptionFeatures(nn.Module):
    """torchmetrics' InceptionV3 (torch-fidelity's port of the TF 2015-12-05 graph) fed with our [-1, 1]
    float images (it wants uint8 RGB); 2048 pool features.

    Resizing to 299 uses torch-fidelity's TF1-style bilinear interpolation (``antialias=False``), as the
    TF graph of ADM's evaluator does, not torchmetrics' default antialiased resize.

    Args:
        weights_path: a local copy of torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``;
            None downloads it to the torch hub cache on first use (needs network).
    """

    def __init__(self, weights_path: str | Path | None = None) -> None:
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
        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"Inception weights not found: {weights_path}")
        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(INCEPTION_FEATURES)],
            feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        )
        # torchmetrics >= 1.5 resizes with antialiasing by default; ADM's TF graph does not
        self.inception.use_antialias = False
        self.num_features = INCEPTION_FEATURES

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.inception(to_adm_uint8(x)).reshape(x.shape[0], -1)

    def logits(self, features: Tensor) -> Tensor:
        """``(N, 1008)`` ``logits_unbiased`` of ``(N, 2048)`` pool features (for the Inception Score)."""
        weight = self.inception.fc.weight
        return features.to(weight) @ weight.T


def make_fid_metric(feature: Literal["inception"] | nn.Module) -> Any:
    """torchmetrics ``FrechetInceptionDistance`` over ``feature`` that keeps its reference between resets.

    Args:
        feature: ``"inception"`` (needs ``.[fid]``) or an ``nn.Module`` with ``num_features``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature, str):
        if feature != "inception":
            raise ValueError(f"feature must be 'inception' or an nn.Module; got {feature!r}")
        feature = InceptionFeatures()
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
        """Add generated images ``(N, C, H, W)``: floats in [-1, 1], or uint8 (read as :func:`from_uint8`)."""
        if images.dtype == torch.uint8:
            images = from_uint8(images)
        self.metric.update(images, real=False)

    def compute(self) -> float:
        """FID of the images added since the last reset (all ranks must call it under DDP)."""
        return float(self.metric.compute())

    @staticmethod
    @torch.no_grad()
    def statistics_of(
        feature: Literal["inception"] | nn.Module, images: Tensor, batch_size: int = 500
    ) -> FeatureStatistics:
        """The feature statistics of images ``(N, C, H, W)``: floats in [-1, 1], or uint8 pixels (each
        batch read as :func:`from_uint8`, so a large uint8 set never exists as floats at once)."""
        metric = make_fid_metric(feature)
        extractor = metric.inception
        # chunks go to the extractor's device (the real images stay on the CPU while the extractor
        # may already sit on the training GPU); the statistics are accumulated on the CPU in float64
        device = module_device(extractor, default=images.device)
        as_input = from_uint8 if images.dtype == torch.uint8 else (lambda chunk: chunk)
        feats = [extractor(as_input(chunk.to(device))).double().cpu() for chunk in images.split(batch_size)]
        return feature_statistics(torch.cat(feats))

    @classmethod
    def cached_statistics(
        cls,
        feature: Literal["inception"] | nn.Module,
        images: Tensor,
        cache_dir: str | Path | None,
        dataset: str,
    ) -> FeatureStatistics:
        """:meth:`statistics_of`, read from / written to ``cache_dir/fid_stats-<dataset>-<key>.pt``
        (the key hashes the images, floats or uint8, and the extractor's weights)."""
        if cache_dir is None:
            return cls.statistics_of(feature, images)
        # the images' bytes are part of the key: another split or preprocessing never reuses stale numbers
        if images.dtype == torch.uint8:
            content = b"uint8" + images.detach().cpu().contiguous().numpy().tobytes()
        else:
            content = images.detach().float().cpu().contiguous().numpy().tobytes()
        digest = hashlib.sha256(content).hexdigest()[:16]
        key = statistics_cache_key(f"{dataset}:{digest}", feature)
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in dataset)
        path = Path(cache_dir) / f"fid_stats-{safe}-{key}.pt"
        if path.is_file():
            return load_statistics(path)
        stats = cls.statistics_of(feature, images)
        save_statistics(stats, path)
        return stats
