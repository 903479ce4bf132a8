"""SiTModule's wiring, checked against hand-built references: what training_step feeds the network, and
what ``sample`` builds (EMA weights, null class, guidance interval and channels, the w_KL,eta SDE).

A fresh SiT outputs exactly zero (adaLN-Zero), so with it a sample equals its noise and the loss does
not see the labels: every test here first makes the network non-trivial and asserts, as a
precondition, that the setting under test changes the result. Otherwise a module that ignored the
setting would pass.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from lightning_toy import TINY_MODEL

from sit_lightning.callbacks import EMACallback
from sit_lightning.module import SiTModule
from sit_lightning.randomness import keyed_randn
from sit_lightning.sampling import ModelField, SamplerSettings, WKLEta, sample_ode, sample_sde
from sit_lightning.sampling.guidance import ClassifierFreeGuidance

SEED = 3  # seed of the keyed sampling draws
INDICES = [10, 11, 12, 13, 14, 15]  # global sample indices: they key the noise
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])
ODE = dict(method="euler", steps=4)  # grid 0, 0.25, 0.5, 0.75, 1
SDE = dict(method="euler", steps=5)
CFG = 2.5
INTERVAL = (0.3, 0.7)  # of the Euler grid above only t = 0.5 lies inside
CHANNELS = 2  # of the 4 output channels
ETA = 0.1
PERTURB_STD = 0.2  # large enough that labels, guidance and EMA visibly change the samples
DROP_PROB = 0.5  # label dropout of the training-step test: a mask with many True and False entries


def _perturb(network: torch.nn.Module, seed: int) -> None:
    """Add seeded noise to every trainable weight (the zero-initialised adaLN and final layers too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            if p.requires_grad:
                p.add_(PERTURB_STD * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def module_with_ema() -> tuple[SiTModule, EMACallback]:
    """A non-trivial tiny module whose EMA (decay 0.5 over two weight states) differs from its weights."""
    module = SiTModule(**TINY_MODEL, seed=SEED)
    ema = EMACallback(decay=0.5)  # _sample passes it as ema= (in a fit, sample finds the trainer's)
    _perturb(module.network, seed=1)
    ema.update(module, step=0)  # a copy of these weights
    _perturb(module.network, seed=2)
    ema.update(module, step=1)  # the average of both states
    return module, ema


def _ema_network(module: SiTModule, ema: EMACallback) -> torch.nn.Module:
    """A copy of the network holding the EMA tensors, built without the module's swap."""
    network = copy.deepcopy(module.network).eval()
    prefix = "network."
    state = {k[len(prefix) :]: v for k, v in ema.ema_tensors().items() if k.startswith(prefix)}
    network.load_state_dict(state, strict=True)
    return network


def _live_network(module: SiTModule) -> torch.nn.Module:
    return copy.deepcopy(module.network).eval()


def _noise(module: SiTModule) -> torch.Tensor:
    return keyed_randn(module.latent_shape, SEED, "sample", 0, INDICES)


def _guided(network: Any, scale: float, **guidance: Any) -> Any:
    return network if scale == 1.0 else ClassifierFreeGuidance(network, scale, **guidance)


def _reference_ode(
    module: SiTModule,
    network: torch.nn.Module,
    scale: float = CFG,
    null_class: int | None = None,
    interval: tuple[float, float] | None = None,
    channels: int | None = None,
) -> torch.Tensor:
    """The ODE samples assembled by hand from the public sampling pieces."""
    null_class = module.network.num_classes if null_class is None else null_class
    net = _guided(network, scale, null_class=null_class, interval=interval, guidance_channels=channels)
    objective = module.objective
    field = ModelField(net, objective.interpolant, objective.prediction, y=LABELS)
    t0, t1 = objective.sample_interval()
    with torch.no_grad():
        return sample_ode(field, _noise(module), t0=t0, t1=t1, **ODE).samples


def _reference_sde(module: SiTModule, network: torch.nn.Module, diffusion: Any) -> torch.Tensor:
    """The SDE samples assembled by hand, with the normals of step k keyed by (SEED, "sample", k + 1)."""
    objective = module.objective
    field = ModelField(network, objective.interpolant, objective.prediction, y=LABELS)

    def normals(k: int, shape: torch.Size) -> torch.Tensor:
        return keyed_randn(shape[1:], SEED, "sample", k + 1, INDICES)

    with torch.no_grad():
        return sample_sde(field, _noise(module), diffusion=diffusion, normals=normals, **SDE).samples


def _sample(module: SiTModule, ema: EMACallback, use_ema: bool = True, **kwargs: Any) -> torch.Tensor:
    settings = SamplerSettings(**(dict(ODE, sampler="ode", cfg_scale=CFG) | kwargs))
    return module.sample(LABELS, settings, seed=SEED, indices=INDICES, use_ema=use_ema, ema=ema).samples


# ---- training_step -------------------------------------------------------------------------------
class _Optimizer:
    param_groups = [{"lr": 1e-4}]


class _Trainer:
    optimizers = [_Optimizer()]
    global_step = 5  # not 0: the draws must be those of the trainer's step


def test_training_step_feeds_the_network_the_batch_labels_and_the_keyed_draws() -> None:
    module = SiTModule(**TINY_MODEL)
    # the rate training_draws reads (set here, not in TINY_MODEL, so that TINY_MODEL is the only
    # place that knows the constructor's signature)
    module.network.class_dropout_prob = DROP_PROB
    num_classes = module.network.num_classes
    _perturb(module.network, seed=1)
    module.log = lambda *args, **kwargs: None  # no trainer attached
    module._trainer = _Trainer()  # type: ignore[assignment]
    n = 64
    g = torch.Generator().manual_seed(0)
    batch = {
        "x": torch.randn(n, *module.latent_shape, generator=g),
        "y": torch.randint(0, num_classes, (n,), generator=g),
        "key": torch.arange(100, 100 + n),
    }
    draws = module.training_draws(batch, step=_Trainer.global_step)
    # preconditions: labels that are not all equal and a mask that drops some labels but not all
    assert len(batch["y"].unique()) == num_classes
    assert draws.drop_labels.any() and not draws.drop_labels.all()

    calls: list[dict[str, Any]] = []
    forward = module.network.forward

    def spy(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        calls.append({"x": x.detach().clone(), "t": t.detach().clone(), "y": y.clone(), **kwargs})
        return forward(x, t, y, **kwargs)

    module.network.forward = spy  # type: ignore[method-assign]
    loss = module.training_step(batch, 0)
    del module.network.forward  # back to the class's forward

    assert len(calls) == 1
    call = calls[0]
    assert torch.equal(call["y"], batch["y"])
    assert call.get("drop_labels") is not None and torch.equal(call["drop_labels"], draws.drop_labels)
    assert torch.equal(call["t"], draws.t)
    x_t = module.objective.interpolant.interpolate(draws.x_0, batch["x"], draws.t)
    assert torch.equal(call["x"], x_t)
    # the loss is the objective's at those inputs, and with this network the labels change it
    kwargs = dict(t=draws.t, x_0=draws.x_0, drop_labels=draws.drop_labels)
    expected = module.objective.loss(module.network, batch["x"], y=batch["y"], **kwargs).loss.mean()
    assert torch.equal(loss, expected)
    other = module.objective.loss(module.network, batch["x"], y=(batch["y"] + 1) % num_classes, **kwargs)
    assert not torch.allclose(other.loss.mean(), expected)


# ---- sample: ODE with guidance --------------------------------------------------------------------
def test_preconditions_the_network_and_its_ema_are_non_trivial(module_with_ema) -> None:
    module, ema = module_with_ema
    live, averaged = _live_network(module), _ema_network(module, ema)
    x = _noise(module)
    t = torch.full((len(x),), 0.5)
    with torch.no_grad():
        out = live(x, t, LABELS)
        assert out.abs().min() > 0  # not the adaLN-Zero output
        assert not torch.allclose(out, live(x, t, (LABELS + 1) % module.network.num_classes), atol=1e-3)
        assert not torch.allclose(out, averaged(x, t, LABELS), atol=1e-3)
    # guidance and its scale change the samples
    guided = _reference_ode(module, live)
    assert not torch.allclose(guided, _reference_ode(module, live, scale=1.0), atol=1e-3)
    assert not torch.allclose(guided, _reference_ode(module, live, scale=1.5), atol=1e-3)


def test_sample_uses_the_ema_weights_and_the_null_class(module_with_ema) -> None:
    module, ema = module_with_ema
    live_before = {k: v.clone() for k, v in module.state_dict().items()}
    with_ema = _sample(module, ema)
    averaged = _ema_network(module, ema)
    reference = _reference_ode(module, averaged)
    assert torch.equal(with_ema, reference)
    # a wrong null class (a real class, here 0) would give other samples
    assert not torch.allclose(_reference_ode(module, averaged, null_class=0), reference, atol=1e-3)
    without = _sample(module, ema, use_ema=False)
    assert torch.equal(without, _reference_ode(module, _live_network(module)))
    assert not torch.allclose(without, with_ema, atol=1e-3)
    # sampling leaves the live weights alone
    assert all(torch.equal(v, live_before[k]) for k, v in module.state_dict().items())


def test_sample_guides_only_inside_the_interval(module_with_ema) -> None:
    module, ema = module_with_ema
    network = _ema_network(module, ema)
    reference = _reference_ode(module, network, interval=INTERVAL)
    assert torch.equal(_sample(module, ema, guidance_interval=INTERVAL), reference)
    assert not torch.allclose(reference, _reference_ode(module, network), atol=1e-3)


def test_sample_guides_only_the_first_channels(module_with_ema) -> None:
    module, ema = module_with_ema
    network = _ema_network(module, ema)
    reference = _reference_ode(module, network, channels=CHANNELS)
    assert torch.equal(_sample(module, ema, guidance_channels=CHANNELS), reference)
    assert not torch.allclose(reference, _reference_ode(module, network), atol=1e-3)


# ---- sample: the w_KL,eta SDE -----------------------------------------------------------------------
def test_w_kl_eta_sde_uses_the_loss_profile_and_eta(module_with_ema) -> None:
    module, ema = module_with_ema
    times = (torch.arange(20, dtype=torch.float32) + 0.5) / 20
    values = 0.05 + 2.0 * (1.0 - times) ** 2  # L_t falls steeply towards the data
    saved = module._profile
    module.on_load_checkpoint({"loss_profile": {"times": times, "values": values}})
    assert torch.equal(module.loss_profile.values, values)
    try:
        options = dict(SDE, sampler="sde", cfg_scale=1.0, diffusion="w_kl_eta")
        samples = _sample(module, ema, eta=ETA, **options)
        other_eta = _sample(module, ema, eta=4 * ETA, **options)
    finally:
        module._profile = saved
    network = _ema_network(module, ema)
    reference = _reference_sde(module, network, WKLEta(ETA, times.tolist(), values.tolist()))
    assert torch.equal(samples, reference)
    assert not torch.allclose(other_eta, samples, atol=1e-3)
    # precondition: the profile's values change the samples too
    flat = _reference_sde(module, network, WKLEta(ETA, times.tolist(), [float(values.mean())] * len(values)))
    assert not torch.allclose(flat, reference, atol=1e-3)
