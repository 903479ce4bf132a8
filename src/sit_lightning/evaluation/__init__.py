"""Evaluation without Lightning: images and grids, FID statistics, the digits judge, keyed sample plans.

Heavy pieces (torchmetrics' FID, diffusers' VAE) are imported by the functions that need them.
"""

from .digits_classifier import (
    DigitsClassifier,
    DigitsClassifierRecipe,
    DigitsFeatures,
    load_or_train_digits_classifier,
    train_digits_classifier,
)
from .fid import (
    FeatureStatistics,
    FIDScorer,
    feature_statistics,
    frechet_distance,
    load_statistics,
    make_fid_metric,
    save_statistics,
)
from .images import (
    SD_VAE_SCALE,
    AutoencoderKLDecoder,
    IdentityDecoder,
    LatentDecoder,
    image_grid,
    make_decoder,
    save_png,
    to_uint8,
)
from .sample_plan import LABEL_MODES, LabelMode, RankShare, generate, rank_share, sample_labels

__all__ = [
    "AutoencoderKLDecoder",
    "DigitsClassifier",
    "DigitsClassifierRecipe",
    "DigitsFeatures",
    "FIDScorer",
    "FeatureStatistics",
    "IdentityDecoder",
    "LABEL_MODES",
    "LabelMode",
    "LatentDecoder",
    "RankShare",
    "SD_VAE_SCALE",
    "feature_statistics",
    "frechet_distance",
    "generate",
    "image_grid",
    "load_or_train_digits_classifier",
    "load_statistics",
    "make_decoder",
    "make_fid_metric",
    "rank_share",
    "sample_labels",
    "save_png",
    "save_statistics",
    "to_uint8",
    "train_digits_classifier",
]
