"""Test helper: a DINOv2-shaped frozen encoder small enough for CPU REPA tests, and a weights file of it.

``build_encoder`` builds the encoder from its import path with no arguments and loads the weights
strictly, so a test that stores another position-table size subclasses :class:`TinyViT` with its own
``grid`` and names the subclass (``import_path``) in its config.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

WIDTH = 8  # the tiny encoder's feature channels


class TinyViT(nn.Module):
    """A DINOv2-shaped frozen encoder: 14-px patches, class token + square ``pos_embed``, ``forward_features``."""

    patch_size = 14
    grid = 6  # its stored position table is grid x grid; build_encoder resamples it to the network's

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, kernel_size=self.patch_size, stride=self.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, width))
        self.norm = nn.LayerNorm(width)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]  # no interpolation here
        return {"x_norm_patchtokens": self.norm(tokens), "x_norm_clstoken": tokens.mean(1)}


def import_path(cls: type) -> str:
    """What ``repa.encoder`` names ``cls`` by."""
    return f"{cls.__module__}.{cls.__qualname__}"


def save_random_weights(factory: Callable[[], nn.Module], path: Path, seed: int) -> Path:
    """``path``: the state dict of ``factory()`` built after ``torch.manual_seed(seed)``, with every value
    drawn again from N(0, 0.5^2) (non-trivial values everywhere)."""
    torch.manual_seed(seed)
    encoder = factory()
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0.0, 0.5)
    torch.save(encoder.state_dict(), path)
    return path
