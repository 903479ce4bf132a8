"""Images out of the model: latents -> pixels (a VAE decode, or nothing for pixel data), grids, PNG files.

No torchvision: the grid is a few tensor ops and the PNG goes through Pillow.

Latents are decoded after undoing the normalisation training applied (:class:`LatentNormalization`):
``z * scale`` (the SD-VAE convention, :data:`SD_VAE_SCALE`) or per channel ``(z - mean) / std``, as the
latent shard index records it (``normalization``, ``scale_factor``, ``channel_mean``, ``channel_std``).
The sampling callbacks hand the decoder the normalisation of the trainer's latent shards
(:meth:`AutoencoderKLDecoder.match_training_data`); one given by hand must agree with it.

Pixel convention: the model's pixel-space data and a VAE's decoded output are floats in [-1, 1];
:func:`to_uint8` maps them to 0..255 (clamping first, as the released ``sample.py`` does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ..errors import ConfigurationError

__all__ = [
    "SD_VAE_SCALE",
    "AutoencoderKLDecoder",
    "IdentityDecoder",
    "LatentDecoder",
    "LatentNormalization",
    "image_grid",
    "make_decoder",
    "save_png",
    "to_uint8",
]

#: Latent scale factor of the Stable Diffusion VAE: the released train.py trains on
#: ``vae.encode(x).latent_dist.sample().mul_(0.18215)`` and sample.py decodes ``z / 0.18215``. The one
#: definition of the constant (``data.shards`` and the callbacks import it).
SD_VAE_SCALE = 0.18215
#: The normalisations a latent shard index can record (``data.shards.Normalization``).
LatentNormalizationKind = Literal["scale", "channel"]
_NORMALIZATION_KINDS: tuple[str, ...] = get_args(LatentNormalizationKind)
#: The index file of a latent shard folder (``data.shards.INDEX_FILE``).
_SHARD_INDEX_FILE = "index.json"
#: Pixels between grid cells.
GRID_PADDING = 1
#: Value range of decoded images.
PIXEL_RANGE = (-1.0, 1.0)
_UINT8_MAX = 255


def to_uint8(images: Tensor, value_range: tuple[float, float] = PIXEL_RANGE) -> Tensor:
    """Floats in ``value_range`` -> ``uint8`` 0..255 (clamped; rounded to nearest).

    Args:
        images: ``(..., C, H, W)`` float images.
        value_range: ``(lo, hi)`` mapped to 0 and 255.
    """
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must have hi > lo; got {value_range}")
    unit = ((images.detach().float() - lo) / (hi - lo)).clamp(0.0, 1.0)
    return (unit * _UINT8_MAX).round().to(torch.uint8)


def image_grid(
    images: Tensor, nrow: int | None = None, padding: int = GRID_PADDING, pad_value: int = 0
) -> Tensor:
    """Tile ``(N, C, H, W)`` images into one ``(C, rows*(H+p)+p, nrow*(W+p)+p)`` image, row-major.

    Cell ``i`` sits in row ``i // nrow`` and column ``i % nrow`` (torchvision's ``make_grid`` layout).
    Unused cells of the last row keep ``pad_value``.

    Args:
        images: ``(N, C, H, W)`` images of any dtype.
        nrow: images per row; default ``ceil(sqrt(N))``.
        padding: pixels between cells and around the border.
        pad_value: value of the padding pixels.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = max(1, math.ceil(math.sqrt(n))) if nrow is None else int(nrow)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1; got {nrow}")
    ncol = min(nrow, max(n, 1))
    rows = max(1, math.ceil(n / nrow))
    grid = torch.full(
        (c, rows * (h + padding) + padding, ncol * (w + padding) + padding),
        pad_value,
        dtype=images.dtype,
        device=images.device,
    )
    for i in range(n):
        top = padding + (i // nrow) * (h + padding)
        left = padding + (i % nrow) * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a ``(C, H, W)`` ``uint8`` image (C = 1 grey or 3 RGB) as a PNG; parent folders are created."""
    from PIL import Image

    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"save_png needs a (1 or 3, H, W) uint8 tensor; got {tuple(image.shape)} {image.dtype}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = image.cpu().permute(1, 2, 0).numpy()
    pil = (
        Image.fromarray(array[:, :, 0], mode="L")
        if image.shape[0] == 1
        else Image.fromarray(array, mode="RGB")
    )
    pil.save(path)
    return path


@dataclass(frozen=True)
class LatentNormalization:
    """The map from VAE latents ``z`` to the model's data space ``x_1``, and its inverse.

    ``kind="scale"``: ``x_1 = z * scale_factor``; ``kind="channel"``: ``x_1 = (z - mean) / std`` per
    channel. :meth:`denormalize` is the same arithmetic as ``LatentShards.denormalize`` (float32 on the
    sample's device), so samples decode exactly as the shards were normalised.

    Attributes:
        kind: ``"scale"`` or ``"channel"``.
        scale_factor: the scale of ``kind="scale"`` (SD VAE: :data:`SD_VAE_SCALE`).
        channel_mean: ``(C,)`` per-channel mean of the unscaled latents (``kind="channel"``).
        channel_std: ``(C,)`` per-channel std, all > 0 (``kind="channel"``).
    """

    kind: LatentNormalizationKind = "scale"
    scale_factor: float = SD_VAE_SCALE
    channel_mean: tuple[float, ...] | None = None
    channel_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in _NORMALIZATION_KINDS:
            raise ValueError(f"normalization kind must be one of {_NORMALIZATION_KINDS}; got {self.kind!r}")
        if self.kind == "scale":
            if not (isinstance(self.scale_factor, (int, float)) and math.isfinite(self.scale_factor)) or not (
                self.scale_factor > 0
            ):
                raise ValueError(
                    f"normalization 'scale' needs a finite scale_factor > 0; got {self.scale_factor!r}"
                )
            if self.channel_mean is not None or self.channel_std is not None:
                raise ValueError("channel_mean / channel_std belong to normalization 'channel', not 'scale'")
            return
        if self.channel_mean is None or self.channel_std is None:
            raise ValueError("normalization 'channel' needs channel_mean and channel_std")
        mean = tuple(float(v) for v in self.channel_mean)
        std = tuple(float(v) for v in self.channel_std)
        if len(mean) != len(std) or not mean or min(std) <= 0:
            raise ValueError(
                f"channel_mean and channel_std must hold one value per channel, std > 0; got {mean} / {std}"
            )
        object.__setattr__(self, "channel_mean", mean)  # a YAML / JSON list becomes the tuple
        object.__setattr__(self, "channel_std", std)

    @classmethod
    def from_index(cls, index: Mapping[str, Any]) -> LatentNormalization:
        """The normalisation a latent shard index (``index.json``'s mapping) records."""
        kind = index.get("normalization", "scale")
        if kind == "channel":
            return cls(
                "channel", channel_mean=index.get("channel_mean"), channel_std=index.get("channel_std")
            )
        scale = index.get("scale_factor")
        return cls(kind, scale_factor=SD_VAE_SCALE if scale is None else float(scale))

    @classmethod
    def read(cls, path: str | Path) -> LatentNormalization:
        """The normalisation of a latent shard folder (or of its ``index.json``)."""
        path = Path(path)
        index_path = path / _SHARD_INDEX_FILE if path.is_dir() else path
        if not index_path.is_file():
            raise ValueError(f"{index_path} not found: give a latent shard folder (with {_SHARD_INDEX_FILE})")
        return cls.from_index(json.loads(index_path.read_text()))

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        assert self.channel_mean is not None and self.channel_std is not None  # __post_init__
        if like.shape[-3] != len(self.channel_mean):
            raise ValueError(
                f"the normalisation has {len(self.channel_mean)} channels, the samples "
                f"{like.shape[-3]} (shape {tuple(like.shape)})"
            )
        shape = (-1, 1, 1)
        mean = torch.tensor(self.channel_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.channel_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def normalize(self, z: Tensor) -> Tensor:
        """Unscaled latents ``(..., C, H, W)`` -> the model's data space."""
        if self.kind == "scale":
            return z * self.scale_factor
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Model samples ``(..., C, H, W)`` -> latents for ``vae.decode`` (inverse of :meth:`normalize`)."""
        if self.kind == "scale":
            return x / self.scale_factor
        mean, std = self._stats(x)
        return x * std + mean

    def describe(self) -> dict[str, Any]:
        """Plain data for reports and JSON."""
        if self.kind == "scale":
            return {"kind": "scale", "scale_factor": self.scale_factor}
        return {
            "kind": "channel",
            "channel_mean": list(self.channel_mean or ()),
            "channel_std": list(self.channel_std or ()),
        }


class LatentDecoder:
    """Maps model samples ``(N, C, h, w)`` to images ``(N, C', H, W)`` in [-1, 1]."""

    def __call__(self, latents: Tensor) -> Tensor:
        raise NotImplementedError


class IdentityDecoder(LatentDecoder):
    """Pixel-space data (the digits demo): the samples already are the images."""

    def __call__(self, latents: Tensor) -> Tensor:
        return latents

    def __repr__(self) -> str:
        return "IdentityDecoder()"


class AutoencoderKLDecoder(LatentDecoder):
    """diffusers ``AutoencoderKL`` decode of the de-normalised samples (the SD VAE of SiT), loaded on first use.

    The samples are mapped back to VAE latents with :class:`LatentNormalization`: the one ``latents`` (the
    shard folder the model was trained on) or ``scale`` names, else the training data's (a sampling
    callback passes the trainer's latent shards to :meth:`match_training_data`), else division by
    :data:`SD_VAE_SCALE`, as the released ``sample.py`` does.

    Args:
        pretrained: a local folder or hub id for ``AutoencoderKL.from_pretrained`` (e.g.
            ``stabilityai/sd-vae-ft-ema``); with ``HF_HUB_OFFLINE=1`` it must be in the local cache.
        scale: the latent scale factor the latents were stored with; None: the training data's, or
            :data:`SD_VAE_SCALE`.
        batch_size: images decoded per VAE call (bounds the decoder's memory).
        latents: a latent shard folder (or its ``index.json``) whose normalisation to undo, or a
            :class:`LatentNormalization`; replaces ``scale``.
    """

    def __init__(
        self,
        pretrained: str,
        scale: float | None = None,
        batch_size: int = 32,
        latents: str | LatentNormalization | None = None,
    ) -> None:
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be > 0; got {scale}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if latents is not None and scale is not None:
            raise ValueError(f"give either scale ({scale}) or latents ({latents!r}), not both")
        self.pretrained = pretrained
        self.normalization = _normalization(latents, SD_VAE_SCALE if scale is None else scale)
        #: what set :attr:`normalization` by hand (for messages); None: the default, open to the data's
        self.given: str | None = (
            f"latents={str(latents)!r}"
            if latents is not None
            else None
            if scale is None
            else f"scale={scale}"
        )
        self.batch_size = int(batch_size)
        self._vae: Any = None

    def match_training_data(self, normalization: LatentNormalization, source: str) -> None:
        """Undo ``normalization``, the one the training data were stored with (``source`` names them).

        Without ``latents`` or ``scale`` the decoder takes it; with them they must agree.

        Raises:
            ConfigurationError: the normalisation given by hand differs from the data's.
        """
        if self.given is not None and self.normalization != normalization:
            raise ConfigurationError(
                f"the VAE decoder undoes {self.normalization.describe()} ({self.given}), but {source} "
                f"hold latents normalised with {normalization.describe()}: drop latents / scale to use "
                "the data's, or give the shard folder the model trains on"
            )
        self.normalization = normalization

    @property
    def scale(self) -> float | None:
        """The scale factor of a ``scale`` normalisation (None for per-channel statistics)."""
        return self.normalization.scale_factor if self.normalization.kind == "scale" else None

    def _load(self, device: torch.device) -> Any:
        if self._vae is None:
            from diffusers.models import AutoencoderKL

            self._vae = AutoencoderKL.from_pretrained(self.pretrained).eval().requires_grad_(False)
        return self._vae.to(device)

    @torch.no_grad()
    def __call__(self, latents: Tensor) -> Tensor:
        vae = self._load(latents.device)
        dtype = next(vae.parameters()).dtype
        z = self.normalization.denormalize(latents.float())
        chunks = [vae.decode(chunk.to(dtype)).sample.float() for chunk in z.split(self.batch_size)]
        return torch.cat(chunks)

    def __repr__(self) -> str:
        return f"AutoencoderKLDecoder({self.pretrained!r}, normalization={self.normalization.describe()})"


def _normalization(latents: str | Path | LatentNormalization | None, scale: float) -> LatentNormalization:
    if isinstance(latents, LatentNormalization):
        return latents
    if latents is not None:
        return LatentNormalization.read(latents)
    return LatentNormalization("scale", scale_factor=float(scale))


def make_decoder(
    decoder: str | LatentDecoder | None,
    scale: float | None = None,
    latents: str | LatentNormalization | None = None,
) -> LatentDecoder:
    """``None`` -> :class:`IdentityDecoder`; a path or hub id -> :class:`AutoencoderKLDecoder`; a decoder as is.

    ``scale`` and ``latents`` (a shard folder or a :class:`LatentNormalization`) are the
    :class:`AutoencoderKLDecoder`'s; they must stay unset with pixel data or a ready decoder.
    """
    if decoder is None or isinstance(decoder, LatentDecoder):
        if latents is not None:
            raise ValueError(f"latents={latents!r} applies to a VAE decoder given by path or hub id")
        if scale is not None:
            raise ValueError(f"scale={scale} applies to a VAE decoder given by path or hub id")
        return IdentityDecoder() if decoder is None else decoder
    if isinstance(decoder, str):
        return AutoencoderKLDecoder(decoder, scale=scale, latents=latents)
    raise TypeError(f"decoder must be None, a path/hub id or a LatentDecoder; got {type(decoder).__name__}")
