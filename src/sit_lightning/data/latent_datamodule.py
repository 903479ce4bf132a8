"""``LatentDataModule``: training batches from precomputed VAE latent shards.

Every draw takes a random flip (p = 0.5: the stored moments of the flipped image) and a fresh posterior
sample ``z = mean + std * n``, both keyed by ``(seed, key)`` -- the sample's position in the run's sample
stream -- and never by rank or worker, then applies the index's normalisation (``z * 0.18215`` for the
SD VAE). This reproduces the released SiT code's on-the-fly ``vae.encode(flip(x)).latent_dist.sample()``
in distribution, at no VAE cost.

Bad input fails before the first step where it can, as a :class:`~sit_lightning.errors.ConfigurationError`
(one line from the CLI): a missing shard folder (with the ``precompute-latents`` command that makes it),
labels outside ``[0, num_classes)`` (checked when the shards are opened), ``trainer.max_steps == 0``, and an
output folder that is not writable or lacks room for a checkpoint (checked in ``setup("fit")``).
Non-finite latents are found where a batch is made (a finiteness check of each sample's sum: about 1% of
making the batch) and named by shard file and row; ``validate_shards`` checks every value of a folder
ahead of time.

For REPA, ``repa_inputs`` adds what the alignment needs beside the latent (docs/data.md, "What REPA
reads"): ``"image"``, the stored clean image as uint8, flipped with its latent (the same keyed flip);
or ``"features"``, the stored encoder features of the unflipped image, which need ``flip=False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from sit_lightning.data.shards import LatentShards
from sit_lightning.data.stream import SampleStreamDataModule
from sit_lightning.errors import ConfigurationError, DataError
from sit_lightning.randomness import NORMAL_VERSIONS, keyed_generator, keyed_rand, keyed_randn

__all__ = ["LatentDataModule", "LatentSource", "FLIP_STREAM", "POSTERIOR_STREAM", "RepaInputs"]

#: What a batch carries for REPA beside the latent: nothing, ``image`` or ``repa_features``.
RepaInputs = Literal["none", "image", "features"]
REPA_INPUTS: tuple[str, ...] = get_args(RepaInputs)

FLIP_STREAM = "data.flip"
POSTERIOR_STREAM = "data.posterior"
VAL_STREAM_PREFIX = "val."  # validation keys restart at 0: their own streams keep their draws apart
SPLIT_STREAM = "data.val_split"
FLIP_PROBABILITY = 0.5
_KEYED_STEP = 0  # the key already holds the epoch, so the randomness "step" slot stays constant
#: ``keyed_randn`` version of the posterior noise (3: float32 Box-Muller on Philox4x64 words, the cheapest in
#: the data workers); saved in checkpoints: a checkpoint of version 2 resumes with version 2, and one without
#: it (version 1, float64) resumes with version 1, so a resume draws the same noise.
POSTERIOR_NORMALS_VERSION = 3
_VERSION_KEY = "posterior_normals_version"


class LatentSource:
    """Batched, keyed loading of latents from shards (the stream's ``SampleSource``).

    Args:
        shards: the shard reader.
        seed: base seed of the flip and posterior draws.
        flip: draw a horizontal flip with probability 0.5 per draw.
        sample_posterior: draw ``z = mean + std * n``; ``False`` uses the posterior mean.
        subset: dataset indices of this split into the shards (``None``: all).
        stream_prefix: prepended to the random stream names (keeps validation draws apart).
        repa_inputs: also yield ``image`` ((b, 3, S, S) uint8, flipped with its latent) or
            ``repa_features`` ((b, T, C) float16, of the unflipped image; needs ``flip=False``).
    """

    def __init__(
        self,
        shards: LatentShards,
        *,
        seed: int,
        flip: bool,
        sample_posterior: bool,
        subset: np.ndarray | None = None,
        stream_prefix: str = "",
        repa_inputs: RepaInputs = "none",
    ) -> None:
        _check_repa_inputs(repa_inputs, flip)
        if repa_inputs == "image" and shards.image_shape is None:
            raise ConfigurationError(
                f"repa_inputs='image' but {shards.path} holds no images; make the shards with "
                "precompute-latents --store_images true, or choose repa_inputs from ('none', 'features')"
            )
        if repa_inputs == "features" and shards.feature_shape is None:
            raise ConfigurationError(
                f"repa_inputs='features' but {shards.path} holds no encoder features; make the shards with "
                "precompute-latents --repa_encoder ..., or choose repa_inputs from ('none', 'image')"
            )
        self.repa_inputs = repa_inputs
        self.shards = shards
        self.seed = seed
        self.flip = flip
        self.sample_posterior = sample_posterior
        self.subset = subset
        self.flip_stream = stream_prefix + FLIP_STREAM
        self.posterior_stream = stream_prefix + POSTERIOR_STREAM
        self.normals_version = POSTERIOR_NORMALS_VERSION  # a resumed checkpoint's, if it is older

    def __len__(self) -> int:
        return len(self.shards) if self.subset is None else len(self.subset)

    def load(self, indices: np.ndarray, keys: np.ndarray) -> dict[str, Tensor]:
        """``{"x": (b, C, H, W) float32 normalised latents, "y": (b,) int64}`` for split ``indices``."""
        rows = indices if self.subset is None else self.subset[indices]
        b = len(rows)
        if self.flip:
            flipped = keyed_rand((), self.seed, self.flip_stream, _KEYED_STEP, keys) < FLIP_PROBABILITY
        else:
            flipped = torch.zeros(b, dtype=torch.bool)
        # only the drawn flip's moments are read; every tensor below is this call's own, so the posterior
        # sample and the normalisation run in place (the same operations as mean + std * noise, then
        # normalize: the same values, without three more batch-sized buffers)
        chosen = torch.from_numpy(self.shards.moments(rows, flips=flipped.numpy()))  # (b, 2, C, H, W)
        mean, std = chosen[:, 0], chosen[:, 1]
        if self.sample_posterior:
            noise = keyed_randn(
                self.shards.latent_shape,
                self.seed,
                self.posterior_stream,
                _KEYED_STEP,
                keys,
                version=self.normals_version,
            )
            z = noise.mul_(std).add_(mean)
        else:
            z = mean.contiguous()  # a copy: the batch does not keep the std half alive
        x = self.shards.normalize(z, in_place=True)
        # A NaN or inf makes its row's sum non-finite: one reduction, ~1% of making the batch (the keyed
        # posterior noise dominates), where an elementwise isfinite costs ~15%. A finite row overflows
        # only with values near float32's limit / (C*H*W), bad data as well.
        finite = torch.isfinite(x.flatten(1).sum(1))  # (b,)
        if not bool(finite.all()):
            self._raise_non_finite(int(rows[int(torch.nonzero(~finite)[0])]))
        y = torch.from_numpy(self.shards.labels[rows].astype(np.int64))
        batch = {"x": x, "y": y}
        if self.repa_inputs == "image":
            image = torch.from_numpy(self.shards.images(rows))  # (b, 3, S, S) uint8, unflipped
            image[flipped] = image[flipped].flip(-1)  # the latent's flip: exact for pixels
            batch["image"] = image
        elif self.repa_inputs == "features":
            batch["repa_features"] = torch.from_numpy(self.shards.features(rows))  # (b, T, C) float16
        return batch

    def _raise_non_finite(self, index: int) -> None:
        file, row = self.shards.locate(index)
        raise DataError(
            f"non-finite latent (NaN or inf) in {file}, row {row} (sample {index} of {self.shards.path}); "
            f"find every bad value with sit_lightning.data.validate_shards({str(self.shards.path)!r}) and "
            "make the shards again with precompute-latents"
        )


def _check_repa_inputs(repa_inputs: str, flip: bool) -> None:
    if repa_inputs not in REPA_INPUTS:
        raise ConfigurationError(f"repa_inputs must be one of {REPA_INPUTS}; got {repa_inputs!r}")
    if repa_inputs == "features" and flip:
        raise ConfigurationError(
            "repa_inputs='features' needs flip=false: the stored encoder features are of the unflipped "
            "images only, so a flipped latent would be aligned with the unflipped image's features"
        )


class LatentDataModule(SampleStreamDataModule):
    """Latent shards -> batches ``{"x": (b, C, H, W) float32, "y": (b,) int64, "key": (b,) int64}``.

    ``b = global_batch_size / world_size``. ``key`` is the sample's position in the run's sample
    stream (``epoch * samples_per_epoch + position``), independent of ranks and workers, so the module
    can key its own draws (time, noise, label dropout) by ``(seed, key)``. Resumes mid-epoch exactly
    from a Lightning checkpoint (see :mod:`sit_lightning.data.stream`).

    Args:
        data_dir: shard folder written by ``sit-lightning precompute-latents``.
        global_batch_size: samples per step over all devices (SiT: 256); must divide by the world size.
        num_workers: data-loader worker processes per device.
        seed: seed of the epoch shuffles, flips and posterior samples.
        flip: random horizontal flip (p = 0.5) per draw, as the released training.
        sample_posterior: fresh posterior sample per draw (released training); ``False``: the mean.
        val_dir: a separate shard folder for validation.
        val_fraction: hold out this fraction of ``data_dir`` (a fixed random subset keyed by ``seed``)
            for validation when ``val_dir`` is not given; 0 disables validation.
        val_global_batch_size: validation batch over all devices (default: ``global_batch_size``); the
            remainder that does not fill a whole batch is not evaluated (a split smaller than one batch
            is evaluated as one batch of what divides by the ranks).
        pin_memory: pin host memory for faster host-to-GPU copies.
        repa_inputs: what training batches carry for REPA (``model.repa``): ``none`` (default),
            ``image`` (``batch["image"]``, the stored clean image, (b, 3, S, S) uint8 with the latent's
            flip; for an online encoder) or ``features`` (``batch["repa_features"]``, the stored
            (b, T, C) float16 encoder features; needs ``flip=false``). The shards must hold them
            (``precompute-latents --store_images`` / ``--repa_encoder``); validation batches carry
            neither (the validation loss is the plain objective).
    """

    def __init__(
        self,
        data_dir: str,
        global_batch_size: int = 256,
        num_workers: int = 4,
        seed: int = 0,
        flip: bool = True,
        sample_posterior: bool = True,
        val_dir: str | None = None,
        val_fraction: float = 0.0,
        val_global_batch_size: int | None = None,
        pin_memory: bool = True,
        repa_inputs: RepaInputs = "none",
    ) -> None:
        _check_repa_inputs(repa_inputs, flip)
        super().__init__(global_batch_size, num_workers, seed, pin_memory, val_global_batch_size)
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigurationError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_dir is not None and val_fraction > 0:
            raise ConfigurationError(
                "give either val_dir or val_fraction, not both "
                f"(val_dir={val_dir!r}, val_fraction={val_fraction})"
            )
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.flip = flip
        self.sample_posterior = sample_posterior
        self.val_dir = val_dir
        self.val_fraction = val_fraction
        self.repa_inputs = repa_inputs
        self._shards: LatentShards | None = None
        self._val_shards: LatentShards | None = None
        self._train: LatentSource | None = None
        self._val: LatentSource | None = None

    # ----------------------------------------------------------------- metadata (read the index only)
    @property
    def shards(self) -> LatentShards:
        """The training shard reader (opened and validated on first use)."""
        if self._shards is None:
            self._shards = LatentShards(Path(self.data_dir))
        return self._shards

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one latent, from the index (``SiTModule`` checks it against the network)."""
        return self.shards.latent_shape

    @property
    def num_classes(self) -> int:
        """Number of classes, from the index."""
        return self.shards.num_classes

    def denormalize(self, x: Tensor) -> Tensor:
        """Model samples ``x_1`` -> unscaled VAE latents for ``vae.decode``."""
        return self.shards.denormalize(x)

    # ----------------------------------------------------------------- splits
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)  # the checks of a fit (SampleStreamDataModule.setup)
        if self._train is not None:
            return
        shards = self.shards
        train_subset = None
        if self.val_fraction > 0:
            g = keyed_generator(self.seed, SPLIT_STREAM)
            order = torch.randperm(len(shards), generator=g).numpy()
            n_val = int(round(self.val_fraction * len(shards)))
            val_subset, train_subset = np.sort(order[:n_val]), np.sort(order[n_val:])
            self._val = self._source(shards, val_subset, VAL_STREAM_PREFIX)
        elif self.val_dir is not None:
            self._val_shards = LatentShards(Path(self.val_dir))
            if self._val_shards.latent_shape != shards.latent_shape:
                raise ConfigurationError(
                    f"val_dir latents have shape {self._val_shards.latent_shape}, "
                    f"data_dir latents {shards.latent_shape}"
                )
            self._val = self._source(self._val_shards, None, VAL_STREAM_PREFIX)
        self._train = self._source(shards, train_subset, "", self.repa_inputs)

    def _source(
        self, shards: LatentShards, subset: np.ndarray | None, prefix: str, repa_inputs: RepaInputs = "none"
    ) -> LatentSource:
        source = LatentSource(
            shards,
            seed=self.seed,
            flip=self.flip,
            sample_posterior=self.sample_posterior,
            subset=subset,
            stream_prefix=prefix,
            repa_inputs=repa_inputs,
        )
        source.normals_version = self.posterior_normals_version
        return source

    # the posterior noise's keyed_randn version travels with the stream position (exact resumes)
    posterior_normals_version: int = POSTERIOR_NORMALS_VERSION

    def state_dict(self) -> dict:
        return {**super().state_dict(), _VERSION_KEY: self.posterior_normals_version}

    def load_state_dict(self, state: dict) -> None:
        version = state.get(_VERSION_KEY, 1)  # checkpoints from before the key drew version 1
        if version not in NORMAL_VERSIONS:
            raise ConfigurationError(
                f"checkpoint posterior noise version {version!r} is not one of {NORMAL_VERSIONS}; "
                "it comes from a newer sit-lightning"
            )
        self.posterior_normals_version = version
        for source in (self._train, self._val):
            if source is not None:
                source.normals_version = version
        super().load_state_dict({k: v for k, v in state.items() if k != _VERSION_KEY})

    def train_source(self) -> LatentSource:
        self.setup()
        assert self._train is not None
        return self._train

    def val_source(self) -> LatentSource | None:
        self.setup()
        return self._val
