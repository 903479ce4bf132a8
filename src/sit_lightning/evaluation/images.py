"""Images out of the model: latents -> pixels (a VAE decode, or nothing for pixel data), grids, PNG files.

No torchvision: the grid is a few tensor ops and the PNG goes through Pillow.

Pixel convention: the model's pixel-space data and a VAE's decoded output are floats in [-1, 1];
:func:`to_uint8` maps them to 0..255 (clamping first, as the released ``sample.py`` does).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SD_VAE_SCALE",
    "AutoencoderKLDecoder",
    "IdentityDecoder",
    "LatentDecoder",
    "image_grid",
    "make_decoder",
    "save_png",
    "to_uint8",
]

#: Latent scale factor of the Stable Diffusion VAE (latents are stored as ``z * scale``).
SD_VAE_SCALE = 0.18215
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
    """diffusers ``AutoencoderKL`` decode of ``z / scale`` (the SD VAE of SiT), loaded on first use.

    Args:
        pretrained: a local folder or hub id for ``AutoencoderKL.from_pretrained`` (e.g.
            ``stabilityai/sd-vae-ft-ema``); with ``HF_HUB_OFFLINE=1`` it must be in the local cache.
        scale: the latent scale factor the latents were stored with.
        batch_size: images decoded per VAE call (bounds the decoder's memory).
    """

    def __init__(self, pretrained: str, scale: float = SD_VAE_SCALE, batch_size: int = 32) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0; got {scale}")
        self.pretrained = pretrained
        self.scale = float(scale)
        self.batch_size = int(batch_size)
        self._vae: Any = None

    def _load(self, device: torch.device) -> Any:
        if self._vae is None:
            from diffusers.models import AutoencoderKL

            self._vae = AutoencoderKL.from_pretrained(self.pretrained).eval().requires_grad_(False)
        return self._vae.to(device)

    @torch.no_grad()
    def __call__(self, latents: Tensor) -> Tensor:
        vae = self._load(latents.device)
        dtype = next(vae.parameters()).dtype
        chunks = [
            vae.decode(chunk.to(dtype) / self.scale).sample.float()
            for chunk in latents.split(self.batch_size)
        ]
        return torch.cat(chunks)

    def __repr__(self) -> str:
        return f"AutoencoderKLDecoder({self.pretrained!r}, scale={self.scale})"


def make_decoder(decoder: str | LatentDecoder | None, scale: float = SD_VAE_SCALE) -> LatentDecoder:
    """``None`` -> :class:`IdentityDecoder`; a path or hub id -> :class:`AutoencoderKLDecoder`; a decoder as is."""
    if decoder is None:
        return IdentityDecoder()
    if isinstance(decoder, LatentDecoder):
        return decoder
    if isinstance(decoder, str):
        return AutoencoderKLDecoder(decoder, scale=scale)
    raise TypeError(f"decoder must be None, a path/hub id or a LatentDecoder; got {type(decoder).__name__}")
