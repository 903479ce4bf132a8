"""Periodic grids of class-conditional samples (EMA weights) to TensorBoard and PNG files.

The noise and label of grid cell ``i`` are keyed by ``(seed, i)`` (see
:mod:`sit_lightning.evaluation.sample_plan`), so the grid at step 1,000 and at step 50,000 show the
same noise turned into images by a better model, and the grid does not depend on the batch size or
the number of processes. Cell ``i`` sits in row ``i // nrow``; with ``num_per_class = k`` and the
default ``nrow = k`` each row holds one class.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..evaluation.images import LatentDecoder, image_grid, save_png, to_uint8
from ..evaluation.sample_plan import rank_share
from ..sampling import SamplerSettings
from ..sampling.presets import SamplerPresetName
from .periodic import DEFAULT_SETTINGS, PeriodicSamplingCallback

__all__ = ["SampleGridCallback", "log_dir_of"]


def log_dir_of(trainer: pl.Trainer) -> Path:
    """The run's folder: the logger's ``log_dir`` if it has one, else ``trainer.default_root_dir``."""
    logger = trainer.logger
    log_dir = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(log_dir if log_dir else trainer.default_root_dir)


class SampleGridCallback(PeriodicSamplingCallback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training), sample a grid and log it.

    The grid goes to TensorBoard (``add_image`` under ``tag`` when the logger is a
    ``TensorBoardLogger``) and to ``<log_dir>/samples/<tag>_step<step>.png``.

    Args:
        every_n_steps: period in optimizer steps; 0 only logs at the end of training.
        num_per_class: samples per class, laid out class by class (cell ``i`` has label
            ``i // num_per_class``); ignored when ``labels`` is given.
        labels: explicit labels of the cells (overrides ``num_per_class``).
        seed: seed of the keyed noise (cell ``i`` gets the noise of sample index ``i``).
        settings: how to sample: a :class:`~sit_lightning.sampling.SamplerSettings` (YAML: a mapping
            of its fields, e.g. ``{sampler: ode, method: heun, steps: 16, cfg_scale: 1.5}``), or a
            preset's name, e.g. ``released-ode-heun250`` (``sit_lightning.sampling.presets``). Default:
            ``SamplerSettings()``, the Heun ODE with 125 steps.
        nrow: cells per row; default ``num_per_class`` (one class per row), or ``ceil(sqrt(N))``.
        batch_size: samples per sampler call (the grid does not depend on it).
        decoder: None for pixel-space data; a path or hub id of a diffusers ``AutoencoderKL`` for
            latents (loaded on first use), or a :class:`LatentDecoder`.
        latent_scale: scale factor the latents were stored with (VAE decoding only); None: the
            normalisation of the trainer's ``LatentDataModule`` shards, else ``SD_VAE_SCALE``.
        use_ema: sample with the EMA weights (when an ``EMACallback`` is attached).
        upscale: integer nearest-neighbour upscaling of each cell in the PNG and TensorBoard image
            (8x8 digits are hard to see otherwise).
        tag: TensorBoard tag and PNG file prefix.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_per_class: int = 8,
        labels: list[int] | None = None,
        seed: int = 0,
        settings: SamplerSettings | SamplerPresetName = DEFAULT_SETTINGS,
        nrow: int | None = None,
        batch_size: int = 256,
        decoder: str | LatentDecoder | None = None,
        latent_scale: float | None = None,
        use_ema: bool = True,
        upscale: int = 1,
        tag: str = "samples",
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
        if labels is None and num_per_class < 1:
            raise ValueError(f"num_per_class must be >= 1; got {num_per_class}")
        if upscale < 1:
            raise ValueError(f"upscale must be >= 1; got {upscale}")
        self.num_per_class = int(num_per_class)
        self.labels = None if labels is None else [int(v) for v in labels]
        self.nrow = nrow
        self.upscale = int(upscale)
        self.tag = tag
        self.last_path: Path | None = None  # the latest PNG (rank 0)

    def grid_labels(self, num_classes: int) -> Tensor:
        """``(N,)`` labels of the grid cells."""
        if self.labels is not None:
            return torch.tensor(self.labels, dtype=torch.long)
        return torch.arange(num_classes).repeat_interleave(self.num_per_class)

    @torch.no_grad()
    def sample_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        """``(N, C, H, W)`` decoded grid images in cell order (on every rank)."""
        labels = self.grid_labels(pl_module.network.num_classes)
        n = len(labels)
        share = rank_share(n, trainer.global_rank, trainer.world_size)
        images = self.generate(pl_module, share.indices, labels[share.indices])
        if trainer.world_size == 1:
            return images
        gathered = pl_module.all_gather(images)  # (world, per_rank, C, H, W); rank r holds r, r + world, ...
        # interleave back: cell i lives on rank i % world at position i // world
        ordered = gathered.transpose(0, 1).reshape(-1, *images.shape[1:])
        return ordered[:n]

    def grid_image(self, images: Tensor) -> Tensor:
        """``(C, H', W')`` uint8 grid of decoded images."""
        pixels = to_uint8(images.cpu())
        if self.upscale > 1:
            pixels = pixels.repeat_interleave(self.upscale, dim=2).repeat_interleave(self.upscale, dim=3)
        nrow = self.nrow if self.nrow is not None else (self.num_per_class if self.labels is None else None)
        return image_grid(pixels, nrow=nrow)

    def log_grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Sample, then (rank 0) write the PNG and the TensorBoard image. Returns the PNG path on rank 0."""
        step = trainer.global_step
        images = self.sample_images(trainer, pl_module)
        self.last_step = step
        if trainer.global_rank != 0:
            return None
        grid = self.grid_image(images)
        path = save_png(grid, log_dir_of(trainer) / "samples" / f"{self.tag}_step{step:07d}.png")
        self.last_path = path
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.tag, grid, global_step=step, dataformats="CHW")
        return path

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """The periodic and final run: :meth:`log_grid`."""
        return self.log_grid(trainer, pl_module)
