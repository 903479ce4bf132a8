"""The base of callbacks that sample every ``every_n_steps`` optimizer steps and at the end of training.

:class:`PeriodicSamplingCallback` owns what the sample grid and the FID callback share: the schedule
(the hooks, and "not twice at the same step"), the sampler settings (one
:class:`~sit_lightning.sampling.SamplerSettings`, ``settings:`` in YAML, validated when the config is
parsed), the keyed sample plan (:func:`~sit_lightning.evaluation.sample_plan.generate`), the decoder
and the EMA switch. A subclass implements :meth:`~PeriodicSamplingCallback.run`.

When the fit starts, a VAE decoder takes the normalisation of the trainer's
:class:`~sit_lightning.data.LatentDataModule` shards (scale, or per-channel mean and std), so that
samples decode exactly as the shards were normalised; one given by hand (``latent_scale``, or the
decoder's ``latents``) that disagrees with the shards stops the fit.

The final run happens in ``on_train_end``, not ``on_fit_end``: Lightning's teardown, which moves the
module to the CPU, runs between the two, and the samples must be drawn on the training device.
Anything that only reports on finished runs (the FID report) belongs in ``on_fit_end``, after every
callback's final run, whatever the order of the callbacks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from ..data.latent_datamodule import LatentDataModule
from ..evaluation.images import (
    SD_VAE_SCALE,
    AutoencoderKLDecoder,
    LatentDecoder,
    LatentNormalization,
    make_decoder,
)
from ..evaluation.sample_plan import generate
from ..sampling import SamplerSettings
from ..sampling.presets import SamplerPresetName, sampler_preset

__all__ = ["DEFAULT_LATENT_SCALE", "DEFAULT_SETTINGS", "PeriodicSamplingCallback"]

#: The SD VAE's latent scale (latents were stored as ``z * SD_VAE_SCALE``): what a VAE decoder undoes
#: when neither ``latent_scale`` nor the trainer's latent shards say otherwise.
DEFAULT_LATENT_SCALE = SD_VAE_SCALE
#: The callbacks' default sampler: ``SamplerSettings()`` itself (Heun ODE, 125 steps, 250 NFE per image),
#: so that a YAML ``settings:`` mapping means exactly ``SamplerSettings(**mapping)``: jsonargparse fills
#: the fields it leaves out from this default, and any other default would leak into them (e.g. its
#: steps into ``{method: dopri5}``, an adaptive method that takes no steps).
DEFAULT_SETTINGS = SamplerSettings()


class PeriodicSamplingCallback(Callback):
    """Sample every ``every_n_steps`` optimizer steps and once at the end of training (base class).

    Args:
        every_n_steps: period in optimizer steps; 0 runs only at the end of training.
        seed: seed of the keyed noise (sample ``i`` gets the noise of index ``i``).
        settings: how to sample (sampler, method, steps, grid, SDE diffusion, guidance); in YAML
            a mapping of its fields, e.g. ``{sampler: ode, method: heun, steps: 16}`` (the fields left
            out keep ``SamplerSettings``' defaults), or the name of a preset
            (``sit_lightning.sampling.presets``, e.g. ``released-ode-heun250``). Default:
            ``SamplerSettings()``, the Heun ODE with 125 steps.
        batch_size: samples per sampler call (results do not depend on it).
        decoder: None for pixel-space data; a path or hub id of a diffusers ``AutoencoderKL`` for
            latents (loaded on first use), or a :class:`LatentDecoder`.
        latent_scale: scale factor the latents were stored with (VAE decoding only); None: the
            normalisation of the trainer's ``LatentDataModule`` shards, else ``SD_VAE_SCALE``.
        use_ema: sample with the EMA weights (when an ``EMACallback`` is attached).
    """

    def __init__(
        self,
        every_n_steps: int,
        seed: int = 0,
        settings: SamplerSettings | SamplerPresetName = DEFAULT_SETTINGS,
        batch_size: int = 256,
        decoder: str | LatentDecoder | None = None,
        latent_scale: float | None = None,
        use_ema: bool = True,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0; got {every_n_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if isinstance(settings, str):
            settings = sampler_preset(settings)
        if not isinstance(settings, SamplerSettings):
            raise ValueError(
                f"settings must be a SamplerSettings; got {type(settings).__name__} {settings!r}"
            )
        self.every_n_steps = int(every_n_steps)
        self.seed = int(seed)
        self.settings = settings
        self.batch_size = int(batch_size)
        self.decoder = make_decoder(decoder, latent_scale)
        self.use_ema = bool(use_ema)
        self.last_step: int | None = None  # the optimizer step of the latest run (set by run())

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Sample and log once, at ``trainer.global_step``; sets :attr:`last_step`. Every rank calls it."""
        raise NotImplementedError

    def generate(
        self, pl_module: pl.LightningModule, indices: Tensor, labels: Tensor, **changes: Any
    ) -> Tensor:
        """``(N, C, H, W)`` decoded samples of the keyed ``indices`` with ``labels``.

        Args:
            pl_module: a module with ``sample(labels, settings, *, seed, indices, use_ema)``.
            indices: ``(N,)`` global sample indices (they key the noise).
            labels: ``(N,)`` class labels.
            **changes: fields of :attr:`settings` to change for this call (e.g. ``cfg_scale``).
        """
        settings = dataclasses.replace(self.settings, **changes) if changes else self.settings
        return generate(
            pl_module.sample,
            indices,
            labels,
            batch_size=self.batch_size,
            decode=self.decoder,
            settings=settings,
            seed=self.seed,
            use_ema=self.use_ema,
        )

    def match_training_data(self, datamodule: object | None) -> None:
        """Give a VAE decoder the normalisation of ``datamodule``'s latent shards (see the module doc).

        Nothing to do for pixel data, a decoder of your own, or a data module other than
        ``LatentDataModule``.

        Raises:
            ConfigurationError: the decoder's ``latents`` / ``latent_scale`` disagree with the shards.
        """
        if not isinstance(self.decoder, AutoencoderKLDecoder) or not isinstance(datamodule, LatentDataModule):
            return
        shards = LatentNormalization.from_index(datamodule.shards.index)
        source = f"{type(self).__name__}: the trainer's LatentDataModule shards ({datamodule.data_dir})"
        self.decoder.match_training_data(shards, source)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # before the first step: a decoder that would decode wrongly must not wait for the first grid
        if stage == "fit":
            self.match_training_data(trainer.datamodule)

    def due(self, step: int) -> bool:
        """Whether the periodic schedule runs at optimizer step ``step`` (and has not yet)."""
        return (
            bool(self.every_n_steps)
            and step > 0
            and step % self.every_n_steps == 0
            and step != self.last_step
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.due(trainer.global_step):
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_end, not on_fit_end: the teardown between the two moves the module to the CPU
        if trainer.global_step != self.last_step:
            self.run(trainer, pl_module)
