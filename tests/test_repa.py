"""REPA (representation alignment, Yu et al. ICLR 2025) as a term added to any training objective.

What a user relies on: the REPA loss is minus the cosine similarity of the projected tokens after block
k and the frozen encoder's patch features of the clean image, averaged over tokens and batch, times
lambda, on top of the objective's loss (checked against a computation written out by hand, for two
objectives); with REPA off, the loss and every gradient are bit-identical to the plain objective; the
encoder gets no gradient and is in no state dict, optimizer, EMA or checkpoint; a token-count mismatch
and a batch without images or features fail with a message; the REPA config is the paper's recipe.

A fresh SiT outputs exactly zero (adaLN-Zero), so every test perturbs its weights first.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

sys.path.append(str(Path(__file__).resolve().parent / "lightning"))  # the shared tiny SiT and toy data
from lightning_toy import TINY_ARCH, RandomLatentsDataModule, trainer_kwargs  # noqa: E402

from sit_lightning.callbacks import EMACallback  # noqa: E402
from sit_lightning.errors import ConfigurationError, ShapeMismatchError  # noqa: E402
from sit_lightning.models import SiT, SiTConfig  # noqa: E402
from sit_lightning.module import SiTModule  # noqa: E402
from sit_lightning.objective import TrainingObjective  # noqa: E402
from sit_lightning.repa import IMAGENET_MEAN, IMAGENET_STD, RepaConfig  # noqa: E402
from sit_lightning.sampling.presets import sampler_preset  # noqa: E402
from tiny_encoder import WIDTH, TinyViT, import_path, save_random_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OLD_GRID = TinyViT.grid  # 6: its stored position table, which build_encoder resamples to the network's 4 x 4
RESOLUTION = 56  # 4 x 4 patches of 14 px: the token count of the tiny SiT/2 (8 x 8 latents)
IMAGE_SIDE = 32
PERTURB_STD = 0.2
LAMBDA = 0.5
DEPTH = 1  # align after blocks[0] of the 2-block tiny SiT


@pytest.fixture(scope="module")
def encoder_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights file of the tiny encoder, with non-trivial values everywhere."""
    return save_random_weights(TinyViT, tmp_path_factory.mktemp("encoder") / "tiny_vit.pt", seed=7)


def _repa(weights: Path, **overrides: Any) -> RepaConfig:
    fields: dict[str, Any] = dict(
        encoder=import_path(TinyViT),
        encoder_weights=str(weights),
        encoder_depth=DEPTH,
        projector_dim=16,
        feature_dim=WIDTH,
        loss_weight=LAMBDA,
        encoder_resolution=RESOLUTION,
    )
    return RepaConfig(**{**fields, **overrides})


def _perturb(module: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(PERTURB_STD * torch.randn(p.shape, generator=g))


def _batch(n: int = 4, seed: int = 0, image: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "x": torch.randn(n, 4, 8, 8, generator=g),
        "y": torch.randint(0, TINY_ARCH["num_classes"], (n,), generator=g),
        "key": torch.arange(n) + 5,
    }
    if image:
        batch["image"] = torch.randint(0, 256, (n, 3, IMAGE_SIDE, IMAGE_SIDE), generator=g, dtype=torch.uint8)
    return batch


def _step(module: SiTModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``training_step`` without a Trainer (a stub answers the learning-rate log)."""

    class _Opt:
        param_groups = [{"lr": 1e-4}]

    class _Trainer:
        optimizers = [_Opt()]
        global_step = 0

    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module._trainer = _Trainer()  # type: ignore[assignment]
    return module.training_step(batch, 0)


def _module(objective: TrainingObjective | None = None, **kwargs: Any) -> SiTModule:
    module = SiTModule(arch=SiTConfig(**TINY_ARCH), objective=objective, **kwargs)
    _perturb(module)
    return module


# ---- the loss --------------------------------------------------------------------------------------
def _direct_loss(module: SiTModule, batch: dict[str, torch.Tensor], weights: Path) -> torch.Tensor:
    """The objective's loss + lambda * REPA, written out: hidden tokens by hand, encoder from its file."""
    net, objective = module.network, module.objective
    draws = module.training_draws(batch, 0)
    plain = objective.loss(
        net, batch["x"], t=draws.t, x_0=draws.x_0, y=batch["y"], drop_labels=draws.drop_labels
    ).loss.mean()
    x_t = objective.interpolant.interpolate(draws.x_0, batch["x"], draws.t)
    y = torch.where(draws.drop_labels, torch.full_like(batch["y"], net.num_classes), batch["y"])
    h = net.x_embedder(x_t) + net.pos_embed
    c = net.t_embedder(draws.t) + net.y_embedder(y)
    for block in net.blocks[:DEPTH]:
        h = block(h, c)
    z = module.repa_projector(h)  # (N, 16, WIDTH)

    state = torch.load(weights, weights_only=True)
    image = batch["image"].float() / 255.0
    image = (image - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    image = F.interpolate(image, size=(RESOLUTION, RESOLUTION), mode="bicubic")
    grid = state["pos_embed"][:, 1:].reshape(1, OLD_GRID, OLD_GRID, WIDTH).permute(0, 3, 1, 2)
    grid = (
        F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True)
        .permute(0, 2, 3, 1)
        .reshape(1, 16, WIDTH)
    )
    tokens = F.conv2d(image, state["patch.weight"], state["patch.bias"], stride=14).flatten(2).transpose(1, 2)
    features = F.layer_norm(tokens + grid, (WIDTH,), state["norm.weight"], state["norm.bias"])

    cosine = (z * features).sum(-1) / (z.norm(dim=-1) * features.norm(dim=-1))  # (N, T)
    return plain + LAMBDA * (-cosine).mean()


@pytest.mark.parametrize(
    "objective",
    [TrainingObjective(), TrainingObjective(path="vp", prediction="score", loss_weight="likelihood")],
    ids=["linear-velocity", "vp-score-likelihood"],
)
def test_repa_loss_is_the_objective_plus_lambda_times_minus_cosine(encoder_weights, objective) -> None:
    module = _module(objective, repa=_repa(encoder_weights))
    batch = _batch()
    loss = _step(module, batch)
    expected = _direct_loss(module, batch, encoder_weights)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # precondition: the REPA term is there (the loss differs from the objective alone)
    plain = _module(objective)
    assert abs(float(_step(plain, batch).detach() - loss.detach())) > 1e-3
    # loss_weight 0: the objective's loss exactly, through the hidden-token forward
    zero = _module(objective, repa=_repa(encoder_weights, loss_weight=0.0))
    assert torch.equal(_step(zero, batch), _step(plain, batch))


def test_precomputed_features_give_the_same_loss_as_the_encoder(encoder_weights) -> None:
    module = _module(repa=_repa(encoder_weights))
    batch = _batch()
    with_encoder = _step(module, batch)
    features = module.repa_targets(batch)
    precomputed = {k: v for k, v in batch.items() if k != "image"} | {"repa_features": features}
    assert torch.equal(_step(module, precomputed), with_encoder)
    features_only = _module(repa=_repa(encoder_weights, encoder=None, encoder_weights=None))
    assert torch.equal(_step(features_only, precomputed), with_encoder)  # no encoder needed at all


# ---- REPA off --------------------------------------------------------------------------------------
def test_repa_off_loss_and_gradients_are_bit_identical_to_the_objective(encoder_weights) -> None:
    batch = _batch()
    module = _module(repa=None)
    reference = _module()  # today's module, no repa argument
    loss = _step(module, batch)
    loss.backward()
    draws = reference.training_draws(batch, 0)
    expected = reference.objective.loss(
        reference.network, batch["x"], t=draws.t, x_0=draws.x_0, y=batch["y"], drop_labels=draws.drop_labels
    ).loss.mean()
    expected.backward()
    assert torch.equal(loss, expected) and float(loss) > 0
    grads = dict(module.named_parameters())
    nonzero = 0
    for name, p in reference.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None, name
            continue
        assert torch.equal(grads[name].grad, p.grad), name
        nonzero += int(p.grad.abs().sum() > 0)
    assert nonzero > 10  # a real gradient, not adaLN-Zero's zeros
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in reference.named_parameters()]
    # REPA on builds the same network weights (the projector is drawn after them)
    with_repa = SiTModule(arch=SiTConfig(**TINY_ARCH), repa=_repa(encoder_weights))
    without = SiTModule(arch=SiTConfig(**TINY_ARCH))
    for (name, a), (_, b) in zip(
        with_repa.network.state_dict().items(), without.network.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_the_hidden_token_forward_returns_the_plain_field_bit_for_bit() -> None:
    torch.manual_seed(0)
    network = SiT(SiTConfig(**TINY_ARCH))
    _perturb(network)
    network.eval()  # no random label dropout: the two calls see the same labels
    batch = _batch(image=False)
    t = torch.rand(4)
    out = network(batch["x"], t, batch["y"], return_hidden_at=2)
    assert torch.equal(out.field, network(batch["x"], t, batch["y"]))
    assert out.hidden.shape == (4, 16, TINY_ARCH["hidden_size"])
    with pytest.raises(ValueError, match=r"return_hidden_at must be in \[1, 2\]"):
        network(batch["x"], t, batch["y"], return_hidden_at=3)


# ---- the encoder is frozen and nobody's state -----------------------------------------------------
class _ImageData(RandomLatentsDataModule):
    """The toy latents with a keyed uint8 image beside each."""

    def train_dataloader(self) -> Any:
        images = torch.randint(
            0, 256, (self.num_samples, 3, IMAGE_SIDE, IMAGE_SIDE), generator=torch.Generator().manual_seed(3),
            dtype=torch.uint8,
        )  # fmt: skip
        batches = [dict(batch, image=images[batch["key"]]) for batch in super().train_dataloader()]
        return torch.utils.data.DataLoader(batches, batch_size=None)  # each item is already a batch


def test_the_encoder_gets_no_gradient_and_is_in_no_state_optimizer_ema_or_checkpoint(
    encoder_weights, tmp_path
) -> None:
    module = _module(repa=_repa(encoder_weights))
    projector_before = {k: v.clone() for k, v in module.repa_projector.state_dict().items()}
    ema = EMACallback(decay=0.5)
    trainer = pl.Trainer(**trainer_kwargs(max_steps=2, callbacks=[ema]))
    trainer.fit(module, datamodule=_ImageData(global_batch_size=4, num_samples=8))

    (encoder,) = module._repa_encoder
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    stored = torch.load(encoder_weights, weights_only=True)
    assert torch.equal(encoder.patch.weight, stored["patch.weight"])  # its file's weights, unchanged
    assert encoder.pos_embed.shape == (1, 1 + 16, WIDTH)  # resampled to the network's 4 x 4 grid
    assert any(not torch.equal(v, module.repa_projector.state_dict()[k]) for k, v in projector_before.items())

    encoder_ids = {id(p) for p in encoder.parameters()}
    optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert not encoder_ids & {id(p) for p in optimized}
    assert {id(p) for p in optimized} == {id(p) for p in module.parameters() if p.requires_grad}
    keys = set(module.state_dict())
    assert all(k.startswith(("network.", "repa_projector.")) for k in keys), sorted(keys)
    assert any(k.startswith("repa_projector.") for k in keys)  # the projector is trained and saved

    path = tmp_path / "repa.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["state_dict"]) == keys
    ema_state = next(v for k, v in checkpoint["callbacks"].items() if "EMACallback" in k)
    # the EMA averages the module's parameters: the network and the projector, not the encoder
    assert set(ema_state["ema"]) == {n for n, _ in module.named_parameters()}
    assert any(n.startswith("repa_projector.") for n in ema_state["ema"])
    assert sum(v.numel() for v in ema_state["ema"].values()) == sum(p.numel() for p in module.parameters())

    loaded = SiTModule.load_from_checkpoint(path)
    assert loaded.repa == module.repa and loaded._repa_encoder == []  # built only when training starts
    for k, v in module.repa_projector.state_dict().items():
        assert torch.equal(loaded.repa_projector.state_dict()[k], v), k


# ---- errors ---------------------------------------------------------------------------------------
def test_a_token_count_mismatch_is_a_clear_error(encoder_weights) -> None:
    arch = SiTConfig(**dict(TINY_ARCH, patch_size=4))  # a /4 network: 2 x 2 = 4 tokens against 16
    module = SiTModule(arch=arch, repa=_repa(encoder_weights))
    with pytest.raises(ShapeMismatchError, match=r"4 x 4 = 16 tokens, and the network has 2 x 2 = 4"):
        _step(module, _batch())  # the encoder says its patch size: caught when it is built
    features = _module(repa=_repa(encoder_weights)).repa_targets(_batch())  # (4, 16, 8)
    precomputed = _batch(image=False) | {"repa_features": features}
    match = r"network gives \(N, T, C\) = \(4, 4, 8\) and the encoder \(4, 16, 8\)"
    with pytest.raises(ShapeMismatchError, match=match):
        _step(module, precomputed)  # precomputed features: caught at the loss


def test_missing_images_and_bad_settings_fail_with_a_message(encoder_weights) -> None:
    module = _module(repa=_repa(encoder_weights))
    with pytest.raises(
        ConfigurationError,
        match=r"REPA needs 'repa_features' \(precomputed\) or 'image'.*\['key', 'x', 'y'\]",
    ):
        _step(module, _batch(image=False))
    with pytest.raises(ValueError, match="repa.loss_weight must be a finite number >= 0; got -1"):
        RepaConfig(loss_weight=-1)
    with pytest.raises(ValueError, match="repa.encoder_depth 3 is deeper than the network"):
        SiTModule(arch=SiTConfig(**TINY_ARCH), repa=RepaConfig(encoder_depth=3))
    missing = _module(repa=_repa(encoder_weights, encoder="no_such_package.Encoder"))
    with pytest.raises(ConfigurationError, match="repa.encoder 'no_such_package.Encoder' does not import"):
        _step(missing, _batch())


# ---- the paper's config ----------------------------------------------------------------------------
def test_the_repa_config_is_the_papers_sit_xl_recipe() -> None:
    from sit_lightning.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "sit_xl_linear_repa.yaml"), "--print_config"])
    config = yaml.safe_load(out.getvalue())
    model, data, trainer = config["model"], config["data"]["init_args"], config["trainer"]
    assert model["arch"] == "SiT-XL/2"
    assert model["objective"]["init_args"]["path"] == "linear"
    assert model["objective"]["init_args"]["prediction"] == "velocity"
    assert data["global_batch_size"] == 256
    assert model["optimizer"]["init_args"]["lr"] == 1e-4
    assert trainer["gradient_clip_val"] == 1.0
    assert data["flip"] is False
    repa = model["repa"]
    assert repa["encoder_depth"] == 8 and repa["loss_weight"] == 0.5
    assert repa["projector_dim"] == 2048 and repa["feature_dim"] == 768
    assert repa["encoder"] == "dinov2.hub.backbones.dinov2_vitb14" and repa["encoder_resolution"] == 224
    assert repa["encoder_init_args"] == {"pretrained": False}  # offline: weights from encoder_weights
    assert "sd-vae-ft-mse" in data["data_dir"]  # REPA's training latents (preprocessing/encoders.py)
    assert data["repa_inputs"] == "image"  # the clean image, stored beside the latents, for the encoder
    RepaConfig(**repa)  # the resolved block is a valid config
    # evaluation: REPA's README generate.py command as a preset, decoded with generate.py's --vae ema
    (fid,) = [c["init_args"] for c in trainer["callbacks"] if c["class_path"].endswith("FIDCallback")]
    assert fid["settings"] == "repa-sde-cfg1.8-interval"
    settings = sampler_preset(fid["settings"])
    assert settings.cfg_scale == 1.8 and settings.guidance_interval == pytest.approx((0.3, 1.0))
    assert (settings.sampler, settings.steps, settings.guidance_channels) == ("sde", 250, None)
    assert fid["decoder"] == "stabilityai/sd-vae-ft-ema" and fid["feature"] == "inception"
    assert fid["num_samples"] == 50000 and fid["labels"] == "uniform"
    classes = [c["class_path"].rsplit(".", 1)[1] for c in trainer["callbacks"]]
    assert {"EMACallback", "AtomicModelCheckpoint", "FIDCallback"} <= set(classes)  # the base's, kept
