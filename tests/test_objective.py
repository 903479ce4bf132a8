"""Training objective: closed-form targets, weights and losses, intervals, time samplers, released losses."""

from __future__ import annotations

import math

import pytest
import torch

from gaussian_closed_form import exact_fields, rotated_gaussian
from sit_lightning.interpolants import GVP, VP, Linear, make_interpolant
from sit_lightning.objective import (
    LogitNormalTimeSampler,
    TrainingObjective,
    UniformTimeSampler,
    default_eps,
)

COMBOS = [
    (path, prediction, weight)
    for path in ("linear", "gvp", "vp")
    for prediction, weight in (
        ("velocity", "none"),
        ("score", "none"),
        ("score", "velocity"),
        ("score", "likelihood"),
        ("noise", "none"),
        ("noise", "velocity"),
        ("noise", "likelihood"),
    )
]


def test_default_eps_table_matches_released() -> None:
    assert default_eps(Linear(), "velocity") == (0.0, 0.0)
    assert default_eps(GVP(), "velocity") == (0.0, 0.0)
    assert default_eps(Linear(), "score") == (1e-3, 1e-3)
    assert default_eps(GVP(), "noise") == (1e-3, 1e-3)
    for prediction in ("velocity", "score", "noise"):
        assert default_eps(VP(), prediction) == (1e-5, 1e-3)


def test_intervals_follow_released_table_and_respect_user_values() -> None:
    assert TrainingObjective("linear", "velocity").train_interval() == (0.0, 1.0)
    assert TrainingObjective("gvp", "score").train_interval() == (1e-3, 1 - 1e-3)
    assert TrainingObjective("vp", "velocity").train_interval() == (0.0, 1 - 1e-5)
    assert TrainingObjective("vp", "score").sample_interval() == (0.0, 1 - 1e-3)
    # the released code silently forces (0, 0) for Linear/GVP velocity; a user value is kept here
    obj = TrainingObjective("linear", "velocity", train_eps=0.01, sample_eps=0.02)
    assert obj.train_interval() == (0.01, 0.99)
    assert obj.sample_interval() == (0.02, 0.98)
    # setting only train_eps keeps the default sample_eps (the released code crashed here)
    obj = TrainingObjective("vp", "score", train_eps=1e-4)
    assert (obj.train_eps, obj.sample_eps) == (1e-4, 1e-3)


def test_time_samplers_stay_in_interval_and_follow_their_law() -> None:
    g = torch.Generator().manual_seed(0)
    obj = TrainingObjective("gvp", "noise")
    t = obj.sample_time(50_000, generator=g)
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3
    # uniform: mean and variance of U[t0, t1]
    t0, t1 = obj.train_interval()
    n = t.numel()
    assert abs(t.mean().item() - (t0 + t1) / 2) < 4 * (t1 - t0) / math.sqrt(12 * n)
    # logit-normal: logit(u) ~ N(mean, std)
    sampler = LogitNormalTimeSampler(mean=0.5, std=0.8)
    u = sampler.sample_unit(50_000, generator=g).double()
    z = torch.log(u) - torch.log1p(-u)
    assert abs(z.mean().item() - 0.5) < 4 * 0.8 / math.sqrt(u.numel())
    assert abs(z.std().item() - 0.8) < 4 * 0.8 / math.sqrt(2 * u.numel())
    obj = TrainingObjective("linear", "velocity", time_sampler=sampler, train_eps=0.1)
    t = obj.sample_time(10_000, generator=g)
    assert t.min() >= 0.1 and t.max() <= 0.9


def test_time_samplers_are_maps_of_standard_variates() -> None:
    """``from_base`` is the sampler's law as a map, and the objective's ``time_from_base`` rescales it."""
    z = torch.linspace(-4, 4, 101, dtype=torch.float64)
    sampler = LogitNormalTimeSampler(mean=0.5, std=0.8)
    assert sampler.base == "normal" and UniformTimeSampler.base == "uniform"
    torch.testing.assert_close(
        sampler.from_base(z), 1 / (1 + torch.exp(-(0.5 + 0.8 * z))), rtol=1e-12, atol=0
    )
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(UniformTimeSampler().from_base(u), u)
    obj = TrainingObjective("vp", "score")  # train interval (0, 1 - 1e-5)
    t0, t1 = obj.train_interval()
    torch.testing.assert_close(obj.time_from_base(u), t0 + (t1 - t0) * u, rtol=1e-12, atol=0)
    # sample_unit is from_base of the generator's variates of the right kind
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(sampler.sample_unit(7, generator=g1), sampler.from_base(torch.randn(7, generator=g2)))


def test_a_custom_time_sampler_writes_only_its_map_and_a_valid_base() -> None:
    from sit_lightning.objective import TimeSampler

    class Cosh(TimeSampler):
        base = "normal"

        def from_base(self, z):
            return torch.sigmoid(2 * z)

    g = torch.Generator().manual_seed(0)
    assert Cosh().sample_unit(5, generator=g).shape == (5,)
    with pytest.raises(TypeError, match=r"Bad.base must be one of \('uniform', 'normal'\); got 'beta'"):

        class Bad(TimeSampler):
            base = "beta"

            def from_base(self, z):
                return z


def test_weights_closed_form_for_linear() -> None:
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    w_vel = TrainingObjective("linear", "score", "velocity").weight(t)
    w_lik = TrainingObjective("linear", "noise", "likelihood").weight(t)
    torch.testing.assert_close(w_vel, 1 / t**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(w_lik, 1 / (t * (1 - t)), rtol=1e-12, atol=0)
    # VP: drift variance is beta_t / 2, so the likelihood weight is beta_t / (2 sigma_t^2)
    vp = VP()
    w = TrainingObjective(vp, "score", "likelihood").weight(t)
    torch.testing.assert_close(w, vp.beta(t) / (2 * vp.sigma(t) ** 2), rtol=1e-12, atol=0)


# ---- closed forms, independent of the package (issue 9) ------------------------------------------
# Golden losses skip where ../shared/golden is missing, so every target and weighting is also pinned
# here: alpha, sigma and their derivatives are written out in float64 and never read from the package.
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0
CLOSED_FORM_T = torch.tensor([0.07, 0.23, 0.41, 0.58, 0.76, 0.93], dtype=torch.float64)
CLOSED_FORM_SHAPE = (6, 2, 3, 3)


def closed_form_coefficients(path: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(alpha, sigma, d_alpha, d_sigma)`` of a built-in path at ``t`` (t = 1 data), in closed form."""
    if path == "linear":
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
    if path == "gvp":
        half_pi = math.pi / 2
        return (
            torch.sin(half_pi * t),
            torch.cos(half_pi * t),
            half_pi * torch.cos(half_pi * t),
            -half_pi * torch.sin(half_pi * t),
        )
    assert path == "vp"
    s = 1 - t
    log_alpha = -(s**2) * (VP_BETA_MAX - VP_BETA_MIN) / 4 - s * VP_BETA_MIN / 2
    d_log_alpha = s * (VP_BETA_MAX - VP_BETA_MIN) / 2 + VP_BETA_MIN / 2  # d/dt, with ds/dt = -1
    alpha = torch.exp(log_alpha)
    sigma = torch.sqrt(1 - alpha**2)
    d_alpha = alpha * d_log_alpha
    return alpha, sigma, d_alpha, -alpha * d_alpha / sigma  # sigma^2 + alpha^2 = 1


def closed_form_target_and_weight(
    path: str, prediction: str, weight: str, x_0: torch.Tensor, x_1: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The regression target ``(N, ...)`` and the loss weight ``lambda_t`` ``(N,)`` of the module table."""
    alpha, sigma, d_alpha, d_sigma = closed_form_coefficients(path, t)
    g = sigma * (d_alpha * sigma / alpha - d_sigma)  # drift variance, w_KL / 2
    lam = {"none": torch.ones_like(t), "velocity": (g / sigma) ** 2, "likelihood": g / sigma**2}[weight]
    b = (-1,) + (1,) * (x_1.dim() - 1)
    target = {
        "velocity": d_alpha.view(b) * x_1 + d_sigma.view(b) * x_0,
        "noise": x_0,
        "score": -x_0 / sigma.view(b),
    }[prediction]
    return target, lam


def closed_form_loss(
    path: str,
    prediction: str,
    weight: str,
    out: torch.Tensor,
    x_0: torch.Tensor,
    x_1: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """``(N,)`` per-sample loss: ``lambda_t`` times the mean over non-batch dims of the squared residual."""
    target, lam = closed_form_target_and_weight(path, prediction, weight, x_0, x_1, t)
    residual = out - target
    if prediction == "score":  # the table's |sigma out + x_0|^2 = sigma^2 |out - target|^2
        sigma = closed_form_coefficients(path, t)[1]
        residual = sigma.view((-1,) + (1,) * (out.dim() - 1)) * residual
    return lam * residual.pow(2).mean(dim=(1, 2, 3))


def closed_form_draws(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise, data and a random network output (not the target, so a wrong target shows)."""
    g = torch.Generator().manual_seed(seed)
    x_0, x_1, out = (torch.randn(CLOSED_FORM_SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    return x_0, x_1, out


@pytest.mark.parametrize(("path", "prediction", "weight"), COMBOS)
def test_loss_target_and_weight_match_closed_form(path: str, prediction: str, weight: str) -> None:
    """Every path x prediction x weighting: ``loss_from_prediction``, ``target``, ``weight`` and ``loss``."""
    x_0, x_1, out = closed_form_draws(seed=11)
    t = CLOSED_FORM_T
    obj = TrainingObjective(path, prediction, weight)
    target, lam = closed_form_target_and_weight(path, prediction, weight, x_0, x_1, t)
    expected = closed_form_loss(path, prediction, weight, out, x_0, x_1, t)
    assert not torch.allclose(expected, torch.zeros_like(expected))  # a random output, far from the target
    torch.testing.assert_close(obj.weight(t), lam, rtol=1e-10, atol=0)
    torch.testing.assert_close(obj.target(x_0, x_1, t), target, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(obj.loss_from_prediction(out, x_0, x_1, t), expected, rtol=1e-10, atol=0)
    # the full loss with given draws and a network that returns ``out`` (computed in float32)
    result = obj.loss(lambda x_t, tt: out, x_1, t=t, x_0=x_0)
    alpha, sigma = closed_form_coefficients(path, t)[:2]
    b = (-1, 1, 1, 1)
    torch.testing.assert_close(result.x_t, alpha.view(b) * x_1 + sigma.view(b) * x_0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.target, target, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.loss.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
@pytest.mark.parametrize("prediction", ["score", "noise"])
def test_velocity_weighting_equals_the_velocity_loss_of_the_converted_output(
    path: str, prediction: str
) -> None:
    """SiT paper Sec. 3.2: lambda_t = (g_t / sigma_t)^2 makes a score (or noise) loss the velocity loss.

    Independent of the written-out weights: the output is converted to a velocity by the path's own
    converter and scored by the unweighted velocity objective.
    """
    x_0, x_1, out = closed_form_draws(seed=12)
    t = CLOSED_FORM_T
    weighted = TrainingObjective(path, prediction, "velocity")
    x_t = weighted.interpolant.interpolate(x_0, x_1, t)
    v = weighted.interpolant.convert(out, x_t, t, prediction, "velocity")
    v_loss = TrainingObjective(path, "velocity").loss_from_prediction(v, x_0, x_1, t)
    torch.testing.assert_close(weighted.loss_from_prediction(out, x_0, x_1, t), v_loss, rtol=1e-9, atol=0)


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
@pytest.mark.parametrize("prediction", ["score", "noise"])
def test_likelihood_weighting_is_half_w_kl_times_the_score_error(path: str, prediction: str) -> None:
    """The maximum-likelihood weighting: the loss is (w_KL / 2) |s - s*|^2, the score error weighted by g_t."""
    x_0, x_1, out = closed_form_draws(seed=13)
    t = CLOSED_FORM_T
    obj = TrainingObjective(path, prediction, "likelihood")
    x_t = obj.interpolant.interpolate(x_0, x_1, t)
    score = obj.interpolant.convert(out, x_t, t, prediction, "score")
    score_error = (score - TrainingObjective(path, "score").target(x_0, x_1, t)).pow(2).flatten(1).mean(1)
    expected = obj.interpolant.w_kl(t) / 2 * score_error
    torch.testing.assert_close(obj.loss_from_prediction(out, x_0, x_1, t), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize(("path", "prediction", "weight"), COMBOS)
def test_loss_at_the_target_is_zero(path: str, prediction: str, weight: str) -> None:
    x_0, x_1, _ = closed_form_draws(seed=14)
    t = CLOSED_FORM_T
    obj = TrainingObjective(path, prediction, weight)
    loss = obj.loss_from_prediction(obj.target(x_0, x_1, t), x_0, x_1, t)
    torch.testing.assert_close(loss, torch.zeros_like(loss), rtol=0, atol=1e-20)


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
@pytest.mark.parametrize("weight", ["velocity", "likelihood"])
def test_velocity_prediction_rejects_a_weighting(path: str, weight: str) -> None:
    with pytest.raises(ValueError, match=f"loss_weight='{weight}' applies to score and noise models only"):
        TrainingObjective(path, "velocity", weight)


@pytest.mark.parametrize(("path", "prediction", "weight"), COMBOS)
def test_exact_field_minimises_loss(path: str, prediction: str, weight: str) -> None:
    """Monte Carlo on Gaussian data: the exact field has a lower loss than perturbed fields, by > 5 SE."""
    torch.manual_seed(0)
    mean, cov = rotated_gaussian(3, seed=1)
    g = torch.Generator().manual_seed(3)
    n = 80_000
    x_1 = mean + torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    obj = TrainingObjective(path, prediction, weight)
    t = obj.sample_time(n, generator=g).double()
    x_0 = torch.randn(n, 3, generator=g, dtype=torch.float64)

    def exact(x_t, tt):
        return getattr(exact_fields(obj.interpolant, mean, cov, x_t, tt), prediction)

    perturbations = {
        "offset": lambda x_t, tt: exact(x_t, tt) + 0.5,
        "scale": lambda x_t, tt: exact(x_t, tt) * 1.25,
        "nonlinear": lambda x_t, tt: exact(x_t, tt) + 0.5 * torch.sin(3 * x_t),
    }
    base = obj.loss(exact, x_1, t=t, x_0=x_0).loss
    for name, field in perturbations.items():
        diff = obj.loss(field, x_1, t=t, x_0=x_0).loss - base  # paired: same t, noise, data
        gap, se = diff.mean().item(), diff.std().item() / math.sqrt(n)
        assert gap > 5 * se, f"{name}: gap {gap:.3g} is not > 5 x SE {se:.3g}"


def test_loss_uses_given_draws_and_generator() -> None:
    obj = TrainingObjective("linear", "velocity")
    x_1 = torch.randn(6, 2, 4, 4)

    def model(x, t):
        return torch.zeros_like(x)

    a = obj.loss(model, x_1, generator=torch.Generator().manual_seed(5))
    b = obj.loss(model, x_1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.t, b.t)
    t = torch.full((6,), 0.25)
    x_0 = torch.randn_like(x_1)
    out = obj.loss(model, x_1, t=t, x_0=x_0)
    torch.testing.assert_close(out.x_t, 0.25 * x_1 + 0.75 * x_0)
    torch.testing.assert_close(out.loss, (x_1 - x_0).pow(2).flatten(1).mean(1))
    assert out.loss.shape == (6,)


def test_bad_choices_raise_with_the_options() -> None:
    with pytest.raises(ValueError, match="prediction must be one of .*got 'eps'"):
        TrainingObjective("linear", "eps")
    with pytest.raises(ValueError, match="loss_weight must be one of .*got 'snr'"):
        TrainingObjective("linear", "noise", "snr")
    with pytest.raises(ValueError, match="score and noise models only"):
        TrainingObjective("linear", "velocity", "likelihood")
    with pytest.raises(ValueError, match="train_eps must be in"):
        TrainingObjective("linear", "velocity", train_eps=0.7)
    with pytest.raises(ValueError, match="std must be a positive"):
        LogitNormalTimeSampler(std=0.0)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        TrainingObjective().loss(lambda x, t: x, torch.zeros(2, 3), t=torch.zeros(3))
    assert isinstance(TrainingObjective().time_sampler, UniformTimeSampler)


def test_golden_losses(golden: dict, golden_model_config: dict) -> None:
    """Every loss.* case of the released code on its tiny model, with the same t, noise and data."""
    from sit_lightning.models import SiT

    model = SiT(**golden_model_config).eval()
    model.load_state_dict(
        {k[len("model.") :]: v for k, v in golden.items() if k.startswith("model.")}, strict=True
    )
    cases = [k for k in golden if k.startswith("loss.") and k.count(".") == 3]
    assert len(cases) == 9
    for key in cases:
        _, path, prediction, weight = key.split(".")
        obj = TrainingObjective(make_interpolant(path), prediction, weight)
        with torch.no_grad():
            out = obj.loss(
                model, golden["loss.x1"], t=golden["loss.t"], x_0=golden["loss.x0"], y=golden["loss.y"]
            )
        ref = golden[key]
        assert ((out.loss - ref).norm() / ref.norm()).item() < 1e-5, key


# ---- golden data policy (issue 9) -------------------------------------------------------------
@pytest.mark.parametrize("ci", ["1", "true", "True", "yes"])
def test_missing_golden_data_fails_under_ci(golden_policy, tmp_path, monkeypatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="golden data not found at .*CI is set"):
        golden_policy(tmp_path / "sit_released_golden.safetensors")


@pytest.mark.parametrize("ci", [None, "", "0", "false"])
def test_missing_golden_data_skips_locally(golden_policy, tmp_path, monkeypatch, ci: str | None) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="golden data not found at"):
        golden_policy(tmp_path / "sit_released_golden.safetensors")
    present = tmp_path / "present.safetensors"
    present.write_bytes(b"")
    assert golden_policy(present) == present
