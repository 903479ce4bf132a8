"""precompute-latents on an image folder, then fit on the shards, all through the ``sit-lightning`` CLI.

The fits record the batches they train on, so the test can check that the horizontal flip and the
VAE posterior sample are drawn afresh every time an image comes back, inside a real training run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batch_recorder import BatchRecorder
from cli_runner import run_cli
from sit_lightning.data import GlobalBatchSampler
from sit_lightning.data.shards import LatentShards
from tiny_vae import save_tiny_vae

CLASSES = ("cat", "dog")
PER_CLASS = 4
STEPS = 8  # 8 images, global batch 4: every image is drawn 4 times


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir()
        for i in range(PER_CLASS):
            h, w = rng.integers(20, 60, size=2)
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png"
            )
    vae_dir = save_tiny_vae(tmp_path_factory.mktemp("vae"), sample_size=16)
    out = tmp_path_factory.mktemp("latents")
    code, text = run_cli(
        ["precompute-latents", str(root), str(out), "--vae", str(vae_dir), "--image_size", "16",
         "--batch_size", "3", "--shard_size", "5", "--devices", "cpu", "--num_workers", "0", "--progress", "false"]
    )  # fmt: skip
    assert code == 0, text[-3000:]
    return out


def _fit(data_dir: Path, root: Path, *, flip: bool, posterior: bool) -> list[tuple[int, dict]]:
    BatchRecorder.batches.clear()
    code, text = run_cli(
        ["fit", "--model.arch", "{input_size: 8, num_classes: 2, depth: 1, hidden_size: 32, num_heads: 2}",
         "--data.class_path", "sit_lightning.data.LatentDataModule", "--data.init_args.data_dir", str(data_dir),
         "--data.init_args.global_batch_size", "4", "--data.init_args.num_workers", "0",
         "--data.init_args.pin_memory", "false", f"--data.init_args.flip={str(flip).lower()}",
         f"--data.init_args.sample_posterior={str(posterior).lower()}",
         "--trainer.max_steps", str(STEPS), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
         "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root),
         "--trainer.callbacks", "[{class_path: batch_recorder.BatchRecorder}]"]
    )  # fmt: skip
    assert code == 0, text[-3000:]
    assert [step for step, _ in BatchRecorder.batches] == list(range(STEPS))
    return list(BatchRecorder.batches)


def _rows(batches: list[tuple[int, dict]], count: int) -> list[tuple[int, torch.Tensor]]:
    """(image row, x) for every draw, mapping each key back to its image through the data's own order."""
    sampler = GlobalBatchSampler(count, 4, seed=0)
    return [
        (int(row), x)
        for _, batch in batches
        for row, x in zip(sampler.indices(batch["key"].numpy()), batch["x"], strict=True)
    ]


def test_precompute_then_fit_draws_a_fresh_flip_per_step(shards: Path, tmp_path: Path) -> None:
    data = LatentShards(shards)
    assert len(data) == len(CLASSES) * PER_CLASS and data.latent_shape == (4, 8, 8)
    draws = _rows(_fit(shards, tmp_path, flip=True, posterior=False), len(data))
    flips_per_image: dict[int, list[int]] = {}
    for row, x in draws:
        record = data[row]
        plain, mirrored = (
            data.normalize(torch.from_numpy(m)).float() for m in (record.mean, record.mean_flip)
        )
        # without the posterior sample, x is exactly one of the two stored means
        which = [i for i, m in enumerate((plain, mirrored)) if torch.allclose(x, m, atol=1e-6)]
        assert len(which) == 1, "x is neither the plain nor the flipped latent of its image"
        flips_per_image.setdefault(row, []).append(which[0])
    assert all(len(f) == STEPS * 4 // len(data) for f in flips_per_image.values())
    # a flip is drawn per draw: images come back flipped and unflipped within the run
    assert sum(len(set(f)) == 2 for f in flips_per_image.values()) >= len(data) // 2
    all_flips = [f for fs in flips_per_image.values() for f in fs]
    assert 0.2 < np.mean(all_flips) < 0.8


def test_precompute_then_fit_draws_a_fresh_posterior_sample_per_step(shards: Path, tmp_path: Path) -> None:
    data = LatentShards(shards)
    draws = _rows(_fit(shards, tmp_path, flip=False, posterior=True), len(data))
    noise_per_image: dict[int, list[torch.Tensor]] = {}
    for row, x in draws:
        record = data[row]
        z = data.denormalize(x.double())
        noise = (z - torch.from_numpy(record.mean).double()) / torch.from_numpy(record.std).double()
        noise_per_image.setdefault(row, []).append(noise)
    everything = torch.stack([n for ns in noise_per_image.values() for n in ns])
    # the implied posterior noise is standard normal ...
    assert abs(everything.mean().item()) < 4 / everything.numel() ** 0.5
    assert abs(everything.std().item() - 1) < 4 / (2 * everything.numel()) ** 0.5
    # ... and different at every draw of the same image
    for noises in noise_per_image.values():
        for i in range(len(noises)):
            for j in range(i):
                assert not torch.allclose(noises[i], noises[j])
