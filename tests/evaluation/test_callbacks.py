"""Sample grid and FID callbacks inside a real (tiny) Lightning fit on the digits."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from sit_lightning.callbacks import EMACallback
from sit_lightning.callbacks.fid import FIDCallback, conditional_accuracy
from sit_lightning.callbacks.sample_grid import SampleGridCallback
from sit_lightning.data import DigitsDataModule
from sit_lightning.evaluation.digits_classifier import DigitsFeatures
from sit_lightning.evaluation.fid import FIDScorer, feature_statistics, frechet_distance, through_uint8
from sit_lightning.evaluation.images import SD_VAE_SCALE, to_uint8
from sit_lightning.module import SiTModule
from sit_lightning.randomness import keyed_randn
from sit_lightning.sampling import ModelField, SamplerSettings, sample_ode
from sit_lightning.sampling.guidance import ClassifierFreeGuidance
from tiny_digits import fit_module, quiet_trainer

SAMPLER = dict(sampler="ode", steps=2, method="euler")
PER_CLASS = 2
NUM_FID = 40


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    module = fit_module()
    # the FID callback comes first: its report must still name the final grid
    grid = SampleGridCallback(
        every_n_steps=0, num_per_class=PER_CLASS, seed=3, batch_size=7, settings=SamplerSettings(**SAMPLER)
    )
    fid = FIDCallback(
        num_samples=NUM_FID,
        seed=4,
        cfg_scales=[1.0, 2.0],
        batch_size=16,
        cache_dir=str(root / "cache"),
        settings=SamplerSettings(**SAMPLER),
    )
    trainer = quiet_trainer(
        root, max_steps=3, logger=TensorBoardLogger(root, name="tb"), callbacks=[fid, grid]
    )
    datamodule = DigitsDataModule(global_batch_size=32)
    # record the order of the final evaluation, the final grid and Lightning's teardown (which moves the
    # module to the CPU): on a GPU, anything after the teardown would sample on the CPU
    events: list[str] = []
    for owner, name in ((fid, "evaluate"), (grid, "log_grid"), (trainer.strategy, "teardown")):
        original = getattr(owner, name)

        def recorded(*args, _original=original, _name=name, **kwargs):
            events.append(_name)
            return _original(*args, **kwargs)

        setattr(owner, name, recorded)
    trainer.recorded_events = events
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the report is printed on stdout
        trainer.fit(module, datamodule=datamodule)
    return module, trainer, grid, fid, datamodule, printed.getvalue()


def test_final_grid_and_evaluation_run_before_the_teardown_moves_the_module(fitted):
    trainer = fitted[1]
    events = trainer.recorded_events
    assert "teardown" in events and {"evaluate", "log_grid"} <= set(events), events
    assert events.index("teardown") > max(events.index("evaluate"), events.index("log_grid")), events


def test_grid_png_holds_the_decoded_samples(fitted):
    module, trainer, grid, _, _, _ = fitted
    path = grid.last_path
    assert (
        path is not None
        and path.exists()
        and path.parent == trainer.logger.log_dir / path.parent.relative_to(trainer.logger.log_dir)
    )
    png = torch.from_numpy(np.array(Image.open(path)))  # (H, W) grey
    cell, pad = 8, 1
    assert png.shape == (10 * (cell + pad) + pad, PER_CLASS * (cell + pad) + pad)  # one class per row
    labels = torch.arange(10).repeat_interleave(PER_CLASS)
    expected = to_uint8(module.sample(labels, seed=3, **SAMPLER).samples)
    for i in range(len(labels)):
        top, left = pad + (i // PER_CLASS) * (cell + pad), pad + (i % PER_CLASS) * (cell + pad)
        assert torch.equal(png[top : top + cell, left : left + cell], expected[i, 0])


def test_grid_goes_to_tensorboard(fitted):
    _, trainer, _, _, _, _ = fitted
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    assert "samples" in events.Tags()["images"]
    scalars = events.Tags()["scalars"]
    assert {"fid/cfg1", "fid/cfg2", "fid/cond_acc/cfg1", "fid/train_vs_reference"} <= set(scalars)


@torch.no_grad()
def _samples_by_hand(module: SiTModule, labels: torch.Tensor, seed: int, scale: float) -> torch.Tensor:
    """The samples the FID callback should score, built from the public sampling pieces.

    Not through ``module.sample``: a broken ``sample`` must not produce its own expected values.
    Sample ``i`` starts from the keyed noise of index ``i``.
    """
    network = copy.deepcopy(module.network).eval()
    if scale != 1.0:
        network = ClassifierFreeGuidance(network, scale, null_class=module.network.num_classes)
    objective = module.objective
    field = ModelField(network, objective.interpolant, objective.prediction, y=labels)
    noise = keyed_randn(module.latent_shape, seed, "sample", 0, torch.arange(len(labels)))
    t0, t1 = objective.sample_interval()
    return sample_ode(field, noise, t0=t0, t1=t1, method=SAMPLER["method"], steps=SAMPLER["steps"]).samples


def test_fid_and_accuracy_equal_an_independent_recomputation(fitted):
    module, trainer, _, fid, datamodule, _ = fitted
    results = {r.cfg_scale: r for step, r in fid.history if step == trainer.global_step}
    assert set(results) == {1.0, 2.0}
    # no EMA in this fit: the callback's EMA samples are those of the live weights
    assert not any(isinstance(c, EMACallback) for c in trainer.callbacks)
    test = datamodule.test_images()
    features = DigitsFeatures(fid.judge)
    reference = feature_statistics(features(test.x))
    labels = torch.arange(NUM_FID) % 10  # balanced: label i % 10
    by_scale = {scale: _samples_by_hand(module, labels, seed=4, scale=scale) for scale in results}
    assert not torch.allclose(by_scale[1.0], by_scale[2.0], atol=1e-3)  # guidance changes the samples
    for scale, result in results.items():
        images = through_uint8(by_scale[scale])  # the callback scores what an .npz of its samples holds
        assert result.conditional_accuracy == pytest.approx(conditional_accuracy(fid.judge, images, labels))
        expected = frechet_distance(feature_statistics(features(images)), reference)
        assert result.fid == pytest.approx(expected, rel=1e-4)
    floor = frechet_distance(feature_statistics(features(datamodule.train_images().x)), reference)
    assert fid.floor_fid == pytest.approx(floor, rel=1e-6)
    # the same reference statistics are cached on disk for the next run
    cached = FIDScorer.cached_statistics(features, test.x, fid.cache_dir, "DigitsDataModule-test")
    torch.testing.assert_close(cached.mean, reference.mean)


def test_final_report_says_where_and_how_good(fitted):
    _, _, grid, fid, _, report = fitted
    assert str(grid.last_path) in report
    assert "conditional accuracy" in report and "FID floor" in report
    acc = next(r.conditional_accuracy for _, r in fid.history if r.cfg_scale == 1.0)
    assert f"{100 * acc:6.2f}%" in report


# ---- latent data: the decoder undoes the shards' own normalisation ---------------------------------
LATENT_MEAN, LATENT_STD = (0.3, -0.2, 0.5, 0.1), (2.0, 0.5, 1.5, 3.0)


def _latent_shards(folder, normalization: str = "channel"):
    """16 latents (4x4x4, 2 classes); per-channel statistics (or the SD scale) in the index."""
    from sit_lightning.data.shards import LatentShardWriter

    stats = dict(channel_mean=LATENT_MEAN, channel_std=LATENT_STD) if normalization == "channel" else {}
    writer = LatentShardWriter(
        folder, (4, 4, 4), vae_id="tiny", class_names=["a", "b"], normalization=normalization, **stats
    )
    mean = np.random.default_rng(0).normal(size=(16, 4, 4, 4)).astype(np.float32)
    std = np.full_like(mean, 0.1)
    writer.add(mean, std, mean[..., ::-1], std, np.arange(16) % 2)
    writer.close()
    return folder


@pytest.fixture(scope="module")
def latent_fit(tmp_path_factory):
    """Two steps on channel-normalised latent shards with a grid decoded by a tiny VAE (no latents given)."""
    from sit_lightning.data import LatentDataModule
    from tiny_vae import save_tiny_vae

    root = tmp_path_factory.mktemp("latent_fit")
    vae_dir = save_tiny_vae(root / "vae", sample_size=8)
    shards = _latent_shards(root / "shards")
    module = fit_module(input_size=4, in_channels=4, num_classes=2, patch_size=2)
    grid = SampleGridCallback(
        every_n_steps=0,
        num_per_class=PER_CLASS,
        seed=3,
        decoder=str(vae_dir),
        settings=SamplerSettings(**SAMPLER),
    )
    datamodule = LatentDataModule(str(shards), global_batch_size=8, num_workers=0, pin_memory=False)
    trainer = quiet_trainer(root, max_steps=2, callbacks=[grid])
    trainer.fit(module, datamodule=datamodule)
    return module, trainer, grid, datamodule, vae_dir


def test_the_grid_decodes_latents_undoing_the_shards_channel_statistics(latent_fit):
    from diffusers import AutoencoderKL

    from sit_lightning.evaluation.images import LatentNormalization

    module, _, grid, _, vae_dir = latent_fit
    expected_normalization = LatentNormalization("channel", channel_mean=LATENT_MEAN, channel_std=LATENT_STD)
    assert grid.decoder.normalization == expected_normalization  # taken from the trainer's datamodule
    labels = torch.arange(2).repeat_interleave(PER_CLASS)
    samples = module.sample(labels, seed=3, **SAMPLER).samples
    noise = module.sample_noise(torch.arange(len(labels)), seed=3)
    assert (samples - noise).abs().mean() > 0.01, "PRECONDITION: the trained network moves the noise"
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    std = torch.tensor(LATENT_STD).view(-1, 1, 1)
    mean = torch.tensor(LATENT_MEAN).view(-1, 1, 1)
    with torch.no_grad():
        expected = to_uint8(vae.decode(samples * std + mean).sample)  # the exact inverse of (z - mean) / std
        scale_only = to_uint8(vae.decode(samples / SD_VAE_SCALE).sample)
    png = torch.from_numpy(np.array(Image.open(grid.last_path))).permute(2, 0, 1)  # (3, H, W)
    cell, pad = 8, 1
    assert png.shape == (3, 2 * (cell + pad) + pad, PER_CLASS * (cell + pad) + pad)
    tops = [pad + (i // PER_CLASS) * (cell + pad) for i in range(len(labels))]
    lefts = [pad + (i % PER_CLASS) * (cell + pad) for i in range(len(labels))]
    cells = [png[:, top : top + cell, left : left + cell] for top, left in zip(tops, lefts, strict=True)]
    assert torch.equal(torch.stack(cells), expected)
    assert not torch.equal(torch.stack(cells), scale_only), "dividing by the SD scale alone decodes wrongly"


def test_fid_callback_takes_the_shards_normalisation_too(latent_fit):
    module, trainer, grid, _, vae_dir = latent_fit
    fid = FIDCallback(decoder=str(vae_dir), feature=torch.nn.Identity(), reference_stats="unused.pt")
    fid.setup(trainer, module, "fit")
    assert fid.decoder.normalization == grid.decoder.normalization
    assert fid.decoder.normalization.kind == "channel"


def test_a_decoder_normalisation_that_disagrees_with_the_shards_is_refused(latent_fit, tmp_path):
    from sit_lightning.errors import ConfigurationError
    from sit_lightning.evaluation.images import AutoencoderKLDecoder

    module, _, _, datamodule, vae_dir = latent_fit
    scale_shards = _latent_shards(tmp_path / "scaled", normalization="scale")
    agreeing = SampleGridCallback(decoder=AutoencoderKLDecoder(str(vae_dir), latents=datamodule.data_dir))
    agreeing.match_training_data(datamodule)  # the same statistics: accepted
    for given in (
        AutoencoderKLDecoder(str(vae_dir), latents=str(scale_shards)),
        AutoencoderKLDecoder(str(vae_dir), scale=0.5),
    ):
        with pytest.raises(ConfigurationError, match=r"scale.*but SampleGridCallback: the trainer's Latent"):
            SampleGridCallback(decoder=given).match_training_data(datamodule)
    # in a fit, before the first step
    trainer = quiet_trainer(
        tmp_path, max_steps=1, limit_val_batches=None, num_sanity_val_steps=None,  # Lightning's defaults
        callbacks=[SampleGridCallback(decoder=str(vae_dir), latent_scale=0.5)],
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match=r"\(scale=0.5\).*channel_mean"):
        trainer.fit(copy.deepcopy(module), datamodule=datamodule)
    assert trainer.global_step == 0
