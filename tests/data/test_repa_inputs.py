"""What REPA reads from latent shards (issue 13): images and encoder features beside the latents.

What a user relies on: ``precompute-latents`` stores the centre-cropped image (uint8, unflipped) and a
frozen encoder's features of it (float16) beside the moments; ``LatentDataModule(repa_inputs=...)``
yields ``image`` with exactly its latent's keyed flip, or ``repa_features``, without changing any
other draw; features with flips on, a folder without what was asked for and a misspelt choice fail
with one line; and a REPA fit step runs through ``SiTModule`` with either input, the two giving the
same alignment targets.

A fresh SiT outputs exactly zero (adaLN-Zero); the fit test checks that training moved the weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.append(str(Path(__file__).resolve().parents[1] / "lightning"))  # the shared tiny SiT
from lightning_toy import TINY_ARCH, trainer_kwargs  # noqa: E402

from sit_lightning.data import LatentDataModule, LatentShards, LatentShardWriter, precompute_latents  # noqa: E402
from sit_lightning.data.images import load_image, scan_image_folder  # noqa: E402
from sit_lightning.errors import ConfigurationError  # noqa: E402
from sit_lightning.models import SiTConfig  # noqa: E402
from sit_lightning.module import SiTModule  # noqa: E402
from sit_lightning.repa import RepaConfig, build_encoder, encode_images  # noqa: E402
from tiny_encoder import WIDTH, TinyViT, import_path, save_random_weights  # noqa: E402
from tiny_vae import save_tiny_vae  # noqa: E402

IMAGE_SIZE = 16  # -> 8 x 8 latents with the tiny VAE: TINY_ARCH's SiT/2 has 4 x 4 = 16 tokens
CLASSES = 3
PER_CLASS = 4
RESOLUTION = 28  # 2 x 2 patches of 14 px ...
OLD_GRID = 3  # ... from a stored 3 x 3 position table, resampled to 2 x 2 at build
SIT_RESOLUTION = 56  # for the fit: 4 x 4 patches, the tiny SiT's 16 tokens
KEYS = np.arange(100, 124)


class TinyEncoder(TinyViT):
    """The shared tiny encoder with a 3 x 3 stored position table."""

    grid = OLD_GRID


ENCODER = import_path(TinyEncoder)


@pytest.fixture(scope="module")
def encoder_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_weights(TinyEncoder, tmp_path_factory.mktemp("encoder") / "tiny_encoder.pt", seed=5)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir()
        for i in range(PER_CLASS):
            h, w = rng.integers(IMAGE_SIZE, 40, size=2)
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(
                root / f"class{c}" / f"img{i}.png"
            )
    return root


def _precompute(root: Path, out: Path, weights: Path, resolution: int = RESOLUTION) -> Path:
    precompute_latents(
        str(root),
        str(out),
        vae=str(save_tiny_vae(out.parent / f"{out.name}-vae", sample_size=32)),
        image_size=IMAGE_SIZE,
        batch_size=5,
        shard_size=5,  # 12 images -> shards of 5, 5, 2: batches and shards do not line up
        devices="cpu",
        num_workers=0,
        progress=False,
        store_images=True,
        repa_encoder=ENCODER,
        repa_encoder_weights=str(weights),
        repa_encoder_resolution=resolution,
    )
    return out


@pytest.fixture(scope="module")
def shard_dir(image_root: Path, encoder_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _precompute(image_root, tmp_path_factory.mktemp("latents") / "shards", encoder_weights)


def _datamodule(path: Path, **kwargs: object) -> LatentDataModule:
    kwargs = {"num_workers": 0, "pin_memory": False, "global_batch_size": 4, "seed": 3, **kwargs}
    return LatentDataModule(str(path), **kwargs)  # type: ignore[arg-type]


# ---- precompute-latents: what is stored -----------------------------------------------------------------
def test_precompute_stores_the_unflipped_image_and_its_encoder_features(
    shard_dir: Path, image_root: Path, encoder_weights: Path
) -> None:
    shards = LatentShards(shard_dir)
    assert shards.image_shape == (3, IMAGE_SIZE, IMAGE_SIZE) and shards.feature_shape == (4, WIDTH)
    assert shards.index["feature_encoder"] == ENCODER
    scan = scan_image_folder(image_root)
    rows = np.arange(len(scan))
    images = shards.images(rows)
    assert images.dtype == np.uint8
    # the ADM centre crop, as is (no flip): channels first
    expected = np.stack([load_image(p, IMAGE_SIZE) for p in scan.paths]).transpose(0, 3, 1, 2)
    assert np.array_equal(images, expected)
    # 3 x 16 x 16 bytes per image on disk (192 KiB at 256 px)
    first = shard_dir / shards.index["shards"][0]["images"]
    assert first.stat().st_size - 128 == 5 * 3 * IMAGE_SIZE * IMAGE_SIZE  # the .npy header is 128 bytes
    # the features are the frozen encoder's, from its weights file, of the unflipped image, in float16
    config = RepaConfig(encoder=ENCODER, encoder_weights=str(encoder_weights), encoder_resolution=RESOLUTION)
    encoder = build_encoder(config, grid_size=None)
    assert encoder.pos_embed.shape == (1, 1 + 4, WIDTH)  # resampled to its own 2 x 2 grid at 28 px
    direct = encode_images(encoder, torch.from_numpy(expected), RESOLUTION).half().numpy()
    features = shards.features(rows)
    assert features.dtype == np.float16 and np.array_equal(features, direct)
    flipped = encode_images(encoder, torch.from_numpy(expected).flip(-1), RESOLUTION).half().numpy()
    assert not np.allclose(features, flipped, atol=1e-2)  # precondition: the flip changes them


# ---- the datamodule: the keyed flip, and nothing else changes -------------------------------------------
def test_the_image_comes_with_its_latents_flip_and_every_other_draw_is_unchanged(shard_dir: Path) -> None:
    shards = LatentShards(shard_dir)
    rows = np.arange(len(KEYS)) % len(shards)
    plain = _datamodule(shard_dir, repa_inputs="none").train_source().load(rows, KEYS)
    batch = _datamodule(shard_dir, repa_inputs="image").train_source().load(rows, KEYS)
    assert set(batch) == {"x", "y", "image"}
    assert torch.equal(batch["x"], plain["x"]) and torch.equal(batch["y"], plain["y"])
    # which latent was flipped: with the posterior mean, x is the plain or the flipped mean exactly
    mean = _datamodule(shard_dir, sample_posterior=False, repa_inputs="image").train_source().load(rows, KEYS)
    moments = torch.from_numpy(shards.moments(rows))
    as_flipped = torch.isclose(mean["x"], shards.normalize(moments[:, 1, 0])).flatten(1).all(1)
    as_plain = torch.isclose(mean["x"], shards.normalize(moments[:, 0, 0])).flatten(1).all(1)
    assert torch.equal(as_flipped, ~as_plain) and 0 < int(as_flipped.sum()) < len(KEYS)  # both occur
    stored = torch.from_numpy(shards.images(rows))
    expected = torch.where(as_flipped.view(-1, 1, 1, 1), stored.flip(-1), stored)
    assert batch["image"].dtype == torch.uint8 and torch.equal(batch["image"], expected)
    assert torch.equal(mean["image"], expected)  # the flip draw does not depend on the posterior setting


def test_features_need_flips_off_and_missing_data_or_a_typo_fail_in_one_line(
    shard_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match=r"repa_inputs='features' needs flip=false: the stored"):
        _datamodule(shard_dir, repa_inputs="features")  # flip defaults to True
    with pytest.raises(
        ConfigurationError, match=r"repa_inputs must be one of \('none', 'image', 'features'\); got 'imgae'"
    ):
        _datamodule(shard_dir, repa_inputs="imgae")
    rows = np.arange(len(KEYS)) % 12
    batch = _datamodule(shard_dir, flip=False, repa_inputs="features").train_source().load(rows, KEYS)
    plain = _datamodule(shard_dir, flip=False).train_source().load(rows, KEYS)
    assert set(batch) == {"x", "y", "repa_features"} and torch.equal(batch["x"], plain["x"])
    assert batch["repa_features"].dtype == torch.float16
    assert torch.equal(batch["repa_features"], torch.from_numpy(LatentShards(shard_dir).features(rows)))
    # a folder of latents only
    bare = tmp_path / "bare"
    writer = LatentShardWriter(bare, (4, 8, 8), shard_size=4, vae_id="test", class_names=["a", "b", "c"])
    zeros = np.zeros((4, 4, 8, 8), np.float32)
    writer.add(zeros, zeros + 1, zeros, zeros + 1, np.arange(4) % 3)
    writer.close()
    for choice, hint in (("image", "--store_images true"), ("features", "--repa_encoder")):
        dm = _datamodule(bare, flip=False, repa_inputs=choice)
        with pytest.raises(ConfigurationError, match=rf"repa_inputs='{choice}' but .*bare holds no .*{hint}"):
            dm.setup("fit")


# ---- a REPA fit step through SiTModule with each input ------------------------------------------------
@pytest.fixture(scope="module")
def fit_shards(image_root: Path, encoder_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards whose features have the tiny SiT's 16 tokens (the encoder at 56 px: 4 x 4 patches)."""
    return _precompute(image_root, tmp_path_factory.mktemp("fit") / "shards", encoder_weights, SIT_RESOLUTION)


def _repa(weights: Path, online: bool) -> RepaConfig:
    encoder = {"encoder": ENCODER, "encoder_weights": str(weights)} if online else {}
    return RepaConfig(
        **encoder, encoder_depth=1, projector_dim=16, feature_dim=WIDTH, encoder_resolution=SIT_RESOLUTION
    )


@pytest.mark.parametrize("inputs", ["image", "features"])
def test_a_repa_fit_step_runs_with_each_input_and_both_give_the_same_targets(
    inputs: str, fit_shards: Path, encoder_weights: Path
) -> None:
    torch.manual_seed(0)
    module = SiTModule(arch=SiTConfig(**TINY_ARCH), repa=_repa(encoder_weights, online=inputs == "image"))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    losses: list[float] = []

    class _Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            assert ("image" in batch) == (inputs == "image") and ("repa_features" in batch) == (
                inputs != "image"
            )
            losses.append(float(outputs["loss"]))

    dm = _datamodule(fit_shards, flip=False, repa_inputs=inputs)
    trainer = pl.Trainer(**trainer_kwargs(max_steps=2, callbacks=[_Record()]))
    trainer.fit(module, datamodule=dm)
    assert len(losses) == 2 and all(np.isfinite(losses))
    after = module.state_dict()
    for prefix in ("repa_projector.", "network.blocks.0."):  # REPA's gradient reached both
        assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith(prefix)), prefix
    # the two inputs give the same alignment targets for the same draws (to float16 rounding)
    rows = np.arange(8)
    image = _datamodule(fit_shards, flip=False, repa_inputs="image").train_source().load(rows, KEYS[:8])
    stored = _datamodule(fit_shards, flip=False, repa_inputs="features").train_source().load(rows, KEYS[:8])
    online = SiTModule(arch=SiTConfig(**TINY_ARCH), repa=_repa(encoder_weights, online=True))
    targets = online.repa_targets(image)
    assert targets.shape == stored["repa_features"].shape == (8, 16, WIDTH)
    torch.testing.assert_close(stored["repa_features"].float(), targets, rtol=2e-3, atol=2e-3)


def test_a_repa_module_and_its_datamodules_inputs_are_checked_before_the_first_step(
    fit_shards: Path, encoder_weights: Path
) -> None:
    cases = [  # (module's REPA, datamodule's repa_inputs, the words the one-line error must hold)
        (_repa(encoder_weights, online=False), "image", "model.repa.encoder is null"),
        (_repa(encoder_weights, online=True), "none", "data.repa_inputs is 'none'"),
    ]
    steps: list[str] = []

    class _Count(pl.Callback):
        def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
            steps.append("step")

    for repa, inputs, words in cases:
        module = SiTModule(arch=SiTConfig(**TINY_ARCH), repa=repa)
        trainer = pl.Trainer(**trainer_kwargs(max_steps=1, callbacks=[_Count()]))
        with pytest.raises(ConfigurationError, match=words):
            trainer.fit(module, datamodule=_datamodule(fit_shards, flip=False, repa_inputs=inputs))
        assert not steps, inputs
    # REPA off with images read for nothing: a warning, and training goes on
    module = SiTModule(arch=SiTConfig(**TINY_ARCH))
    with pytest.warns(UserWarning, match="model.repa is null"):
        pl.Trainer(**trainer_kwargs(max_steps=1)).fit(
            module, datamodule=_datamodule(fit_shards, flip=False, repa_inputs="image")
        )
