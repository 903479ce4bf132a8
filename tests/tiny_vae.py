"""A tiny diffusers AutoencoderKL (random weights, built from a config) saved to a folder, for tests."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_vae(path: Path, sample_size: int) -> Path:
    """Build the 2-level, 4-latent-channel VAE (seed 0) and ``save_pretrained`` it to ``path``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )
    vae.save_pretrained(path)
    return path
