"""The ``sit-lightning fid`` command: FID of a sample file against a reference, with torchmetrics.

    sit-lightning fid samples.npz VIRTUAL_imagenet256_labeled.npz --extractor inception \\
        --inception_weights weights-inception-2015-12-05-6726825d.pth
    sit-lightning fid samples.npz digits-test --extractor digits            # the digits demo's judge
    sit-lightning fid samples_png/ reference_png/ --cache_dir eval_cache --format json
    sit-lightning fid samples.npz reference_png/ --extractor features.pt     # a TorchScript extractor

Samples: an ADM-style ``.npz`` (``arr_0`` uint8 N x H x W x C, labels ``arr_1``) or a folder of PNG
files. The reference is one of

- an ``.npz`` with ``mu`` / ``sigma`` of the extractor's width: those statistics (ADM's reference
  batches: TensorFlow Inception statistics; ours from ``save_statistics`` carry ``num_samples``);
- an ``.npz`` with images (``arr_0``) or a PNG folder: their statistics (cached under ``--cache_dir``);
- a ``.pt`` statistics file (``save_statistics``; ``FIDCallback``'s ``fid_stats-*.pt`` cache);
- ``digits-test``: the digits data module's test split, the reference of ``FIDCallback`` on the digits.

Extractors: ``inception`` (torchmetrics' InceptionV3 through the ``fid`` extra; also gives the
Inception Score), ``digits`` (the digits judge of :mod:`sit_lightning.evaluation.digits_classifier`,
trained on the digits train split; also the accuracy judge) or a TorchScript file: a module mapping
images in [-1, 1] to ``(N, D)`` features, with an int attribute ``num_features = D`` (any features a
user trusts, or a tiny one for a check without Inception weights). All see the samples as
:func:`~sit_lightning.evaluation.fid.through_uint8` makes them in ``FIDCallback``, so this command on
the ``.npz`` of a callback's samples prints the callback's numbers. sFID, precision and recall: run
ADM's evaluator suite on the ``.npz``. See docs/evaluation.md, "sit-lightning fid".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .evaluation.fid import (
    NPZ_IMAGES,
    NPZ_LABELS,
    FeatureStatistics,
    FIDScorer,
    InceptionFeatures,
    InceptionScore,
    from_uint8,
    inception_score,
    load_statistics,
    npz_keys,
    read_images,
)

if TYPE_CHECKING:
    from .evaluation.digits_classifier import DigitsClassifier

__all__ = ["DIGITS_TEST_REFERENCE", "FID_SUBCOMMAND", "FIDReport", "fid_main", "measure_fid"]

#: Subcommand name (dispatched by ``sit-lightning``'s ``main`` before LightningCLI).
FID_SUBCOMMAND = "fid"
#: The reference that names the digits data module's test split (FIDCallback's digits reference).
DIGITS_TEST_REFERENCE = "digits-test"
#: ``FIDCallback``'s cache name of that reference, so both share one cached statistics file.
_DIGITS_TEST_DATASET = "DigitsDataModule-test"
#: The built-in extractors; ``--extractor`` also takes a TorchScript file (see module docs).
Extractor = Literal["inception", "digits"]
OutputFormat = Literal["text", "json"]
#: The judge ``--classifier digits`` names (the default with ``--extractor digits``).
DIGITS_CLASSIFIER = "digits"
_EXTRACTOR_NAMES = {
    "inception": "torch InceptionV3 (torchmetrics / torch-fidelity port of TF inception-2015-12-05), "
    "2048 pool features",
    "digits": "digits judge (MLP trained on the digits train split), 64 penultimate features",
}
HYBRID_NOTE = (
    "hybrid: torch Inception features of the samples against ADM's TensorFlow reference statistics; "
    "close to, not identical with, ADM's evaluator. For published-comparable FID, sFID, precision "
    "and recall run ADM's evaluator suite on the .npz"
)


@dataclass(frozen=True)
class FIDReport:
    """What ``sit-lightning fid`` measured.

    Attributes:
        samples: the sample file or folder.
        num_samples: images scored.
        reference: the reference argument, and ``reference_kind`` what it held.
        extractor: ``inception``, ``digits`` or a TorchScript file; ``extractor_name`` says which network
            that is.
        fid: Frechet distance of the extractor's features, samples vs reference.
        inception_score: mean and std over splits (Inception only).
        conditional_accuracy: share of samples the classifier assigns to their label (None without
            labels or a classifier); ``classifier`` names the classifier.
        note: the hybrid note (torch Inception vs ADM's TensorFlow statistics), else None.
    """

    samples: str
    num_samples: int
    reference: str
    reference_kind: str
    extractor: str
    extractor_name: str
    fid: float
    inception_score: InceptionScore | None
    conditional_accuracy: float | None
    classifier: str | None
    note: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the Inception Score as ``{"mean", "std", "splits"}``."""
        out = dataclasses.asdict(self)
        if self.inception_score is not None:
            out["inception_score"] = self.inception_score._asdict()
        return out

    def text(self) -> str:
        """The human-readable report, one score per line."""
        lines = [
            f"samples    : {self.samples} ({self.num_samples} images)",
            f"reference  : {self.reference} ({self.reference_kind})",
            f"extractor  : {self.extractor}: {self.extractor_name}",
            f"FID        : {self.fid:.4f}",
        ]
        if self.inception_score is not None:
            score = self.inception_score
            lines.append(f"IS         : {score.mean:.4f} +- {score.std:.4f} ({score.splits} splits)")
        if self.conditional_accuracy is not None:
            lines.append(
                f"accuracy   : {100 * self.conditional_accuracy:.2f}% (conditional, {self.classifier})"
            )
        if self.note:
            lines.append(f"note       : {self.note}")
        return "\n".join(lines)


def _digits_data() -> Any:
    from .data.digits import DigitsDataModule

    return DigitsDataModule()  # configs/digits.yaml's split: split_seed 0, 297 test images


def _digits_judge(cache_dir: str | None) -> DigitsClassifier:
    from .evaluation.digits_classifier import load_or_train_digits_classifier

    train = _digits_data().train_images()
    return load_or_train_digits_classifier(train.x, train.y, cache_dir=cache_dir)


def _extractor(
    extractor: str, inception_weights: str | None, cache_dir: str | None
) -> tuple[nn.Module, DigitsClassifier | None]:
    if extractor == "inception":
        return InceptionFeatures(inception_weights), None
    if extractor == "digits":
        from .evaluation.digits_classifier import DigitsFeatures

        judge = _digits_judge(cache_dir)
        return DigitsFeatures(judge), judge
    # TorchScript, as for --classifier: a module file without pickled Python code
    feature = torch.jit.load(extractor, map_location="cpu").eval()
    if not isinstance(getattr(feature, "num_features", None), int):
        raise ValueError(
            f"--extractor {extractor}: the TorchScript module needs an int attribute `num_features` "
            "(the width of its (N, D) features)"
        )
    return feature, None


def _extractor_name(extractor: str, feature: nn.Module) -> str:
    if extractor in _EXTRACTOR_NAMES:
        return _EXTRACTOR_NAMES[extractor]
    return f"TorchScript file {extractor}, {feature.num_features} features"


def _reference(
    reference: str, feature: nn.Module, cache_dir: str | None
) -> tuple[FeatureStatistics, str, bool]:
    """The reference statistics, what they came from, and whether they are ADM's (TensorFlow) own."""
    width = feature.num_features
    if reference == DIGITS_TEST_REFERENCE:
        test = _digits_data().test_images()
        stats = FIDScorer.cached_statistics(feature, test.x, cache_dir, _DIGITS_TEST_DATASET)
        return stats, f"digits test split, {len(test.x)} images", False
    path = Path(reference)
    if not path.exists():
        raise FileNotFoundError(
            f"reference not found: {reference} (an .npz, a .pt, a PNG folder or {DIGITS_TEST_REFERENCE})"
        )
    keys = npz_keys(path) if path.suffix == ".npz" else []
    adm = False
    if path.suffix == ".pt":
        stats, kind = load_statistics(path), "statistics file"
    elif {"mu", "sigma"} <= set(keys) and (_npz_width(path) == width or NPZ_IMAGES not in keys):
        # an ADM reference batch holds both: its statistics serve Inception, its images other extractors
        stats = load_statistics(path)
        adm = "num_samples" not in keys  # save_statistics writes it; ADM's reference batches do not
        kind = "ADM reference statistics (TensorFlow Inception)" if adm else "statistics (mu, sigma)"
    else:
        pixels = read_images(path).pixels
        stats = FIDScorer.cached_statistics(feature, pixels, cache_dir, path.name)
        kind = f"{len(pixels)} images"
    if stats.feature_sum.shape != (width,):
        raise ValueError(
            f"{reference}: statistics of {stats.feature_sum.shape[0]} features; the extractor gives {width}"
        )
    return stats, kind, adm


def _npz_width(path: Path) -> int:
    with np.load(path, allow_pickle=False) as data:
        return int(data["mu"].shape[0])


def _classifier(
    classifier: str | None, judge: DigitsClassifier | None, cache_dir: str | None, device: torch.device
) -> tuple[nn.Module | None, str | None]:
    if classifier is None:
        return (judge, "digits judge") if judge is not None else (None, None)
    if classifier == DIGITS_CLASSIFIER:
        return judge if judge is not None else _digits_judge(cache_dir), "digits judge"
    if not Path(classifier).is_file():
        raise FileNotFoundError(
            f"--classifier: {classifier} is neither '{DIGITS_CLASSIFIER}' nor a TorchScript file"
        )
    # TorchScript: a module file without pickled Python code (images in [-1, 1] -> logits)
    return torch.jit.load(classifier, map_location=device).eval(), classifier


@torch.no_grad()
def _accuracy(
    classifier: nn.Module, pixels: Tensor, labels: Tensor, batch_size: int, device: torch.device
) -> float:
    from .callbacks.fid import conditional_accuracy

    correct = 0
    for x, y in zip(pixels.split(batch_size), labels.split(batch_size), strict=True):
        # per batch, so that a 50k ImageNet set never exists as floats; the count is exact
        correct += round(conditional_accuracy(classifier, from_uint8(x.to(device)), y, batch_size) * len(y))
    return correct / len(labels)


def measure_fid(
    samples: str,
    reference: str,
    *,
    extractor: Extractor | str = "inception",
    classifier: str | None = None,
    inception_weights: str | None = None,
    cache_dir: str | None = None,
    batch_size: int = 500,
    device: str | None = None,
) -> FIDReport:
    """FID of a sample file against a reference; Inception Score with Inception; conditional accuracy.

    Args:
        samples: an ``.npz`` (``arr_0`` uint8 N x H x W x C, optional labels ``arr_1``) or a PNG folder.
        reference: an ``.npz`` with ``mu``/``sigma`` of the extractor's width (an ADM reference batch),
            an ``.npz`` with images ``arr_0``, a PNG folder, a ``.pt`` statistics file, or ``digits-test``.
        extractor: ``inception`` (torchmetrics' InceptionV3; needs ``pip install "sit-lightning[fid]"``),
            ``digits`` (the digits judge, trained on the digits train split), or a TorchScript file
            mapping images ``(N, C, H, W)`` in [-1, 1] to features ``(N, D)``, with an int attribute
            ``num_features = D`` (works offline, on any image size the module accepts).
        classifier: the judge of the conditional accuracy (needs labels in the samples): ``digits``
            (the default with ``--extractor digits``) or a TorchScript file mapping images in [-1, 1]
            to logits. None with Inception: no accuracy.
        inception_weights: local torch-fidelity Inception weights (offline machines); default: the
            torch hub cache, downloaded on first use.
        cache_dir: where the digits judge and the statistics of reference images are cached.
        batch_size: images per extractor call.
        device: ``cpu``, ``cuda``, ...; default: CUDA when available.
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1; got {batch_size}")
    if extractor not in _EXTRACTOR_NAMES and not Path(extractor).is_file():
        raise ValueError(
            f"--extractor must be one of {list(_EXTRACTOR_NAMES)} or a TorchScript file; got {extractor!r}"
        )
    run_on = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    read = read_images(samples)
    pixels, labels = read.pixels, read.labels
    if len(pixels) < 2:
        raise ValueError(f"{samples}: FID needs at least 2 images (a covariance); got {len(pixels)}")
    if classifier is not None and labels is None:
        raise ValueError(f"--classifier needs labels: {samples} has none (an .npz with '{NPZ_LABELS}')")
    feature, judge = _extractor(extractor, inception_weights, cache_dir)
    feature = feature.to(run_on)
    ref_stats, ref_kind, adm_statistics = _reference(reference, feature, cache_dir)

    scorer = FIDScorer(feature, ref_stats).to(run_on)
    logits: list[Tensor] = []  # Inception's, taken from the FID pass itself (no second pass)
    hook = None
    if isinstance(feature, InceptionFeatures):
        hook = feature.register_forward_hook(lambda _m, _x, out: logits.append(feature.logits(out).cpu()))
    try:
        for chunk in pixels.split(batch_size):
            scorer.update(chunk.to(run_on))
    finally:
        if hook is not None:
            hook.remove()
    fid = scorer.compute()
    score = inception_score(torch.cat(logits)) if logits else None

    judge_module, judge_name = _classifier(classifier, judge, cache_dir, run_on)
    accuracy = None
    if judge_module is not None and labels is not None:
        accuracy = _accuracy(judge_module.to(run_on), pixels, labels, batch_size, run_on)
    hybrid = extractor == "inception" and adm_statistics
    return FIDReport(
        samples=str(samples),
        num_samples=len(pixels),
        reference=str(reference),
        reference_kind=ref_kind,
        extractor=extractor,
        extractor_name=_extractor_name(extractor, feature),
        fid=fid,
        inception_score=score,
        conditional_accuracy=accuracy,
        classifier=judge_name if accuracy is not None else None,
        note=HYBRID_NOTE if hybrid else None,
    )


def fid_main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``sit-lightning fid SAMPLES REFERENCE [--extractor ...] [--format json]``.

    ``argv`` holds the arguments after the subcommand name. A bad file or option exits with status 2
    and a one-line message.
    """
    from jsonargparse import ArgumentParser

    from .errors import exit_in_one_line, subcommand_argv

    argv = subcommand_argv(FID_SUBCOMMAND, argv)
    parser = ArgumentParser(
        prog=f"sit-lightning {FID_SUBCOMMAND}",
        allow_abbrev=False,
        description="FID of samples against a reference, with IS (Inception) and conditional accuracy; "
        "see docs/evaluation.md, 'sit-lightning fid'.",
    )
    parser.add_function_arguments(measure_fid, as_positional=True)
    parser.add_argument("--format", type=OutputFormat, default="text", help="text report or one JSON object")
    config = parser.parse_args(argv)
    options = {k: v for k, v in config.as_dict().items() if k != "format"}
    with exit_in_one_line(FID_SUBCOMMAND, ValueError, OSError, ImportError, RuntimeError):
        report = measure_fid(**options)
    print(json.dumps(report.as_dict()) if config.format == "json" else report.text())
    return 0
