"""The documented extension point: a user's own interpolant (two schedules) used end to end.

The path below is defined by ``alpha`` and ``sigma`` only. The objective trains on it, the conversions
turn its exact noise prediction into a velocity, and the ODE sampler carries N(0, I) noise to the
data distribution, all without any code knowing the path.

A path also declares its ends (default eps, which end is clipped, a singular data end): the
objective, both samplers and the likelihood use exactly what it declares, observed here through
the times a recording model is called at.
"""

from __future__ import annotations

import math

import pytest
import torch

from gaussian_closed_form import exact_fields, rotated_gaussian
from sit_lightning.interpolants import DefaultEps, Interpolant, Linear
from sit_lightning.objective import TrainingObjective
from sit_lightning.sampling import ModelField, likelihood, sample_ode, sample_sde


class SquaredTrig(Interpolant):
    name = "squared_trig"

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * t) ** 2

    def sigma(self, t):
        return torch.cos(0.5 * math.pi * t) ** 2


class SteepVP(Interpolant):
    """VP's schedules with another beta range, written out: VP-like ends, but NOT a subclass of VP."""

    name = "steep_vp"
    # eps unlike both VP's and Linear's, so that the test sees which declaration was used
    velocity_eps = converted_eps = DefaultEps(train_eps=2e-4, sample_eps=2e-2)
    clips_noise_end = False  # alpha_0 = exp(-2.625) > 0
    singular_at_data = True  # sigma ~ sqrt(beta_min (1 - t)) near t = 1
    beta_min, beta_max = 0.5, 9.0

    def _log_alpha(self, t):
        s = 1 - t
        return -0.25 * s**2 * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min

    def alpha(self, t):
        return torch.exp(self._log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)))


def used_intervals(path: Interpolant, prediction: str) -> dict[str, tuple[float, float]]:
    """The (first, last) time each consumer of the path's ends actually evaluates a model at, by default.

    The model records every t it is called with; nobody passes t0 or t1.
    """
    seen: list[float] = []

    def model(x, t):  # a model of the given prediction type, differentiable in x for the likelihood
        seen.extend(t.tolist())
        return -0.5 * x

    def span(run) -> tuple[float, float]:
        seen.clear()
        run()
        return min(seen), max(seen)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64)
    objective = TrainingObjective(path, prediction)
    field = ModelField(model, path, prediction=prediction)
    ends = objective.time_from_base(torch.tensor([0.0, 1.0], dtype=torch.float64))
    return {
        "objective ends": (ends[0].item(), ends[1].item()),  # the base variates' ends land on t0, t1
        "objective draws": span(lambda: objective.loss(model, x, generator=g)),
        # heun evaluates both ends of every step, so the first and last times seen are t0 and t1
        "ode": span(lambda: sample_ode(field, x, method="heun", steps=3)),
        "sde": span(lambda: sample_sde(field, x, method="heun", steps=3, last_step="none", generator=g)),
        "likelihood": span(lambda: likelihood(field, x, method="heun", steps=3, divergence="exact")),
    }


@pytest.mark.parametrize("prediction", ["velocity", "noise"])
def test_vp_like_custom_path_gets_its_own_ends_everywhere(prediction: str) -> None:
    used = used_intervals(SteepVP(), prediction)
    train, sample = (0.0, 1 - 2e-4), (0.0, 1 - 2e-2)  # as declared: t = 0 unclipped, data end clipped
    assert used["objective ends"] == pytest.approx(train, abs=1e-15)
    t0, t1 = used["objective draws"]
    assert train[0] <= t0 and t1 <= train[1]
    for consumer in ("ode", "sde", "likelihood"):
        assert used[consumer] == pytest.approx(sample, abs=1e-15), consumer
    # ... which is not what Linear's policy gives
    linear = used_intervals(Linear(), prediction)
    for consumer in ("objective ends", "ode", "sde", "likelihood"):
        assert used[consumer] != pytest.approx(linear[consumer], abs=1e-6), consumer
    # and t1 = 1, where this path's velocity is infinite, is refused by name
    field = ModelField(lambda x, t: -0.5 * x, SteepVP(), prediction=prediction)
    with pytest.raises(ValueError, match="SteepVP has sigma_1 = 0"):
        likelihood(field, torch.zeros(1, 2), t1=1.0)


@pytest.mark.parametrize("prediction", ["velocity", "noise"])
def test_linear_like_custom_path_keeps_linear_ends(prediction: str) -> None:
    used = used_intervals(SquaredTrig(), prediction)
    linear = used_intervals(Linear(), prediction)
    eps = 0.0 if prediction == "velocity" else 1e-3  # released Linear: velocity (0, 0), noise (1e-3, 1e-3)
    for consumer in ("objective ends", "ode", "sde", "likelihood"):
        assert used[consumer] == pytest.approx(linear[consumer], abs=1e-15), consumer
        assert used[consumer] == pytest.approx((eps, 1 - eps), abs=1e-15), consumer
    t0, t1 = used["objective draws"]
    assert eps <= t0 and t1 <= 1 - eps


def test_custom_path_trains_and_samples_end_to_end() -> None:
    path = SquaredTrig()
    mean, cov = rotated_gaussian(2, seed=4)
    objective = TrainingObjective(path, "noise")
    # a custom path is treated like Linear/GVP: score/noise models clip both ends by 1e-3
    assert objective.train_interval() == (1e-3, 1 - 1e-3)

    def noise_model(x_t, t):  # the Bayes-optimal noise predictor for this path and data
        return exact_fields(path, mean, cov, x_t, t).noise

    # 1) training: the exact predictor has a lower loss than a slightly wrong one (paired Monte Carlo)
    g = torch.Generator().manual_seed(0)
    n = 40_000
    x_1 = mean + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    t = objective.sample_time(n, generator=g).double()
    x_0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    exact = objective.loss(noise_model, x_1, t=t, x_0=x_0).loss
    wrong = objective.loss(lambda x, tt: 1.2 * noise_model(x, tt), x_1, t=t, x_0=x_0).loss
    diff = wrong - exact
    assert diff.mean() > 5 * diff.std() / math.sqrt(n)

    # 2) sampling: noise model -> velocity by the path's conversions -> Heun ODE -> the data law.
    # t0 = 0 needs alpha = 0 handled: the noise->velocity conversion divides by alpha, so start at 1e-3.
    m = 20_000
    z = torch.randn(m, 2, generator=g, dtype=torch.float64)
    # x at t0 = 1e-3 is essentially noise (alpha = 2.5e-6); start there from exact x_t0 draws
    t0, t1 = 1e-3, 1.0 - 1e-3
    a0, s0 = (
        path.alpha(torch.tensor(t0, dtype=torch.float64)),
        path.sigma(torch.tensor(t0, dtype=torch.float64)),
    )
    x_data = mean + torch.randn(m, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    start = a0 * x_data + s0 * z
    field = ModelField(noise_model, path, prediction="noise")
    result = sample_ode(field, start, method="heun", steps=200, t0=t0, t1=t1)
    assert result.nfe == 400
    # at t1 the law is N(a1 m, a1^2 S + s1^2 I)
    a1, s1 = (
        path.alpha(torch.tensor(t1, dtype=torch.float64)),
        path.sigma(torch.tensor(t1, dtype=torch.float64)),
    )
    target_mean = a1 * mean
    target_cov = a1**2 * cov + s1**2 * torch.eye(2, dtype=torch.float64)
    samples = result.samples
    se_mean = torch.sqrt(torch.diag(target_cov) / m)
    assert torch.all((samples.mean(0) - target_mean).abs() < 4 * se_mean)
    emp_cov = torch.cov(samples.T)
    # SE of a covariance entry: sqrt((S_ii S_jj + S_ij^2) / m) for Gaussian data
    se_cov = torch.sqrt((torch.outer(torch.diag(target_cov), torch.diag(target_cov)) + target_cov**2) / m)
    assert torch.all((emp_cov - target_cov).abs() < 4 * se_cov)
