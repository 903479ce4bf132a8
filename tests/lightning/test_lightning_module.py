"""SiTModule: keyed draws, closed-form loss profiles, shape errors, keyed sampling; EMACallback math."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning_toy import TINY_ARCH, TINY_MODEL, RandomLatentsDataModule, trainer_kwargs

from sit_lightning.callbacks import EMACallback
from sit_lightning.models import SiTConfig
from sit_lightning.module import PaperAdamW, ShapeMismatchError, SiTModule
from sit_lightning.objective import TrainingObjective


def _batch(keys: list[int], n_classes: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 4, 8, 8, generator=g)
    y = torch.randint(0, n_classes, (100,), generator=g)
    k = torch.tensor(keys)
    return {"x": x[k], "y": y[k], "key": k}


def test_training_draws_depend_only_on_the_sample_key_not_on_the_batch() -> None:
    """Row i of (t, x_0, drop) is the same whichever batch (rank, worker, batch size) holds sample i."""
    module = SiTModule(**TINY_MODEL)
    whole = module.training_draws(_batch([5, 17, 3, 42]), step=7)
    part = module.training_draws(_batch([42, 3]), step=7)
    assert torch.equal(part.t, whole.t[[3, 2]])
    assert torch.equal(part.x_0, whole.x_0[[3, 2]])
    assert torch.equal(part.drop_labels, whole.drop_labels[[3, 2]])
    # ... and fresh at the next step
    other = module.training_draws(_batch([42, 3]), step=8)
    assert not torch.equal(other.x_0, part.x_0) and not torch.equal(other.t, part.t)


def test_label_dropout_rate_and_time_range_follow_the_configuration() -> None:
    module = SiTModule(SiTConfig(**TINY_ARCH, class_dropout_prob=0.25), objective=TrainingObjective("vp"))
    draws = module.training_draws(_batch(list(range(100))) | {"key": torch.arange(4000)}, step=0)
    rate = draws.drop_labels.float().mean().item()
    assert abs(rate - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)
    t0, t1 = module.objective.train_interval()
    assert draws.t.min() >= t0 and draws.t.max() <= t1
    assert abs(draws.t.mean().item() - (t0 + t1) / 2) < 4 * (t1 - t0) / math.sqrt(12 * 4000)


def test_training_draws_are_made_on_the_batch_device_in_one_go() -> None:
    """A batch on the meta device: any per-sample loop or host copy of the keys would raise."""
    module = SiTModule(**TINY_MODEL)
    batch = {"x": torch.empty(64, 4, 8, 8, device="meta"), "key": torch.arange(64, device="meta")}
    draws = module.training_draws(batch, step=3)
    assert {draws.t.device.type, draws.x_0.device.type, draws.drop_labels.device.type} == {"meta"}
    assert draws.x_0.shape == (64, 4, 8, 8) and draws.t.shape == (64,)


def test_keyed_logit_normal_times_follow_their_law() -> None:
    """The keyed times of a ``base = "normal"`` sampler: logit(t) ~ N(mean, std), by moments."""
    from sit_lightning.objective import LogitNormalTimeSampler

    objective = TrainingObjective("linear", time_sampler=LogitNormalTimeSampler(mean=0.5, std=0.8))
    module = SiTModule(**TINY_MODEL, objective=objective)
    n = 20_000
    t = module.training_draws(_batch([0]) | {"key": torch.arange(n)}, step=0).t.double()
    z = torch.log(t) - torch.log1p(-t)
    assert abs(z.mean().item() - 0.5) < 5 * 0.8 / math.sqrt(n)
    assert abs(z.std().item() - 0.8) < 5 * 0.8 / math.sqrt(2 * n)


def test_training_step_is_the_objective_loss_at_the_keyed_draws() -> None:
    module = SiTModule(**TINY_MODEL)
    batch = _batch([1, 2, 3, 4])
    module.log = lambda *args, **kwargs: None  # no trainer attached
    module.trainer = None  # type: ignore[assignment]
    draws = module.training_draws(batch, step=0)
    expected = module.objective.loss(
        module.network, batch["x"], t=draws.t, x_0=draws.x_0, y=batch["y"], drop_labels=draws.drop_labels
    ).loss.mean()

    class _Opt:
        param_groups = [{"lr": 1e-4}]

    class _Trainer:
        optimizers = [_Opt()]
        global_step = 0

    module._trainer = _Trainer()  # type: ignore[assignment]
    assert torch.equal(module.training_step(batch, 0), expected)


@pytest.mark.parametrize(
    ("path", "prediction", "closed_form"),
    [
        # Zero network output (adaLN-Zero init). Velocity model on GVP: v = d_alpha x_1 + d_sigma x_0 with
        # unit-variance data and noise -> E|v|^2 = (pi/2)^2 (cos^2 + sin^2) = (pi/2)^2 at every t.
        ("gvp", "velocity", lambda t: torch.full_like(t, (math.pi / 2) ** 2)),
        # Score model on Linear: score 0 -> velocity x_t / t, so the error is x_0 / t: L_t = 1 / t^2.
        ("linear", "score", lambda t: 1.0 / t**2),
    ],
)
def test_loss_profile_matches_closed_form_at_initialisation(path, prediction, closed_form) -> None:
    """The validation L_t table at the 20 bin centres for a network whose output is exactly 0."""
    module = SiTModule(**TINY_MODEL, objective=TrainingObjective(path, prediction))
    data = RandomLatentsDataModule(global_batch_size=32, num_samples=64)
    trainer = pl.Trainer(**trainer_kwargs(limit_val_batches=1.0))
    trainer.validate(module, data, verbose=False)
    times, values = module.loss_profile
    assert torch.allclose(times, (torch.arange(20) + 0.5) / 20)
    # 64 samples x 256 dims of chi-square(1) terms: relative error ~ sqrt(2 / 16384) ~ 1.1%
    assert torch.allclose(values, closed_form(times), rtol=0.06)


def test_loss_profile_is_saved_and_restored_with_the_checkpoint(tmp_path) -> None:
    module = SiTModule(**TINY_MODEL)
    trainer = pl.Trainer(**trainer_kwargs(limit_val_batches=1.0))
    trainer.validate(module, RandomLatentsDataModule(), verbose=False)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    restored = SiTModule(**TINY_MODEL)
    assert restored.loss_profile is None
    restored.on_load_checkpoint(checkpoint)
    assert torch.equal(restored.loss_profile.values, module.loss_profile.values)


def test_latent_shape_mismatch_fails_before_training_with_a_clear_message() -> None:
    module = SiTModule(**TINY_MODEL)  # expects (4, 8, 8)
    data = RandomLatentsDataModule(latent_shape=(4, 16, 16))
    trainer = pl.Trainer(**trainer_kwargs(max_steps=1))
    with pytest.raises(ShapeMismatchError, match=r"\(4, 16, 16\).*\(4, 8, 8\).*input_size"):
        trainer.fit(module, data)
    with pytest.raises(ShapeMismatchError, match="10 classes.*num_classes: 10"):
        module.check_data(num_classes=10)


def test_a_datamodule_without_shape_and_classes_is_named_before_training() -> None:
    class Bare(pl.LightningDataModule):  # batches only: no latent_shape, no num_classes
        def train_dataloader(self):
            return RandomLatentsDataModule(global_batch_size=4, num_samples=8).train_dataloader()

    trainer = pl.Trainer(**trainer_kwargs(max_steps=1))
    with pytest.raises(
        TypeError, match=r"SiTModule .*latent_shape, num_classes .*Bare has no latent_shape, num_classes"
    ):
        trainer.fit(SiTModule(**TINY_MODEL), Bare())


def test_unknown_arch_lists_the_presets() -> None:
    with pytest.raises(ValueError, match="SiT-XL/2"):
        SiTModule(arch="SiT-M/2")  # type: ignore[arg-type]


def test_default_optimizer_is_the_papers_adamw() -> None:
    module = SiTModule(**TINY_MODEL)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, PaperAdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-4, 0.0, (0.9, 0.999))
    assert not group["fused"]  # CPU parameters: the fused kernel is CUDA only


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_sample_is_keyed_by_sample_index_not_by_batch(sampler) -> None:
    """Sample i is the same drawn alone or inside a batch (noise and SDE noise keyed by index)."""
    module = SiTModule(**TINY_MODEL)
    with torch.no_grad():  # give the zero-initialised output layer weights so the sampler does something
        for p in module.network.final_layer.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    kwargs = dict(sampler=sampler, steps=4, method="euler", cfg_scale=2.0)
    whole = module.sample([0, 1, 2], indices=[10, 11, 12], seed=3, **kwargs)
    alone = module.sample([2], indices=[12], seed=3, **kwargs)
    torch.testing.assert_close(alone.samples[0], whole.samples[2], rtol=1e-5, atol=1e-5)
    assert whole.nfe > 0
    other_seed = module.sample([2], indices=[12], seed=4, **kwargs)
    assert not torch.allclose(other_seed.samples, alone.samples)


# ---- EMA ---------------------------------------------------------------------------------------
class _Params(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.frozen = torch.nn.Parameter(torch.tensor([5.0]), requires_grad=False)


def test_ema_update_is_the_exponential_average() -> None:
    module, ema = _Params(), EMACallback(decay=0.9)
    ema.update(module, step=0)  # starts as a copy, then averages
    history = [torch.tensor([1.0, 2.0])]
    for step, value in enumerate([[3.0, -1.0], [0.5, 4.0]], start=1):
        module.w.data.copy_(torch.tensor(value))
        history.append(torch.tensor(value))
        ema.update(module, step)
    expected = 0.9**3 * history[0] + 0.9**2 * 0.1 * history[0] + 0.9 * 0.1 * history[1] + 0.1 * history[2]
    torch.testing.assert_close(ema.ema_tensors()["w"], expected)
    assert torch.equal(ema.ema_tensors()["frozen"], torch.tensor([5.0]))  # pos_embed-like: a no-op


def test_ema_warmup_and_update_every() -> None:
    ema = EMACallback(decay=0.9999, warmup=True)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(10**6) == 0.9999
    module, sparse = _Params(), EMACallback(decay=0.5, update_every=2)
    sparse.update(module, step=0)
    module.w.data.fill_(3.0)
    sparse.update(module, step=1)  # skipped
    assert torch.equal(sparse.ema_tensors()["w"], torch.tensor([1.0, 2.0]))
    sparse.update(module, step=2)
    assert torch.equal(sparse.ema_tensors()["w"], torch.tensor([2.0, 2.5]))


def test_ema_swap_holds_ema_inside_and_restores_weights_bitwise() -> None:
    module, ema = _Params(), EMACallback(decay=0.5)
    ema.update(module, step=0)
    module.w.data.copy_(torch.tensor([0.1, 0.7]))
    ema.update(module, step=1)
    live = module.w.detach().clone()
    with ema.swap(module):
        assert torch.equal(module.w, ema.ema_tensors()["w"])
    assert torch.equal(module.w, live)


def test_ema_state_round_trips_into_a_fresh_callback() -> None:
    module, ema = _Params(), EMACallback(decay=0.5)
    ema.setup(None, module, "fit")  # type: ignore[arg-type]
    ema.update(module, step=0)
    module.w.data.fill_(-1.0)
    ema.update(module, step=1)
    state = ema.state_dict()
    restored = EMACallback(decay=0.5)
    restored.load_state_dict(state)
    restored.setup(None, _Params(), "fit")  # type: ignore[arg-type]
    restored._ensure(_Params())
    assert torch.equal(restored.ema_tensors()["w"], ema.ema_tensors()["w"])
    assert restored.num_updates == ema.num_updates == 2
    bad = EMACallback()
    bad.load_state_dict({"ema": {"other": torch.zeros(1)}})
    with pytest.raises(ValueError, match="missing"):
        bad._ensure(_Params())


def test_validation_runs_on_the_ema_weights_and_leaves_the_live_weights_alone() -> None:
    module, ema = SiTModule(**TINY_MODEL, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)), EMACallback(0.5)
    data = RandomLatentsDataModule()
    trainer = pl.Trainer(**trainer_kwargs(max_steps=2, callbacks=[ema]))
    trainer.fit(module, data)
    live = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.limit_val_batches = 1.0
    trainer.validate(module, data, verbose=False)
    with_ema = module.loss_profile.values
    assert all(torch.equal(v, live[k]) for k, v in module.state_dict().items())
    # the same validation on a plain module that holds the EMA tensors as its weights
    copy = SiTModule(**TINY_MODEL)
    copy.load_state_dict(ema.ema_tensors())
    pl.Trainer(**trainer_kwargs(limit_val_batches=1.0)).validate(copy, data, verbose=False)
    assert torch.equal(copy.loss_profile.values, with_ema)
    exported = module.network_state_dict()  # EMA weights, released key layout
    assert all(torch.equal(exported[k], ema.ema_tensors()[f"network.{k}"]) for k in exported)
    key = "final_layer.linear.weight"
    assert torch.equal(module.network_state_dict(use_ema=False)[key], live[f"network.{key}"])
    assert not torch.equal(exported[key], live[f"network.{key}"])
    SiTModule(**TINY_MODEL).network.load_state_dict(exported, strict=True)
    no_ema = SiTModule(**TINY_MODEL)
    no_ema.load_state_dict(live)
    pl.Trainer(**trainer_kwargs(limit_val_batches=1.0)).validate(no_ema, data, verbose=False)
    assert not torch.allclose(no_ema.loss_profile.values, with_ema)


def test_bf16_mixed_training_keeps_float32_weights_and_ema() -> None:
    """bf16 autocast (the configs' precision): the loss, the weights and the EMA stay float32."""
    module, ema = SiTModule(**TINY_MODEL), EMACallback(0.5)
    trainer = pl.Trainer(
        **trainer_kwargs(max_steps=2, precision="bf16-mixed", callbacks=[ema], deterministic=False)
    )
    trainer.fit(module, RandomLatentsDataModule())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert all(e.dtype == torch.float32 for e in ema.ema_tensors().values())
    trained = module.network.final_layer.linear.weight
    assert trained.abs().sum() > 0  # the optimizer stepped (zero-initialised layer moved)
