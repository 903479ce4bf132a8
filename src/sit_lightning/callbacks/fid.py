"""Periodic FID (torchmetrics) and conditional accuracy of EMA samples; the digits demo's final report.

Every ``every_n_steps`` optimizer steps and at the end of training, the callback draws ``num_samples``
samples with the EMA weights on the training device (sample ``i``: keyed noise of index ``i``, label
``i % num_classes`` or a keyed uniform label), decodes them, and logs for each guidance scale in ``cfg_scales``

- ``fid/cfg<scale>``: FID against the reference statistics (computed once from real data and cached
  under ``cache_dir``, keyed by data set and extractor);
- ``fid/cond_acc/cfg<scale>``: conditional accuracy, the share of samples that the judge classifier
  assigns to the class they were generated for (with ``feature="digits"``).

With ``feature="digits"`` the extractor and judge is a small classifier trained on the data module's
TRAIN split (:mod:`sit_lightning.evaluation.digits_classifier`) and the reference set is the TEST
split; the FID of the train split against the test split is reported beside it as the floor (what
real digits score). With ``feature="inception"`` (the ImageNet FID; needs ``.[fid]``) or a custom
module, give ``reference_stats`` (a ``.pt`` from :func:`~sit_lightning.evaluation.fid.save_statistics`
or an ADM ``.npz``), or a data module with ``test_images()``.

What the callback reads from the data module (:mod:`sit_lightning.data.contract`) is checked when the fit
starts, not at the first evaluation: ``train_images()`` with ``feature="digits"`` or ``floor=True``,
``test_images()`` without ``reference_stats``; a data module without them fails with a ``TypeError``
that says which setting needs what. The floor is the one optional score: with ``floor=None`` (the
default) it is reported when the data module has ``train_images()`` and left out when it does not
(latent data has no pixel images to score).

Under DDP each rank generates its interleaved share of the indices; torchmetrics sums the FID
states over ranks and the accuracy counts are summed by the strategy.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Literal, NamedTuple

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ..data.contract import RealTestImages, RealTrainImages, missing, require
from ..evaluation.digits_classifier import DigitsClassifier, DigitsFeatures, load_or_train_digits_classifier
from ..evaluation.fid import FIDScorer, frechet_distance, load_statistics, module_device, through_uint8
from ..evaluation.images import LatentDecoder
from ..evaluation.sample_plan import LabelMode, rank_share, sample_labels
from ..sampling import SamplerSettings
from ..sampling.presets import SamplerPresetName
from .periodic import DEFAULT_SETTINGS, PeriodicSamplingCallback
from .sample_grid import SampleGridCallback, log_dir_of
from .training_plots import TrainingPlotsCallback

__all__ = ["FIDCallback", "SampleQuality", "conditional_accuracy"]


# what each setting needs from the data module, for require()'s message
_FOR_JUDGE = "FIDCallback(feature='digits') (to train its judge classifier on the real training images)"
_FOR_REFERENCE = (
    "FIDCallback without reference_stats (to compute the reference statistics from real held-out images)"
)
_FOR_FLOOR = "FIDCallback(floor=True) (to score the real training images against the reference)"
#: how the report names the PNGs of TrainingPlotsCallback
_PLOT_NAMES = {"loss_curve": "loss curve", "loss_profile": "loss profile L_t"}


class SampleQuality(NamedTuple):
    """Scores of one set of generated samples.

    Attributes:
        cfg_scale: guidance scale used (1 = none).
        fid: FID against the reference statistics.
        conditional_accuracy: share of samples classified as their label (None without a judge).
        num_samples: samples scored.
        seconds: wall time of generation and scoring.
    """

    cfg_scale: float
    fid: float
    conditional_accuracy: float | None
    num_samples: int
    seconds: float


@torch.no_grad()
def conditional_accuracy(
    classifier: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000
) -> float:
    """Share of ``images`` that ``classifier`` (``images -> logits``) assigns to ``labels``.

    Each batch is moved to the classifier's device, wherever ``images`` and ``labels`` live.
    """
    device = module_device(classifier, default=images.device)
    correct = sum(
        int((classifier(x.to(device)).argmax(dim=1).cpu() == y.cpu()).sum())
        for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True)
    )
    return correct / max(len(labels), 1)


class FIDCallback(PeriodicSamplingCallback):
    """FID and conditional accuracy of EMA samples, periodically and at the end of training.

    Args:
        every_n_steps: period in optimizer steps; 0 evaluates only at the end of training.
        num_samples: samples per evaluation (2,000 = 200 per class for the digits demo).
        labels: ``balanced`` (label ``i % num_classes``) or ``uniform`` (keyed draw).
        seed: seed of the keyed noise and labels (fixed: every evaluation uses the same noise).
        settings: how to sample: a :class:`~sit_lightning.sampling.SamplerSettings` (YAML: a mapping
            of its fields, e.g. ``{sampler: ode, method: heun, steps: 16}``), or a preset's name, e.g.
            ``released-ode-heun250`` (``sit_lightning.sampling.presets``). Default:
            ``SamplerSettings()``, the Heun ODE with 125 steps.
        cfg_scales: guidance scales to evaluate, each a separate set of samples (it replaces
            ``settings.cfg_scale``, which must then stay 1); None: ``[settings.cfg_scale]``.
        batch_size: samples per sampler call (results do not depend on it).
        feature: ``digits`` (classifier trained on the train split; also gives conditional
            accuracy), ``inception`` (needs ``.[fid]``) or an ``nn.Module`` with ``num_features``.
        reference_stats: file of reference statistics; default: computed from the data module's
            ``test_images()`` and cached.
        floor: also report the FID of the data module's ``train_images()`` against the reference (what
            real images score): True requires ``train_images()``, False never reports it, None (default)
            reports it when the data module has ``train_images()``.
        cache_dir: where the classifier and reference statistics are cached; default
            ``<default_root_dir>/eval_cache``.
        decoder: None for pixel data; a diffusers ``AutoencoderKL`` path/hub id for latents.
        latent_scale: scale factor of stored latents (VAE decoding only); None: the normalisation of
            the trainer's ``LatentDataModule`` shards, else ``SD_VAE_SCALE``.
        use_ema: sample with the EMA weights.
        report: print a summary (log dir, sample grid, scores, wall time) at the end of training.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        num_samples: int = 2000,
        labels: LabelMode = "balanced",
        seed: int = 0,
        settings: SamplerSettings | SamplerPresetName = DEFAULT_SETTINGS,
        cfg_scales: list[float] | None = None,
        batch_size: int = 500,
        feature: Literal["digits", "inception"] | nn.Module = "digits",
        reference_stats: str | None = None,
        floor: bool | None = None,
        cache_dir: str | None = None,
        decoder: str | LatentDecoder | None = None,
        latent_scale: float | None = None,
        use_ema: bool = True,
        report: bool = True,
    ) -> None:
        super().__init__(
            every_n_steps,
            seed=seed,
            settings=settings,
            batch_size=batch_size,
            decoder=decoder,
            latent_scale=latent_scale,
            use_ema=use_ema,
        )
        if cfg_scales is not None and self.settings.cfg_scale != 1.0:
            raise ValueError(
                f"give the guidance scale once: cfg_scales={cfg_scales} or settings.cfg_scale="
                f"{self.settings.cfg_scale}, not both"
            )
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (FID needs a covariance); got {num_samples}")
        if isinstance(feature, str) and feature not in ("digits", "inception"):
            raise ValueError(f"feature must be 'digits', 'inception' or an nn.Module; got {feature!r}")
        self.num_samples = int(num_samples)
        self.label_mode = labels
        sample_labels([0], 1, labels, 0)  # validates the mode now, not after an hour of training
        self.cfg_scales = [self.settings.cfg_scale] if cfg_scales is None else [float(s) for s in cfg_scales]
        for scale in self.cfg_scales:  # each scale must make valid settings now, not at the first evaluation
            dataclasses.replace(self.settings, cfg_scale=scale)
        self.feature = feature
        self.reference_stats = reference_stats
        self.floor = floor
        self.cache_dir = cache_dir
        self.report = bool(report)
        self.judge: DigitsClassifier | None = None
        self.scorer: FIDScorer | None = None
        self.floor_fid: float | None = None
        self.judge_test_accuracy: float | None = None
        self.history: list[tuple[int, SampleQuality]] = []
        self._fit_start: float | None = None
        self._train_seconds: float | None = None  # fit start -> end of training, before the final evaluation

    # ---- setup: judge, extractor, reference ---------------------------------------------------------
    def _cache_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(trainer.default_root_dir) / "eval_cache"

    def check_datamodule(self, datamodule: object | None) -> None:
        """Raise ``TypeError`` if ``datamodule`` lacks what these settings read from it (see the module doc)."""
        if self.feature == "digits":
            require(datamodule, RealTrainImages, for_what=_FOR_JUDGE)
        if self.reference_stats is None:
            require(datamodule, RealTestImages, for_what=_FOR_REFERENCE)
        if self.floor:
            require(datamodule, RealTrainImages, for_what=_FOR_FLOOR)

    def _scores_floor(self, datamodule: object | None) -> bool:
        if self.floor is None:
            return datamodule is not None and not missing(datamodule, RealTrainImages)
        return self.floor

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> FIDScorer:
        if self.scorer is not None:
            return self.scorer
        datamodule = trainer.datamodule
        self.check_datamodule(datamodule)
        cache = self._cache_dir(trainer)
        extractor: Literal["inception"] | nn.Module
        if self.feature == "digits":
            train = require(datamodule, RealTrainImages, for_what=_FOR_JUDGE).train_images()
            self.judge = load_or_train_digits_classifier(train.x, train.y, cache_dir=cache)
            extractor = DigitsFeatures(self.judge)
        else:
            extractor = self.feature
        dataset = type(datamodule).__name__ if datamodule is not None else "data"
        if self.reference_stats is not None:
            reference = load_statistics(self.reference_stats)
        else:
            test = require(datamodule, RealTestImages, for_what=_FOR_REFERENCE).test_images()
            reference = FIDScorer.cached_statistics(extractor, test.x, cache, f"{dataset}-test")
            if self.judge is not None:
                self.judge_test_accuracy = conditional_accuracy(self.judge, test.x, test.y)
        self.scorer = FIDScorer(extractor, reference, rank=trainer.global_rank).to(pl_module.device)
        if self._scores_floor(datamodule):
            real_train = require(datamodule, RealTrainImages, for_what=_FOR_FLOOR).train_images()
            train_stats = FIDScorer.cached_statistics(extractor, real_train.x, cache, f"{dataset}-train")
            self.floor_fid = frechet_distance(train_stats, reference)
        return self.scorer

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[SampleQuality]:
        """Generate and score ``num_samples`` samples for each guidance scale (all ranks must call it)."""
        scorer = self._prepare(trainer, pl_module)
        share = rank_share(self.num_samples, trainer.global_rank, trainer.world_size)
        num_classes = pl_module.network.num_classes
        labels = sample_labels(share.indices, num_classes, self.label_mode, self.seed)
        results = []
        for scale in self.cfg_scales:
            start = time.perf_counter()
            images = self.generate(pl_module, share.indices, labels, cfg_scale=scale)
            images, kept = images[share.valid.to(images.device)], labels[share.valid]
            # what a sample file holds: `sit-lightning fid` on the .npz of these samples gives these numbers
            images = through_uint8(images)
            scorer.reset()
            scorer.update(images)
            fid = scorer.compute()
            accuracy = None
            if self.judge is not None:
                judge = self.judge.to(images.device)
                correct = torch.tensor(
                    conditional_accuracy(judge, images, kept) * len(kept),
                    dtype=torch.float64,
                    device=pl_module.device,
                )
                count = torch.tensor(float(len(kept)), dtype=torch.float64, device=pl_module.device)
                correct = trainer.strategy.reduce(correct, reduce_op="sum")
                count = trainer.strategy.reduce(count, reduce_op="sum")
                accuracy = float(correct / count)
            results.append(SampleQuality(scale, fid, accuracy, self.num_samples, time.perf_counter() - start))
        self._log(trainer, results)
        self.last_step = trainer.global_step
        self.history.extend((trainer.global_step, r) for r in results)
        return results

    def _log(self, trainer: pl.Trainer, results: list[SampleQuality]) -> None:
        metrics: dict[str, float] = {}
        for r in results:
            metrics[f"fid/cfg{r.cfg_scale:g}"] = r.fid
            if r.conditional_accuracy is not None:
                metrics[f"fid/cond_acc/cfg{r.cfg_scale:g}"] = r.conditional_accuracy
        if self.floor_fid is not None:
            metrics["fid/train_vs_reference"] = self.floor_fid
        if trainer.global_rank == 0:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # ---- hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # the callback evaluates during fit only; fail now rather than after hours of training
        if stage == "fit":
            self.check_datamodule(trainer.datamodule)
        super().setup(trainer, pl_module, stage)  # the decoder takes the latent shards' normalisation

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[SampleQuality]:
        """The periodic and final run: :meth:`evaluate`."""
        return self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_start is not None:
            self._train_seconds = time.perf_counter() - self._fit_start
        super().on_train_end(trainer, pl_module)  # the final evaluation, on the training device

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the report comes after every callback's on_train_end, so it names the final grid whatever the
        # order of the callbacks; it samples nothing, so Lightning's teardown before it does not matter
        if self.report and trainer.global_rank == 0 and self.last_step == trainer.global_step:
            results = [r for s, r in self.history if s == trainer.global_step]
            # print, not logging: the report is the demo's output and must not depend on log levels
            total = time.perf_counter() - self._fit_start if self._fit_start is not None else None
            print(self.summary(trainer, results, self._train_seconds, total), flush=True)

    def summary(
        self,
        trainer: pl.Trainer,
        results: list[SampleQuality],
        fit_seconds: float | None = None,
        total_seconds: float | None = None,
    ) -> str:
        """The end-of-fit report: where the logs, grid and loss plots are, the scores and the wall time."""
        log_dir = log_dir_of(trainer)
        grids = [
            cb.last_path for cb in trainer.callbacks if isinstance(cb, SampleGridCallback) and cb.last_path
        ]
        per_class = self.num_samples // max(1, trainer.lightning_module.network.num_classes)
        lines = ["", "=" * 78, f"sit-lightning: evaluation after {trainer.global_step} steps", "-" * 78]
        lines.append(f"TensorBoard logs : {log_dir}   (tensorboard --logdir {log_dir})")
        for path in grids:
            lines.append(f"sample grid      : {path}")
        for plots in (cb for cb in trainer.callbacks if isinstance(cb, TrainingPlotsCallback)):
            for name, path in plots.paths.items():
                lines.append(f"{_PLOT_NAMES.get(name, name):<17}: {path}")
        settings = self.settings.describe(with_guidance=False) + ("" if self.use_ema else ", live weights")
        lines.append(
            f"samples          : {self.num_samples} ({self.label_mode}"
            + (f", {per_class} per class" if self.label_mode == "balanced" else "")
            + f"), seed {self.seed}, {settings}"
        )
        for r in results:
            acc = (
                ""
                if r.conditional_accuracy is None
                else f"conditional accuracy {100 * r.conditional_accuracy:6.2f}%   "
            )
            lines.append(f"cfg {r.cfg_scale:<4g}         : {acc}FID {r.fid:8.3f}   ({r.seconds:.0f} s)")
        if self.floor_fid is not None:
            lines.append(f"FID floor        : {self.floor_fid:.3f} (real train split vs test split)")
        if self.judge_test_accuracy is not None:
            lines.append(
                f"judge            : digits classifier, {100 * self.judge_test_accuracy:.2f}% on real test digits"
            )
        if fit_seconds is not None:
            lines.append(
                f"wall time        : {fit_seconds:.0f} s training"
                + (f", {total_seconds:.0f} s with the final evaluation" if total_seconds is not None else "")
            )
        lines.append("=" * 78)
        return "\n".join(lines)
